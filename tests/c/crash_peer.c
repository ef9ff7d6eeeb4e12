/* A pure-C peer for the crash tests (tests/test_crash.py), no Python.
 *
 * Built from the C core with crash points, it plays one side of a ring and
 * can be made to SIGKILL itself at a named step (IPC_RING_CRASH_AT="name" or
 * "name:N", see _ring.h "crash points"); the test is the other side and
 * checks what survives.
 *
 *   cc -std=c11 -Wall -Wextra -Wshadow -Wconversion -DRB_CRASH_POINTS -Isrc/ipc_ring \
 *      src/ipc_ring/_ring.c src/ipc_ring/_handle.c tests/c/crash_peer.c -o crash_peer -pthread
 *
 * It creates, attaches and waits through the same functions as the
 * extension (_handle.h: rb_handle_create, rb_handle_open, rb_wait), so the
 * order of lock, map and validation is the library's own.
 *
 *   crash_peer writer PATH CAPACITY N
 *       Creates the ring at PATH as RingWriter.create does (rb_handle_create),
 *       prints "ready\n", then pushes
 *       messages 0..N-1, blocking while the ring is full, and closes the
 *       stream. After each push returns, writes the message's sequence number
 *       to stdout as 8 little-endian bytes ("reported as pushed").
 *   crash_peer reader PATH N [BATCH]
 *       Attaches to the ring at PATH as its reader, prints "ready\n", then
 *       pops messages and checks every byte. For each message it writes the
 *       sequence number to stdout (8 little-endian bytes, "reported as
 *       received") BEFORE releasing it with rb_consume; the crash point
 *       "reader_copied" sits between the two. The crash point
 *       "reader_jumped" sits right after an rb_peek that jumped over a wrap
 *       point (FORMAT.md "Wrap rule"): the jump is private, nothing of it
 *       is published yet. At the end of the stream it leaves the role
 *       closed, as RingReader.close() does.
 *       With BATCH > 1 it reads as pop_many does: it copies and reports each
 *       message and skips it (rb_skip), and releases them together
 *       (rb_release) once BATCH are skipped or no more is there now; the
 *       crash point "reader_batch_skipped" sits right before that release.
 *
 * Message `seq` has message_length(seq) bytes filled by fill(); the tests
 * compute the same pattern in Python (tests/test_crash.py), so keep the two
 * identical.
 *
 * Exit status: 0 done; 1 usage or system error; 2 not a valid ring; 3 the
 * role is taken (RB_BUSY); 4 a message differs from the pattern; 5 RB_CORRUPT
 * or the stream ended after the wrong number of messages; 6 the peer died
 * (RB_PEER_DIED). A SIGALRM after 120 s stops a peer that a broken test left
 * behind.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "_handle.h"

#define SPIN_NS 2000u /* busy-wait before sleeping */
#define BACKSTOP_SECONDS 120u

enum exit_status {
    EXIT_DONE = 0,
    EXIT_SYSTEM = 1,
    EXIT_INVALID = 2,
    EXIT_BUSY = 3,
    EXIT_MISMATCH = 4,
    EXIT_CORRUPT = 5,
    EXIT_PEER_DIED = 6,
};

/* xorshift64*, as in ring_stress.c: the size and fill of message `seq`. */
static uint64_t mix(uint64_t x) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return x * 0x2545F4914F6CDD1DULL;
}

/* 0 .. max_len: zero-length and maximal messages one time in eight each (a
 * maximal record fills the whole data area, so from any index but 0 it
 * wraps: the writer records wrap_pos and writes it at the next lap), a
 * uniform size one time in eight, else 8..71 bytes. */
static uint64_t message_length(uint64_t seq, uint64_t max_len) {
    uint64_t r = mix(seq + 1);
    switch (r & 7) {
    case 0: return 0;
    case 1: return max_len;
    case 2: return r % (max_len + 1);
    default: {
        uint64_t small = 8 + (r >> 8) % 64;
        return small < max_len ? small : max_len;
    }
    }
}

/* Byte i is (seq * 31 + i) mod 256; the first 8 bytes are seq, little-endian,
 * when the message is long enough. */
static void fill(uint8_t *buf, uint64_t seq, uint64_t len) {
    for (uint64_t i = 0; i < len; i++) buf[i] = (uint8_t)(seq * 31 + i);
    if (len >= 8) memcpy(buf, &seq, 8);
}

static void die(const char *what) {
    perror(what);
    exit(EXIT_SYSTEM);
}

/* Writes all of buf to stdout with write(2): no stdio buffer, so whatever
 * was reported is in the pipe when the process is killed. */
static void report(uint64_t seq) {
    const uint8_t *p = (const uint8_t *)&seq; /* little-endian host (_ring.h) */
    size_t left = sizeof seq;
    while (left) {
        ssize_t n = write(STDOUT_FILENO, p, left);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        p += n;
        left -= (size_t)n;
    }
}

static void say_ready(void) {
    fputs("ready\n", stdout);
    fflush(stdout);
}

static uint64_t parse_u64(const char *s, const char *what) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end) {
        fprintf(stderr, "crash_peer: bad %s: %s\n", what, s);
        exit(EXIT_SYSTEM);
    }
    return (uint64_t)v;
}

