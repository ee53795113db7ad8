/*
 * dshm.h -- the parts of dragon._core that C says better than Cython:
 * atomics, futex syscalls, the pool allocator and the channel ring.
 *
 * Everything works on offsets inside one POSIX shared-memory segment (a "pool"), never on pointers stored
 * in shared memory, so every process may map the segment at a different address.
 *
 * Every function returns a small int code (DS_OK, DS_FULL, ...); core.pyx maps a code to an exception in one place.
 *
 * Pool layout:  [ds_pool_hdr | page pad][bitmap of used granules][lentab: uint32 per granule][data ...]
 *   - a block is a run of granules (256 B); its payload starts at the first granule (so 256-byte aligned);
 *   - lentab[i] != 0 iff granule i starts an allocated block of lentab[i] granules;
 *   - the bitmap is a search accelerator derived from lentab: after a process dies holding the robust mutex,
 *     the bitmap and the counters are rebuilt from lentab (alloc sets lentab last, free clears it first),
 *     so a process killed inside alloc/free leaks at most the block it was allocating or freeing.
 *
 * Channel layout (inside one pool block): [ds_ch_hdr (6 cache lines)][slot 0][slot 1]...
 *   Bounded MPMC ring after Vyukov, but a claim is a CAS on the SLOT's state word, which carries the
 *   claimer's pid:  state = lap << 32 | phase << 30 | pid,  phase EMPTY / WRITING / FULL / READING.
 *   tail/head are only hints advanced by whoever sees them stale, so a claimer killed between its claim and
 *   the counter update strands nothing; a slot left WRITING/READING by a dead pid is taken over by a blocked
 *   peer (the dead writer's message is dropped, the dead reader's slot released).
 */
#ifndef DRAGON_DSHM_H
#define DRAGON_DSHM_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <signal.h>
#include <sched.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdio.h>
#include <limits.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include <linux/futex.h>

/* ---------------------------------------------------------------- return codes */
enum {
    DS_OK = 0,
    DS_FULL = 1,       /* channel full / pool has no room right now */
    DS_EMPTY = 2,      /* channel empty */
    DS_TIMEOUT = 3,
    DS_TOO_BIG = 4,    /* can never fit */
    DS_DESTROYED = 5,
    DS_CORRUPT = 6,    /* header/state inconsistent */
    DS_INTR = 7,       /* a signal arrived while waiting: caller runs PyErr_CheckSignals and retries */
    DS_BADARG = 8,     /* e.g. an offset that is not an allocated block */
    DS_TOO_SMALL = 9,  /* receive buffer too small; message left queued */
    DS_STALE = 10,     /* generation mismatch */
};

/* ---------------------------------------------------------------- atomics, time, futex */
#define DS_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define DS_LOADR(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define DS_LOADS(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define DS_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define DS_STORES(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define DS_CAS(p, expp, v) \
    __atomic_compare_exchange_n((p), (expp), (v), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)
#define DS_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define DS_ALIGN64 __attribute__((aligned(64)))

static inline void ds_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline int64_t ds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/*
 * Blocking waits (see ds_ch_wait): poll with pause, and sched_yield every ds_yield_ns (at every poll when the peer
 * runs on this CPU), until the budget learned per handle and direction (ds_chan.ad, ds_spin_ns .. ds_spin_max_ns)
 * is used up, then sleep on the futex in chunks of ds_wait_chunk_ns.
 */
static int64_t ds_spin_ns = 20000;          /* keep the CPU at least this long before sleeping on a futex */
static int64_t ds_spin_max_ns = 100000;     /* ... and at most this long (the budget adapts in between) */
static int64_t ds_yield_ns = 1000;          /* pause-spin this long between yields (0 if the peer is on this CPU) */
static int64_t ds_wait_chunk_ns = 50000000; /* sleep in chunks this long (dead owners, destroy, signals) */
static int64_t ds_switch_ns = 1500;         /* a sched_yield that took longer let another task run */

/* per-process counters of the slow path (syscalls), for tests and tuning; relaxed atomics */
typedef struct {
    uint64_t waits;        /* blocking waits that had to wait (first try failed) */
    uint64_t yields;       /* sched_yield calls */
    uint64_t switches;     /* ... of which let another task run (took > ds_switch_ns) */
    uint64_t sleeps;       /* FUTEX_WAIT calls */
    uint64_t wakes;        /* FUTEX_WAKE calls */
} ds_stats_t;
static ds_stats_t ds_stats;
#define DS_COUNT(field) __atomic_add_fetch(&ds_stats.field, 1, __ATOMIC_RELAXED)

