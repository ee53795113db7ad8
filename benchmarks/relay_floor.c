/*
 * The floor of dragon's cross-node path on this machine: what a message costs when a process hands it to a
 * relay beside it, the relay sends it with MPI to the other node's relay, and that relay hands it to its own
 * process, all in C with nothing else to do. It is the path the transport agents take (process -> gateway ->
 * agent -> MPI -> agent -> channel -> process) without their protocol: no frames, no acknowledgements, no
 * windows but the slots themselves. dragon-bench xnode runs it beside the agents and mpi4py
 * (benchmarks/xnode.py).
 *
 *   relay_floor N REPEAT [CPUS0 CPUS1]                  8 B round trips (under mpiexec -n 2 or srun -N 2)
 *   relay_floor --stream SIZE N REPEAT [CPUS0 CPUS1]    a stream of SIZE-byte messages from rank 1 to rank 0
 *   relay_floor --library                               (alone: the MPI library's version, MPI not initialized)
 *
 * Each rank forks its "process", which shares one CPU set with the rank's relay (CPUSk: a comma-separated
 * list for rank k, or "-" for no binding: as dragon binds each virtual node to its share of the host's CPUs).
 *
 * Round trips: the process and the relay meet in a one-slot mailbox per direction (a counter and 8 bytes in
 * a shared mapping); a waiting side yields the CPU at every poll, as dragon's waits do when the peer runs on
 * the same CPU, and the relay yields when a pass found nothing to do. Rank 0's process times N round trips
 * per repeat (after 1,000 to warm up) and prints one line: DRAGON_BENCH_JSON: {"library": ..., "n": N,
 * "rtt_median_us": [...], "rtt_p99_us": [...]}.
 *
 * Stream: what dragon's copying send and zero-copy receive do with a big message. Rank 1's process copies
 * each message from its own buffer into a free slot of a ring of STREAM_SLOTS shared slots (dragon's send
 * copies it into a block of the staging pool); its relay sends it with MPI straight from the slot and frees
 * the slot when the send is complete. Rank 0's relay receives each message straight into a free slot of its
 * own ring and hands it to its process, which frees the slot without reading it (dragon's recv_message() and
 * release(), as mpi4py's Recv leaves the data in place). Rank 0's process times N messages per repeat (after
 * STREAM_WARM) and prints DRAGON_BENCH_JSON: {"library": ..., "size": SIZE, "n": N, "msg_per_s": [...]}.
 *
 * Every wait gives up after WAIT_LIMIT seconds without progress (exit 3); bad arguments exit 2 with usage.
 */
#define _GNU_SOURCE
#include <mpi.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WARM 1000
#define WAIT_LIMIT 20.0
#define STREAM_SLOTS 8 /* dragon's sender window is 8 MiB: 8 messages of 1 MiB in flight */
#define STREAM_WARM 50
#define STREAM_MAX_SIZE (64 << 20)

typedef struct {
    volatile uint64_t count; /* messages put so far */
    char pad[56];
    char data[8];
} mailbox;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void put(mailbox *m, const char *data, uint64_t count) {
    memcpy(m->data, data, 8);
    __atomic_store_n(&m->count, count, __ATOMIC_RELEASE);
}

/* wait (yielding at every poll) until *counter >= count; 0, or -1 after WAIT_LIMIT seconds without it */
static int wait_count(volatile uint64_t *counter, uint64_t count) {
    double give_up = 0.0;
    for (unsigned polls = 0;; polls++) {
        if (__atomic_load_n(counter, __ATOMIC_ACQUIRE) >= count) return 0;
        sched_yield();
        if ((polls & 1023) == 0) {
            double t = now();
            if (give_up == 0.0) give_up = t + WAIT_LIMIT;
            else if (t > give_up) return -1;
        }
    }
}

/* wait until m holds message number `count` */
static int wait_for(mailbox *m, uint64_t count) { return wait_count(&m->count, count); }

/* the end of a relay's pass: yield if it did nothing; -1 once it did nothing for WAIT_LIMIT seconds */
static int idle_pass(int work, unsigned pass, double *last) {
    if (work) {
        *last = 0.0;
        return 0;
    }
    sched_yield();
    if ((pass & 1023) == 0) {
        double t = now();
        if (*last == 0.0) *last = t;
        else if (t - *last > WAIT_LIMIT) return -1;
    }
    return 0;
}

static void bind_to(const char *list) {
    if (!list || strcmp(list, "-") == 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    char *copy = strdup(list), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) CPU_SET(atoi(tok), &set);
    free(copy);
    if (sched_setaffinity(0, sizeof set, &set) != 0) perror("relay_floor: sched_setaffinity");
}

