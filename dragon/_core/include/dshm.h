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
 *   - lentab[i] != 0 iff granule i starts an allocated block of lentab[i] granules (the top bit: DEFERRED, freed
 *     while another process held the lock, on the deferred list the next lock holder frees);
 *   - the robust mutex is never waited for past a deadline (clocklock in chunks), and free never waits for it;
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
 *   Everything read from a slot is input: checked before use (ds_slot_msg); a corrupt slot is dropped.
 */
#ifndef DRAGON_DSHM_H
#define DRAGON_DSHM_H

#include "dshm_base.h" /* return codes, atomics, time, futex, process identity and liveness */
#include "dshm_pool.h" /* the pool: header, allocator, robust mutex */
#include "dshm_chan.h" /* the channel: ring, slots, blocking waits */

#endif /* DRAGON_DSHM_H */