/* returns 0 (woken or value changed) or an errno (ETIMEDOUT, EINTR, EAGAIN) */
static inline int ds_futex_wait(uint32_t *addr, uint32_t val, int64_t timeout_ns) {
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tp = &ts;
    }
    DS_COUNT(sleeps);
    long r = syscall(SYS_futex, addr, FUTEX_WAIT, val, tp, NULL, 0);
    return r == 0 ? 0 : errno;
}

static inline void ds_futex_wake_all(uint32_t *addr) {
    DS_COUNT(wakes);
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/*
 * Sleep/wake protocol (no lost wake-up, self-healing): a sleeper reads the sequence word, THEN sets the waiting
 * flag (seq_cst), re-checks its condition and FUTEX_WAITs on the sequence value it read. A waker makes its change
 * visible (seq_cst), and only if the flag is set, clears it (exchange), bumps the sequence and wakes all. There is
 * no waiter count to decrement, so a sleeper that times out, or is SIGKILLed while asleep, costs at most one
 * spurious wake-up instead of a wake syscall on every operation forever.
 * A woken sleeper re-tries its condition BEFORE it sets the flag again: setting it first and then finding the
 * message (the usual case after a wake) would leave the flag set, and the next operation would make a wake
 * syscall for nobody. So one sleep costs exactly one FUTEX_WAKE, and nothing sleeping costs none.
 */
static inline void ds_wake_if_waiting(uint32_t *flag, uint32_t *seq) {
    if (__atomic_load_n(flag, __ATOMIC_SEQ_CST) && __atomic_exchange_n(flag, 0, __ATOMIC_SEQ_CST)) {
        __atomic_add_fetch(seq, 1, __ATOMIC_SEQ_CST);
        ds_futex_wake_all(seq);
    }
}

static inline uint32_t ds_prepare_wait(uint32_t *flag, uint32_t *seq) {
    uint32_t v = __atomic_load_n(seq, __ATOMIC_SEQ_CST);
    __atomic_store_n(flag, 1, __ATOMIC_SEQ_CST);
    DS_FENCE();
    return v;
}

/* ---------------------------------------------------------------- process identity and liveness */
/*
 * A claim carries a 30-bit "claim id": pid (22 bits: Linux pid_max <= 2^22) | 8-bit tag derived from the
 * process's start time. A slot whose pid is alive but whose tag does not match the live process's start time
 * belongs to a dead process whose pid was reused, so it can still be taken over (1/256 chance of a false match).
 */
#define DS_PID_BITS 22
#define DS_PID_MASK ((1u << DS_PID_BITS) - 1)
static uint32_t ds_pid_cache = 0; /* this process's claim id */
static int64_t ds_last_liveness_check = 0;

/* parse a /proc/<pid>/stat line: state char and start time (field 22); 0 on success */
static inline int ds_parse_stat(char *buf, char *state, unsigned long long *start) {
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ' || !p[2]) return -1;
    *state = p[2];
    p += 2;
    for (int field = 3; field < 22; field++) { /* skip to field 22 */
        p = strchr(p, ' ');
        if (!p) return -1;
        p++;
    }
    unsigned long long v = 0;
    if (*p < '0' || *p > '9') return -1;
    while (*p >= '0' && *p <= '9') v = v * 10 + (unsigned long long)(*p++ - '0');
    *start = v;
    return 0;
}

static inline uint32_t ds_tag(unsigned long long start) {
    return (uint32_t)((start * 0x9E3779B97F4A7C15ULL) >> 56);
}

/* read a stat file into buf (NUL-terminated); bytes read or -1 (errno set) */
static inline ssize_t ds_read_stat(const char *path, char *buf, size_t len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return n;
}

static void ds_set_identity(void) { /* only open/read/close: fine in an atfork child handler */
    uint32_t pid = (uint32_t)getpid() & DS_PID_MASK, tag = 0;
    char buf[1024], state;
    unsigned long long start;
    if (ds_read_stat("/proc/self/stat", buf, sizeof buf) > 0 && ds_parse_stat(buf, &state, &start) == 0)
        tag = ds_tag(start);
    ds_pid_cache = (tag << DS_PID_BITS) | pid;
}

static void ds_atfork_child(void) {
    ds_set_identity();
    ds_last_liveness_check = 0;
    memset(&ds_stats, 0, sizeof ds_stats);
}

static inline int ds_init(void) {
    ds_set_identity();
    return pthread_atfork(NULL, NULL, ds_atfork_child);
}

static inline uint32_t ds_me(void) { return ds_pid_cache; }

/* 1 if the claimer is gone, a zombie (killed, not yet reaped) or its pid now names another process; else 0 */
static inline int ds_pid_dead(uint32_t id) {
    uint32_t pid = id & DS_PID_MASK;
    if (pid == 0 || id == ds_pid_cache) return 0;
    if (kill((pid_t)pid, 0) == -1 && errno == ESRCH) return 1;
    char path[64], buf[1024], state;
    unsigned long long start;
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    if (ds_read_stat(path, buf, sizeof buf) < 0) return errno == ENOENT;
    if (ds_parse_stat(buf, &state, &start) != 0) return 0;
    if (state == 'Z' || state == 'X') return 1;
    return ds_tag(start) != (id >> DS_PID_BITS);
}

static inline int ds_set_pdeathsig(int sig) { return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0 ? 0 : errno; }
static inline int ds_set_child_subreaper(void) { return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0 ? 0 : errno; }

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

/* ---------------------------------------------------------------- channel */
#define DS_CH_MAGIC 0x4c4e48434e475244ULL /* "DRGNCHNL" */
#define DS_CH_DEAD 0x444145444e475244ULL  /* "DRGNDEAD" */
#define DS_CH_NAME 64
#define DS_SLOT_HDR 16
#define DS_SLOT_BLOCK 1u /* payload in a pool block; data[0..8) = offset */

#define DS_PH_EMPTY 0ULL
#define DS_PH_WRITING 1ULL
#define DS_PH_FULL 2ULL
#define DS_PH_READING 3ULL
#define DS_ST(lap, ph, pid) ((((uint64_t)(uint32_t)(lap)) << 32) | ((uint64_t)(ph) << 30) | (uint64_t)(pid))
#define DS_ST_LAP(s) ((uint32_t)((s) >> 32))
#define DS_ST_PH(s) (((s) >> 30) & 3ULL)
#define DS_ST_PID(s) ((uint32_t)((s) & 0x3fffffffULL))

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t destroyed;
    uint64_t generation;
    uint64_t pool_generation;
    uint32_t capacity;
    uint32_t stride;
    uint32_t block_size;
    uint32_t recoveries; /* slots taken over from dead processes */
    uint64_t nbytes;     /* header + slots */
    DS_ALIGN64 char name[DS_CH_NAME];
    DS_ALIGN64 uint64_t tail;
    DS_ALIGN64 uint64_t head;
    DS_ALIGN64 uint32_t ne_seq; /* "not empty": receivers sleep here */
    uint32_t ne_waiters;        /* flag: a receiver may be asleep */
    uint32_t ne_cpu;            /* the CPU of the last sender (a hint for waiting receivers, see ds_ch_wait) */
    DS_ALIGN64 uint32_t nf_seq; /* "not full": senders sleep here */
    uint32_t nf_waiters;        /* flag: a sender may be asleep */
    uint32_t nf_cpu;            /* the CPU of the last receiver (a hint for waiting senders) */
    DS_ALIGN64 char slots[];
} ds_ch_hdr;

