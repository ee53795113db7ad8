/* dshm_pool.h -- the pool: header, allocator, robust mutex (see dshm.h for the layout) */
#ifndef DRAGON_DSHM_POOL_H
#define DRAGON_DSHM_POOL_H

#include "dshm_base.h"

/* ---------------------------------------------------------------- pool */
#define DS_POOL_MAGIC 0x4c4f4f504e475244ULL /* "DRGNPOOL" */
#define DS_VERSION 2u /* 2: the deferred-free list in the header */
#define DS_GSHIFT 8
#define DS_GRANULE (1ULL << DS_GSHIFT)
#define DS_PAGE 4096ULL
#define DS_MAX_GRANULES (1ULL << 34) /* 4 TiB of data */
#define DS_LT_DEFERRED 0x80000000u    /* lentab flag: the block is freed, on the deferred list (see ds_pool_free) */
#define DS_LT_MAX 0x7fffffffu         /* granules of the largest block (512 GiB) */

/* a non-blocking call (timeout 0) waits at most this long for the pool's lock: a process inside the allocator
   holds it for microseconds, unless it is stopped (SIGSTOP, a debugger) or descheduled for a time slice */
static int64_t ds_lock_grace_ns = 5000000;

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t granule;
    uint64_t generation;
    uint64_t seg_size;   /* bytes mapped */
    uint64_t nbits;      /* granules of data */
    uint64_t bitmap_off;
    uint64_t lentab_off;
    uint64_t data_off;
    uint32_t destroyed;
    uint32_t _pad0;
    /* below: protected by mutex */
    DS_ALIGN64 uint64_t free_granules;
    uint64_t allocated_blocks;
    uint64_t hint;
    uint64_t repairs;
    DS_ALIGN64 pthread_mutex_t mutex;
    DS_ALIGN64 uint32_t free_seq; /* futex, bumped when a free wakes blocked allocators */
    uint32_t waiters;             /* "somebody sleeps on free_seq" flag (see ds_wake_if_waiting) */
    uint64_t deferred;            /* offset of the first block of the deferred-free list, 0: empty (lock-free) */
} ds_pool_hdr;

