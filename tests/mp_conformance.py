"""CPython's own multiprocessing test suite (``test._test_multiprocessing``, shipped with the interpreter),
its ``processes`` tests, for one start method: ``dragon-launch tests/mp_conformance.py dragon`` or ``python
tests/mp_conformance.py spawn`` (the baseline on the same machine). The suite is run, not copied: its test
classes are built by its own ``install_tests_in_module_dict``.

Every test has a time limit (``--timeout``, default 60 s): a watchdog thread interrupts a test that overruns
(SIGUSR2 in the main thread; the suite itself uses SIGALRM and SIGUSR1) and it counts as an error. The tests
the dragon start method cannot pass by design are skipped with their reason: SKIP_DRAGON below is the only
list. Prints one line per test that did not pass, then ``RESULT {json}`` with the counts."""

import argparse
import json
import signal
import sys
import threading
import time
import unittest

import dragon  # noqa: F401  (registers the start method before the suite captures multiprocessing's names)

# test id (class.method, without the With prefix's start-method-independent part) -> why dragon cannot pass it
_SEND_HANDLE = "reduction.send_handle over the connection (see test_fd_transfer)"
SKIP_DRAGON = {
    "WithProcessesTestConnection.test_fd_transfer": "sends a file descriptor over the connection's socket "
    "(SCM_RIGHTS, reduction.send_handle): a dragon connection is a channel, not a socket",
    "WithProcessesTestConnection.test_large_fd_transfer": _SEND_HANDLE,
    "WithProcessesTestConnection.test_missing_fd_transfer": _SEND_HANDLE,
    "WithProcessesTestPicklingConnections.test_pickling": "sends a socket through a connection: a socket is "
    "a file descriptor, which a process that may run on another node cannot receive",
}


# the suite's classes, built here at import: a child imports this script as __mp_main__ to unpickle them
METHOD = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "spawn"
import test._test_multiprocessing as _suite  # noqa: E402

_suite.install_tests_in_module_dict(globals(), METHOD, only_type="processes")


class _Timeout(Exception):
    pass


def _on_usr2(signum, frame):
    raise _Timeout("the test ran over its time limit")


class _Result(unittest.TextTestResult):
    """Counts, and a watchdog per test."""

    def __init__(self, *a, limit=60.0, **kw):
        super().__init__(*a, **kw)
        self.limit = limit
        self.passed = []
        self._timer = None
        self.durations = []

    def startTest(self, test):
        super().startTest(test)
        self._t0 = time.monotonic()
        main = threading.main_thread().ident
        self._timer = threading.Timer(self.limit, signal.pthread_kill, (main, signal.SIGUSR2))
        self._timer.daemon = True
        self._timer.start()

    def stopTest(self, test):
        self._timer.cancel()
        self.durations.append((time.monotonic() - self._t0, test.id()))
        super().stopTest(test)

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed.append(test.id())


def _skip(suite, reasons):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            _skip(t, reasons)
            continue
        key = ".".join(t.id().split(".")[-2:])
        if key in reasons:
            setattr(t, t._testMethodName, unittest.skip(reasons[key])(getattr(t, t._testMethodName)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", help="start method: dragon, spawn, forkserver or fork")
    ap.add_argument("-k", dest="pattern", action="append", help="only tests whose id contains this")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per test (default 60)")
    ap.add_argument("-v", action="store_true", help="one line per test")
    args = ap.parse_args()
    signal.signal(signal.SIGUSR2, _on_usr2)

    ns = globals()
    loader = unittest.TestLoader()
    if args.pattern:
        loader.testNamePatterns = [f"*{p}*" for p in args.pattern]
    suite = unittest.TestSuite()
    for name, obj in sorted(ns.items()):
        if name.startswith("With") and isinstance(obj, type) and issubclass(obj, unittest.TestCase):
            suite.addTests(loader.loadTestsFromTestCase(obj))
    if args.method == "dragon":
        _skip(suite, SKIP_DRAGON)
    ns["setUpModule"]()
    t0 = time.monotonic()
    try:
        runner = unittest.TextTestRunner(
            stream=sys.stderr,
            verbosity=2 if args.v else 1,
            resultclass=lambda *a, **kw: _Result(*a, limit=args.timeout, **kw),
        )
        res = runner.run(suite)
    finally:
        ns["tearDownModule"]()
    for test, _ in res.failures:
        print("FAIL", test.id(), flush=True)
    for test, _ in res.errors:
        print("ERROR", test.id(), flush=True)
    summary = {
        "method": args.method,
        "run": res.testsRun,
        "passed": len(res.passed),
        "failed": len(res.failures),
        "errors": len(res.errors),
        "skipped": len(res.skipped),
        "seconds": round(time.monotonic() - t0, 1),
        "passed_ids": sorted(res.passed),
        "slowest": [(round(d, 2), t) for d, t in sorted(res.durations, reverse=True)[:10]],
    }
    print("RESULT " + json.dumps(summary), flush=True)
    return 0 if res.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
