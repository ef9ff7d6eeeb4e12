/* One-way wake-up latency to a process asleep in its receive, in C: the
 * floors the Python figures are compared with, and the C core's own wait
 * path (_handle.c's rb_wait, as the extension waits) without Python.
 *
 * The parent forks a receiver. Every --gap-us (1000) microseconds the parent
 * reads CLOCK_MONOTONIC and sends it; the receiver, which has been asleep
 * since the last one, takes CLOCK_MONOTONIC when its receive returns and
 * keeps the difference. The modes of --modes take turns sample by sample,
 * each round of M samples in an order of its own drawn from --seed (the
 * same in both processes; --seed 0: always the order of --modes), so the
 * machine's noise, and whatever one mode's wake-up leaves behind for the
 * next, hits them alike and their ratios compare. Modes:
 *   futex  a bare FUTEX_WAIT / FUTEX_WAKE on a word in a shared mapping
 *          (the time stamp beside it, the word bumped after it);
 *   pipe   write(2) of the 8-byte stamp into a pipe, read(2) asleep in it;
 *   core   an ipc_ring ring file through the library's C core: the sender
 *          rb_try_push (which wakes a reader that said it sleeps), the
 *          receiver rb_peek / rb_wait (spin, then futex slices, with the
 *          liveness and truncation checks) / rb_consume, as pop() does.
 *
 *   cc -std=c11 -O2 -Isrc/ipc_ring src/ipc_ring/_ring.c src/ipc_ring/_handle.c \
 *      benchmarks/wake_latency.c -o benchmarks/bin/wake_latency -pthread
 *   benchmarks/bin/wake_latency [--modes futex,pipe,core] [--samples N] [--gap-us US]
 *                               [--ring PATH] [--spin-ns NS] [--pin SENDER,RECEIVER]
 *                               [--seed S]
 *
 * Prints one JSON line per mode: {"mode": ..., "samples": N (per mode),
 * "p50": us, "p99": us, "p99.9": us, "max": us}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <sched.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "_handle.h"

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_us(uint64_t us) {
    struct timespec ts = {(time_t)(us / 1000000u), (long)(us % 1000000u) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double at(const uint64_t *sorted, size_t n, double q) {
    size_t i = (size_t)(q * (double)n);
    return (double)sorted[i < n ? i : n - 1] / 1000.0;
}

/* Writes all of buf to fd, or exits. */
static void write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            perror("write");
            exit(1);
        }
        p += n;
        len -= (size_t)n;
    }
}