static inline uint64_t ds_round(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static inline void ds_pool_layout(uint64_t nbits, uint64_t *bitmap_off, uint64_t *lentab_off,
                                  uint64_t *data_off, uint64_t *seg_size) {
    uint64_t hdr = ds_round(sizeof(ds_pool_hdr), DS_PAGE);
    uint64_t nwords = (nbits + 63) / 64;
    *bitmap_off = hdr;
    *lentab_off = hdr + ds_round(nwords * 8, 64);
    *data_off = ds_round(*lentab_off + nbits * 4, DS_PAGE);
    *seg_size = *data_off + nbits * DS_GRANULE;
}

static inline ds_pool_hdr *ds_ph(char *base) { return (ds_pool_hdr *)base; }
static inline uint64_t *ds_bitmap(char *base) { return (uint64_t *)(base + ds_ph(base)->bitmap_off); }
static inline uint32_t *ds_lentab(char *base) { return (uint32_t *)(base + ds_ph(base)->lentab_off); }

static inline void ds_bm_assign(uint64_t *bm, uint64_t i, uint64_t n, int v) {
    while (n) {
        uint64_t w = i >> 6, b = i & 63, k = 64 - b;
        if (k > n) k = n;
        uint64_t mask = (k == 64) ? ~0ULL : (((1ULL << k) - 1) << b);
        if (v) bm[w] |= mask; else bm[w] &= ~mask;
        i += k;
        n -= k;
    }
}

/* first i in [from, to) such that granules [i, i+n) are all free; -1 if none */
static inline int64_t ds_bm_find(const uint64_t *bm, uint64_t nbits, uint64_t from, uint64_t to, uint64_t n) {
    uint64_t i = from;
    while (i < to && i + n <= nbits) {
        uint64_t w = i >> 6, b = i & 63;
        uint64_t word = bm[w] | (b ? (~0ULL >> (64 - b)) : 0ULL);
        if (word == ~0ULL) { i = (w + 1) << 6; continue; }
        i = (w << 6) + (uint64_t)__builtin_ctzll(~word);
        if (i >= to || i + n > nbits) return -1;
        uint64_t j = i, end = i + n;
        while (j < end) {
            uint64_t wj = j >> 6, bj = j & 63;
            uint64_t x = bm[wj] >> bj;
            if (x == 0) { j = (wj + 1) << 6; continue; }
            j += (uint64_t)__builtin_ctzll(x);
            break;
        }
        if (j >= end) return (int64_t)i;
        i = j + 1;
    }
    return -1;
}

/* rebuild bitmap and counters from lentab (after a process died holding the mutex). Deferred blocks stay
   allocated: they are still on the deferred list, which the next lock holder drains. */
static inline void ds_pool_repair(char *base) {
    ds_pool_hdr *h = ds_ph(base);
    uint64_t nbits = h->nbits, nwords = (nbits + 63) / 64, used = 0, blocks = 0, covered = 0;
    uint64_t *bm = ds_bitmap(base);
    uint32_t *lt = ds_lentab(base);
    memset(bm, 0, nwords * 8);
    for (uint64_t i = 0; i < nbits; i++) {
        uint32_t n = DS_LOADR(&lt[i]) & DS_LT_MAX;
        if (!n) continue;
        if (i < covered || i + n > nbits) { DS_STORE(&lt[i], 0); continue; } /* overlapping garbage */
        ds_bm_assign(bm, i, n, 1);
        used += n;
        blocks++;
        covered = i + n;
    }
    if (nbits & 63) bm[nwords - 1] |= ~0ULL << (nbits & 63);
    h->free_granules = nbits - used;
    h->allocated_blocks = blocks;
    h->hint = 0;
    h->repairs++;
}

static inline int ds_pool_init(char *base, uint64_t nbits, uint64_t generation) {
    ds_pool_hdr *h = ds_ph(base);
    uint64_t bo, lo, dof, ss;
    ds_pool_layout(nbits, &bo, &lo, &dof, &ss);
    h->version = DS_VERSION;
    h->granule = (uint32_t)DS_GRANULE;
    h->generation = generation;
    h->seg_size = ss;
    h->nbits = nbits;
    h->bitmap_off = bo;
    h->lentab_off = lo;
    h->data_off = dof;
    h->destroyed = 0;
    h->free_granules = nbits;
    h->allocated_blocks = 0;
    h->hint = 0;
    h->repairs = 0;
    h->free_seq = 0;
    h->waiters = 0;
    h->deferred = 0;
    uint64_t nwords = (nbits + 63) / 64;
    uint64_t *bm = (uint64_t *)(base + bo);
    if (nbits & 63) bm[nwords - 1] |= ~0ULL << (nbits & 63);
    pthread_mutexattr_t a;
    int r;
    if ((r = pthread_mutexattr_init(&a))) return r;
    if ((r = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED))) return r;
    if ((r = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST))) return r;
    if ((r = pthread_mutex_init(&h->mutex, &a))) return r;
    pthread_mutexattr_destroy(&a);
    DS_STORES(&h->magic, DS_POOL_MAGIC);
    return 0;
}

/* validate a freshly mapped header against the sdesc's generation and the mapping size */
static inline int ds_pool_check(char *base, uint64_t map_size, uint64_t generation) {
    ds_pool_hdr *h = ds_ph(base);
    if (map_size < sizeof(ds_pool_hdr)) return DS_CORRUPT;
    if (DS_LOAD(&h->magic) != DS_POOL_MAGIC || h->version != DS_VERSION || h->granule != DS_GRANULE)
        return DS_CORRUPT;
    if (h->generation != generation) return DS_STALE;
    uint64_t bo, lo, dof, ss;
    if (h->nbits == 0 || h->nbits > DS_MAX_GRANULES) return DS_CORRUPT;
    ds_pool_layout(h->nbits, &bo, &lo, &dof, &ss);
    if (bo != h->bitmap_off || lo != h->lentab_off || dof != h->data_off || ss != h->seg_size || ss != map_size)
        return DS_CORRUPT;
    return DS_OK;
}

/* the granule index of a block's payload offset (in range and granule-aligned), or -1 */
static inline int64_t ds_pool_granule(char *base, uint64_t off) {
    ds_pool_hdr *h = ds_ph(base);
    if (off < h->data_off || ((off - h->data_off) & (DS_GRANULE - 1))) return -1;
    uint64_t i = (off - h->data_off) >> DS_GSHIFT;
    return i < h->nbits ? (int64_t)i : -1;
}