typedef struct {
    uint64_t state;
    uint32_t len;
    uint32_t flags;
    char data[];
} ds_slot;

/* what a handle learned about its waits in one direction (see ds_ch_wait) */
typedef struct {
    int64_t budget; /* how long to keep the CPU (spin, yield) before sleeping on the futex, ns */
    uint32_t waits; /* waits with the peer on this CPU so far (every 64th sleeps at once, see ds_ch_wait) */
} ds_adapt;

/* per-process view of a channel (lives inside the Cython object) */
typedef struct {
    char *base; /* pool mapping */
    ds_ch_hdr *h;
    uint64_t cap;
    uint64_t stride;
    uint64_t block_size;
    uint64_t generation;
    ds_adapt ad[2]; /* [0]: waits for room (send), [1]: waits for a message (recv, poll) */
} ds_chan;

static inline uint64_t ds_ch_stride(uint64_t block_size) {
    return ds_round(DS_SLOT_HDR + (block_size < 8 ? 8 : block_size), 64);
}

static inline uint64_t ds_ch_nbytes(uint64_t capacity, uint64_t block_size) {
    return sizeof(ds_ch_hdr) + capacity * ds_ch_stride(block_size);
}

static inline ds_slot *ds_ch_slot(const ds_chan *c, uint64_t pos) {
    return (ds_slot *)(c->h->slots + (pos % c->cap) * c->stride);
}

static inline void ds_ch_init(char *base, uint64_t off, uint64_t capacity, uint64_t block_size,
                              uint64_t generation, const char *name, size_t namelen) {
    ds_ch_hdr *h = (ds_ch_hdr *)(base + off);
    memset(h, 0, sizeof(ds_ch_hdr));
    h->version = DS_VERSION;
    h->generation = generation;
    h->pool_generation = ds_ph(base)->generation;
    h->capacity = (uint32_t)capacity;
    h->stride = (uint32_t)ds_ch_stride(block_size);
    h->block_size = (uint32_t)block_size;
    h->nbytes = ds_ch_nbytes(capacity, block_size);
    if (namelen >= DS_CH_NAME) namelen = DS_CH_NAME - 1;
    memcpy(h->name, name, namelen);
    h->ne_cpu = h->nf_cpu = UINT32_MAX;
    for (uint64_t i = 0; i < capacity; i++) {
        ds_slot *s = (ds_slot *)(h->slots + i * h->stride);
        s->state = DS_ST(0, DS_PH_EMPTY, 0);
        s->len = 0;
        s->flags = 0;
    }
    DS_STORES(&h->magic, DS_CH_MAGIC);
}

