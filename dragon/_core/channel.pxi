# ---------------------------------------------------------------------------------------------- channels
cdef class Channel:
    """A bounded multi-producer multi-consumer lock-free queue inside a pool."""

    def __init__(self, *args, **kwargs):
        raise TypeError("use Channel.create() or Channel.attach()")

    @staticmethod
    def create(pool, capacity=1024, block_size=1024, name=None, timeout=None):
        """Create a channel in ``pool``: ``capacity`` slots, messages up to ``block_size`` bytes stored
        inline. A pool without room raises ChannelError at once; ``timeout`` bounds the wait for the pool's
        lock, which another process holds for microseconds unless it is stopped (None: as long as it takes;
        0: a short grace, then ChannelError; t: ChannelTimeout after t seconds)."""
        global _counter
        if not isinstance(pool, Pool):
            raise TypeError(f"Channel.create() needs a Pool, not {type(pool).__name__}")
        cdef Pool p = pool
        if p.seg is None or p.seg.destroyed:
            raise ChannelError(
                f"cannot create a channel in pool {p._name!r}: the pool handle is closed or destroyed")
        cdef long long cap = _int(capacity, ChannelError, "channel capacity")
        cdef long long bs = _int(block_size, ChannelError, "channel block_size")
        if cap < 1 or cap > 0x7fffffff:
            raise ChannelError(f"channel capacity must be between 1 and 2**31-1, not {cap}")
        if bs < 0 or bs > 0x3fffffff:
            raise ChannelError(f"channel block_size must be between 0 and 2**30-1, not {bs}")
        if name is None:
            _counter += 1
            name = f"{os.getpid()}-{_counter}"
        elif not isinstance(name, str):
            raise TypeError(f"channel name must be a str, not {type(name).__name__}")
        bname = name.encode()
        if len(bname) >= DS_CH_NAME or b"\0" in bname:
            raise ChannelError(f"channel name {name!r} is too long (max {DS_CH_NAME - 1} bytes) or has NUL")
        cdef int64_t deadline = _deadline(timeout)  # (a bad timeout is refused even when no wait is needed)
        cdef uint64_t nbytes = ds_ch_nbytes(<uint64_t>cap, <uint64_t>bs)
        cdef uint64_t off = 0
        cdef int rc = ds_pool_try_alloc(p.base, nbytes, &off)
        if rc == DS_BUSY:
            rc = _alloc_wait(p.base, nbytes, &off, rc, deadline)
        if rc == DS_BUSY or rc == DS_LOCKED:
            raise (ChannelError if rc == DS_BUSY else ChannelTimeout)(
                f"channel {name!r}: the lock of pool {p._name!r} is held by another process (stopped?)")
        if rc == DS_TOO_BIG:
            raise ChannelError(f"channel {name!r} needs {nbytes} bytes, more than pool {p._name!r} holds")
        if rc == DS_FULL:
            raise ChannelError(f"channel {name!r}: no room for {nbytes} bytes in pool {p._name!r}")
        if rc == DS_DESTROYED:
            raise ChannelError(f"channel {name!r}: pool {p._name!r} was destroyed")
        if rc != DS_OK:
            _raise(rc, K_CHAN, f"channel {name!r}")
        gen = int.from_bytes(os.urandom(8), "little") | 1
        ds_ch_init(p.base, off, <uint64_t>cap, <uint64_t>bs, gen, bname, len(bname))
        return _channel_handle(p, off, gen, True)

    @staticmethod
    def attach(sdesc):
        """Attach to a channel from its sdesc (maps its pool too). The sdesc names the node that holds the
        channel: a channel of another node is reached through this node's transport agent, and the handle is a
        ``dragon._core.remote.RemoteChannel`` with the same API (both are ``ChannelLike``)."""
        kind, name, pgen, psize, choff, chgen, node = _parse_sdesc(sdesc, ChannelError)
        if kind != SD_CHANNEL:
            raise ChannelError("not a channel sdesc (kind %d)" % kind)
        if node != local_node():
            from dragon._core.remote import RemoteChannel
            return RemoteChannel(bytes(sdesc), node)
        try:
            seg = _attach_segment(name, psize, pgen, node)
        except PoolError as e:
            raise ChannelError(f"cannot attach the channel's pool: {e}") from e
        return _channel_handle(_pool_handle(seg, False), choff, chgen, False)

    cdef int _unusable(self) except -1:
        if self.destroyed:
            raise ChannelError(f"channel {self._name!r} was destroyed")
        if not self.usable:
            raise ChannelError(f"channel {self._name!r}: this handle is closed")
        if self.seg.destroyed:
            raise ChannelError(f"channel {self._name!r}: its pool {self.seg.name!r} was destroyed")
        _raise(DS_DESTROYED, K_CHAN, f"channel {self._name!r}")

    cdef inline int _check(self) except -1:
        if not self.usable or self.seg.destroyed or not ds_ch_alive(&self.c):
            self._unusable()
        return 0

    cdef int _block(self, int mode, int rc, uint64_t maxlen, ds_slot **slot, uint32_t *lap, uint64_t *st,
                    ds_msg *m, int64_t deadline) except -1:
        """Finish a claim whose first (GIL-held) attempt returned rc: wait without the GIL, or raise. A
        receive fills ``m`` with what the claimed slot holds (see ds_slot_msg); a send passes NULL."""
        cdef ds_op op
        if rc == DS_FULL or rc == DS_EMPTY:
            if deadline == DL_NONBLOCK:
                if slot[0] != NULL and ds_ch_maybe_recover(&self.c, slot[0], st[0]):
                    slot[0] = NULL
                    if mode == DS_OP_SEND:
                        rc = ds_ch_claim_send(&self.c, slot, lap, st)
                    else:
                        rc = ds_ch_claim_recv(&self.c, maxlen, 1, slot, lap, st, m)
            else:
                memset(&op, 0, sizeof(op))
                op.kind = mode
                op.c = &self.c
                op.n = maxlen
                rc = _wait(&op, deadline)
                slot[0], lap[0], st[0] = op.slot, op.lap, op.st
                if m != NULL:
                    m[0] = op.m
        if rc != DS_OK:
            if rc == DS_DESTROYED:
                self._check()
            _raise(rc, K_CHAN, f"channel {self._name!r}", st[0])
        return 0

    cdef int _send(self, const char *p, Py_ssize_t n, int64_t deadline) except -1:
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0, off = 0
        cdef int rc
        if <uint64_t>n <= self.c.block_size:
            rc = ds_ch_claim_send(&self.c, &slot, &lap, &st)
            if rc != DS_OK:
                self._block(DS_OP_SEND, rc, 0, &slot, &lap, &st, NULL, deadline)
            ds_slot_put_inline(slot, p, <uint32_t>n)
            ds_ch_commit_send(&self.c, slot, lap)
            return 0
        self._fits(n)
        cdef char *base = self.c.base
        rc = ds_pool_try_alloc(base, <uint64_t>n, &off)
        if rc == DS_FULL or rc == DS_BUSY:
            rc = _alloc_wait(base, <uint64_t>n, &off, rc, deadline)
        if rc != DS_OK:
            if rc == DS_FULL:
                raise ChannelFull(f"channel {self._name!r}: no room in its pool for a {n}-byte message")
            if rc == DS_TIMEOUT:
                raise ChannelTimeout(f"channel {self._name!r}: no room in its pool for a {n}-byte message "
                                     f"before the timeout")
            if rc == DS_DESTROYED:
                raise ChannelError(f"channel {self._name!r}: its pool {self.seg.name!r} was destroyed")
            _raise(rc, K_CHAN, f"channel {self._name!r}", <uint64_t>n)
        if n >= BIG_COPY:
            with nogil:
                memcpy(base + off, p, n)
        else:
            memcpy(base + off, p, n)
        try:
            rc = ds_ch_claim_send(&self.c, &slot, &lap, &st)
            if rc != DS_OK:
                self._block(DS_OP_SEND, rc, 0, &slot, &lap, &st, NULL, deadline)
        except BaseException:
            ds_pool_free(base, off)
            raise
        ds_slot_put_block(slot, off, <uint32_t>n)
        ds_ch_commit_send(&self.c, slot, lap)
        return 0

    cdef int _fits(self, Py_ssize_t n) except -1:
        """Raise ChannelError if a message of n bytes (more than block_size) could never be sent."""
        if <uint64_t>n > 0xffffffffULL:
            raise ChannelError(f"channel {self._name!r}: messages are limited to 4 GiB - 1, not {n} bytes")
        if <uint64_t>n > self.seg.data_size:
            _raise(DS_TOO_BIG, K_CHAN, f"channel {self._name!r}", <uint64_t>n)
        return 0

    cdef int _send_obj(self, object data, int64_t deadline) except -1:
        cdef Py_buffer view
        if type(data) is bytes:
            return self._send(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), deadline)
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except (BufferError, ValueError):   # a non-contiguous buffer: one extra copy
            data = memoryview(data).tobytes()
            return self._send(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), deadline)
        try:
            self._send(<const char *>view.buf, view.len, deadline)
        finally:
            PyBuffer_Release(&view)
        return 0

    def send(self, data, timeout=None):
        """Send any bytes-like object. timeout: None blocks, 0 raises ChannelFull, t > 0 ChannelTimeout."""
        self._check()
        if type(data) is bytes:
            self._send(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                       DL_FOREVER if timeout is None else _deadline(timeout))
        else:
            self._send_obj(data, DL_FOREVER if timeout is None else _deadline(timeout))

    def send_block(self, block, nbytes=None, timeout=None):
        """Hand an allocated Block of this channel's pool to the receiver, zero-copy; the block's ownership
        moves (this Block can no longer be used or freed here). On a timeout the block stays with the
        sender."""
        self._check()
        if not isinstance(block, Block):
            raise TypeError(f"send_block() takes a Block, not {type(block).__name__}")
        cdef Block b = block
        if b.seg is not self.seg:
            raise ChannelError(f"channel {self._name!r}: the block belongs to another pool")
        if b.freed:
            raise ChannelError(f"channel {self._name!r}: the block at offset {b.offset} was freed or sent")
        cdef uint64_t cap = 0
        if ds_pool_block_capacity(self.c.base, b.offset, &cap) != DS_OK:
            raise ChannelError(f"channel {self._name!r}: offset {b.offset} is not an allocated block")
        cdef long long n = b.size if nbytes is None else _int(nbytes, ChannelError, "nbytes")
        if n < 0 or <uint64_t>n > cap or <uint64_t>n > 0xffffffffULL:
            raise ChannelError(f"channel {self._name!r}: nbytes={n} does not fit the block ({cap} bytes)")
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0
        cdef int rc = ds_ch_claim_send(&self.c, &slot, &lap, &st)
        if rc != DS_OK:
            self._block(DS_OP_SEND, rc, 0, &slot, &lap, &st, NULL, _deadline(timeout))
        ds_slot_put_block(slot, b.offset, <uint32_t>n)
        ds_ch_commit_send(&self.c, slot, lap)
        b.freed = True

    cdef object _take_bytes(self, ds_slot *slot, uint32_t lap, const ds_msg *m):
        """The claimed message (m: as the claim read and checked it, never re-read from the slot) as bytes."""
        cdef uint32_t n = m.n
        cdef uint64_t off = m.off
        cdef object out
        cdef char *dst
        if off == 0:
            try:
                out = PyBytes_FromStringAndSize(ds_slot_data(slot), n)
            finally:
                ds_ch_commit_recv(&self.c, slot, lap)
            return out
        ds_slot_clear_block(slot)
        ds_ch_commit_recv(&self.c, slot, lap)
        try:
            out = PyBytes_FromStringAndSize(NULL, n)
            dst = PyBytes_AS_STRING(out)
            if n >= BIG_COPY:
                with nogil:
                    memcpy(dst, self.c.base + off, n)
            else:
                memcpy(dst, self.c.base + off, n)
        finally:
            ds_pool_free(self.c.base, off)
        return out

    def recv(self, timeout=None):
        """Receive one message as bytes. timeout: None blocks, 0 raises ChannelEmpty, t > 0 ChannelTimeout."""
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0
        cdef ds_msg m
        self._check()
        cdef int rc = ds_ch_claim_recv(&self.c, UINT64_MAX, 1, &slot, &lap, &st, &m)
        if rc != DS_OK:
            self._block(DS_OP_RECV, rc, UINT64_MAX, &slot, &lap, &st, &m,
                        DL_FOREVER if timeout is None else _deadline(timeout))
        return self._take_bytes(slot, lap, &m)

    def recv_into(self, buffer, timeout=None):
        """Receive into a writable buffer; returns the message length. A message longer than the buffer raises
        ChannelError and stays queued."""
        cdef Py_buffer view
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0
        cdef ds_msg m
        cdef int rc
        self._check()
        try:
            PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        except (BufferError, ValueError) as e:
            raise TypeError(f"recv_into() needs a writable contiguous buffer, not {type(buffer).__name__}: "
                            f"{e}") from None
        try:
            rc = ds_ch_claim_recv(&self.c, <uint64_t>view.len, 1, &slot, &lap, &st, &m)
            if rc != DS_OK:
                self._block(DS_OP_RECV, rc, <uint64_t>view.len, &slot, &lap, &st, &m, _deadline(timeout))
            if m.off == 0:
                memcpy(view.buf, ds_slot_data(slot), m.n)
                ds_ch_commit_recv(&self.c, slot, lap)
            else:
                ds_slot_clear_block(slot)
                ds_ch_commit_recv(&self.c, slot, lap)
                if m.n >= BIG_COPY:
                    with nogil:
                        memcpy(view.buf, self.c.base + m.off, m.n)
                else:
                    memcpy(view.buf, self.c.base + m.off, m.n)
                ds_pool_free(self.c.base, m.off)
        finally:
            PyBuffer_Release(&view)
        return m.n

    def recv_message(self, timeout=None):
        """Receive one message as a Message buffer; a message stored in a pool block is not copied."""
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0
        cdef ds_msg d
        cdef Message m = Message.__new__(Message)
        self._check()
        cdef int rc = ds_ch_claim_recv(&self.c, UINT64_MAX, 1, &slot, &lap, &st, &d)
        if rc != DS_OK:
            self._block(DS_OP_RECV, rc, UINT64_MAX, &slot, &lap, &st, &d, _deadline(timeout))
        m.n = d.n
        m.seg = self.seg
        m.owner_pid = ds_me()
        if d.off != 0:
            m.off = d.off
            m.ptr = self.c.base + d.off
            m.in_pool = True
            ds_slot_clear_block(slot)
            ds_ch_commit_recv(&self.c, slot, lap)
        else:
            m.ptr = <char *>PyMem_Malloc(d.n if d.n else 1)
            if m.ptr != NULL:
                memcpy(m.ptr, ds_slot_data(slot), d.n)
            ds_ch_commit_recv(&self.c, slot, lap)
            if m.ptr == NULL:
                raise MemoryError()
        return m

    cdef int _check_item(self, object data, Py_ssize_t i) except -1:
        """send_many's check of an item that is not a small bytes: bytes-like, and not too big to be sent."""
        try:
            n = memoryview(data).nbytes
        except TypeError:
            raise TypeError(f"send_many() takes bytes-like objects, not {type(data).__name__} (item {i}): "
                            f"nothing was sent") from None
        if <uint64_t>n > self.c.block_size:
            self._fits(n)
        return 0

    def send_many(self, messages, timeout=None):
        """Send each bytes-like of ``messages`` in order; returns how many were sent. All or nothing for bad
        input: every item is checked first (TypeError for one that is not bytes-like, ChannelError for one
        that could never be sent), so a bad one raises before anything is sent. The timeout covers the whole
        call; if it passes after k > 0 messages were sent, returns k (else raises ChannelFull/Timeout)."""
        self._check()
        cdef int64_t deadline = _deadline(timeout)
        cdef list items = messages if type(messages) is list else list(messages)
        cdef Py_ssize_t i, k = 0
        cdef PyObject *o
        for i in range(PyList_GET_SIZE(items)):  # (borrowed references: checking costs no refcounting)
            o = PyList_GET_ITEM(items, i)
            if not (_is_bytes(o) and <uint64_t>_bytes_size(o) <= self.c.block_size):
                self._check_item(<object>o, i)
        for data in items:
            try:
                if type(data) is bytes:
                    self._send(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), deadline)
                else:
                    self._send_obj(data, deadline)
            except (ChannelFull, ChannelTimeout):
                if k == 0:
                    raise
                return k
            k += 1
        return k

    def recv_many(self, max_n, timeout=None):
        """Wait (per timeout) for one message, then take whatever else is queued, up to ``max_n`` in all."""
        cdef Py_ssize_t m = _int(max_n, ChannelError, "max_n"), k
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0
        cdef ds_msg d
        cdef int rc
        self._check()
        if m < 1:
            raise ChannelError(f"recv_many: max_n must be >= 1, not {m}")
        out = []
        rc = ds_ch_claim_recv(&self.c, UINT64_MAX, 1, &slot, &lap, &st, &d)
        if rc != DS_OK:
            self._block(DS_OP_RECV, rc, UINT64_MAX, &slot, &lap, &st, &d, _deadline(timeout))
        cdef uint64_t total = d.n
        out.append(self._take_bytes(slot, lap, &d))
        for k in range(1, m):  # (a corrupt slot ends the batch: the next receive drops it and says so)
            rc = ds_ch_claim_recv(&self.c, UINT64_MAX, 0, &slot, &lap, &st, &d)
            if rc != DS_OK:
                break
            total += d.n
            out.append(self._take_bytes(slot, lap, &d))
        if total >= KEEP_AFTER and _kept == 0:
            keep_freed_memory()
        return out

    def poll(self, timeout=None):
        """True once a message is ready to receive (does not consume it); False if none came in time."""
        cdef ds_slot *slot = NULL
        cdef uint64_t st = 0
        cdef int rc
        self._check()
        if ds_ch_ready(&self.c, &slot, &st):
            return True
        cdef int64_t deadline = _deadline(timeout)
        if deadline == DL_NONBLOCK:
            if slot != NULL and ds_ch_maybe_recover(&self.c, slot, st):
                return bool(ds_ch_ready(&self.c, &slot, &st))
            return False
        cdef ds_op op
        memset(&op, 0, sizeof(op))
        op.kind = DS_OP_POLL
        op.c = &self.c
        rc = _wait(&op, deadline)
        if rc == DS_OK:
            return True
        if rc == DS_TIMEOUT:
            return False
        self._check()
        _raise(rc, K_CHAN, f"channel {self._name!r}")

    def _peek(self, n=64):
        """The first n bytes (at most) of the next message and its whole length, as ``(head, length)``,
        without taking it; None if there is none ready. Another receiver may take it right after: a recv that
        follows gets what is next then. (For dragon.mp's poll; a RemoteChannel cannot look without taking.)"""
        cdef char buf[256]
        cdef uint32_t length = 0
        cdef int rc
        if not 0 <= n <= 256:
            raise ValueError(f"_peek: n must be 0..256, not {n!r}")
        self._check()
        rc = ds_ch_peek(&self.c, buf, <uint32_t>n, &length)
        if rc == DS_EMPTY:
            return None
        if rc != DS_OK:
            self._check()
            _raise(rc, K_CHAN, f"channel {self._name!r}")
        return buf[:min(<uint32_t>n, length)], length

    def __len__(self):
        self._check()
        return ds_ch_len(&self.c)

    def _positions(self):
        """``(head, tail)``: how many messages receivers have taken from the channel since it was made, and
        how many slots senders have claimed. A message whose send has returned lies below ``tail``, and it
        has been taken (or, if its sender died mid-send, skipped) once ``head`` is past that ``tail``: a
        reader can wait for everything written before a moment this way."""
        self._check()
        cdef uint64_t head, tail
        ds_ch_positions(&self.c, &head, &tail)
        return head, tail

    def _wait_state(self):
        """What this handle learned about its blocking waits: the budget (ns of CPU kept before sleeping on
        the futex) when waiting for room (send) and for a message (recv, poll)."""
        return dict(send=dict(budget_ns=self.c.ad[0].budget), recv=dict(budget_ns=self.c.ad[1].budget))

    def _debug_state(self):
        """Snapshot of the ring for debugging: counters, waiters and (lap, phase, pid) of every slot."""
        self._check()
        cdef uint64_t *buf = <uint64_t *>PyMem_Malloc((9 + self.c.cap) * 8)
        if buf == NULL:
            raise MemoryError()
        try:
            ds_ch_snapshot(&self.c, buf, self.c.cap)
            phases = ("EMPTY", "WRITING", "FULL", "READING")
            return dict(head=buf[0], tail=buf[1], ne_seq=buf[2], ne_waiters=buf[3], nf_seq=buf[4],
                        nf_waiters=buf[5], recoveries=buf[6],
                        ne_cpu=None if buf[7] == 0xffffffff else buf[7],
                        nf_cpu=None if buf[8] == 0xffffffff else buf[8],
                        slots=[(buf[9 + i] >> 32, phases[(buf[9 + i] >> 30) & 3], buf[9 + i] & 0x3fffff)
                               for i in range(self.c.cap)])
        finally:
            PyMem_Free(buf)

    @property
    def capacity(self):
        return self.c.cap

    @property
    def block_size(self):
        return self.c.block_size

    @property
    def name(self):
        return self._name

    @property
    def closed(self):
        return not self.usable

    @property
    def sdesc(self):
        bname = self.seg.name.encode()
        return _SD.pack(SD_MAGIC, SDESC_VERSION, SD_CHANNEL, len(bname), self.seg.generation,
                        self.seg.data_size, self.offset, self.generation, self.seg.node) + bname

    @property
    def node(self):
        """The index of the node that holds the channel."""
        return self.seg.node

    def close(self):
        """Release this handle (idempotent)."""
        self.usable = False

    def destroy(self):
        """Free the channel's memory in its pool (once); blocked senders/receivers wake with ChannelError."""
        self._check()
        ds_ch_destroy(&self.c)
        ds_pool_free(self.c.base, self.offset)
        self.destroyed = True
        self.usable = False

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        if (self.creator and self.creator_pid == os.getpid() and self.usable and not self.seg.destroyed
                and ds_ch_alive(&self.c)):
            self.destroy()
        else:
            self.close()

    def __reduce__(self):
        return (Channel.attach, (self.sdesc,))

    def __repr__(self):
        return f"<Channel {self._name!r} capacity={self.c.cap} block_size={self.c.block_size}>"


cdef Channel _channel_handle(Pool pool, uint64_t off, uint64_t gen, bint creator):
    cdef Channel ch = Channel.__new__(Channel)
    cdef int rc = ds_ch_open(pool.base, off, gen, &ch.c)
    if rc != DS_OK:
        _raise(rc, K_CHAN, f"channel at offset {off} of pool {pool._name!r}")
    ch.seg = pool.seg
    ch.pool = pool
    ch.offset = off
    ch.generation = gen
    ch.usable = True
    ch.creator = creator
    ch.creator_pid = os.getpid()
    ch._name = PyBytes_FromStringAndSize(<char *>ch.c.h.name, DS_CH_NAME).split(b"\0", 1)[0].decode(
        errors="replace")
    return ch
