"""dragon.globalservices.process: start, find, signal and join managed processes (the spec's Process
Services).

Every call asks global services and is safe to call from several threads at once. Outside dragon-launch, calls
raise RuntimeNotFound.
"""

import os
import signal as _signal

from dragon.errors import ProcessError
from dragon.infrastructure import checks
from dragon.infrastructure import client as _client
from dragon.infrastructure import messages as _m
from dragon.infrastructure.descriptors import ProcessDescriptor, ProcessOptions

ProcessInfo = ProcessDescriptor  # the spec's other name for it (query's rtype)

__all__ = [
    "create",
    "get_list",
    "query",
    "kill",
    "join",
    "multi_join",
    "this_process",
    "ProcessDescriptor",
    "ProcessInfo",
    "ProcessOptions",
    "ProcessError",
]


def create(exe, run_dir, args, env=None, user_name="", options=None, soft=False):
    """Start ``exe args`` in ``run_dir`` ('' or None: the caller's working directory) as a managed process,
    with ``env`` added to the inherited environment. ``user_name`` must be unique in the job (one is picked if
    empty); with ``soft=True`` an existing process of that name is returned instead of an error. ``options``:
    a ProcessOptions, a dict initializer, or None. Returns when the process has started; raises ProcessError
    if it cannot start or the arguments are wrong."""
    exe = os.fspath(exe) if isinstance(exe, os.PathLike) else exe
    if run_dir is None or run_dir == "":
        run_dir = os.getcwd()
    if not isinstance(run_dir, (str, os.PathLike)):
        raise ProcessError(f"run_dir must be a str or path, not {run_dir!r}")
    run_dir = os.path.abspath(os.fspath(run_dir))
    if args is None:
        args = []
    if isinstance(args, (list, tuple)):
        args = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in args]
    args = checks.command(exe, args, env, ProcessError)
    checks.name_soft(user_name, soft, ProcessError)
    opts = ProcessOptions.make(options)
    d = _client.call(
        _m.GSProcessCreate,
        ProcessError,
        exe=exe,
        run_dir=run_dir,
        args=args,
        env=env,
        user_name=user_name or None,
        options=opts.to_wire(),
        soft=soft,
        head=False,
    )
    return ProcessDescriptor.from_wire(d)


def get_list():
    """[(p_uid, user_name)] of every process currently running in the job."""
    return [tuple(x) for x in _client.call(_m.GSProcessList, ProcessError)]


def query(identifier):
    """The ProcessDescriptor of a process, by p_uid (int) or user_name (str); ProcessError if there is
    none."""
    return ProcessDescriptor.from_wire(
        _client.call(_m.GSProcessQuery, ProcessError, ident=checks.ident(identifier, ProcessError))
    )


def kill(identifier, sig=_signal.SIGKILL):
    """Send signal ``sig`` (default SIGKILL) to a running process. ProcessError if it is unknown, has exited,
    or sig is not a signal."""
    checks.signum(sig, ProcessError)
    _client.call(_m.GSProcessKill, ProcessError, ident=checks.ident(identifier, ProcessError), sig=int(sig))


def join(identifier, timeout=None):
    """Wait until the process exits; return its exit code (-N if signal N killed it), or None if ``timeout``
    seconds (measured by global services) pass first. Joining yourself raises ProcessError."""
    return _client.call(
        _m.GSProcessJoin,
        ProcessError,
        server_wait=True,
        ident=checks.ident(identifier, ProcessError),
        timeout=checks.timeout(timeout, ProcessError),
    )


def multi_join(identifiers, timeout=None):
    """Wait until at least one of the processes has exited, or ``timeout`` seconds (measured by global
    services).

    Returns ``(exited, status)``: ``exited`` is a list of ``(p_uid, exit_code)`` of every listed process that
    has exited, or None if none had when the timeout passed; ``status`` is a dict p_uid -> ProcessDescriptor
    of every listed process. Joining yourself raises ProcessError."""
    idents = checks.idents(identifiers, ProcessError)
    r = _client.call(
        _m.GSProcessMultiJoin,
        ProcessError,
        server_wait=True,
        idents=idents,
        timeout=checks.timeout(timeout, ProcessError),
    )
    exited = None if r["exited"] is None else [tuple(x) for x in r["exited"]]
    return exited, {int(k): ProcessDescriptor.from_wire(v) for k, v in r["status"].items()}


def this_process():
    """The calling process's own ProcessDescriptor."""
    p_uid = _client.my_puid()
    _client.connection()  # RuntimeNotFound outside dragon-launch
    if not p_uid:
        raise ProcessError("this process is not a managed process of the job")
    return query(p_uid)
