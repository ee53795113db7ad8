"""Starting a dragon Process: what ``Process.start()`` does under the 'dragon' start method.

The child is pickled as with 'spawn' (preparation data, then the Process object: the child imports the main
module as ``__mp_main__``) and started as a managed process (``dragon.globalservices.process.create``), forked
from its node's zygote when it can be (``ProcessOptions(zygote=True)``). The pickles go in the child's
environment, or through a channel when they are big. The child gets this process's environment, except what is
the runtime's or, on another node, that node's own (``DRAGON_*``, Slurm's and MPI's variables).

The sentinel is a real file descriptor, as ``multiprocessing.connection.wait()`` needs: for a child on this
node, a pidfd (readable when it exits); for a child elsewhere, the read end of a pipe whose write end is
closed when global services reports the exit (``ExitWatcher``, one thread per parent watching all its remote
children).
"""

import base64
import fcntl
import itertools
import json
import marshal
import os
import select
import signal
import stat
import struct
import sys
import threading
import time
from multiprocessing import context as _mpctx
from multiprocessing import resource_tracker, spawn, util

from dragon import env as E
from dragon.errors import ChannelError, NotSupported, ProcessError
from dragon.mp import heap, serial

BOOT = "from dragon.mp._child import main; main()"
BOOT_ENV, BOOT_CD_ENV, PARENT_ENV = E.MP_BOOT, E.MP_BOOT_CD, E.MP_PARENT  # see dragon/env.py
TRACKER_ENV, STATUS_ENV, INHERIT_ENV = E.MP_TRACKER, E.MP_STATUS_CD, E.MP_INHERIT
STATUS_MAGIC = 0x5A
_STATUS = struct.Struct("<Bq")
BOOT_ENV_MAX = 64 * 1024
# variables a child does not take from its parent: the runtime's (set by the child's shepherd), and, for a
# child on another node, what describes the parent's node or its place in Slurm/MPI
_NOT_INHERITED = ("DRAGON_",)
_NODE_LOCAL = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_", "I_MPI_", "HOSTNAME")
_PASSED_DRAGON = (E.MP_HEAP_SIZE, E.ZYGOTE_PRELOAD, E.LOG, E.REQUEST_TIMEOUT)

_rr = itertools.count()
_nodes = None


def _node_count():
    global _nodes
    if _nodes is None:
        from dragon.globalservices import node

        _nodes = len(node.get_list())
    return _nodes


def pick_node(process_obj):
    from dragon.mp.context import chosen_node

    node = chosen_node(process_obj)
    if node is not None:
        return node
    n = _node_count()
    return (heap.here() + next(_rr)) % n if n > 1 else heap.here()


def child_env(node):
    here = node == heap.here()
    env = {}
    for k, v in os.environ.items():
        if k.startswith(_NOT_INHERITED) and not k.startswith(_PASSED_DRAGON):
            continue
        if not here and k.startswith(_NODE_LOCAL):
            continue
        env[k] = v
    return env


class _Held:
    """What a Popen keeps for its child: descriptors the child reopens (until it exits), the boot channel, the
    sentinel (until the Popen is closed). Apart from the Popen, so that its finalizer holds no reference to
    it."""

    __slots__ = ("fds", "chans", "sentinel", "wakeup", "status")

    def __init__(self):
        self.fds, self.chans = [], []
        self.sentinel = self.wakeup = self.status = None

    def child_done(self):
        fds, self.fds = self.fds, []
        chans, self.chans = self.chans, []
        for fd in fds:
            os.close(fd)
        for ch in chans:
            try:
                ch.destroy()
            except ChannelError:
                pass
        w, self.wakeup = self.wakeup, None
        if w is not None:
            os.close(w)
        st, self.status = self.status, None
        if st is not None:
            try:
                st.destroy()
            except ChannelError:
                pass

    def close(self):
        self.child_done()
        fd, self.sentinel = self.sentinel, None
        if fd is not None:
            os.close(fd)