/* granule index of an allocated (not freed, not deferred) block's payload offset, and its length in granules
   (*n, read once), or -1: a lock-free check */
static inline int64_t ds_pool_index(char *base, uint64_t off, uint32_t *n) {
    int64_t i = ds_pool_granule(base, off);
    if (i < 0) return -1;
    *n = DS_LOAD(&ds_lentab(base)[i]);
    if (*n == 0 || (*n & DS_LT_DEFERRED) || (uint64_t)i + *n > ds_ph(base)->nbits) return -1;
    return i;
}

/* capacity in bytes of the allocated block at off */
static inline int ds_pool_block_capacity(char *base, uint64_t off, uint64_t *cap) {
    uint32_t n;
    if (ds_pool_index(base, off, &n) < 0) return DS_BADARG;
    *cap = (uint64_t)n << DS_GSHIFT;
    return DS_OK;
}

/* give granules [i, i+n) back (the lock held; lentab[i] already cleared by the caller's CAS) */
static inline void ds_pool_release(char *base, uint64_t i, uint32_t n) {
    ds_pool_hdr *h = ds_ph(base);
    ds_bm_assign(ds_bitmap(base), i, n, 0);
    h->free_granules += n;
    h->allocated_blocks--;
    if (i < h->hint) h->hint = i; /* reuse what was just freed: its cache lines are hot */
}

/*
 * Deferred frees. A free never waits for the pool's lock: the holder may be stopped (SIGSTOP, a debugger) for
 * any time, and frees run where nothing may block (a Message's deallocation, a blocked peer's recovery of a dead
 * process's slot). When the lock is busy, the freer marks the block DEFERRED in lentab (a CAS, so a block is
 * freed once, by whoever marks or clears it first) and pushes it on a lock-free list whose links live in the
 * freed blocks' first 8 bytes; whoever takes the lock next frees the list (one popper at a time, the lock
 * holder, so the pops have no ABA problem). Until then the block counts as allocated.
 */
static inline void ds_pool_drain(char *base) {
    ds_pool_hdr *h = ds_ph(base);
    uint32_t *lt = ds_lentab(base);
    for (uint64_t k = 0; k <= h->nbits; k++) { /* (bounded: a scribbled list could hold a cycle) */
        uint64_t off = DS_LOAD(&h->deferred);
        if (!off) return;
        int64_t i = ds_pool_granule(base, off);
        uint32_t n = i < 0 ? 0 : DS_LOAD(&lt[i]);
        if (!(n & DS_LT_DEFERRED) || (uint64_t)i + (n & DS_LT_MAX) > h->nbits) {
            DS_CAS(&h->deferred, &off, 0); /* a scribbled list: drop it (its blocks leak), unless it just grew */
            continue;
        }
        uint64_t next;
        memcpy(&next, base + off, 8);
        if (!DS_CAS(&h->deferred, &off, next)) continue; /* a push came in between: pop again */
        DS_STORE(&lt[i], 0);
        ds_pool_release(base, (uint64_t)i, n & DS_LT_MAX);
    }
}

/* after a lock attempt returned r: DS_OK with the lock held (a dead holder's state repaired, the deferred frees
   done), DS_BUSY (another process holds it), or DS_CORRUPT */
static inline int ds_pool_locked(char *base, int r) {
    ds_pool_hdr *h = ds_ph(base);
    if (r == EOWNERDEAD) {
        ds_pool_repair(base);
        pthread_mutex_consistent(&h->mutex);
        r = 0;
    }
    if (r == EBUSY || r == ETIMEDOUT) return DS_BUSY;
    if (r) return DS_CORRUPT;
    if (DS_LOADR(&h->deferred)) ds_pool_drain(base);
    return DS_OK;
}

static inline int ds_pool_trylock(char *base) {
    return ds_pool_locked(base, pthread_mutex_trylock(&ds_ph(base)->mutex));
}

