/* dshm_chan.h -- the channel ring, its slots and its blocking waits (see dshm.h for the layout) */
#ifndef DRAGON_DSHM_CHAN_H
#define DRAGON_DSHM_CHAN_H

#include "dshm_pool.h"

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

/* the offset of the channel's own block in its pool */
static inline uint64_t ds_ch_offset(const ds_chan *c) { return (uint64_t)((char *)c->h - c->base); }

/* a message, as its claim read it from the slot (once) and checked it */
typedef struct {
    uint32_t n;   /* bytes */
    uint64_t off; /* 0: inline in the slot; else the offset of the pool block that holds it */
} ds_msg;

/*
 * What a FULL slot holds, read once and checked against the channel and its pool before anyone uses it (a buggy
 * process may scribble on shared memory): inline, at most block_size bytes; in a block, an allocated block of
 * the pool (not the channel's own) whose capacity holds the length. 1 (*m filled) or 0: the slot is corrupt.
 */
static inline int ds_slot_msg(const ds_chan *c, ds_slot *s, ds_msg *m) {
    m->n = DS_LOADR(&s->len);
    if (!(__atomic_load_n(&s->flags, __ATOMIC_RELAXED) & DS_SLOT_BLOCK)) {
        m->off = 0;
        return m->n <= c->block_size;
    }
    uint64_t cap;
    m->off = ds_slot_block_off(s);
    return m->off != ds_ch_offset(c) && ds_pool_block_capacity(c->base, m->off, &cap) == DS_OK && m->n <= cap;
}

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
        if (sl == lap && DS_ST_PH(st) == DS_PH_EMPTY) { /* EMPTY with a claimer's id: scribbled; make it usable */
            DS_CAS(&s->state, &st, DS_ST(lap, DS_PH_EMPTY, 0));
            continue;
        }
        if (sl == lap || sl == lap + 1) { /* tail is stale: help it on */
            uint64_t p = pos;
            DS_CAS(&h->tail, &p, pos + 1);
            continue;
        }
        if (DS_LOAD(&h->tail) != pos) continue;
        *slot = s;
        *st_out = st;
        if (!ds_ch_alive(c)) return DS_DESTROYED;
        if (sl == lap - 1) return DS_FULL;
        /* a lap no protocol step puts here (scribbled): whatever the slot held is lost; make it this lap's */
        DS_CAS(&s->state, &st, DS_ST(lap, DS_PH_EMPTY, 0));
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
 * The head slot (at pos, lap) seen by a receiver whose head is still pos, in state st: what it means.
 * DS_OK: a message; DS_EMPTY: nothing yet (or a reader of the previous lap still reads it); DS_HEAD_STALE: the
 * slot was taken in this lap, or is already in the next one; DS_CORRUPT: a state that no step of the protocol
 * puts at the head (a scribble): anything else of the previous lap (head passed it only once it was taken), an
 * EMPTY or FULL state with a claimer's id, a claim without one, an EMPTY slot that the senders have passed.
 */
#define DS_HEAD_STALE (-1)
static inline int ds_ch_head_state(const ds_chan *c, uint64_t pos, uint32_t lap, ds_slot *s, uint64_t st) {
    uint32_t sl = DS_ST_LAP(st);
    uint64_t ph = DS_ST_PH(st);
    if (st == DS_ST(lap, DS_PH_FULL, 0)) return DS_OK;
    if ((sl == lap && ph == DS_PH_READING) || sl == lap + 1) return DS_HEAD_STALE;
    int claimed = (DS_ST_PID(st) & DS_PID_MASK) != 0; /* (a claim carries its claimer's pid: never 0) */
    if (sl == lap && ph == DS_PH_WRITING && claimed) return DS_EMPTY;
    if (sl == lap - 1 && ph == DS_PH_READING && claimed) return DS_EMPTY;
    if (st == DS_ST(lap, DS_PH_EMPTY, 0)) {
        /* a sender moves tail past pos only after its claim of the slot: EMPTY still, after tail passed, is a
           scribble (re-read after tail, so that a claim between the two reads is not mistaken for one) */
        if (DS_LOAD(&c->h->tail) <= pos || DS_LOAD(&s->state) != st) return DS_EMPTY;
    }
    return DS_CORRUPT;
}

