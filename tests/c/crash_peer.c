/* A pure-C peer for the crash tests (tests/test_crash.py), no Python.
 *
 * Built from the C core with crash points, it plays one side of a ring and
 * can be made to SIGKILL itself at a named step (IPC_RING_CRASH_AT="name" or
 * "name:N", see _ring.h "crash points"); the test is the other side and
 * checks what survives.
 *
 *   cc -std=c11 -Wall -Wextra -Wshadow -Wconversion -DRB_CRASH_POINTS -Isrc/ipc_ring \
 *      src/ipc_ring/_ring.c tests/c/crash_peer.c -o crash_peer
 *
 *   crash_peer writer PATH CAPACITY N
 *       Creates the ring at PATH as RingWriter.create does (temporary name,
 *       liveness lock, link into place), prints "ready\n", then pushes
 *       messages 0..N-1, blocking while the ring is full, and closes the
 *       stream. After each push returns, writes the message's sequence number
 *       to stdout as 8 little-endian bytes ("reported as pushed").
 *   crash_peer reader PATH N
 *       Attaches to the ring at PATH as its reader, prints "ready\n", then
 *       pops messages and checks every byte. For each message it writes the
 *       sequence number to stdout (8 little-endian bytes, "reported as
 *       received") BEFORE releasing it with rb_consume; the crash point
 *       "reader_copied" sits between the two.
 *
 * Message `seq` has message_length(seq) bytes filled by fill(); the tests
 * compute the same pattern in Python (tests/test_crash.py), so keep the two
 * identical.
 *
 * Exit status: 0 done; 1 usage or system error; 2 not a valid ring; 3 the
 * role is taken (RB_BUSY); 4 a message differs from the pattern; 5 RB_CORRUPT
 * or the stream ended after the wrong number of messages. A SIGALRM after
 * 120 s stops a peer that a broken test left behind.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "_ring.h"

#define SPIN_NS 2000u /* busy-wait before sleeping */
#define WAIT_SLICE_NS 50000000u /* 50 ms, like the glue's sleep slice */
#define BACKSTOP_SECONDS 120u

enum exit_status {
    EXIT_DONE = 0,
    EXIT_SYSTEM = 1,
    EXIT_INVALID = 2,
    EXIT_BUSY = 3,
    EXIT_MISMATCH = 4,
    EXIT_CORRUPT = 5,
};

/* xorshift64*, as in ring_stress.c: the size and fill of message `seq`. */
static uint64_t mix(uint64_t x) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return x * 0x2545F4914F6CDD1DULL;
}

/* 0 .. max_len: zero-length and maximal messages one time in eight each (a
 * maximal record never fits after index 0, so it always needs a padding
 * record first), a uniform size one time in eight, else 8..71 bytes. */
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

/* ---- writer ------------------------------------------------------------ */

/* Creates the ring file at `path` like RingWriter.create (FORMAT.md "Creating
 * a ring"): built under a temporary name in the same directory, locked as the
 * writer, then linked into place. Returns the mapping and fills *snap;
 * *fd_out stays open so that the liveness lock lives as long as the process. */
static void *create_ring(const char *path, uint64_t capacity, int *fd_out, rb_snapshot *snap) {
    size_t path_len = strlen(path);
    char *tmp = malloc(path_len + 64);
    if (!tmp) die("malloc");
    const char *slash = strrchr(path, '/');
    size_t dir_len = slash ? (size_t)(slash - path) + 1 : 0;
    snprintf(tmp, path_len + 64, "%.*s.%s.%ld.crash_peer.tmp", (int)dir_len, path,
             path + dir_len, (long)getpid());
    int fd = open(tmp, O_RDWR | O_CLOEXEC | O_CREAT | O_EXCL | O_NOFOLLOW, 0600);
    if (fd < 0) die("open temporary ring file");
    size_t size = (size_t)rb_file_size(capacity);
    if (ftruncate(fd, (off_t)size) != 0) die("ftruncate");
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) die("mmap");
    rb_init(base, capacity);
    if (rb_validate_header(base, size, snap) != RB_VALID) {
        fprintf(stderr, "crash_peer: fresh ring does not validate\n");
        exit(EXIT_INVALID);
    }
    if (rb_lock_role(fd, RB_ROLE_WRITER) != RB_OK) die("lock the writer role");
    if (link(tmp, path) != 0) die("link ring file into place");
    if (unlink(tmp) != 0) die("unlink temporary ring file");
    free(tmp);
    *fd_out = fd;
    return base;
}

