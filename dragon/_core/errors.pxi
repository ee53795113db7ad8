# ---------------------------------------------------------------------------------------------- errors
cdef str _rc_name(int rc):
    return {DS_OK: "OK", DS_FULL: "FULL", DS_EMPTY: "EMPTY", DS_TIMEOUT: "TIMEOUT", DS_TOO_BIG: "TOO_BIG",
            DS_DESTROYED: "DESTROYED", DS_CORRUPT: "CORRUPT", DS_INTR: "INTR", DS_BADARG: "BADARG",
            DS_TOO_SMALL: "TOO_SMALL", DS_STALE: "STALE", DS_BUSY: "BUSY", DS_LOCKED: "LOCKED",
            DS_BADSLOT: "BADSLOT"}.get(rc, str(rc))


cdef int _raise(int rc, int kind, str what, uint64_t detail=0) except -1:
    """The one place that turns a C return code into the documented exception."""
    if kind == K_POOL:
        if rc == DS_FULL:
            raise PoolFull(f"{what}: no room for {detail} bytes right now")
        if rc == DS_TIMEOUT:
            raise PoolTimeout(f"{what}: no room for {detail} bytes before the timeout")
        if rc == DS_TOO_BIG:
            raise PoolError(f"{what}: {detail} bytes is more than the pool could ever hold")
        if rc == DS_DESTROYED:
            raise PoolError(f"{what} was destroyed")
        if rc == DS_BADARG:
            raise PoolError(f"{what}: offset {detail} is not an allocated block")
        if rc == DS_STALE:
            raise PoolError(f"{what}: stale sdesc (the pool was destroyed and recreated)")
        if rc == DS_CORRUPT:
            raise PoolError(f"{what}: corrupt pool header or mutex")
        if rc == DS_BUSY:
            raise PoolFull(f"{what}: its lock is held by another process (stopped?): no allocation right now")
        if rc == DS_LOCKED:
            raise PoolTimeout(f"{what}: its lock stayed held by another process (stopped?) until the timeout")
        raise PoolError(f"{what}: error {_rc_name(rc)}")
    if rc == DS_FULL:
        raise ChannelFull(f"{what} is full")
    if rc == DS_EMPTY:
        raise ChannelEmpty(f"{what} is empty")
    if rc == DS_TIMEOUT:
        raise ChannelTimeout(f"{what}: timed out")
    if rc == DS_TOO_BIG:
        raise ChannelError(f"{what}: a {detail}-byte message is more than its pool could ever hold")
    if rc == DS_DESTROYED:
        raise ChannelError(f"{what} was destroyed")
    if rc == DS_TOO_SMALL:
        raise ChannelError(f"{what}: receive buffer too small for the next message ({detail} bytes); "
                           f"the message stays queued")
    if rc == DS_STALE:
        raise ChannelError(f"{what}: stale sdesc (the channel or its pool was destroyed and recreated)")
    if rc == DS_BADARG:
        raise ChannelError(f"{what}: the sdesc does not point at an allocated block of its pool")
    if rc == DS_CORRUPT:
        raise ChannelError(f"{what}: corrupt channel header or slot state")
    if rc == DS_BADSLOT:
        raise ChannelError(f"{what}: a corrupt message slot (scribbled shared memory?) was dropped; the "
                           f"channel goes on")
    if rc == DS_BUSY:
        raise ChannelFull(f"{what}: the lock of its pool is held by another process (stopped?)")
    if rc == DS_LOCKED:
        raise ChannelTimeout(f"{what}: the lock of its pool stayed held by another process (stopped?) until "
                             f"the timeout")
    raise ChannelError(f"{what}: error {_rc_name(rc)}")


cdef long long _int(object value, object err, str what) except? -1:
    """An integer argument: TypeError for non-integers, ``err`` for integers that do not fit in 64 bits."""
    try:
        return PyNumber_Index(value)  # no silent truncation of floats
    except OverflowError:
        raise err(f"{what} {value} is out of range") from None


cdef enum:
    _T_FOREVER = 0
    _T_NOW = 1
    _T_SECONDS = 2


cdef inline int _timeout_rule(object timeout, object err, double *secs) except -1:
    """The one rule for a timeout argument, for every wait of the core and for the remote channel handle
    (``timeout_seconds``): None or more than 1e9 s (an int beyond a double too) -> _T_FOREVER; <= 0 -> _T_NOW;
    else _T_SECONDS with *secs. A bool is a TypeError (True is not "1 second"), as is a non-number; NaN is
    ``err``."""
    if timeout is None:
        return _T_FOREVER
    if type(timeout) is bool:
        raise TypeError("timeout must be None or a number of seconds, not a bool")
    cdef double t
    try:
        t = timeout
    except OverflowError:  # an int beyond a double: as long as forever (or never, if negative)
        return _T_FOREVER if timeout > 0 else _T_NOW
    except TypeError:
        raise TypeError(f"timeout must be None or a number of seconds, not {timeout!r}") from None
    if t != t:
        raise err(f"timeout must be None or a number of seconds, not {timeout!r}")
    if t <= 0:
        return _T_NOW
    if t > 1e9:
        return _T_FOREVER
    secs[0] = t
    return _T_SECONDS


cdef inline int64_t _deadline(object timeout, object err=ChannelError) except -2:
    """None: block forever; <= 0: never block; t: block up to t seconds (CLOCK_MONOTONIC deadline in ns)."""
    cdef double t = 0.0
    cdef int kind = _timeout_rule(timeout, err, &t)
    if kind == _T_FOREVER:
        return DL_FOREVER
    if kind == _T_NOW:
        return DL_NONBLOCK
    return ds_now() + <int64_t>(t * 1e9)


def timeout_seconds(timeout, err=ChannelError):
    """A timeout argument as every wait of the core reads it: None (wait for good: None, or more than 1e9 s),
    0.0 (do not wait: <= 0) or seconds. TypeError for a bool or a non-number, ``err`` for NaN."""
    cdef double t = 0.0
    cdef int kind = _timeout_rule(timeout, err, &t)
    if kind == _T_FOREVER:
        return None
    if kind == _T_NOW:
        return 0.0
    return t
