# ---------------------------------------------------------------------------------------------- OS helpers
def job_id():
    """This job's id: env DRAGON_JOB if set (the launcher sets it), else ``u<uid>``."""
    job = os.environ.get(_env.JOB) or f"u{os.getuid()}"
    if "/" in job or "\0" in job:
        raise PoolError(f"DRAGON_JOB {job!r} must not contain '/' or NUL")
    return job


def job_prefix(job=None):
    """Prefix of every shared-memory segment of the job: ``dragon-<job>-`` (a file name in /dev/shm)."""
    return f"dragon-{job_id() if job is None else job}-"


def unlink_job_segments(job=None):
    """Unlink every /dev/shm/dragon-<job>-* segment (default: this job); returns how many were removed."""
    prefix = job_prefix(job)
    n = 0
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join("/dev/shm", name))
                n += 1
            except FileNotFoundError:
                pass
    return n


def set_pdeathsig(int signum):
    """prctl(PR_SET_PDEATHSIG): get ``signum`` when the parent thread dies."""
    cdef int e = ds_set_pdeathsig(signum)
    if e:
        raise OSError(e, os.strerror(e))


def set_child_subreaper():
    """prctl(PR_SET_CHILD_SUBREAPER, 1): orphaned descendants are reparented to this process."""
    cdef int e = ds_set_child_subreaper()
    if e:
        raise OSError(e, os.strerror(e))


cdef int _kept = 0  # keep_freed_memory(): 0 not yet, 1 done, -1 left alone (env, or not glibc)
KEEP_MMAP_MAX = 16 << 20
KEEP_TRIM_MAX = 64 << 20
KEEP_AFTER = 2 << 20  # a batch of received bytes this big: a receive of many big messages (recv_many)


def keep_freed_memory(force=False):
    """Once per process: keep freed memory in the heap (glibc's malloc; ``KEEP_MMAP_MAX``, ``KEEP_TRIM_MAX``),
    so that receiving batches of big messages, each a fresh bytes object, does not fault in and zero every
    page of every batch again (glibc's defaults give a freed batch above 2 MiB back to the kernel). Called by
    ``recv_many`` once a batch holds ``KEEP_AFTER`` bytes, and by the transport agents (``force``: also when
    ``DRAGON_KEEP_FREED_MEMORY`` is 0). ``DRAGON_KEEP_FREED_MEMORY=0`` leaves a user process's malloc as it
    is. (glibc's own dynamic thresholds reach these values after a 16 MiB block was freed; here they are set
    at once, and fixed from then on.) Returns whether the settings are in effect."""
    global _kept
    if _kept == 0 or (force and _kept < 0):
        if not force and os.environ.get(_env.KEEP_FREED_MEMORY, "1").strip() == "0":
            _kept = -1
        else:
            _kept = 1 if ds_keep_freed_memory(KEEP_MMAP_MAX, KEEP_TRIM_MAX) else -1
    return _kept == 1


def _claim_id():
    """This process's claim id as stored in slots it claims: pid | start-time tag << 22 (for
    tests/debugging)."""
    return ds_me()


def _claim_dead(claim_id):
    """Would a slot claimed with ``claim_id`` be taken over (owner gone, zombie, or pid reused)? For tests."""
    return bool(ds_pid_dead(<uint32_t>claim_id))


def set_wait_params(spin_ns=None, chunk_ns=None, yield_ns=None, spin_max_ns=None):
    """Tune blocking waits in this process (every channel handle learns within these bounds, per direction).

    A blocked call keeps the CPU for a budget between ``spin_ns`` and ``spin_max_ns`` (learned from its
    recent waits: twice their length, down to ``spin_ns`` after a wait longer than ``spin_max_ns``), then
    sleeps on the futex in chunks of ``chunk_ns``. Within the budget it polls, calling sched_yield every
    ``yield_ns`` (at every poll when the peer last ran on this CPU). Giving ``spin_ns`` without
    ``spin_max_ns`` fixes the budget at ``spin_ns`` (no learning, no yield-at-once; 0: sleep at once).
    Returns the old (spin_ns, chunk_ns, yield_ns, spin_max_ns)."""
    global ds_spin_ns, ds_wait_chunk_ns, ds_yield_ns, ds_spin_max_ns
    old = (ds_spin_ns, ds_wait_chunk_ns, ds_yield_ns, ds_spin_max_ns)
    cdef int64_t lo = ds_spin_ns if spin_ns is None else _ns(spin_ns, 0, "spin_ns")
    cdef int64_t hi = ds_spin_max_ns
    if spin_max_ns is not None:
        hi = _ns(spin_max_ns, 0, "spin_max_ns")
    elif spin_ns is not None:
        hi = lo
    if hi < lo:
        raise ValueError(f"spin_max_ns ({hi}) must not be less than spin_ns ({lo})")
    cdef int64_t chunk = ds_wait_chunk_ns if chunk_ns is None else _ns(chunk_ns, 1000000, "chunk_ns")
    cdef int64_t yld = ds_yield_ns if yield_ns is None else _ns(yield_ns, 0, "yield_ns")
    ds_spin_ns, ds_spin_max_ns, ds_wait_chunk_ns, ds_yield_ns = lo, hi, chunk, yld
    return old


cdef int64_t _ns(object value, int64_t lo, str what) except -1:
    """A duration in ns for set_wait_params: a number (TypeError otherwise), clamped to [lo, 1 s]."""
    if isinstance(value, float) and value == value:
        value = int(value)
    try:
        v = PyNumber_Index(value)
    except TypeError:
        raise TypeError(f"{what} must be a number of nanoseconds, not {type(value).__name__}") from None
    return max(lo, min(v, 1000000000))


cdef int _wait(ds_op *op, int64_t deadline) except -1:
    """The one blocking loop of dragon._core: wait for ``op`` without the GIL, in chunks of
    ``ds_wait_chunk_ns``, and run the signal handlers between chunks (so Ctrl-C raises KeyboardInterrupt even
    when the signal missed the futex syscall). Returns the outcome of the wait (a DS_* code, not DS_INTR)."""
    cdef int rc
    while True:
        with nogil:
            rc = ds_op_wait(op, deadline)
        if rc != DS_INTR:
            return rc
        PyErr_CheckSignals()


def wait_stats(reset=False):
    """Counters of this process's blocking waits since import, fork or the last reset: ``waits`` (calls
    that had to wait), ``yields`` (sched_yield calls), ``switches`` (yields that let another task run),
    ``sleeps`` (FUTEX_WAIT calls), ``wakes`` (FUTEX_WAKE calls: one per sleep of a peer, none when nobody
    sleeps)."""
    out = dict(waits=ds_stats.waits, yields=ds_stats.yields, switches=ds_stats.switches,
               sleeps=ds_stats.sleeps, wakes=ds_stats.wakes)
    if reset:
        memset(&ds_stats, 0, sizeof(ds_stats))
    return out
