/* dshm_base.h -- return codes, atomics, time, futex and process identity (see dshm.h) */
#ifndef DRAGON_DSHM_BASE_H
#define DRAGON_DSHM_BASE_H

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
    DS_BUSY = 11,      /* a non-blocking call found the pool's lock held by another process (past ds_lock_grace_ns) */
    DS_LOCKED = 12,    /* the pool's lock stayed held by another process until the deadline */
    DS_BADSLOT = 13,   /* a corrupt channel slot (scribbled shared memory) was found at the head (see ds_ch_claim_recv) */
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

/* the state of one blocking wait (ds_ch_wait, ds_pool_alloc_wait), across its DS_INTR returns */
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
    int futile;         /* yields in a row that let nobody run (yield mode) */
} ds_wait_ctx;

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

/* glibc's malloc: blocks below mmap_max come from the heap, and up to trim_max of free memory at its top stays
   there (its defaults hand a batch of big freed blocks back to the kernel, which faults in and zeroes every
   page of the next batch again). 1: done; 0: not glibc, or glibc refused. */
#if defined(__GLIBC__)
#include <malloc.h>
static inline int ds_keep_freed_memory(int mmap_max, int trim_max) {
    return mallopt(M_MMAP_THRESHOLD, mmap_max) == 1 && mallopt(M_TRIM_THRESHOLD, trim_max) == 1;
}
#else
static inline int ds_keep_freed_memory(int mmap_max, int trim_max) { (void)mmap_max; (void)trim_max; return 0; }
#endif

#endif /* DRAGON_DSHM_BASE_H */