/* The exit status for an error of the handle layer, after printing it. */
static int fail(const rb_error *err) {
    fprintf(stderr, "crash_peer: %s\n", err->message);
    switch (err->code) {
    case RB_INVALID: return EXIT_INVALID;
    case RB_BUSY: return EXIT_BUSY;
    case RB_CORRUPT: return EXIT_CORRUPT;
    case RB_PEER_DIED: return EXIT_PEER_DIED;
    default: return EXIT_SYSTEM;
    }
}

/* ---- writer ------------------------------------------------------------ */

static int run_writer(const char *path, uint64_t capacity, uint64_t n) {
    rb_handle h;
    rb_error err;
    rb_handle_init(&h);
    /* As RingWriter.create: built under temporary names, linked into place. */
    rb_options opt = {.path = path, .capacity = capacity, .mode = 0600, .spin_ns = SPIN_NS};
    if (rb_handle_create(&h, &opt, &err) != RB_OK) return fail(&err);
    rb_writer *w = &h.ring.writer;
    uint64_t max_len = capacity - RB_RECORD_HEADER;
    uint8_t *buf = malloc(max_len + 1);
    if (!buf) die("malloc");
    say_ready();
    for (uint64_t seq = 0; seq < n; seq++) {
        uint64_t len = message_length(seq, max_len);
        fill(buf, seq, len);
        rb_wait_state ws;
        rb_wait_init(&ws, RB_FOREVER, "push");
        for (;;) {
            rb_result res = rb_try_push(w, buf, len);
            if (res == RB_OK) break;
            if (res != RB_FULL) {
                rb_handle_error(&h, res, len, &err);
                return fail(&err);
            }
            if (rb_wait(&h, &ws, &err) != RB_OK) return fail(&err);
        }
        report(seq);
    }
    rb_handle_release(&h, RB_STATE_CLOSED, 0);
    rb_handle_unmap(&h);
    free(buf);
    return EXIT_DONE;
}

/* ---- reader ------------------------------------------------------------ */

static int run_reader(const char *path, uint64_t n, uint64_t batch) {
    rb_handle h;
    rb_error err;
    rb_handle_init(&h);
    rb_options opt = {.path = path, .spin_ns = SPIN_NS};
    if (rb_handle_open(&h, RB_ROLE_READER, &opt, &err) != RB_OK) return fail(&err);
    rb_reader *r = &h.ring.reader;
    uint64_t max_len = r->capacity - RB_RECORD_HEADER;
    uint8_t *expect = malloc(max_len + 1);
    uint8_t *copy = malloc(max_len + 1);
    if (!expect || !copy) die("malloc");
    say_ready();
    uint64_t seq = 0;
    uint64_t skipped = 0; /* messages skipped and not yet released (batch mode) */
    rb_wait_state ws;
    rb_wait_init(&ws, RB_FOREVER, "pop");
    for (;;) {
        const void *payload;
        uint64_t len;
        uint64_t before = r->read_pos;
        rb_result res = rb_peek(r, &payload, &len);
        /* rb_peek moves the private read_pos only to jump over a wrap point. */
        if (res == RB_OK && r->read_pos != before) RB_CRASH_POINT("reader_jumped");
        if (skipped && (res == RB_EMPTY || res == RB_CLOSED)) {
            /* As pop_many: the batch ends with what is there now, released at once. */
            RB_CRASH_POINT("reader_batch_skipped");
            rb_release(r);
            skipped = 0;
        }
        if (res == RB_EMPTY) {
            if (rb_wait(&h, &ws, &err) != RB_OK) return fail(&err);
            continue;
        }
        if (res == RB_CLOSED) break;
        if (res != RB_OK) {
            rb_handle_error(&h, res, 0, &err);
            return fail(&err);
        }
        rb_wait_init(&ws, RB_FOREVER, "pop");
        uint64_t want = message_length(seq, max_len);
        fill(expect, seq, want);
        if (len != want || memcmp(payload, expect, len) != 0) {
            fprintf(stderr,
                    "crash_peer reader: message %" PRIu64 " has %" PRIu64 " bytes, want %" PRIu64
                    ", or its bytes differ\n",
                    seq, len, want);
            return EXIT_MISMATCH;
        }
        memcpy(copy, payload, len);
        report(seq);
        RB_CRASH_POINT("reader_copied");
        if (batch <= 1) {
            rb_consume(r);
        }
        else {
            rb_skip(r);
            if (++skipped == batch) {
                RB_CRASH_POINT("reader_batch_skipped");
                rb_release(r);
                skipped = 0;
            }
        }
        seq++;
    }
    if (seq != n) {
        fprintf(stderr, "crash_peer reader: end of stream after %" PRIu64 " of %" PRIu64
                        " messages\n",
                seq, n);
        return EXIT_CORRUPT;
    }
    rb_handle_release(&h, RB_STATE_CLOSED, 0);
    rb_handle_unmap(&h);
    free(copy);
    free(expect);
    return EXIT_DONE;
}

int main(int argc, char **argv) {
    alarm(BACKSTOP_SECONDS);
    if (argc == 5 && strcmp(argv[1], "writer") == 0)
        return run_writer(argv[2], parse_u64(argv[3], "capacity"), parse_u64(argv[4], "N"));
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "reader") == 0)
        return run_reader(argv[2], parse_u64(argv[3], "N"),
                          argc == 5 ? parse_u64(argv[4], "BATCH") : 1);
    fprintf(stderr, "usage: crash_peer writer PATH CAPACITY N\n"
                    "       crash_peer reader PATH N [BATCH]\n");
    return EXIT_SYSTEM;
}