/* validate the channel header at off (an allocated pool block) and fill c */
static inline int ds_ch_open(char *base, uint64_t off, uint64_t generation, ds_chan *c) {
    uint64_t bcap;
    if (ds_pool_block_capacity(base, off, &bcap) != DS_OK) return DS_BADARG;
    if (bcap < sizeof(ds_ch_hdr)) return DS_CORRUPT;
    ds_ch_hdr *h = (ds_ch_hdr *)(base + off);
    uint64_t magic = DS_LOAD(&h->magic);
    if (magic == DS_CH_DEAD) return DS_DESTROYED;
    if (magic != DS_CH_MAGIC || h->version != DS_VERSION) return DS_CORRUPT;
    if (h->generation != generation) return DS_STALE;
    if (h->pool_generation != ds_ph(base)->generation) return DS_STALE;
    if (h->capacity < 1 || h->stride != ds_ch_stride(h->block_size) ||
        h->nbytes != ds_ch_nbytes(h->capacity, h->block_size) || h->nbytes > bcap)
        return DS_CORRUPT;
    if (DS_LOAD(&h->destroyed)) return DS_DESTROYED;
    c->base = base;
    c->h = h;
    c->cap = h->capacity;
    c->stride = h->stride;
    c->block_size = h->block_size;
    c->generation = generation;
    for (int i = 0; i < 2; i++) {
        c->ad[i].budget = ds_spin_ns;
        c->ad[i].waits = 0;
    }
    return DS_OK;
}

static inline int ds_ch_alive(const ds_chan *c) {
    ds_ch_hdr *h = c->h;
    return DS_LOADR(&h->magic) == DS_CH_MAGIC && h->generation == c->generation && !DS_LOADR(&h->destroyed);
}

static inline char *ds_slot_data(ds_slot *s) { return s->data; }
static inline uint32_t ds_slot_len(ds_slot *s) { return s->len; }
static inline int ds_slot_is_block(ds_slot *s) { return (s->flags & DS_SLOT_BLOCK) != 0; }
static inline uint64_t ds_slot_block_off(ds_slot *s) { uint64_t o; memcpy(&o, s->data, 8); return o; }

static inline void ds_slot_put_inline(ds_slot *s, const char *p, uint32_t n) {
    memcpy(s->data, p, n);
    s->len = n;
    s->flags = 0;
}

/* the offset is written before the flag, so a dead writer's block can be freed by whoever skips its slot */
static inline void ds_slot_put_block(ds_slot *s, uint64_t off, uint32_t n) {
    memcpy(s->data, &off, 8);
    s->len = n;
    __atomic_store_n(&s->flags, DS_SLOT_BLOCK, __ATOMIC_RELEASE);
}

/* a reader that took ownership of (or freed) the block clears the flag first */
static inline void ds_slot_clear_block(ds_slot *s) { __atomic_store_n(&s->flags, 0, __ATOMIC_RELEASE); }

/*
 * One attempt to claim a slot for writing.  OK: *slot is ours (WRITING), fill it and call ds_ch_commit_send.
 * FULL: *slot / *st tell the slot in the way (its owner's pid may be checked on the slow path).
 */
static inline int ds_ch_claim_send(const ds_chan *c, ds_slot **slot, uint32_t *lap_out, uint64_t *st_out) {
    ds_ch_hdr *h = c->h;
    uint32_t me = ds_me();
    for (;;) {
        uint64_t pos = DS_LOAD(&h->tail);
        ds_slot *s = ds_ch_slot(c, pos);
        uint32_t lap = (uint32_t)(pos / c->cap);
        uint64_t st = DS_LOAD(&s->state);
        if (st == DS_ST(lap, DS_PH_EMPTY, 0)) {
            if (DS_CAS(&s->state, &st, DS_ST(lap, DS_PH_WRITING, me))) {
                uint64_t p = pos;
                DS_CAS(&h->tail, &p, pos + 1);
                *slot = s;
                *lap_out = lap;
                return DS_OK;
            }
            continue;
        }
        uint32_t sl = DS_ST_LAP(st);
        if (sl == lap || sl == lap + 1) { /* tail is stale: help it on */
            uint64_t p = pos;
            DS_CAS(&h->tail, &p, pos + 1);
            continue;
        }
        if (DS_LOAD(&h->tail) != pos) continue;
        *slot = s;
        *st_out = st;
        if (!ds_ch_alive(c)) return DS_DESTROYED;
        return sl == lap - 1 ? DS_FULL : DS_CORRUPT;
    }
}

