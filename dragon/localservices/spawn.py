"""Starting a managed process with one ``posix_spawn`` call instead of ``subprocess.Popen``.

Popen's own Python work (its argument checks, the environment encoded again, a pipe for exec errors and the
file objects around them) takes about 60 us of the ~160 us a start costs the shepherd; ``os.posix_spawn``
does the same vfork-and-exec in C and returns the exec's error, as Popen's error pipe does. What a child
gets from Popen, it gets here too:

- its own process group, so that it can be signalled as a whole; in the shepherd's session, not a session of
  its own (see ``own_group``), unless it reads a terminal;
- SIGPIPE and SIGXFSZ back to their default action (Python ignores them; Popen's ``restore_signals``);
- no file descriptor but 0, 1 and 2. Popen closes every other one in the child (``close_fds``); here no
  other one is inheritable: Python opens every descriptor close-on-exec (PEP 446), the dragon code that runs
  in a shepherd's process never makes one inheritable, and the ones the process inherited when it started
  (a shell's, mpiexec's) are made close-on-exec by ``seal_inherited`` when the shepherd starts.

Used only for a program given by a path (with a '/': Popen would search the child's PATH) that runs in the
shepherd's own working directory (``os.posix_spawn`` has no chdir before Python 3.13); the shepherd starts
anything else with Popen. ``SpawnedChild`` has the part of Popen's interface the shepherd uses.
"""

import os
import signal
import subprocess
import sys
import threading

_DEFAULT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, n))
_stdin = None  # /dev/null, for every child's stdin


def seal_inherited():
    """Make every descriptor above 2 that this process holds close-on-exec (the ones it inherited: a
    shell's, mpiexec's; no child of the runtime should get them, and Popen would not have passed them)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
            except OSError:  # (the listing's own descriptor, closed by now)
                pass


def child_ends(stdout, stderr):
    """The descriptors for a child's stdout and stderr, given as Popen takes them (None: the parent's own,
    PIPE, DEVNULL, a file, and STDOUT for stderr): -> (out_r, out_w, err_r, err_w), where *_r is a pipe's
    read end the parent keeps (or None) and *_w the descriptor to hand the child (or None: it inherits the
    parent's), which the caller closes once the child has it. Nothing is left open if it raises."""
    made = []

    def end(how):
        if how is None:
            return None, None
        if how == subprocess.PIPE:
            r, w = os.pipe()
            made.extend((r, w))
            return r, w
        w = os.open(os.devnull, os.O_WRONLY) if how == subprocess.DEVNULL else os.dup(how.fileno())
        made.append(w)
        return None, w

    try:
        out_r, out_w = end(stdout)
        if stderr == subprocess.STDOUT:
            err_r, err_w = None, os.dup(out_w if out_w is not None else 1)  # 1: the parent's own stdout
            made.append(err_w)
        else:
            err_r, err_w = end(stderr)
    except BaseException:
        for fd in made:
            os.close(fd)
        raise
    return out_r, out_w, err_r, err_w


def eligible(exe, run_dir):
    """Whether ``exe`` can be started here rather than with Popen (see the module's docstring)."""
    try:
        return "/" in exe and run_dir == os.getcwd()
    except OSError:  # (our own directory was removed: Popen starts it in run_dir, or says why it cannot)
        return False


class SpawnedChild:
    """A process started by ``spawn``: pid, stdout/stderr (read ends, or None), wait(), send_signal()."""

    def __init__(self, pid, stdout, stderr):
        self.pid = pid
        self.stdout, self.stderr = stdout, stderr
        self.returncode = None
        self.pidfd = os.pidfd_open(pid)  # the shepherd's IO thread watches (and closes) this one
        try:
            self._sigfd = os.dup(self.pidfd)  # signals go through a pidfd: never to a reused pid
        except OSError:
            os.close(self.pidfd)
            raise
        self._lock = threading.Lock()  # a signal and the reaping (two threads) never cross

    def wait(self):
        """The exit code (-N for signal N). Called once the pidfd said the child exited."""
        with self._lock:
            if self.returncode is None:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
                os.close(self._sigfd)
        return self.returncode

    def send_signal(self, sig):
        with self._lock:
            if self.returncode is None:
                try:
                    signal.pidfd_send_signal(self._sigfd, sig)
                except ProcessLookupError:  # (ended: nothing left to signal, as subprocess.Popen)
                    pass


def own_group(stdin_null):
    """How a managed process is set apart, as Popen keywords: its own process group (signalled as a whole, and
    out of reach of mpiexec's kill of the launcher's group and of Ctrl-C in the launcher's terminal), in the
    shepherd's session, which is the launcher's. Not a session of its own: with the kernel's autogroup
    scheduling (a CPU share per session) a process in a session of its own competes with its node's transport
    agent as a separate group, its waits' yields to the agent let nobody run and it sleeps on every wait
    instead (cross-node 8 B round trip under dragon-launch: 40.6-43.9 -> 26.8-29.6 us; futex sleeps 20,900 ->
    ~500 in 21,000 waits). A process that reads the shepherd's stdin when that is a terminal (the head process
    of a launch from a shell) still gets a session of its own: in a background group of the terminal's
    session it would be stopped (SIGTTIN). Popen's process_group needs Python 3.11; before it, a session."""
    return {"start_new_session": True} if _own_session(stdin_null) else {"process_group": 0}


def _own_session(stdin_null):
    """own_group's rule: a session of its own for a child that reads a terminal, or without process_group."""
    return (not stdin_null and _isatty(0)) or sys.version_info < (3, 11)


def _isatty(fd):
    try:
        return os.isatty(fd)
    except OSError:
        return False


def spawn(argv, env, stdin_null, stdout, stderr):
    """Start ``argv`` (argv[0] a path) with environment ``env`` in this process's working directory.
    stdin_null: stdin from /dev/null (else inherited); stdout/stderr as Popen takes them (None: inherited,
    PIPE, DEVNULL, STDOUT for stderr, or a file). Raises OSError if it cannot start (nothing is left open)."""
    global _stdin
    if _stdin is None:
        _stdin = os.open(os.devnull, os.O_RDONLY)  # (close-on-exec; dup2 into 0 clears that there)
    out_r, out_w, err_r, err_w = child_ends(stdout, stderr)
    actions = [(os.POSIX_SPAWN_DUP2, _stdin, 0)] if stdin_null else []
    actions += [(os.POSIX_SPAWN_DUP2, w, target) for w, target in ((out_w, 1), (err_w, 2)) if w is not None]
    try:
        apart = {"setsid": True} if _own_session(stdin_null) else {"setpgroup": 0}
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsigdef=_DEFAULT_SIGNALS, **apart)
    except BaseException:
        for fd in (out_r, err_r):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w):
            if fd is not None:
                os.close(fd)
    out, err = (None if fd is None else open(fd, "rb", buffering=0) for fd in (out_r, err_r))  # noqa: SIM115
    try:
        return SpawnedChild(pid, out, err)
    except OSError:  # (no pidfd: out of descriptors) a child nobody watches must not run on
        os.kill(pid, signal.SIGKILL)  # (our unreaped child: its pid cannot have been reused)
        os.waitpid(pid, 0)
        for f in (out, err):
            if f is not None:
                f.close()
        raise
