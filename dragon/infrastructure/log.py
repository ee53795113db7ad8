"""Service logging: to stderr, warnings and errors only unless DRAGON_LOG=debug (or info), naming the component,
node and pid of every line."""

import logging
import os
import sys


def get_logger(component, node=0):
    name = f"dragon.{component}"
    logger = logging.getLogger(name)
    if not logger.handlers:
        level = os.environ.get("DRAGON_LOG", "warning").upper()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"dragon {component}[node {node} pid %(process)d] %(levelname)s: %(message)s")
        )
        logger.addHandler(handler)
        logger.setLevel(getattr(logging, level, logging.WARNING))
        logger.propagate = False
    return logger