/* record the CPU this process runs on (sched_getcpu reads glibc's rseq area: a few ns); stored only when it changed,
   in the line the commit reads anyway for the waiting flag */
static inline void ds_note_cpu(uint32_t *p) {
    uint32_t cpu = (uint32_t)sched_getcpu(); /* -1 (never on Linux) is UINT32_MAX: "unknown" */
    if (__atomic_load_n(p, __ATOMIC_RELAXED) != cpu) __atomic_store_n(p, cpu, __ATOMIC_RELAXED);
}

static inline void ds_ch_commit_send(const ds_chan *c, ds_slot *s, uint32_t lap) {
    ds_ch_hdr *h = c->h;
    ds_note_cpu(&h->ne_cpu);
    DS_STORES(&s->state, DS_ST(lap, DS_PH_FULL, 0));
    ds_wake_if_waiting(&h->ne_waiters, &h->ne_seq);
}

/*
 * One attempt to claim a message for reading.  maxlen: refuse (DS_TOO_SMALL, *st_out = length, nothing claimed)
 * a message longer than this.  OK: *slot is ours (READING); read it and call ds_ch_commit_recv.
 */
static inline int ds_ch_claim_recv(const ds_chan *c, uint64_t maxlen, ds_slot **slot, uint32_t *lap_out,
                                   uint64_t *st_out) {
    ds_ch_hdr *h = c->h;
    uint32_t me = ds_me();
    for (;;) {
        uint64_t pos = DS_LOAD(&h->head);
        ds_slot *s = ds_ch_slot(c, pos);
        uint32_t lap = (uint32_t)(pos / c->cap);
        uint64_t st = DS_LOAD(&s->state);
        if (st == DS_ST(lap, DS_PH_FULL, 0)) {
            uint32_t len = DS_LOADR(&s->len);
            if (len > maxlen) {
                if (DS_LOAD(&s->state) != st) continue;
                *st_out = len;
                return DS_TOO_SMALL;
            }
            if (DS_CAS(&s->state, &st, DS_ST(lap, DS_PH_READING, me))) {
                uint64_t p = pos;
                DS_CAS(&h->head, &p, pos + 1);
                *slot = s;
                *lap_out = lap;
                return DS_OK;
            }
            continue;
        }
        uint32_t sl = DS_ST_LAP(st);
        uint64_t ph = DS_ST_PH(st);
        if ((sl == lap && ph == DS_PH_READING) || sl == lap + 1) { /* head is stale */
            uint64_t p = pos;
            DS_CAS(&h->head, &p, pos + 1);
            continue;
        }
        if (DS_LOAD(&h->head) != pos) continue;
        *slot = s;
        *st_out = st;
        if (!ds_ch_alive(c)) return DS_DESTROYED;
        if ((sl == lap && (ph == DS_PH_EMPTY || ph == DS_PH_WRITING)) || sl == lap - 1) return DS_EMPTY;
        return DS_CORRUPT;
    }
}

static inline void ds_ch_commit_recv(const ds_chan *c, ds_slot *s, uint32_t lap) {
    ds_ch_hdr *h = c->h;
    ds_note_cpu(&h->nf_cpu);
    DS_STORES(&s->state, DS_ST(lap + 1, DS_PH_EMPTY, 0));
    ds_wake_if_waiting(&h->nf_waiters, &h->nf_seq);
}

/* is a message ready at head (non-consuming)? If not, *slot / *st tell the head slot (for dead-owner checks) */
static inline int ds_ch_ready(const ds_chan *c, ds_slot **slot, uint64_t *st_out) {
    ds_ch_hdr *h = c->h;
    for (;;) {
        uint64_t pos = DS_LOAD(&h->head);
        ds_slot *s = ds_ch_slot(c, pos);
        uint32_t lap = (uint32_t)(pos / c->cap);
        uint64_t st = DS_LOAD(&s->state);
        if (st == DS_ST(lap, DS_PH_FULL, 0)) return 1;
        uint32_t sl = DS_ST_LAP(st);
        if ((sl == lap && DS_ST_PH(st) == DS_PH_READING) || sl == lap + 1) {
            uint64_t p = pos;
            DS_CAS(&h->head, &p, pos + 1);
            continue;
        }
        if (DS_LOAD(&h->head) != pos) continue;
        *slot = s;
        *st_out = st;
        return 0;
    }
}

