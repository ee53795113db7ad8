"""The start of a dragon Process: ``python -c "from dragon.mp._child import main; main()"``, usually forked
from its node's zygote (which has imported this module and what it needs).

As with 'spawn': the preparation data is unpickled and applied first (sys.path, the working directory, the
main module imported as ``__mp_main__``), then the Process object, then it runs. It ends like a forked
multiprocessing child: the process's own exit steps (its atexit handlers, multiprocessing's finalizers, stdio
flushed), then ``os._exit`` (a full interpreter teardown in a forked process costs ~20 ms of copy-on-write
faults for nothing). A daemon Process also watches its parent and terminates itself when the parent is gone.
"""

import atexit
import base64
import marshal
import multiprocessing  # noqa: F401 (registers the start method: dragon's import hook, or register() below)
import os
import pickle
import runpy
import signal
import sys
import threading
import types
from multiprocessing import process, resource_tracker, spawn, util

import dragon  # noqa: F401
from dragon.errors import ChannelError
from dragon.mp import context, heap, popen

# what the zygote preloads along with this module: the modules a child usually needs
import dragon.mp.connection  # noqa: F401, E402  isort: skip
import dragon.mp.queues  # noqa: F401, E402  isort: skip
import dragon.mp.synchronize  # noqa: F401, E402  isort: skip
import dragon.mp.pool  # noqa: F401, E402  isort: skip
import pkgutil  # noqa: F401, E402  isort: skip  (spawn.prepare imports the main module with runpy, which uses it)


def _payload():
    text = os.environ.pop(popen.BOOT_ENV, None)
    if text is not None:
        return base64.b64decode(text)
    ch = heap.attach(bytes.fromhex(os.environ.pop(popen.BOOT_CD_ENV)))
    try:
        return ch.recv(timeout=60)
    finally:
        ch.close()


def _prepare(prep):
    """spawn.prepare, except that the main script arrives compiled from the parent (when it could send it):
    __mp_main__ is made as spawn makes it (runpy's way of running a script), without compiling it again."""
    code = prep.pop("dragon_main_code", None)
    path = prep.get("init_main_from_path")
    if code is None or path is None:
        return spawn.prepare(prep)
    del prep["init_main_from_path"]
    spawn.prepare(prep)
    current = sys.modules["__main__"]
    if os.path.splitext(os.path.basename(path))[0] == "ipython" or getattr(current, "__file__", None) == path:
        return  # as spawn._fixup_main_from_path
    spawn.old_main_modules.append(current)
    main_module = types.ModuleType("__mp_main__")
    content = runpy._run_module_code(marshal.loads(code), None, "__mp_main__", pkg_name="", script_name=path)
    main_module.__dict__.update(content)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main_module


def _share_tracker():
    """Use the parent's resource tracker (as 'spawn' does), when the parent passed it (same node)."""
    text = os.environ.pop(popen.TRACKER_ENV, None)
    if text:
        pid, fd = text.split(":")
        try:
            fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # the parent is gone: this process starts its own tracker if it needs one
        os.set_blocking(fd, True)
        resource_tracker._resource_tracker._fd = fd


def _watch_parent(sentinel):
    """A daemon Process ends when its parent does (even one that was killed)."""
    import select

    def watch():
        select.select([sentinel], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="dragon-mp-daemon-watch", daemon=True).start()


def main():
    text = os.environ.pop(popen.INHERIT_ENV, None)
    if text:  # (first: the parent's umask, limits, niceness, affinity, ignored signals, as 'spawn' has)
        popen.apply_inherited(text)
    context.register()
    _share_tracker()
    data = memoryview(_payload())
    n = int.from_bytes(data[:8], "little")
    process.current_process()._inheriting = True
    try:
        _prepare(pickle.loads(data[8 : 8 + n]))
        obj = pickle.loads(data[8 + n :])
    finally:
        del process.current_process()._inheriting
    text = os.environ.pop(popen.STATUS_ENV, None)
    status = None
    if text:
        try:
            status = heap.attach(bytes.fromhex(text))
        except ChannelError:  # the parent was killed, its heap gone with it: global services has the exit
            pass
    sentinel = popen._parent_sentinel()
    if obj.daemon and sentinel is not None:
        _watch_parent(sentinel)
    code = obj._bootstrap(parent_sentinel=sentinel)
    try:
        atexit._run_exitfuncs()
    finally:
        util._flush_std_streams()
        # (what the OS keeps of the code, as a spawn child's parent sees it: sys.exit(257) -> 1, -1 -> 255)
        code &= 0xFF
        _say_exit(status, code)
        os._exit(code)


def _say_exit(status, code):
    """Tell the parent (on this node) the exit code, so it need not ask global services."""
    if status is None:
        return
    try:
        status.send(popen._STATUS.pack(popen.STATUS_MAGIC, code), timeout=0)
    except Exception:  # the parent is gone, or its heap: global services still knows
        pass
