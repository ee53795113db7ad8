# Raw C declarations of include/dshm.h (the only C of dragon._core); behaviour lives in core.pyx.
from libc.stdint cimport uint32_t, uint64_t, int64_t

cdef extern from "dshm.h" nogil:
    enum:
        DS_OK
        DS_FULL
        DS_EMPTY
        DS_TIMEOUT
        DS_TOO_BIG
        DS_DESTROYED
        DS_CORRUPT
        DS_INTR
        DS_BADARG
        DS_TOO_SMALL
        DS_STALE
        DS_BUSY
        DS_LOCKED
        DS_BADSLOT

    enum:
        DS_GRANULE
        DS_CH_NAME
        DS_MAX_GRANULES

    int64_t ds_spin_ns
    int64_t ds_spin_max_ns
    int64_t ds_yield_ns
    int64_t ds_wait_chunk_ns

    ctypedef struct ds_stats_t:
        uint64_t waits
        uint64_t yields
        uint64_t switches
        uint64_t sleeps
        uint64_t wakes
    ds_stats_t ds_stats

    ctypedef struct ds_adapt:
        int64_t budget

    ctypedef struct ds_wait_ctx:
        int started

    int64_t ds_now()
    int ds_init()
    uint32_t ds_me()
    int ds_pid_dead(uint32_t id)
    int ds_set_pdeathsig(int sig)
    int ds_set_child_subreaper()
    int ds_keep_freed_memory(int mmap_max, int trim_max)

    # pool
    ctypedef struct ds_pool_hdr:
        uint64_t generation
        uint64_t seg_size
        uint64_t nbits
        uint64_t data_off
        uint32_t destroyed

    void ds_pool_layout(uint64_t nbits, uint64_t *bitmap_off, uint64_t *lentab_off,
                        uint64_t *data_off, uint64_t *seg_size)
    ds_pool_hdr *ds_ph(char *base)
    int ds_pool_init(char *base, uint64_t nbits, uint64_t generation)
    int ds_pool_check(char *base, uint64_t map_size, uint64_t generation)
    int ds_pool_try_alloc(char *base, uint64_t nbytes, uint64_t *off)
    int ds_pool_block_capacity(char *base, uint64_t off, uint64_t *cap)
    int ds_pool_free(char *base, uint64_t off)
    int ds_pool_stats(char *base, uint64_t *free_bytes, uint64_t *blocks, uint64_t *repairs)
    void ds_pool_mark_destroyed(char *base)
    int ds_pool_is_destroyed(char *base)
    void ds_pool_unlock(char *base)

    # channel
    ctypedef struct ds_ch_hdr:
        uint32_t capacity
        uint32_t block_size
        char name[1]

    ctypedef struct ds_slot:
        pass

    ctypedef struct ds_chan:
        char *base
        ds_ch_hdr *h
        uint64_t cap
        uint64_t stride
        uint64_t block_size
        uint64_t generation
        ds_adapt ad[2]

    uint64_t ds_ch_nbytes(uint64_t capacity, uint64_t block_size)
    void ds_ch_init(char *base, uint64_t off, uint64_t capacity, uint64_t block_size,
                    uint64_t generation, const char *name, size_t namelen)
    int ds_ch_open(char *base, uint64_t off, uint64_t generation, ds_chan *c)
    int ds_ch_alive(const ds_chan *c)
    ctypedef struct ds_msg:
        uint32_t n
        uint64_t off

    char *ds_slot_data(ds_slot *s)
    void ds_slot_put_inline(ds_slot *s, const char *p, uint32_t n)
    void ds_slot_put_block(ds_slot *s, uint64_t off, uint32_t n)
    void ds_slot_clear_block(ds_slot *s)
    int ds_ch_claim_send(const ds_chan *c, ds_slot **slot, uint32_t *lap, uint64_t *st)
    void ds_ch_commit_send(const ds_chan *c, ds_slot *s, uint32_t lap)
    int ds_ch_claim_recv(const ds_chan *c, uint64_t maxlen, int take_bad, ds_slot **slot, uint32_t *lap,
                         uint64_t *st, ds_msg *m)
    void ds_ch_commit_recv(const ds_chan *c, ds_slot *s, uint32_t lap)
    int ds_ch_ready(const ds_chan *c, ds_slot **slot, uint64_t *st)
    int ds_ch_peek(const ds_chan *c, char *out, uint32_t n, uint32_t *len)
    uint64_t ds_ch_len(const ds_chan *c)
    void ds_ch_positions(const ds_chan *c, uint64_t *head, uint64_t *tail)
    int ds_ch_maybe_recover(const ds_chan *c, ds_slot *s, uint64_t st)
    void ds_ch_destroy(const ds_chan *c)

    # one blocking call (core.pyx's _wait)
    enum:
        DS_OP_SEND
        DS_OP_RECV
        DS_OP_POLL
        DS_OP_ALLOC
        DS_OP_LOCK

    ctypedef struct ds_op:
        int kind
        ds_chan *c
        char *base
        uint64_t n
        ds_slot *slot
        uint32_t lap
        uint64_t st
        uint64_t off
        ds_msg m
        ds_wait_ctx w

    int ds_op_wait(ds_op *op, int64_t deadline)
    void ds_ch_snapshot(const ds_chan *c, uint64_t *out, uint64_t nslots)