static inline uint64_t ds_ch_len(const ds_chan *c) {
    uint64_t head = DS_LOAD(&c->h->head);
    uint64_t tail = DS_LOAD(&c->h->tail);
    if (tail <= head) return 0;
    return tail - head > c->cap ? c->cap : tail - head;
}

/* How many slots receivers have taken (head) and senders have claimed (tail) since the channel was made: every
 * message whose send has returned sits below tail, and has been taken once head is past it. */
static inline void ds_ch_positions(const ds_chan *c, uint64_t *head, uint64_t *tail) {
    *head = DS_LOAD(&c->h->head);
    *tail = DS_LOAD(&c->h->tail);
}

static inline void ds_ch_wake_all(const ds_chan *c) {
    ds_ch_hdr *h = c->h;
    __atomic_add_fetch(&h->ne_seq, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&h->nf_seq, 1, __ATOMIC_SEQ_CST);
    ds_futex_wake_all(&h->ne_seq);
    ds_futex_wake_all(&h->nf_seq);
}

/*
 * If the slot is held (WRITING/READING) by a dead process, take it over: a dead writer's message is dropped,
 * a dead reader's slot is released; a pool block referenced by the slot is freed.  Returns 1 if it recovered.
 */
static inline int ds_ch_recover(const ds_chan *c, ds_slot *s, uint64_t st) {
    uint64_t ph = DS_ST_PH(st);
    if (ph != DS_PH_WRITING && ph != DS_PH_READING) return 0;
    if (!ds_pid_dead(DS_ST_PID(st))) return 0;
    /* take the slot over in our own name first, so two recoverers cannot both touch it */
    if (!DS_CAS(&s->state, &st, DS_ST(DS_ST_LAP(st), ph, ds_me()))) return 0;
    uint32_t flags = __atomic_load_n(&s->flags, __ATOMIC_ACQUIRE);
    uint64_t off = ds_slot_block_off(s);
    __atomic_store_n(&s->flags, 0, __ATOMIC_RELEASE);
    DS_STORES(&s->state, DS_ST(DS_ST_LAP(st) + 1, DS_PH_EMPTY, 0));
    if (flags & DS_SLOT_BLOCK) ds_pool_free(c->base, off);
    __atomic_add_fetch(&c->h->recoveries, 1, __ATOMIC_RELAXED);
    ds_ch_wake_all(c);
    return 1;
}

/* recovery from the non-blocking path: at most one liveness check per 10 ms per process */
static inline int ds_ch_maybe_recover(const ds_chan *c, ds_slot *s, uint64_t st) {
    uint64_t ph = DS_ST_PH(st);
    if (ph != DS_PH_WRITING && ph != DS_PH_READING) return 0;
    int64_t now = ds_now();
    if (now - ds_last_liveness_check < 10000000LL) return 0;
    ds_last_liveness_check = now;
    return ds_ch_recover(c, s, st);
}

/*
 * Blocking waits.  A futex sleep is expensive here in a way the sleeper does not pay alone: the wake-up takes
 * 20-40 us on a VM (the idle vCPU halted), and a peer that sleeps in turn while it waits for the late answer makes
 * the round trip slow for as long as both sides keep timing out their spin (the "slow mode" of ping-pong). So a
 * wait keeps the CPU for a budget learned from its recent waits (ds_spin_ns .. ds_spin_max_ns): twice the last
 * waits, so that a short wait, or one that was only long because the peer was waking up, is spun through next time;
 * a wait longer than the cap brings the budget back down (an idle receiver sleeps after ds_spin_ns).
 *
 * Within the budget it polls with `pause` and calls sched_yield every ds_yield_ns (1 us). Pause-spinning longer
 * between yields halved 1x1 streaming on this VM. But when the peer is queued on this very CPU (2 cores shared by
 * more runnable processes) spinning only delays it, and the round trip was 7.5 us instead of 4: so a wait whose
 * peer last committed on this CPU (ne_cpu / nf_cpu, which every commit keeps up to date) yields at every poll.
 * Yields never move a task to a CPU that became free, a wake-up does: so every 64th such wait sleeps at once
 * (a pair pinned to one CPU and then freed otherwise stayed in the 4 us mode for half its round trips).
 * A yield that lost the CPU for long (another process's time slice; not a yield to the peer on this CPU, which may
 * well work that long) ends the spinning: a sleeper is woken with priority, a yielder competes as a CPU hog
 * (gap-30us ping-pong with a busy process had a 4 ms p99); such a wait also brings the budget down. Neither of these applies to a fixed budget (ds_spin_max_ns == ds_spin_ns).
 */
