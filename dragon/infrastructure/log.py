"""Service logging: one line per event on stderr, naming the component, node and pid. Warnings and errors
only, unless DRAGON_LOG=debug (or info). Deliberately not the logging module: services start on the critical
path of every job, and this costs nothing to import."""

import os
import sys

from dragon import env

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    def __init__(self, component, node=0):
        self.component, self.node = component, node
        self.level = _LEVELS.get(os.environ.get(env.LOG, "warning").lower(), 30)

    def _emit(self, level, name, text, args):
        if level < self.level:
            return
        if args:
            text = text % args
        line = f"dragon {self.component}[node {self.node} pid {os.getpid()}] {name}: {text}\n"
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def debug(self, text, *args):
        self._emit(10, "DEBUG", text, args)

    def info(self, text, *args):
        self._emit(20, "INFO", text, args)

    def warning(self, text, *args):
        self._emit(30, "WARNING", text, args)

    def error(self, text, *args):
        self._emit(40, "ERROR", text, args)

    def exception(self, text, *args):
        import traceback

        self._emit(40, "ERROR", text + "\n" + traceback.format_exc().rstrip(), args)


def get_logger(component, node=0):
    return Logger(component, node)