class _ProcFd:
    """A descriptor of the parent that a child on the same node reopens through /proc (multiprocessing's
    DupFd: a heap arena, a file). The parent keeps its copy open until the child has exited."""

    def __init__(self, pid, fd):
        self.pid, self.fd = pid, fd
        self.mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE

    def detach(self):
        fd = os.open(f"/proc/{self.pid}/fd/{self.fd}", self.mode | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        return fd


class DragonPopen:
    method = "dragon"

    def __init__(self, process_obj):
        util._flush_std_streams()
        self.returncode = None
        self.finalizer = None
        self._left = False  # it runs on in a runtime this process left (keep=True): not to be asked about
        self._held = _Held()
        self._launch(process_obj)

    # multiprocessing's reducers ask the Popen for file descriptors (a heap arena, the resource tracker's
    # pipe): a child on this node reopens them through /proc; a child on another node cannot have them
    def duplicate_for_child(self, fd):
        if self.node != heap.here():
            raise NotSupported(
                f"file descriptor {fd} cannot be passed to a process on node {self.node}: use a dragon "
                "Queue/Pipe/Value, or place the process on this node (node=, dragon.mp.placement)"
            )
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise NotSupported(
                f"a socket (file descriptor {fd}) cannot be passed to a dragon process: use a dragon Pipe"
            )
        dup = os.dup(fd)
        self._held.fds.append(dup)
        return dup

    def DupFd(self, fd):
        return _ProcFd(os.getpid(), fd)

    def _launch(self, process_obj):
        from dragon.globalservices import process
        from dragon.globalservices.process import ProcessOptions
        from dragon.mp.util import runtime

        runtime()
        self.node = pick_node(process_obj)
        env = child_env(self.node)
        env[PARENT_ENV] = f"{os.environ.get(E.PUID, '0')}:{heap.here()}:{os.getpid()}"
        prep = spawn.get_preparation_data(process_obj._name)
        main_code = _main_code(prep)
        if main_code is not None:
            prep["dragon_main_code"] = main_code
        # a writer of a pipe among the arguments announces its copy when pickled: if the process is not made,
        # that copy never exists and must not keep the pipe's reader waiting for it
        with serial.undo_if_failed():
            _mpctx.set_spawning_popen(self)
            try:
                prep = serial.dumps(prep)
                payload = len(prep).to_bytes(8, "little") + prep + serial.dumps(process_obj)
                tracker = resource_tracker._resource_tracker._fd
                if tracker is not None and _same_host(self.node):  # share it, as 'spawn' does
                    dup = os.dup(tracker)
                    self._held.fds.append(dup)
                    env[TRACKER_ENV] = f"{os.getpid()}:{dup}"
            except BaseException:
                self._held.close()
                raise
            finally:
                _mpctx.set_spawning_popen(None)
            if len(payload) <= BOOT_ENV_MAX:
                env[BOOT_ENV] = base64.b64encode(payload).decode()
            else:
                ch = heap.channel(capacity=1, block_size=64)
                self._held.chans.append(ch)
                ch.send(payload)
                env[BOOT_CD_ENV] = bytes(ch.sdesc).hex()
            if (
                self.node == heap.here()
            ):  # the child says its exit code here: no round trip through GS to learn it
                self._held.status = heap.channel(capacity=1, block_size=16)
                env[STATUS_ENV] = bytes(self._held.status.sdesc).hex()
            env[INHERIT_ENV] = inherited(self.node == heap.here())
            exe = os.fsdecode(spawn.get_executable())
            args = [*util._args_from_interpreter_flags(), "-c", BOOT]
            try:
                desc = process.create(
                    exe, os.getcwd(), args, env=env, options=ProcessOptions(node=self.node, zygote=True)
                )
            except BaseException:
                self._held.close()
                raise
        self.pid = desc.pid
        self.p_uid = desc.p_uid
        if desc.node == heap.here():
            try:
                self.sentinel = os.pidfd_open(desc.pid)
            except ProcessLookupError:  # gone already (its exit code comes from global services)
                self.sentinel = _ready_fd()
        else:
            self.sentinel, self._held.wakeup = os.pipe()
            watcher().add(self)
        self._held.sentinel = self.sentinel
        self.finalizer = util.Finalize(self, self._held.close)

    def _exited(self, code):
        """The child has exited with code (from global services)."""
        if self.returncode is None:
            self.returncode = code
        self._held.child_done()

    def _from_status(self):
        """The exit code the child said before exiting (it has exited: its pidfd is readable), or None if it
        did not say (killed by a signal): then global services knows it."""
        st = self._held.status
        if st is None:
            return None
        try:
            data = st.recv(timeout=0)
        except ChannelError:
            return None
        if len(data) != _STATUS.size:
            return None
        magic, code = _STATUS.unpack(data)
        return code if magic == STATUS_MAGIC else None

    def poll(self, flag=os.WNOHANG):
        if self.returncode is None and not self._left:
            if self._held.wakeup is None:  # a child on this node: its pidfd says whether it exited
                if not _readable(self.sentinel, 0):
                    return None
                code = self._from_status()
                if code is not None:
                    self._exited(code)
                    return code
                return self.wait(None)
            return self.wait(0)
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None and not self._left:
            from dragon.globalservices import process

            if timeout is not None:
                timeout = max(0.0, timeout)
            if self._held.wakeup is None and self.sentinel is not None:
                if not _readable(self.sentinel, timeout):
                    return None
                code = self._from_status()
                if code is not None:
                    self._exited(code)
                    return code
                timeout = None  # it has exited: global services will know at once
            code = process.join(self.p_uid, timeout)
            if code is not None:
                self._exited(code)
        return self.returncode

    def _signal(self, sig):
        if self._left:
            raise ProcessError(
                f"process {self.pid} was left running in a runtime this process has left (keep=True): "
                "it cannot be signalled from here"
            )
        if self.returncode is None:
            from dragon.globalservices import process

            try:
                process.kill(self.p_uid, sig)
            except ProcessError:
                if self.wait(0) is None:  # it has not exited: a real failure
                    raise

    def terminate(self):
        self._signal(signal.SIGTERM)

    def kill(self):
        self._signal(signal.SIGKILL)

    def close(self):
        if self.finalizer is not None:
            self.finalizer()
        w = _watcher
        if w is not None:
            w.discard(self)


_main_cache = {}


_HOSTS: dict[int, str] = {}  # node index -> its host name (asked of global services once)


def _same_host(node):
    """Whether node ``node`` is this host (this node, or a virtual node beside it). A child on this host
    shares this process's resource tracker (through /proc): one of its own would unlink, when the child
    ends, every shared_memory segment the child merely attached (one /dev/shm holds all of a host's)."""
    here = heap.here()
    if node == here:
        return True
    from dragon.globalservices import node as gs_node

    for k in (node, here):
        if k not in _HOSTS:
            _HOSTS[k] = gs_node.query(k).hostname
    return _HOSTS[node] == _HOSTS[here]


def _main_code(prep):
    """The main script compiled (marshal), for a child that imports it as __mp_main__: compiling it again in
    every child is most of a child's start. None when the child cannot use it (another interpreter, a main
    module imported by name) or the file cannot be read; cached per file version."""
    path = prep.get("init_main_from_path")
    if path is None or os.path.realpath(os.fsdecode(spawn.get_executable())) != os.path.realpath(
        sys.executable
    ):
        return None
    try:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        code = _main_cache.get(key)
        if code is None:
            with open(path, "rb") as f:
                source = f.read()
            code = marshal.dumps(compile(source, path, "exec", dont_inherit=True))
            _main_cache.clear()
            _main_cache[key] = code
        return code
    except (OSError, SyntaxError, ValueError):
        return None


def _readable(fd, timeout):
    """Whether fd becomes readable within timeout seconds (None: wait). Signals get through (PEP 475)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    if timeout is None:
        return bool(p.poll())
    deadline = time.monotonic() + timeout
    while True:
        if p.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            return True
        if time.monotonic() >= deadline:
            return False


def _ready_fd():
    r, w = os.pipe()
    os.close(w)
    return r


class ExitWatcher:
    """One thread per process that watches its children on other nodes (multi_join on all of them) and closes
    the write end of each one's sentinel pipe when it exits. A child added while a multi_join is pending is
    included in the next one (at most WATCH_PERIOD later); join() and poll() close the pipe at once anyway."""

    WATCH_PERIOD = 0.25

    def __init__(self):
        self.lock = threading.Condition()
        self.popens = {}  # p_uid -> DragonPopen
        self.thread = threading.Thread(target=self._run, name="dragon-mp-exit-watcher", daemon=True)
        self.thread.start()

    def add(self, popen):
        with self.lock:
            self.popens[popen.p_uid] = popen
            self.lock.notify()

    def discard(self, popen):
        with self.lock:
            self.popens.pop(popen.p_uid, None)

    def _run(self):
        from dragon.globalservices import process

        while True:
            with self.lock:
                while not self.popens:
                    self.lock.wait()
                uids = list(self.popens)
            try:
                exited, _ = process.multi_join(uids, timeout=self.WATCH_PERIOD)
            except Exception:
                exited = None
                threading.Event().wait(self.WATCH_PERIOD)
            for p_uid, code in exited or ():
                with self.lock:
                    popen = self.popens.pop(p_uid, None)
                if popen is not None:
                    popen._exited(code)


_watcher = None
_watcher_lock = threading.Lock()


def _forget(h):
    """This process leaves runtime h (``dragon.shutdown()``; see ``dragon.mp.util``). Its children there
    end with it (a local runtime ends everything, a client's processes are released: SIGKILL) or, kept
    (``keep=True``), run on out of its reach; either way nothing asks the next runtime about them (their
    p_uids name other processes there, which a join or a kill would reach). Those that already exited
    keep their own exit code. The node count was that runtime's too."""
    global _nodes
    import multiprocessing.process as mpp

    kept = h.mode == "connected" and h.keep
    for p in list(mpp._children):
        popen = getattr(p, "_popen", None)
        if type(popen) is not DragonPopen or popen.returncode is not None or popen._left:
            continue
        try:
            code = popen.poll()
        except Exception:
            code = None
        if code is not None:
            continue
        if kept:
            popen._left = True
            popen._held.child_done()
            mpp._children.discard(p)
        else:
            popen._exited(-signal.SIGKILL)
    w = _watcher
    if w is not None:
        with w.lock:
            w.popens.clear()
    _nodes = None


def watcher():
    global _watcher
    with _watcher_lock:
        if _watcher is None or not _watcher.thread.is_alive():
            _watcher = ExitWatcher()
        return _watcher


def _parent_sentinel():
    """An fd that becomes readable when this process's parent exits (for multiprocessing.parent_process())."""
    try:
        p_uid, node, pid = (int(x) for x in os.environ[PARENT_ENV].split(":"))
    except (KeyError, ValueError):
        return None
    if node == heap.here():
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError:
            return _ready_fd()
    if not p_uid:
        return None
    r, w = os.pipe()

    def watch():
        from dragon.globalservices import process

        try:
            process.join(p_uid)
        finally:
            os.close(w)

    threading.Thread(target=watch, name="dragon-mp-parent-watcher", daemon=True).start()
    return r


_RLIMITS = None  # the resource module's RLIMIT_* names (see inherited)


def inherited(same_node):
    """What a 'spawn' child inherits of this process and a child forked from the node's zygote would not:
    umask, niceness, resource limits, ignored signals and (on this node) the CPU affinity, as text for
    INHERIT_ENV (the child applies it with apply_inherited before anything of the program runs)."""
    import resource

    global _RLIMITS
    if _RLIMITS is None:  # (once: this runs at every start)
        _RLIMITS = [n for n in dir(resource) if n.startswith("RLIMIT_")]
    mask = os.umask(0)
    os.umask(mask)
    limits = {}
    for name in _RLIMITS:
        try:
            limits[name] = resource.getrlimit(getattr(resource, name))
        except (OSError, ValueError):
            pass
    ignored = [int(s) for s in signal.valid_signals() if _ignored(s)]
    state = {"umask": mask, "nice": os.getpriority(os.PRIO_PROCESS, 0), "rlimits": limits, "ignored": ignored}
    if same_node:
        state["cpus"] = sorted(os.sched_getaffinity(0))
    return json.dumps(state, separators=(",", ":"))


def _ignored(sig):
    try:
        return signal.getsignal(sig) == signal.SIG_IGN
    except (ValueError, OSError):
        return False


def apply_inherited(text):
    """In the child: take on what the parent had (see inherited). What this process may not do (raise a hard
    limit, lower its niceness without privilege, run on a CPU it may not use) is left as the zygote had it."""
    import resource

    state = json.loads(text)
    os.umask(state["umask"])
    for name, (soft, hard) in state["rlimits"].items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            if resource.getrlimit(which) != (soft, hard):
                resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError):
            pass
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) != state["nice"]:
            os.setpriority(os.PRIO_PROCESS, 0, state["nice"])
    except OSError:
        pass
    for sig in state["ignored"]:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (OSError, ValueError):
            pass
    if "cpus" in state:
        try:
            os.sched_setaffinity(0, state["cpus"])
        except (OSError, ValueError):
            pass