typedef struct { /* one blocking call, across its DS_INTR returns: zero it before the first call */
    int started;        /* spin and budget below were set */
    int64_t t0;         /* when the wait began (0: not read yet: the first clock read is after 16 polls) */
    int64_t last;       /* the last clock read */
    int64_t last_check; /* last liveness check of the slot's owner */
    int64_t next_yield; /* no sched_yield before this (pure spin between yields) */
    int64_t spin;       /* pure spin between yields in this wait (0: the peer shares this CPU) and its budget */
    int64_t budget;
    int sleeping;       /* the spin phase is over */
    int yielded;        /* a sched_yield was made */
    int lost;           /* a yield lost the CPU for long (someone else's time slice) */
} ds_wait_ctx;

#define DS_LOST_NS 20000 /* a sched_yield that took this long ran someone else's time slice */

static inline int64_t ds_clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }
static inline int64_t ds_budget_max(void) { return ds_spin_max_ns > ds_spin_ns ? ds_spin_max_ns : ds_spin_ns; }

/* a wait of dur ns just ended (satisfied, or timed out after dur >= the cap): move the handle's budget halfway to
   twice the wait (rounding down), or back towards ds_spin_ns after a long wait or a yield that lost the CPU */
static inline void ds_adapt_learn(ds_adapt *a, const ds_wait_ctx *w, int64_t dur) {
    int64_t lo = ds_spin_ns, hi = ds_budget_max();
    int64_t target = dur >= hi || w->lost ? lo : ds_clamp(2 * dur, lo, hi);
    a->budget = ds_clamp((a->budget + target) / 2, lo, hi);
}

static inline int ds_wait_end(ds_adapt *a, const ds_wait_ctx *w, int r) {
    if (r == DS_OK || r == DS_TIMEOUT) {
        /* ended while spinning: the last clock read is close enough (no clock read on the fast path) */
        int64_t dur = !w->t0 ? 0 : (w->yielded || w->sleeping ? ds_now() : w->last) - w->t0;
        if (r == DS_OK || dur >= ds_budget_max()) ds_adapt_learn(a, w, dur);
    }
    return r;
}

/*
 * Blocking claim, call without the GIL.  mode 0: send, 1: recv, 2: poll (wait until ready, claim nothing).
 * deadline: CLOCK_MONOTONIC ns or -1.  Spins (see above), then sleeps on the futex in bounded chunks, checking
 * for dead slot owners and destroy() between chunks.  DS_INTR: a signal arrived or a chunk passed; the caller
 * checks signals (with the GIL) and calls again with the same deadline and the same *w (so it does not spin again).
 */