/* wait for the lock until `until` (CLOCK_MONOTONIC ns; a past time: one try). Call without the GIL. */
static inline int ds_pool_lock_until(char *base, int64_t until) {
    struct timespec ts;
    ts.tv_sec = until / 1000000000LL;
    ts.tv_nsec = until % 1000000000LL;
    return ds_pool_locked(base, pthread_mutex_clocklock(&ds_ph(base)->mutex, CLOCK_MONOTONIC, &ts));
}

/* wait for the lock for one chunk (ds_wait_chunk_ns) at most, and never past end (-1: no end): DS_OK (held),
   DS_INTR (a chunk passed: the caller checks signals and calls again), DS_BUSY (end passed), DS_CORRUPT */
static inline int ds_pool_lock_chunk(char *base, int64_t end) {
    int64_t until = ds_now() + ds_wait_chunk_ns;
    if (end >= 0 && end < until) until = end;
    int r = ds_pool_lock_until(base, until);
    return r == DS_BUSY && (end < 0 || ds_now() < end) ? DS_INTR : r;
}

static inline void ds_pool_unlock(char *base) { pthread_mutex_unlock(&ds_ph(base)->mutex); }

static inline uint64_t ds_granules_for(uint64_t nbytes) {
    uint64_t g = (nbytes + DS_GRANULE - 1) >> DS_GSHIFT;
    return g ? g : 1;
}

static inline int ds_pool_alloc_checks(char *base, uint64_t nbytes) {
    ds_pool_hdr *h = ds_ph(base);
    uint64_t n = ds_granules_for(nbytes);
    if (n > h->nbits || n > DS_LT_MAX) return DS_TOO_BIG;
    if (DS_LOADR(&h->destroyed)) return DS_DESTROYED;
    return DS_OK;
}

/* allocate with the lock held, and release it; *off = payload offset from the segment start */
static inline int ds_pool_alloc_locked(char *base, uint64_t nbytes, uint64_t *off) {
    ds_pool_hdr *h = ds_ph(base);
    uint64_t n = ds_granules_for(nbytes);
    if (h->free_granules < n) { ds_pool_unlock(base); return DS_FULL; }
    uint64_t *bm = ds_bitmap(base);
    uint64_t hint = h->hint < h->nbits ? h->hint : 0;
    int64_t i = ds_bm_find(bm, h->nbits, hint, h->nbits, n);
    if (i < 0 && hint) i = ds_bm_find(bm, h->nbits, 0, hint, n);
    if (i < 0) { ds_pool_unlock(base); return DS_FULL; }
    ds_bm_assign(bm, (uint64_t)i, n, 1);
    DS_STORE(&ds_lentab(base)[i], (uint32_t)n);
    h->free_granules -= n;
    h->allocated_blocks++;
    h->hint = (uint64_t)i + n;
    ds_pool_unlock(base);
    *off = h->data_off + ((uint64_t)i << DS_GSHIFT);
    return DS_OK;
}

/* one attempt that does not wait for the lock either (DS_BUSY: another process holds it; see ds_pool_alloc_wait) */
static inline int ds_pool_try_alloc(char *base, uint64_t nbytes, uint64_t *off) {
    int r = ds_pool_alloc_checks(base, nbytes);
    if (!r) r = ds_pool_trylock(base);
    return r ? r : ds_pool_alloc_locked(base, nbytes, off);
}

static inline int ds_pool_free(char *base, uint64_t off) {
    ds_pool_hdr *h = ds_ph(base);
    uint32_t n;
    int64_t i = ds_pool_index(base, off, &n);
    if (i < 0) return DS_BADARG;
    uint32_t *lt = ds_lentab(base);
    int r = ds_pool_trylock(base);
    if (r == DS_OK) {
        /* (a CAS, not a store: a concurrent deferred free of the same block must not free it twice) */
        if (!DS_CAS(&lt[i], &n, 0)) { ds_pool_unlock(base); return DS_BADARG; }
        ds_pool_release(base, (uint64_t)i, n);
        ds_pool_unlock(base);
    } else if (r == DS_BUSY) { /* see ds_pool_drain */
        if (!DS_CAS(&lt[i], &n, n | DS_LT_DEFERRED)) return DS_BADARG; /* freed meanwhile by another */
        uint64_t head = DS_LOAD(&h->deferred);
        do memcpy(base + off, &head, 8);
        while (!DS_CAS(&h->deferred, &head, off));
    } else {
        return r;
    }
    DS_FENCE();
    ds_wake_if_waiting(&h->waiters, &h->free_seq); /* (a deferred free too: the woken allocator drains it) */
    return DS_OK;
}

