/* dshm_pool.h -- the pool: header, allocator, robust mutex (see dshm.h for the layout) */
#ifndef DRAGON_DSHM_POOL_H
#define DRAGON_DSHM_POOL_H

#include "dshm_base.h"

/* ---------------------------------------------------------------- pool */
#define DS_POOL_MAGIC 0x4c4f4f504e475244ULL /* "DRGNPOOL" */
#define DS_VERSION 1u
#define DS_GSHIFT 8
#define DS_GRANULE (1ULL << DS_GSHIFT)
#define DS_PAGE 4096ULL
#define DS_MAX_GRANULES (1ULL << 34) /* 4 TiB of data */

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

/* rebuild bitmap and counters from lentab (after a process died holding the mutex) */
static inline void ds_pool_repair(char *base) {
    ds_pool_hdr *h = ds_ph(base);
    uint64_t nbits = h->nbits, nwords = (nbits + 63) / 64, used = 0, blocks = 0, covered = 0;
    uint64_t *bm = ds_bitmap(base);
    uint32_t *lt = ds_lentab(base);
    memset(bm, 0, nwords * 8);
    for (uint64_t i = 0; i < nbits; i++) {
        uint32_t n = DS_LOADR(&lt[i]);
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

static inline int ds_pool_lock(char *base) {
    ds_pool_hdr *h = ds_ph(base);
    int r = pthread_mutex_lock(&h->mutex);
    if (r == EOWNERDEAD) {
        ds_pool_repair(base);
        pthread_mutex_consistent(&h->mutex);
        return DS_OK;
    }
    return r ? DS_CORRUPT : DS_OK;
}

static inline void ds_pool_unlock(char *base) { pthread_mutex_unlock(&ds_ph(base)->mutex); }

static inline uint64_t ds_granules_for(uint64_t nbytes) {
    uint64_t g = (nbytes + DS_GRANULE - 1) >> DS_GSHIFT;
    return g ? g : 1;
}

/* one attempt; *off = payload offset from the segment start */
static inline int ds_pool_try_alloc(char *base, uint64_t nbytes, uint64_t *off) {
    ds_pool_hdr *h = ds_ph(base);
    uint64_t n = ds_granules_for(nbytes);
    if (n > h->nbits || n > 0xffffffffULL) return DS_TOO_BIG;
    if (DS_LOADR(&h->destroyed)) return DS_DESTROYED;
    int r = ds_pool_lock(base);
    if (r) return r;
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

/* granule index of an allocated block's payload offset, or -1 (lock-free check) */
static inline int64_t ds_pool_index(char *base, uint64_t off) {
    ds_pool_hdr *h = ds_ph(base);
    if (off < h->data_off || ((off - h->data_off) & (DS_GRANULE - 1))) return -1;
    uint64_t i = (off - h->data_off) >> DS_GSHIFT;
    if (i >= h->nbits) return -1;
    uint32_t n = DS_LOAD(&ds_lentab(base)[i]);
    if (n == 0 || i + n > h->nbits) return -1;
    return (int64_t)i;
}

/* capacity in bytes of the allocated block at off */
static inline int ds_pool_block_capacity(char *base, uint64_t off, uint64_t *cap) {
    int64_t i = ds_pool_index(base, off);
    if (i < 0) return DS_BADARG;
    *cap = (uint64_t)DS_LOAD(&ds_lentab(base)[i]) << DS_GSHIFT;
    return DS_OK;
}

static inline int ds_pool_free(char *base, uint64_t off) {
    ds_pool_hdr *h = ds_ph(base);
    int64_t i = ds_pool_index(base, off);
    if (i < 0) return DS_BADARG;
    int r = ds_pool_lock(base);
    if (r) return r;
    uint32_t *lt = ds_lentab(base);
    uint32_t n = lt[i];
    if (n == 0 || (uint64_t)i + n > h->nbits) { ds_pool_unlock(base); return DS_BADARG; }
    DS_STORE(&lt[i], 0);
    ds_bm_assign(ds_bitmap(base), (uint64_t)i, n, 0);
    h->free_granules += n;
    h->allocated_blocks--;
    if ((uint64_t)i < h->hint) h->hint = (uint64_t)i; /* reuse what was just freed: its cache lines are hot */
    ds_pool_unlock(base);
    DS_FENCE();
    ds_wake_if_waiting(&h->waiters, &h->free_seq);
    return DS_OK;
}

static inline int ds_pool_stats(char *base, uint64_t *free_bytes, uint64_t *blocks, uint64_t *repairs) {
    ds_pool_hdr *h = ds_ph(base);
    int r = ds_pool_lock(base);
    if (r) return r;
    *free_bytes = h->free_granules << DS_GSHIFT;
    *blocks = h->allocated_blocks;
    *repairs = h->repairs;
    ds_pool_unlock(base);
    return DS_OK;
}

static inline void ds_pool_mark_destroyed(char *base) {
    ds_pool_hdr *h = ds_ph(base);
    DS_STORES(&h->destroyed, 1);
    __atomic_add_fetch(&h->free_seq, 1, __ATOMIC_SEQ_CST);
    ds_futex_wake_all(&h->free_seq);
}

/* blocking alloc, call without the GIL. deadline: CLOCK_MONOTONIC ns, or -1 for none */
static inline int ds_pool_alloc_wait(char *base, uint64_t nbytes, uint64_t *off, int64_t deadline) {
    ds_pool_hdr *h = ds_ph(base);
    for (;;) {
        int r = ds_pool_try_alloc(base, nbytes, off); /* before the flag: see ds_wake_if_waiting */
        if (r != DS_FULL) return r;
        uint32_t seq = ds_prepare_wait(&h->waiters, &h->free_seq);
        r = ds_pool_try_alloc(base, nbytes, off);
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

#endif /* DRAGON_DSHM_POOL_H */
