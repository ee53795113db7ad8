"""The argument rules of the runtime's API, in one place.

The client API (``dragon.globalservices.*``) checks what a caller passes before anything is sent, and global
services checks the same again on what arrives (a request may come from any process; the codec checks only the
fields' types). Each check raises the error class it is given, with a message that names the argument, and
returns the value in the form the runtime uses.
"""

import signal as _signal

_VALID_SIGNALS = {int(s) for s in _signal.valid_signals()}


def timeout(value, err):
    """None (wait forever) or a number >= 0 (not a bool, not NaN) -> None or float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # (also NaN)
        raise err(f"timeout must be None or a number >= 0, not {value!r}")
    return float(value)


def ident(value, err, what="process", uid="p_uid"):
    """A uid (int) or a user_name (str) of a process, pool or channel."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise err(f"a {what} identifier is a {uid} (int) or a name (str), not {value!r}")
    return value


def idents(value, err, what="process", uid="p_uid", call="multi_join"):
    """A non-empty list (or tuple) of identifiers -> list."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise err(f"{call} needs a non-empty list of identifiers, not {value!r}")
    return [ident(v, err, what, uid) for v in value]


def node(value, err, nnodes=None, what="node"):
    """None (the caller's node) or a node index (int >= 0, and < nnodes when the number of nodes is known)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise err(f"{what} must be None or a node index (int >= 0), not {value!r}")
    if nnodes is not None and value >= nnodes:
        raise err(f"{what}: no node {value} (the job has nodes 0..{nnodes - 1})")
    return value


def name_soft(user_name, soft, err):
    """The rules every create shares: a str name or None, a bool soft, and soft only with a name."""
    if user_name is not None and not isinstance(user_name, str):
        raise err(f"user_name must be a str or None, not {user_name!r}")
    if not isinstance(soft, bool):
        raise err(f"soft must be a bool, not {soft!r}")
    if soft and not user_name:
        raise err("soft create needs a user_name")


def positive_int(value, err, what):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise err(f"{what} must be a positive int, not {value!r}")
    return value


def signum(value, err):
    """A signal number this system knows (not 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in _VALID_SIGNALS:
        raise err(f"not a signal: {value!r}")
    return value


def command(exe, args, env, err):
    """What a process is started with: a non-empty exe, a list of str args, an env of str to str (names
    without '=') or None. Paths are the caller's to turn into str (os.fspath) first."""
    if not isinstance(exe, str) or not exe:
        raise err(f"exe must be a non-empty str or path, not {exe!r}")
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
        raise err(f"args must be a list of str, not {args!r}")
    if not all(isinstance(a, str) for a in args):
        raise err(f"args must be a list of str, not {args!r}")
    if env is not None and (
        not isinstance(env, dict)
        or not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items())
    ):
        raise err(f"env must be a dict of str to str (names without '='), not {env!r}")
    return list(args)