static inline int ds_ch_wait(ds_chan *c, int mode, uint64_t maxlen, ds_slot **slot, uint32_t *lap, uint64_t *st,
                             int64_t deadline, ds_wait_ctx *w) {
    ds_ch_hdr *h = c->h;
    uint32_t *seq_p = mode == 0 ? &h->nf_seq : &h->ne_seq;
    uint32_t *wait_p = mode == 0 ? &h->nf_waiters : &h->ne_waiters;
    ds_adapt *ad = &c->ad[mode == 0 ? 0 : 1];
    int busy = mode == 0 ? DS_FULL : DS_EMPTY;
    int r;
    *st = 0;
    *slot = NULL;
#define DS_TRY()                                                                          \
    (mode == 0   ? ds_ch_claim_send(c, slot, lap, st)                                     \
     : mode == 1 ? ds_ch_claim_recv(c, maxlen, slot, lap, st)                             \
                 : (ds_ch_ready(c, slot, st) ? DS_OK : (ds_ch_alive(c) ? DS_EMPTY : DS_DESTROYED)))
    if (!w->started) {
        int adaptive = ds_spin_max_ns > ds_spin_ns, me = sched_getcpu();
        uint32_t peer_cpu = __atomic_load_n(mode == 0 ? &h->nf_cpu : &h->ne_cpu, __ATOMIC_RELAXED);
        w->started = 1;
        w->spin = adaptive && me >= 0 && peer_cpu == (uint32_t)me ? 0 : ds_yield_ns;
        w->budget = ds_clamp(ad->budget, ds_spin_ns, ds_budget_max());
        /* yield mode keeps both processes runnable on one CPU, and the scheduler only moves a task to a freed CPU
           when it wakes up: so every 64th wait in yield mode sleeps at once (a pair pinned together and then
           freed stayed in the 4 us same-CPU mode for half its round trips without this, 7% with it) */
        if (w->spin == 0 && (++ad->waits & 63) == 0) w->budget = 0;
        /* not an atomic add on the fast path: a lost count between threads does not matter */
        __atomic_store_n(&ds_stats.waits, __atomic_load_n(&ds_stats.waits, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
    }
    if (!w->sleeping) {
        for (uint32_t it = 1;; it++) {
            if (!ds_ch_alive(c)) return DS_DESTROYED;
            r = DS_TRY();
            if (r != busy) return ds_wait_end(ad, w, r);
            if (!w->yielded && (it & 15) && w->spin > 0) { /* pure spin: read the clock every 16 polls */
                ds_relax();
                continue;
            }
            int64_t now = w->last = ds_now();
            if (!w->t0) w->t0 = now; /* (the first polls took well under a microsecond) */
            if (deadline >= 0 && now >= deadline) return ds_wait_end(ad, w, DS_TIMEOUT);
            if (now - w->t0 >= w->budget) break;
            if (!w->yielded) w->next_yield = w->t0 + w->spin;
            if (now < w->next_yield) {
                ds_relax();
                continue;
            }
            sched_yield();
            DS_COUNT(yields);
            w->yielded = 1;
            int64_t after = ds_now(), took = after - now;
            w->next_yield = after + w->spin; /* spin as long between yields: fewer chances to lose the CPU */
            if (took > ds_switch_ns) DS_COUNT(switches);
            /* lost the CPU for long to someone else (not to the peer, which may work that long): sleep */
            if (took > DS_LOST_NS && w->spin > 0 && ds_spin_max_ns > ds_spin_ns) {
                w->lost = 1;
                break;
            }
        }
        w->sleeping = 1;
    }
    for (;;) {
        if (!ds_ch_alive(c)) return DS_DESTROYED;
        r = DS_TRY(); /* before the flag: a woken sleeper finds its message without setting it again */
        if (r != busy) return ds_wait_end(ad, w, r);
        if (*slot) { /* liveness of the slot's owner: on entry, then at most once per chunk */
            int64_t now = ds_now();
            if (w->last_check == 0 || now - w->last_check >= ds_wait_chunk_ns) {
                w->last_check = now;
                if (ds_ch_recover(c, *slot, *st)) continue;
            }
        }
        uint32_t seq = ds_prepare_wait(wait_p, seq_p);
        r = DS_TRY();
        if (r != busy) return ds_wait_end(ad, w, r);
        int64_t wait = ds_wait_chunk_ns;
        if (deadline >= 0) {
            int64_t now = ds_now();
            if (now >= deadline) return ds_wait_end(ad, w, DS_TIMEOUT);
            if (deadline - now < wait) wait = deadline - now;
        }
        int e = ds_futex_wait(seq_p, seq, wait);
        /* a signal, or a chunk passed: return so the caller runs PyErr_CheckSignals (a signal that arrived
           outside the futex syscall does not interrupt it) and calls again; dead owners are checked on entry */
        if (e == EINTR || e == ETIMEDOUT) return DS_INTR;
    }
#undef DS_TRY
}

/* debugging snapshot: out[0..9) = head, tail, ne_seq, ne_waiters, nf_seq, nf_waiters, recoveries, ne_cpu, nf_cpu;
   then slots */
static inline void ds_ch_snapshot(const ds_chan *c, uint64_t *out, uint64_t nslots) {
    ds_ch_hdr *h = c->h;
    out[0] = DS_LOAD(&h->head);
    out[1] = DS_LOAD(&h->tail);
    out[2] = DS_LOAD(&h->ne_seq);
    out[3] = DS_LOAD(&h->ne_waiters);
    out[4] = DS_LOAD(&h->nf_seq);
    out[5] = DS_LOAD(&h->nf_waiters);
    out[6] = DS_LOAD(&h->recoveries);
    out[7] = DS_LOAD(&h->ne_cpu);
    out[8] = DS_LOAD(&h->nf_cpu);
    for (uint64_t i = 0; i < nslots && i < c->cap; i++)
        out[9 + i] = DS_LOAD(&((ds_slot *)(h->slots + i * c->stride))->state);
}

/* destroy: mark, wake everybody, free the pool blocks of queued messages. Caller frees the channel block. */
static inline void ds_ch_destroy(const ds_chan *c) {
    ds_ch_hdr *h = c->h;
    DS_STORES(&h->destroyed, 1);
    ds_ch_wake_all(c);
    for (uint64_t i = 0; i < c->cap; i++) {
        ds_slot *s = (ds_slot *)(h->slots + i * c->stride);
        uint64_t st = DS_LOAD(&s->state);
        if (DS_ST_PH(st) == DS_PH_FULL && (__atomic_load_n(&s->flags, __ATOMIC_ACQUIRE) & DS_SLOT_BLOCK)) {
            if (DS_CAS(&s->state, &st, DS_ST(DS_ST_LAP(st) + 1, DS_PH_EMPTY, 0))) {
                ds_pool_free(c->base, ds_slot_block_off(s));
                s->flags = 0;
            }
        }
    }
    DS_STORES(&h->magic, DS_CH_DEAD);
    ds_ch_wake_all(c);
}

#endif /* DRAGON_DSHM_H */