/* the forked process: rank 0 pings and times, rank 1 echoes; -> exit code */
static int process(int rank, int n, int repeat, mailbox *to_relay, mailbox *to_proc, const char *library) {
    int per = WARM + n;
    double *lat = malloc(sizeof(double) * (size_t)per);
    double *med = malloc(sizeof(double) * (size_t)repeat), *p99 = malloc(sizeof(double) * (size_t)repeat);
    if (!lat || !med || !p99) return 2;
    uint64_t k = 0;
    char msg[8] = "floor!!";
    for (int r = 0; r < repeat; r++) {
        for (int i = 0; i < per; i++) {
            k++;
            if (rank == 0) {
                double t = now();
                put(to_relay, msg, k);
                if (wait_for(to_proc, k) != 0) return 3;
                lat[i] = now() - t;
            } else {
                if (wait_for(to_proc, k) != 0) return 3;
                put(to_relay, to_proc->data, k);
            }
        }
        if (rank == 0) {
            qsort(lat + WARM, (size_t)n, sizeof(double), by_value);
            med[r] = lat[WARM + n / 2] * 1e6;
            p99[r] = lat[WARM + (int)(0.99 * (n - 1))] * 1e6;
        }
    }
    if (rank == 0) {
        printf("DRAGON_BENCH_JSON: {\"library\": \"%s\", \"n\": %d, \"rtt_median_us\": [", library, n);
        for (int r = 0; r < repeat; r++) printf("%s%.3f", r ? ", " : "", med[r]);
        printf("], \"rtt_p99_us\": [");
        for (int r = 0; r < repeat; r++) printf("%s%.3f", r ? ", " : "", p99[r]);
        printf("]}\n");
        fflush(stdout);
    }
    return 0;
}

/* the rank itself: moves messages between its process and the other rank; -> 0, or -1 if stuck */
static int relay(int rank, uint64_t total, mailbox *to_relay, mailbox *to_proc) {
    uint64_t sent = 0, got = 0;
    char out[8];
    MPI_Request req = MPI_REQUEST_NULL;
    double last = now();
    for (unsigned pass = 0; sent < total || got < total; pass++) {
        int work = 0;
        if (sent < total && __atomic_load_n(&to_relay->count, __ATOMIC_ACQUIRE) > sent) {
            if (req != MPI_REQUEST_NULL) MPI_Wait(&req, MPI_STATUS_IGNORE);
            memcpy(out, to_relay->data, 8);
            sent++;
            MPI_Isend(out, 8, MPI_BYTE, 1 - rank, 0, MPI_COMM_WORLD, &req);
            work = 1;
        }
        int found = 0;
        MPI_Message m;
        MPI_Status st;
        MPI_Improbe(1 - rank, 0, MPI_COMM_WORLD, &found, &m, &st);
        if (found) {
            char in[8];
            MPI_Mrecv(in, 8, MPI_BYTE, &m, MPI_STATUS_IGNORE);
            put(to_proc, in, ++got);
            work = 1;
        }
        if (req != MPI_REQUEST_NULL) {
            int done;
            MPI_Test(&req, &done, MPI_STATUS_IGNORE);
        }
        if (idle_pass(work, pass, &last) != 0) return -1;
    }
    if (req != MPI_REQUEST_NULL) MPI_Wait(&req, MPI_STATUS_IGNORE);
    return 0;
}

/* ---- stream ------------------------------------------------------------------------------------------- */

typedef struct {
    volatile uint64_t put; /* messages put into the ring so far (rank 1: by the process; rank 0: the relay) */
    char pad1[56];
    volatile uint64_t freed; /* slots given back so far (rank 1: by the relay; rank 0: the process) */
    char pad2[56];
} ring;

static char *slot(ring *r, size_t size, uint64_t k) {
    return (char *)(r + 1) + (size_t)(k % STREAM_SLOTS) * size;
}

static int stream_process(int rank, size_t size, int n, int repeat, ring *r, const char *library) {
    uint64_t per = STREAM_WARM + (uint64_t)n, k = 0;
    double *rates = malloc(sizeof(double) * (size_t)repeat);
    char *src = rank == 1 ? malloc(size) : NULL;
    if (!rates || (rank == 1 && !src)) return 2;
    if (src) memset(src, 'x', size);
    for (int rep = 0; rep < repeat; rep++) {
        double t0 = 0.0;
        for (uint64_t i = 0; i < per; i++, k++) {
            if (i == STREAM_WARM) t0 = now();
            if (rank == 1) { /* wait for a free slot, copy the message in, hand it over */
                if (k >= STREAM_SLOTS && wait_count(&r->freed, k - STREAM_SLOTS + 1) != 0) return 3;
                memcpy(slot(r, size, k), src, size);
                __atomic_store_n(&r->put, k + 1, __ATOMIC_RELEASE);
            } else { /* wait for the message, give its slot back unread */
                if (wait_count(&r->put, k + 1) != 0) return 3;
                __atomic_store_n(&r->freed, k + 1, __ATOMIC_RELEASE);
            }
        }
        rates[rep] = (double)n / (now() - t0);
    }
    if (rank == 0) {
        printf("DRAGON_BENCH_JSON: {\"library\": \"%s\", \"size\": %zu, \"n\": %d, \"msg_per_s\": [", library, size,
               n);
        for (int i = 0; i < repeat; i++) printf("%s%.1f", i ? ", " : "", rates[i]);
        printf("]}\n");
        fflush(stdout);
    }
    return 0;
}

