/* The C core (_ring.c) between two processes, without Python: how close the
 * core comes to the machine, and so how much the Python layer adds.
 *
 * Same protocol as `ipc-ring bench`: the parent creates a ring file and
 * forks a reader; the writer puts a little-endian sequence number in the
 * first 8 bytes of each message and the reader checks every one, timing
 * from the first message to the last.
 *
 *   cc -std=c11 -O2 -Isrc/ipc_ring src/ipc_ring/_ring.c src/ipc_ring/_handle.c \
 *      benchmarks/ring_bench.c -o benchmarks/bin/ring_bench -pthread
 *
 * It attaches and waits through the extension's own functions (_handle.h).
 *   benchmarks/bin/ring_bench [--ring PATH] [--cap BYTES] [--messages N] [--msg-size S]
 *                             [--no-populate]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "_handle.h"

static int populate = 1; /* MAP_POPULATE, as the extension maps; --no-populate to compare */

/* Creates the ring (writer) or opens it (reader) through the library's own
 * functions (lock, map, validate). Exits on failure. */
static void attach(rb_handle *h, const char *path, uint64_t capacity, rb_role role) {
    rb_options opt = {.path = path, .capacity = capacity, .mode = 0600,
                      .spin_ns = RB_DEFAULT_SPIN_NS, .no_populate = !populate};
    rb_error err;
    rb_handle_init(h);
    rb_result res = role == RB_ROLE_WRITER ? rb_handle_create(h, &opt, &err)
                                           : rb_handle_open(h, role, &opt, &err);
    if (res != RB_OK) {
        fprintf(stderr, "%s\n", err.message);
        exit(1);
    }
}

/* Waits as the extension's blocking calls do (spin, then futex slices). */
static void wait_or_die(rb_handle *h, rb_wait_state *ws) {
    rb_error err;
    if (rb_wait(h, ws, &err) != RB_OK) {
        fprintf(stderr, "%s\n", err.message);
        exit(1);
    }
}

static int run_reader(rb_handle *h, uint64_t n, uint64_t msg_size, int ready_fd) {
    rb_reader *r = &h->ring.reader;
    if (write(ready_fd, "r", 1) != 1) return 1;
    uint64_t errors = 0, start = 0;
    uint8_t *copy = malloc(msg_size); /* pop() copies every message out, so this does too */
    rb_wait_state ws;
    rb_wait_init(&ws, RB_FOREVER, "pop");
    for (uint64_t expected = 0; expected < n;) {
        const void *payload;
        uint64_t len;
        rb_result res = rb_peek(r, &payload, &len);
        if (res == RB_EMPTY) {
            wait_or_die(h, &ws);
            continue;
        }
        if (res != RB_OK) {
            fprintf(stderr, "reader: result %d\n", (int)res);
            return 1;
        }
        rb_wait_init(&ws, RB_FOREVER, "pop");
        if (expected == 0) start = rb_now_ns();
        uint64_t seq;
        memcpy(copy, payload, len);
        memcpy(&seq, copy, sizeof seq);
        if (seq != expected || len != msg_size) errors++;
        rb_consume(r);
        expected++;
    }
    double elapsed = (double)(rb_now_ns() - start) / 1e9;
    double rate = (double)(n - 1) / elapsed;
    printf("{\"messages\":%" PRIu64 ",\"msg_size\":%" PRIu64 ",\"elapsed_sec\":%.6f,"
           "\"msgs_per_sec\":%.0f,\"MiB_per_sec\":%.2f}\n",
           n, msg_size, elapsed, rate, rate * (double)msg_size / (1 << 20));
    printf("C core (no Python): %.2f M msgs/s, %" PRIu64 " sequence errors\n", rate / 1e6, errors);
    rb_handle_unmap(h);
    free(copy);
    return errors ? 1 : 0;
}

static void run_writer(rb_handle *h, uint64_t n, uint64_t msg_size) {
    rb_writer *w = &h->ring.writer;
    uint8_t *msg = calloc(1, msg_size);
    rb_wait_state ws;
    for (uint64_t seq = 0; seq < n; seq++) {
        memcpy(msg, &seq, sizeof seq);
        rb_wait_init(&ws, RB_FOREVER, "push");
        while (rb_try_push(w, msg, msg_size) != RB_OK) wait_or_die(h, &ws);
    }
    rb_handle_release(h, RB_STATE_CLOSED, 0);
    rb_handle_unmap(h);
    free(msg);
}

int main(int argc, char **argv) {
    const char *path = "/dev/shm/ipc_ring.cbench";
    uint64_t capacity = 64u << 20, n = 5000000, msg_size = 256;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--no-populate")) {
            populate = 0;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "option %s needs a value\n", argv[i]);
            return 2;
        }
        if (!strcmp(argv[i], "--ring")) path = argv[i++ + 1];
        else if (!strcmp(argv[i], "--cap")) capacity = strtoull(argv[i++ + 1], NULL, 0);
        else if (!strcmp(argv[i], "--messages")) n = strtoull(argv[i++ + 1], NULL, 0);
        else if (!strcmp(argv[i], "--msg-size")) msg_size = strtoull(argv[i++ + 1], NULL, 0);
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!rb_capacity_valid(capacity) || msg_size < 8 || msg_size > capacity - 8) {
        fprintf(stderr, "need a power-of-two capacity and 8 <= msg-size <= capacity - 8\n");
        return 2;
    }
    rb_handle writer;
    attach(&writer, path, capacity, RB_ROLE_WRITER);
    int ready[2];
    if (pipe(ready) != 0) return 1;
    pid_t child = fork();
    if (child == 0) {
        /* Its own handle and mapping, as an unrelated process has (the
         * inherited writer handle is disowned by the fork handler). */
        rb_handle reader;
        attach(&reader, path, capacity, RB_ROLE_READER);
        int rc = run_reader(&reader, n, msg_size, ready[1]);
        fflush(stdout);
        _exit(rc);
    }
    char c;
    if (read(ready[0], &c, 1) != 1) return 1;
    run_writer(&writer, n, msg_size);
    int status = 1;
    waitpid(child, &status, 0);
    rb_error err;
    rb_unlink(path, &err);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