/* ds_ch_claim_recv for every case (see there) */
static int ds_ch_claim_recv_any(const ds_chan *c, uint64_t maxlen, int take_bad, ds_slot **slot,
                                uint32_t *lap_out, uint64_t *st_out, ds_msg *m) {
    ds_ch_hdr *h = c->h;
    uint32_t me = ds_me();
    for (;;) {
        uint64_t pos = DS_LOAD(&h->head);
        ds_slot *s = ds_ch_slot(c, pos);
        uint32_t lap = (uint32_t)(pos / c->cap);
        uint64_t st = DS_LOAD(&s->state);
        int r = st == DS_ST(lap, DS_PH_FULL, 0) ? DS_OK : DS_HEAD_STALE;
        if (r != DS_OK) {
            if (DS_LOAD(&h->head) != pos) continue;
            r = ds_ch_head_state(c, pos, lap, s, st);
        }
        if (r == DS_OK && !ds_slot_msg(c, s, m)) r = DS_CORRUPT;
        if (r == DS_OK) {
            if (m->n > maxlen) {
                if (DS_LOAD(&s->state) != st) continue;
                *st_out = m->n;
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
        if (r == DS_HEAD_STALE) {
            uint64_t p = pos;
            DS_CAS(&h->head, &p, pos + 1);
            continue;
        }
        *slot = s;
        *st_out = st;
        if (!ds_ch_alive(c)) return DS_DESTROYED;
        if (r == DS_EMPTY) return DS_EMPTY;
        if (!take_bad) return DS_BADSLOT;
        if (DS_CAS(&s->state, &st, DS_ST(lap + 1, DS_PH_EMPTY, 0))) { /* drop it (as a reader that took it) */
            uint64_t p = pos;
            DS_CAS(&h->head, &p, pos + 1);
            ds_wake_if_waiting(&h->nf_waiters, &h->nf_seq);
            return DS_BADSLOT;
        }
    }
}

/*
 * One attempt to claim a message for reading.  maxlen: refuse (DS_TOO_SMALL, *st_out = length, nothing claimed)
 * a message longer than this.  OK: *slot is ours (READING), *m says what it holds (checked: ds_slot_msg); read
 * it and call ds_ch_commit_recv.
 * A corrupt slot at the head (ds_slot_msg, ds_ch_head_state) is dropped (DS_BADSLOT: consumed, head moved on, a
 * block it names not freed: it may be anybody's), unless take_bad is 0: then DS_BADSLOT leaves it for the next
 * call (recv_many, which must not lose the messages it already took by raising).
 */
static inline int ds_ch_claim_recv(const ds_chan *c, uint64_t maxlen, int take_bad, ds_slot **slot,
                                   uint32_t *lap_out, uint64_t *st_out, ds_msg *m) {
    /* the common case, inline: a valid inline message at the head (the same steps as ds_ch_claim_recv_any's) */
    ds_ch_hdr *h = c->h;
    uint64_t pos = DS_LOAD(&h->head);
    ds_slot *s = ds_ch_slot(c, pos);
    uint32_t lap = (uint32_t)(pos / c->cap);
    uint64_t st = DS_LOAD(&s->state);
    if (st == DS_ST(lap, DS_PH_FULL, 0)) {
        uint32_t n = DS_LOADR(&s->len);
        if (!(__atomic_load_n(&s->flags, __ATOMIC_RELAXED) & DS_SLOT_BLOCK) && n <= c->block_size && n <= maxlen &&
            DS_CAS(&s->state, &st, DS_ST(lap, DS_PH_READING, ds_me()))) {
            uint64_t p = pos;
            DS_CAS(&h->head, &p, pos + 1);
            m->n = n;
            m->off = 0;
            *slot = s;
            *lap_out = lap;
            return DS_OK;
        }
    }
    return ds_ch_claim_recv_any(c, maxlen, take_bad, slot, lap_out, st_out, m);
}

static inline void ds_ch_commit_recv(const ds_chan *c, ds_slot *s, uint32_t lap) {
    ds_ch_hdr *h = c->h;
    ds_note_cpu(&h->nf_cpu);
    DS_STORES(&s->state, DS_ST(lap + 1, DS_PH_EMPTY, 0));
    ds_wake_if_waiting(&h->nf_waiters, &h->nf_seq);
}

/* The head slot, past slots whose receive is under way (head moved on for them): DS_OK (a message, FULL),
   DS_EMPTY or DS_CORRUPT; *pos, *slot and *st tell the slot and the state read. */
static inline int ds_ch_head(const ds_chan *c, uint64_t *pos_out, ds_slot **slot, uint64_t *st_out) {
    ds_ch_hdr *h = c->h;
    for (;;) {
        uint64_t pos = DS_LOAD(&h->head);
        ds_slot *s = ds_ch_slot(c, pos);
        uint32_t lap = (uint32_t)(pos / c->cap);
        uint64_t st = DS_LOAD(&s->state);
        *pos_out = pos;
        *slot = s;
        *st_out = st;
        if (st == DS_ST(lap, DS_PH_FULL, 0)) return DS_OK;
        if (DS_LOAD(&h->head) != pos) continue;
        int r = ds_ch_head_state(c, pos, lap, s, st);
        if (r == DS_HEAD_STALE) {
            uint64_t p = pos;
            DS_CAS(&h->head, &p, pos + 1);
            continue;
        }
        return r;
    }
}

/* is a message ready at head (non-consuming)? A corrupt head slot counts as ready: the receive that follows drops
   it and says so. If not, *slot / *st tell the head slot (for dead-owner checks) */
static inline int ds_ch_ready(const ds_chan *c, ds_slot **slot, uint64_t *st_out) {
    uint64_t pos;
    return ds_ch_head(c, &pos, slot, st_out) != DS_EMPTY;
}

/*
 * The first bytes of the message at the head, without taking it: up to n of them into out, its length into
 * *len. DS_OK, DS_EMPTY (no message ready: a sender still writes it counts as none), DS_CORRUPT (the slot
 * holds no valid message: a receive will say so). Lock-free and read-only: the copy is checked afterwards
 * against the slot's state, which a receiver changes (FULL -> READING) before it touches the message or frees
 * its block, so a copy made while the state stayed the same FULL of the same lap is the message's; a receiver
 * that took it meanwhile makes this look at the next head. (A pool block is in the mapped pool even once freed:
 * reading it is harmless, its bytes are only kept if the check passes.)
 */
static inline int ds_ch_peek(const ds_chan *c, char *out, uint32_t n, uint32_t *len) {
    for (;;) {
        uint64_t pos, st;
        ds_slot *s;
        int r = ds_ch_head(c, &pos, &s, &st);
        if (r == DS_EMPTY) return DS_EMPTY;
        if (r != DS_OK) {
            /* a claim of another lap or a scribble: a moment later it may be a message (or the next head) */
            if (DS_LOAD(&s->state) != st || DS_LOAD(&c->h->head) != pos) continue;
            return DS_CORRUPT;
        }
        ds_msg m;
        int valid = ds_slot_msg(c, s, &m);
        uint32_t k = 0;
        if (valid) {
            k = m.n < n ? m.n : n;
            memcpy(out, m.off ? c->base + m.off : ds_slot_data(s), k);
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (DS_LOAD(&s->state) != st || DS_LOAD(&c->h->head) != pos) continue; /* taken meanwhile: look again */
        if (!valid) return DS_CORRUPT;
        *len = m.n;
        return DS_OK;
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
    if ((flags & DS_SLOT_BLOCK) && off != ds_ch_offset(c)) ds_pool_free(c->base, off);
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
 * A yield only hands the CPU over when the scheduler finds the peer eligible: a peer that has used more than its
 * share (a transport agent beside the process it serves, each of its steps longer than the process's polls) is
 * not picked for several yields in a row, and the waiter kept the CPU polling in vain (6 yields per switch).
 * So DS_FUTILE_YIELDS yields in a row that let nobody run end the yielding, and the wait sleeps: the peer gets the
 * CPU and wakes it (the cross-node 8 B round trip on 2 cores, a process beside its agent: 54-55 -> 45-47 us;
 * two processes pinned to one CPU, whose yields do switch: unchanged at 4.1-4.2 us).
 * A yield that lost the CPU for long (another process's time slice; not a yield to the peer on this CPU, which may
 * well work that long) ends the spinning: a sleeper is woken with priority, a yielder competes as a CPU hog
 * (gap-30us ping-pong with a busy process had a 4 ms p99); such a wait also brings the budget down. Neither of these applies to a fixed budget (ds_spin_max_ns == ds_spin_ns).
 * The state of one wait is a ds_wait_ctx (dshm_base.h).
 */

#define DS_LOST_NS 20000 /* a sched_yield that took this long ran someone else's time slice */
#define DS_FUTILE_YIELDS 2 /* yields in a row that let nobody run end a wait's yielding to its peer on this CPU */

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
                             ds_msg *m, int64_t deadline, ds_wait_ctx *w) {
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
     : mode == 1 ? ds_ch_claim_recv(c, maxlen, 1, slot, lap, st, m)                      \
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
            if (took > ds_switch_ns) {
                DS_COUNT(switches);
                w->futile = 0;
            } else if (w->spin == 0 && ++w->futile >= DS_FUTILE_YIELDS) {
                break; /* the peer on this CPU is not running for us now: give it the CPU by sleeping */
            }
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

/*
 * One blocking call of core.pyx, carried across the DS_INTR returns of its wait: what it waits for and what it got.
 * core.pyx has one wait loop (_wait) for every kind: it calls ds_op_wait without the GIL and, on DS_INTR (a signal,
 * or a chunk of ds_wait_chunk_ns passed), runs the signal handlers and calls again with the same op.
 */
enum { DS_OP_SEND = 0, DS_OP_RECV = 1, DS_OP_POLL = 2, DS_OP_ALLOC = 3, DS_OP_LOCK = 4 }; /* SEND..POLL: ds_ch_wait's modes */
typedef struct {
    int kind;      /* DS_OP_* */
    ds_chan *c;    /* SEND, RECV, POLL: the channel */
    char *base;    /* ALLOC, LOCK: the pool */
    uint64_t n;    /* RECV: the longest message to take; ALLOC: the size */
    ds_slot *slot; /* SEND, RECV: the slot claimed (or the one in the way) */
    uint32_t lap;
    uint64_t st;
    uint64_t off;  /* ALLOC: the block allocated */
    ds_msg m;      /* RECV: the message claimed */
    ds_wait_ctx w; /* zeroed before the first call */
} ds_op;

static inline int ds_op_wait(ds_op *op, int64_t deadline) {
    if (op->kind == DS_OP_ALLOC) return ds_pool_alloc_wait(op->base, op->n, &op->off, deadline, &op->w);
    if (op->kind == DS_OP_LOCK) return ds_pool_lock_wait(op->base, deadline);
    return ds_ch_wait(op->c, op->kind, op->n, &op->slot, &op->lap, &op->st, &op->m, deadline, &op->w);
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
                if (ds_slot_block_off(s) != ds_ch_offset(c)) ds_pool_free(c->base, ds_slot_block_off(s));
                s->flags = 0;
            }
        }
    }
    DS_STORES(&h->magic, DS_CH_DEAD);
    ds_ch_wake_all(c);
}

#endif /* DRAGON_DSHM_CHAN_H */