/* rank 1's relay sends every message from its slot (the slot is freed when the send is complete); rank 0's
 * receives each into a free slot (one pair of ranks, one tag: the messages match the receives in order) */
static int stream_relay(int rank, size_t size, uint64_t total, ring *r) {
    MPI_Request reqs[STREAM_SLOTS];
    uint64_t started = 0, done = 0;
    double last = now();
    for (unsigned pass = 0; done < total; pass++) {
        int work = 0;
        if (started < total && started - done < STREAM_SLOTS) {
            if (rank == 1 && __atomic_load_n(&r->put, __ATOMIC_ACQUIRE) > started) {
                MPI_Isend(slot(r, size, started), (int)size, MPI_BYTE, 0, 1, MPI_COMM_WORLD,
                          &reqs[started % STREAM_SLOTS]);
                started++;
                work = 1;
            } else if (rank == 0 && __atomic_load_n(&r->freed, __ATOMIC_ACQUIRE) + STREAM_SLOTS > started) {
                MPI_Irecv(slot(r, size, started), (int)size, MPI_BYTE, 1, 1, MPI_COMM_WORLD,
                          &reqs[started % STREAM_SLOTS]);
                started++;
                work = 1;
            }
        }
        if (done < started) {
            /* every request in flight is tested at each pass, as the agent does (testing only the oldest one
             * halved the stream over TCP: the others' progress waited for it) */
            for (uint64_t k = done; k < started; k++) {
                MPI_Request *q = &reqs[k % STREAM_SLOTS];
                int flag = 0;
                if (*q != MPI_REQUEST_NULL) MPI_Test(q, &flag, MPI_STATUS_IGNORE);
            }
            uint64_t before = done; /* (a completed request is MPI_REQUEST_NULL; slots go back in order) */
            while (done < started && reqs[done % STREAM_SLOTS] == MPI_REQUEST_NULL) done++;
            if (done != before) {
                __atomic_store_n(rank == 1 ? &r->freed : &r->put, done, __ATOMIC_RELEASE);
                work = 1;
            }
        }
        if (idle_pass(work, pass, &last) != 0) return -1;
    }
    return 0;
}

static int usage(int rank) {
    if (rank == 0)
        fprintf(stderr, "usage: mpiexec -n 2 relay_floor [--stream SIZE>=1] N>=10 REPEAT>=1 [CPUS0 CPUS1]\n");
    MPI_Finalize();
    return 2;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--library") == 0) { /* (callable before MPI_Init) */
        char version[MPI_MAX_LIBRARY_VERSION_STRING];
        int n;
        MPI_Get_library_version(version, &n);
        printf("%s\n", version);
        return 0;
    }
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int first = 1;
    long msg_size = 0;
    if (argc > 1 && strcmp(argv[1], "--stream") == 0) {
        msg_size = argc > 2 ? atol(argv[2]) : 0;
        if (msg_size < 1 || msg_size > STREAM_MAX_SIZE) return usage(rank);
        first = 3;
    }
    int n = argc > first ? atoi(argv[first]) : 0, repeat = argc > first + 1 ? atoi(argv[first + 1]) : 0;
    if (size != 2 || n < 10 || repeat < 1) return usage(rank);
    bind_to(argc > first + 2 + rank ? argv[first + 2 + rank] : NULL);
    char library[MPI_MAX_LIBRARY_VERSION_STRING];
    int len;
    MPI_Get_library_version(library, &len);
    for (int i = 0; i < len; i++)
        if (library[i] == '\n' || library[i] == '"' || library[i] == '\\' || (unsigned char)library[i] < 32) {
            library[i] = '\0';
            break;
        }
    size_t bytes = msg_size ? sizeof(ring) + STREAM_SLOTS * (size_t)msg_size : 2 * sizeof(mailbox);
    void *shared = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED) MPI_Abort(MPI_COMM_WORLD, 2);
    memset(shared, 0, bytes); /* (every page touched once, as a pool's blocks are after their first use) */
    mailbox *boxes = shared;
    MPI_Barrier(MPI_COMM_WORLD);
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) MPI_Abort(MPI_COMM_WORLD, 2);
    if (pid == 0) {
        if (msg_size) _exit(stream_process(rank, (size_t)msg_size, n, repeat, shared, library));
        _exit(process(rank, n, repeat, &boxes[0], &boxes[1], library));
    }
    int stuck = msg_size ? stream_relay(rank, (size_t)msg_size, (uint64_t)(STREAM_WARM + n) * (uint64_t)repeat, shared)
                         : relay(rank, (uint64_t)(WARM + n) * (uint64_t)repeat, &boxes[0], &boxes[1]);
    if (stuck) {
        kill(pid, SIGKILL);
        fprintf(stderr, "relay_floor: rank %d: no progress for %.0f s\n", rank, WAIT_LIMIT);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    int code = stuck ? 3 : (WIFEXITED(status) ? WEXITSTATUS(status) : 3);
    if (code) MPI_Abort(MPI_COMM_WORLD, code);
    MPI_Finalize();
    return 0;
}
