"""A runtime without a program, serving clients: ``dragon-launch --serve`` and the background runtime of
``dragon.init()``.

``dragon-launch --serve`` (alone, under mpiexec, or under srun on every node) starts the runtime and, once
it is up, node 0's launcher writes the connection file (dragon.infrastructure.connect) and prints its path.
Clients on node 0's host attach with ``dragon.init(connect=FILE)``. It runs until ``dragon-launch --stop
FILE`` (which sends node 0's launcher SIGTERM and waits for its end), Ctrl-C, SIGTERM, scancel or the time
limit; then it tears the job down like any other and removes the file.

``dragon.init()`` in a plain python starts ``python -m launcher.serve --owner PID START --ready-fd FD``: a
single-node launcher in a session of its own (Ctrl-C in the client's terminal is the client's), which
writes the connection info to the pipe FD instead of a file and ends the runtime when its owner (the
client) ends, however it ends, or when the owner sends it SIGTERM (``dragon.shutdown()``).
"""

import argparse
import json
import os
import signal
import sys
import time

from dragon.errors import RuntimeNotFound
from dragon.infrastructure import connect
from launcher.runtime import EXIT_SERVICE_FAILED, GRACE, log

STOP_WAIT = 60.0  # seconds --stop waits for the runtime's end


class Serving:
    """How a launcher serves: where the connection info goes (connect_file, or the pipe ready_fd), and owner:
    (pid, start time) of the process whose end ends the runtime, or None."""

    def __init__(self, connect_file=None, ready_fd=None, owner=None):
        self.connect_file, self.ready_fd, self.owner = connect_file, ready_fd, owner
        self.written = None

    def ready(self, info):
        """The runtime is up: hand out the connection info."""
        if self.ready_fd is not None:
            with os.fdopen(self.ready_fd, "w") as f:
                f.write(json.dumps(info) + "\n")
            self.ready_fd = None
            return
        path = self.connect_file or connect.default_path(info["job"])
        self.written = connect.write(path, info)
        print(
            f"dragon-launch: serving job {info['job']} on {info['nodes']} node(s); connection file:\n"
            f"{self.written}\n"
            f"attach from {info['host']}: dragon.init(connect={self.written!r}) "
            f"or DRAGON_CONNECT={self.written}; "
            f"stop: dragon-launch --stop {self.written}",
            flush=True,
        )

    def fail(self, why):
        """The runtime did not come up: tell the owner waiting on the pipe."""
        if self.ready_fd is not None:
            try:
                with os.fdopen(self.ready_fd, "w") as f:
                    f.write(json.dumps({"error": why}) + "\n")
            except OSError:
                pass
            self.ready_fd = None

    def done(self):
        if self.written is not None:
            connect.remove(self.written, os.getpid())
            self.written = None


def stop(path):
    """dragon-launch --stop FILE: end the runtime that wrote FILE (SIGTERM to node 0's launcher) and wait for
    it. -> exit status: 0 once it ended, 1 if there is none."""
    try:
        info = connect.read(path)
        connect.check(path, info)
    except RuntimeNotFound as e:
        log(f"--stop: {e}")
        if os.path.exists(path):
            try:
                info = connect.read(path)
                if info["host"] == os.uname().nodename and not connect.alive(info):
                    os.unlink(path)  # its runtime is gone (SIGKILLed): the file would only mislead
            except (RuntimeNotFound, OSError):
                pass
        return 1
    os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while connect.alive(info):
        if time.monotonic() > deadline:
            log(f"--stop: job {info['job']} (launcher pid {info['pid']}) still runs after {STOP_WAIT:g} s")
            return 1
        time.sleep(0.05)
    return 0


def run(ns_grace, serving):
    """Serve on this node alone (no MPI). -> exit status."""
    from launcher.runtime import Runtime, local_world

    nodes, me = local_world()
    rt = Runtime(nodes, me, grace=ns_grace)
    try:
        code = rt.run(None, (), serving=serving)
    finally:
        serving.done()
    if code and rt.failed:
        serving.fail(rt.failed)
    return code


def main(argv=None):
    """The background runtime of dragon.init() (not a user command: dragon-launch --serve is)."""
    p = argparse.ArgumentParser(prog="python -m launcher.serve", description=__doc__)
    p.add_argument("--owner", nargs=2, type=int, required=True, metavar=("PID", "START"))
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--grace", type=float, default=GRACE)
    ns = p.parse_args(argv)
    serving = Serving(ready_fd=ns.ready_fd, owner=tuple(ns.owner))
    try:
        code = run(ns.grace, serving)
    except BaseException as e:  # noqa: BLE001 (the owner must hear why, whatever it was)
        serving.fail(f"{type(e).__name__}: {e}")
        code = EXIT_SERVICE_FAILED
    serving.fail("the runtime ended before it was up")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