static int read_all(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void pin_to(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET((size_t)cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) perror("sched_setaffinity");
}

/* ---- futex ------------------------------------------------------------- */

typedef struct shared_word {
    _Atomic uint32_t seq;
    _Atomic uint64_t stamp;
} shared_word;

static void futex_receive(shared_word *w, uint64_t *out) {
    static uint32_t seen;
    uint32_t now;
    while ((now = atomic_load_explicit(&w->seq, memory_order_acquire)) == seen)
        syscall(SYS_futex, (uint32_t *)&w->seq, FUTEX_WAIT, seen, NULL, NULL, 0);
    uint64_t t = now_ns();
    seen = now;
    *out = t - atomic_load_explicit(&w->stamp, memory_order_relaxed);
}

static void futex_send(shared_word *w) {
    atomic_store_explicit(&w->stamp, now_ns(), memory_order_relaxed);
    atomic_fetch_add_explicit(&w->seq, 1u, memory_order_release);
    syscall(SYS_futex, (uint32_t *)&w->seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* ---- core -------------------------------------------------------------- */

static void attach_or_die(rb_handle *h, const char *path, rb_role role, uint64_t spin_ns) {
    rb_options opt = {.path = path, .capacity = 1u << 16, .mode = 0600, .spin_ns = spin_ns};
    rb_error err;
    rb_handle_init(h);
    rb_result res = role == RB_ROLE_WRITER ? rb_handle_create(h, &opt, &err)
                                           : rb_handle_open(h, role, &opt, &err);
    if (res != RB_OK) {
        fprintf(stderr, "%s\n", err.message);
        exit(1);
    }
}

/* One pop(): peek, and wait while the ring is empty. */
static void core_receive(rb_handle *h, uint64_t *out) {
    rb_reader *r = &h->ring.reader;
    rb_wait_state ws;
    rb_wait_init(&ws, RB_FOREVER, "pop");
    for (;;) {
        const void *payload;
        uint64_t len, stamp;
        rb_result res = rb_peek(r, &payload, &len);
        if (res == RB_EMPTY) {
            rb_error err;
            if (rb_wait(h, &ws, &err) != RB_OK) {
                fprintf(stderr, "%s\n", err.message);
                exit(1);
            }
            continue;
        }
        if (res != RB_OK || len != sizeof stamp) {
            fprintf(stderr, "receiver: result %d, length %" PRIu64 "\n", (int)res, len);
            exit(1);
        }
        memcpy(&stamp, payload, sizeof stamp); /* pop() copies the message out too */
        uint64_t t = now_ns();
        rb_consume(r);
        *out = t - stamp;
        return;
    }
}

static void core_send(rb_handle *h) {
    uint64_t stamp = now_ns();
    if (rb_try_push(&h->ring.writer, &stamp, sizeof stamp) != RB_OK) {
        fprintf(stderr, "sender: the ring is full\n");
        exit(1);
    }
}

/* ---- main -------------------------------------------------------------- */

enum { FUTEX, PIPE, CORE, NMODES };
static const char *const mode_names[NMODES] = {"futex", "pipe", "core"};

static int parse_modes(const char *list, int *modes) {
    int count = 0;
    char *copy = strdup(list), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int found = -1;
        for (int m = 0; m < NMODES; m++)
            if (!strcmp(tok, mode_names[m])) found = m;
        if (found < 0 || count == NMODES) {
            free(copy);
            return -1;
        }
        modes[count++] = found;
    }
    free(copy);
    return count;
}

static void report(const char *mode, uint64_t *samples, size_t n) {
    qsort(samples, n, sizeof *samples, cmp_u64);
    printf("{\"mode\": \"%s\", \"samples\": %zu, \"p50\": %.2f, \"p99\": %.2f, \"p99.9\": %.2f, "
           "\"max\": %.2f}\n",
           mode, n, at(samples, n, 0.5), at(samples, n, 0.99), at(samples, n, 0.999),
           (double)samples[n - 1] / 1000.0);
}

int main(int argc, char **argv) {
    const char *modes_arg = "futex,pipe,core";
    const char *path = NULL;
    size_t per_mode = 2000;
    uint64_t gap_us = 1000, spin_ns = RB_DEFAULT_SPIN_NS;
    int pin[2] = {-1, -1};
    uint64_t seed = 1;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) {
            fprintf(stderr, "option %s needs a value\n", argv[i]);
            return 2;
        }
        const char *v = argv[++i];
        if (!strcmp(argv[i - 1], "--modes")) modes_arg = v;
        else if (!strcmp(argv[i - 1], "--samples")) per_mode = (size_t)strtoull(v, NULL, 0);
        else if (!strcmp(argv[i - 1], "--gap-us")) gap_us = strtoull(v, NULL, 0);
        else if (!strcmp(argv[i - 1], "--ring")) path = v;
        else if (!strcmp(argv[i - 1], "--spin-ns")) spin_ns = strtoull(v, NULL, 0);
        else if (!strcmp(argv[i - 1], "--seed")) seed = strtoull(v, NULL, 0);
        else if (!strcmp(argv[i - 1], "--pin")) {
            if (sscanf(v, "%d,%d", &pin[0], &pin[1]) != 2) {
                fprintf(stderr, "--pin takes SENDER,RECEIVER CPU numbers\n");
                return 2;
            }
        }
        else {
            fprintf(stderr, "unknown option %s\n", argv[i - 1]);
            return 2;
        }
    }
    int modes[NMODES];
    int nmodes = parse_modes(modes_arg, modes);
    if (nmodes <= 0 || per_mode == 0) {
        fprintf(stderr, "--modes takes futex, pipe and core, comma-separated; --samples at least 1\n");
        return 2;
    }
    size_t n = per_mode * (size_t)nmodes;
    /* order[i]: the mode of sample i. Drawn before the fork: both sides
     * follow the same one. */
    int *order = calloc(n, sizeof *order);
    if (!order) return 1;
    uint64_t x = seed;
    for (size_t round = 0; round < per_mode; round++) {
        int *o = order + round * (size_t)nmodes;
        memcpy(o, modes, (size_t)nmodes * sizeof *o);
        for (int k = nmodes - 1; seed && k > 0; k--) { /* Fisher-Yates, xorshift64 */
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            int j = (int)(x % (uint64_t)(k + 1)), t = o[k];
            o[k] = o[j];
            o[j] = t;
        }
    }
    char default_path[64];
    if (!path) {
        snprintf(default_path, sizeof default_path, "/dev/shm/ipc_ring.wake.%d", (int)getpid());
        path = default_path;
    }

    shared_word *word = mmap(NULL, sizeof *word, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                             -1, 0);
    int data[2], results[2], ready[2];
    if (word == MAP_FAILED || pipe(data) || pipe(results) || pipe(ready)) {
        perror("setup");
        return 1;
    }
    rb_handle writer;
    attach_or_die(&writer, path, RB_ROLE_WRITER, spin_ns);

    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        pin_to(pin[1]);
        uint64_t *out = calloc(n, sizeof *out);
        rb_handle reader;
        attach_or_die(&reader, path, RB_ROLE_READER, spin_ns);
        write_all(ready[1], "r", 1);
        for (size_t i = 0; i < n; i++) {
            switch (order[i]) {
            case FUTEX:
                futex_receive(word, &out[i]);
                break;
            case PIPE: {
                uint64_t stamp;
                if (read_all(data[0], &stamp, sizeof stamp)) _exit(1);
                out[i] = now_ns() - stamp;
                break;
            }
            default:
                core_receive(&reader, &out[i]);
            }
        }
        write_all(results[1], out, n * sizeof *out);
        _exit(0);
    }
    pin_to(pin[0]);
    char c;
    if (read(ready[0], &c, 1) != 1) return 1;
    sleep_us(20000);
    for (size_t i = 0; i < n; i++) {
        sleep_us(gap_us);
        switch (order[i]) {
        case FUTEX:
            futex_send(word);
            break;
        case PIPE: {
            uint64_t stamp = now_ns();
            write_all(data[1], &stamp, sizeof stamp);
            break;
        }
        default:
            core_send(&writer);
        }
    }
    uint64_t *samples = calloc(n, sizeof *samples);
    int failed = read_all(results[0], samples, n * sizeof *samples);
    int status = 1;
    waitpid(child, &status, 0);
    rb_error err;
    rb_handle_release(&writer, RB_STATE_CLOSED, 0);
    rb_handle_unmap(&writer);
    rb_unlink(path, &err);
    if (failed || !WIFEXITED(status) || WEXITSTATUS(status)) {
        fprintf(stderr, "the receiver failed\n");
        return 1;
    }
    uint64_t *mine = calloc(per_mode, sizeof *mine);
    for (int m = 0; m < nmodes; m++) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if (order[i] == modes[m]) mine[k++] = samples[i];
        report(mode_names[modes[m]], mine, k);
    }
    return 0;
}