static int run_writer(const char *path, uint64_t capacity, uint64_t n) {
    if (!rb_capacity_valid(capacity)) {
        fprintf(stderr, "crash_peer: capacity must be a power of two in [64, 2**32]\n");
        return EXIT_SYSTEM;
    }
    int fd;
    rb_snapshot snap;
    void *base = create_ring(path, capacity, &fd, &snap);
    rb_writer w;
    rb_writer_attach(&w, base, &snap);
    uint64_t max_len = capacity - RB_RECORD_HEADER;
    uint8_t *buf = malloc(max_len + 1);
    if (!buf) die("malloc");
    say_ready();
    for (uint64_t seq = 0; seq < n; seq++) {
        uint64_t len = message_length(seq, max_len);
        fill(buf, seq, len);
        for (;;) {
            rb_result res = rb_try_push(&w, buf, len);
            if (res == RB_OK) break;
            if (res != RB_FULL) {
                fprintf(stderr, "crash_peer writer: result %d at seq %" PRIu64 "\n", (int)res,
                        seq);
                return EXIT_CORRUPT;
            }
            if (rb_spin_writable(&w, SPIN_NS) != RB_WOKEN) {
                rb_wait_writable(&w, rb_now_ns() + WAIT_SLICE_NS);
                rb_end_wait_writable(&w);
            }
        }
        report(seq);
    }
    rb_writer_close(&w);
    free(buf);
    return EXIT_DONE;
}

/* ---- reader ------------------------------------------------------------ */

/* Maps the existing ring at `path` (as much of it as the capacity its header
 * claims, if the file is that long) and validates it. Returns the mapping and
 * fills *snap; *fd_out stays open. */
static void *open_ring(const char *path, int *fd_out, rb_snapshot *snap) {
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) die("open ring file");
    struct stat sb;
    if (fstat(fd, &sb) != 0) die("fstat");
    uint64_t file_size = (uint64_t)sb.st_size;
    if (file_size < RB_DATA_OFFSET) {
        fprintf(stderr, "crash_peer: %s\n", rb_invalid_reason(RB_INVALID_SHORT_FILE));
        exit(EXIT_INVALID);
    }
    void *head = mmap(NULL, RB_DATA_OFFSET, PROT_READ, MAP_SHARED, fd, 0);
    if (head == MAP_FAILED) die("mmap header");
    uint64_t capacity = ((const rb_header *)head)->capacity;
    munmap(head, RB_DATA_OFFSET);
    size_t map_size = RB_DATA_OFFSET;
    if (rb_capacity_valid(capacity) && file_size >= rb_file_size(capacity))
        map_size = (size_t)rb_file_size(capacity);
    void *base = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) die("mmap");
    rb_invalid why = rb_validate_header(base, file_size < map_size ? file_size : map_size, snap);
    if (why != RB_VALID) {
        fprintf(stderr, "crash_peer: %s: %s\n", path, rb_invalid_reason(why));
        exit(EXIT_INVALID);
    }
    *fd_out = fd;
    return base;
}

static int run_reader(const char *path, uint64_t n) {
    int fd;
    rb_snapshot snap;
    void *base = open_ring(path, &fd, &snap);
    rb_result locked = rb_lock_role(fd, RB_ROLE_READER);
    if (locked == RB_BUSY) {
        fprintf(stderr, "crash_peer reader: %s already has a live reader\n", path);
        return EXIT_BUSY;
    }
    if (locked != RB_OK) die("lock the reader role");
    rb_reader r;
    rb_reader_attach(&r, base, &snap);
    uint64_t max_len = r.capacity - RB_RECORD_HEADER;
    uint8_t *expect = malloc(max_len + 1);
    uint8_t *copy = malloc(max_len + 1);
    if (!expect || !copy) die("malloc");
    say_ready();
    uint64_t seq = 0;
    for (;;) {
        const void *payload;
        uint64_t len;
        rb_result res = rb_peek(&r, &payload, &len);
        if (res == RB_EMPTY) {
            if (rb_spin_readable(&r, SPIN_NS) != RB_WOKEN) {
                rb_wait_readable(&r, rb_now_ns() + WAIT_SLICE_NS);
                rb_end_wait_readable(&r);
            }
            continue;
        }
        if (res == RB_CLOSED) break;
        if (res != RB_OK) {
            fprintf(stderr, "crash_peer reader: result %d at seq %" PRIu64 "\n", (int)res, seq);
            return EXIT_CORRUPT;
        }
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
#ifdef RB_CRASH_POINTS
        rb_crash_point("reader_copied");
#endif
        rb_consume(&r);
        seq++;
    }
    if (seq != n) {
        fprintf(stderr, "crash_peer reader: end of stream after %" PRIu64 " of %" PRIu64
                        " messages\n",
                seq, n);
        return EXIT_CORRUPT;
    }
    free(copy);
    free(expect);
    return EXIT_DONE;
}

int main(int argc, char **argv) {
    alarm(BACKSTOP_SECONDS);
    if (argc == 5 && strcmp(argv[1], "writer") == 0)
        return run_writer(argv[2], parse_u64(argv[3], "capacity"), parse_u64(argv[4], "N"));
    if (argc == 4 && strcmp(argv[1], "reader") == 0)
        return run_reader(argv[2], parse_u64(argv[3], "N"));
    fprintf(stderr, "usage: crash_peer writer PATH CAPACITY N\n"
                    "       crash_peer reader PATH N\n");
    return EXIT_SYSTEM;
}