/* counters; read without the lock when another process holds it */
static inline int ds_pool_stats(char *base, uint64_t *free_bytes, uint64_t *blocks, uint64_t *repairs) {
    ds_pool_hdr *h = ds_ph(base);
    int r = ds_pool_trylock(base);
    if (r != DS_OK && r != DS_BUSY) return r;
    *free_bytes = DS_LOADR(&h->free_granules) << DS_GSHIFT;
    *blocks = DS_LOADR(&h->allocated_blocks);
    *repairs = DS_LOADR(&h->repairs);
    if (r == DS_OK) ds_pool_unlock(base);
    return DS_OK;
}

/* whether some process destroyed the pool (a mapping made before stays readable) */
static inline int ds_pool_is_destroyed(char *base) { return DS_LOADR(&ds_ph(base)->destroyed) != 0; }

static inline void ds_pool_mark_destroyed(char *base) {
    ds_pool_hdr *h = ds_ph(base);
    DS_STORES(&h->destroyed, 1);
    __atomic_add_fetch(&h->free_seq, 1, __ATOMIC_SEQ_CST);
    ds_futex_wake_all(&h->free_seq);
}

/* lock, then allocate: DS_OK, DS_FULL, DS_INTR (a chunk of the lock wait passed), DS_BUSY / DS_LOCKED (the lock
   was still held at lock_end: by a non-blocking call / a blocking one), or DS_TOO_BIG, DS_DESTROYED, DS_CORRUPT */
static inline int ds_pool_alloc_by(char *base, uint64_t nbytes, uint64_t *off, int64_t lock_end, int nonblock) {
    int r = ds_pool_alloc_checks(base, nbytes);
    if (!r) r = ds_pool_lock_chunk(base, lock_end);
    if (r == DS_BUSY) return nonblock ? DS_BUSY : DS_LOCKED;
    return r ? r : ds_pool_alloc_locked(base, nbytes, off);
}

/*
 * Blocking alloc, call without the GIL. deadline: CLOCK_MONOTONIC ns, -1 for none, or 0 for a non-blocking call
 * that found the lock busy (it waits up to ds_lock_grace_ns for the lock, never for room). The lock is waited for
 * in chunks like the room (DS_INTR: the caller checks signals and calls again with the same *w), so a process
 * stopped while holding it delays an allocation until its deadline, not for ever.
 */
static inline int ds_pool_alloc_wait(char *base, uint64_t nbytes, uint64_t *off, int64_t deadline, ds_wait_ctx *w) {
    ds_pool_hdr *h = ds_ph(base);
    if (!w->started) {
        w->started = 1;
        w->t0 = ds_now();
    }
    int nonblock = deadline == 0;
    int64_t lock_end = nonblock ? w->t0 + ds_lock_grace_ns : deadline;
    for (;;) {
        int r = ds_pool_alloc_by(base, nbytes, off, lock_end, nonblock); /* before the flag: see ds_wake_if_waiting */
        if (r != DS_FULL || nonblock) return r;
        uint32_t seq = ds_prepare_wait(&h->waiters, &h->free_seq);
        r = ds_pool_alloc_by(base, nbytes, off, lock_end, nonblock);
        if (r != DS_FULL) return r;
        int64_t wait = ds_wait_chunk_ns;
        if (deadline >= 0) {
            int64_t now = ds_now();
            if (now >= deadline) return DS_TIMEOUT;
            if (deadline - now < wait) wait = deadline - now;
        }
        int e = ds_futex_wait(&h->free_seq, seq, wait);
        if (e == EINTR || e == ETIMEDOUT) return DS_INTR; /* let the caller check signals, then retry */
    }
}

/* wait for the lock (for a test: a process that holds it while others run): DS_OK, DS_INTR, DS_LOCKED */
static inline int ds_pool_lock_wait(char *base, int64_t deadline) {
    int r = ds_pool_lock_chunk(base, deadline);
    return r == DS_BUSY ? DS_LOCKED : r;
}

#endif /* DRAGON_DSHM_POOL_H */
