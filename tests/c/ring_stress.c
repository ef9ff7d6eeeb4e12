/* Two-thread stress test of the pure C core (_ring.c), no Python.
 *
 * A writer thread and a reader thread share one mapping; the writer pushes
 * messages of pseudo-random sizes (0 .. max_message_size, biased to small)
 * carrying their sequence number and a pattern derived from it, blocking
 * with the same spin-then-sleep calls the glue uses; the reader checks every
 * byte. Built with -fsanitize=thread in CI (.ci/run) to prove the memory
 * ordering, and usable under ASan/UBSan or valgrind too.
 *
 *   cc -std=c11 -O1 -g -fsanitize=thread -pthread -Isrc/ipc_ring \
 *      src/ipc_ring/_ring.c tests/c/ring_stress.c -o ring_stress
 *   ./ring_stress [messages] [capacity] [spin_ns]
 *
 * Exit status 0 when every message arrived intact and in order.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "_ring.h"

static uint64_t n_messages = 2000000;
static uint64_t capacity = 4096;
static uint64_t spin_ns = 2000; /* busy-wait before sleeping */
static void *mapping;
static rb_snapshot snapshot; /* of the fresh ring, for both threads */

/* xorshift64*: the size and fill of message `seq`, the same on both sides. */
static uint64_t mix(uint64_t x) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return x * 0x2545F4914F6CDD1DULL;
}

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

static void fill(uint8_t *buf, uint64_t seq, uint64_t len) {
    for (uint64_t i = 0; i < len; i++) buf[i] = (uint8_t)(seq * 31 + i);
    if (len >= 8) memcpy(buf, &seq, 8);
}

static void *writer_main(void *arg) {
    (void)arg;
    rb_writer w;
    rb_writer_attach(&w, mapping, &snapshot);
    uint64_t max_len = capacity - RB_RECORD_HEADER;
    uint8_t *buf = malloc(max_len + 1);
    for (uint64_t seq = 0; seq < n_messages; seq++) {
        uint64_t len = message_length(seq, max_len);
        fill(buf, seq, len);
        for (;;) {
            rb_result res = rb_try_push(&w, buf, len);
            if (res == RB_OK) break;
            if (res != RB_FULL) {
                fprintf(stderr, "writer: result %d at seq %" PRIu64 "\n", (int)res, seq);
                exit(2);
            }
            if (rb_spin_writable(&w, spin_ns) != RB_WOKEN) {
                rb_wait_writable(&w, rb_now_ns() + 50000000u);
                rb_end_wait_writable(&w);
            }
        }
    }
    rb_writer_leave(&w, RB_STATE_CLOSED);
    free(buf);
    return NULL;
}

static void *reader_main(void *arg) {
    (void)arg;
    rb_reader r;
    rb_reader_attach(&r, mapping, &snapshot);
    uint64_t max_len = capacity - RB_RECORD_HEADER;
    uint8_t *expect = malloc(max_len + 1);
    uint64_t seq = 0;
    for (;;) {
        const void *payload;
        uint64_t len;
        rb_result res = rb_peek(&r, &payload, &len);
        if (res == RB_EMPTY) {
            if (rb_spin_readable(&r, spin_ns) != RB_WOKEN) {
                rb_wait_readable(&r, rb_now_ns() + 50000000u);
                rb_end_wait_readable(&r);
            }
            continue;
        }
        if (res == RB_CLOSED) break;
        if (res != RB_OK) {
            fprintf(stderr, "reader: result %d at seq %" PRIu64 "\n", (int)res, seq);
            exit(3);
        }
        uint64_t want = message_length(seq, max_len);
        fill(expect, seq, want);
        if (len != want || memcmp(payload, expect, len) != 0) {
            fprintf(stderr, "reader: message %" PRIu64 " has %" PRIu64 " bytes, want %" PRIu64
                            ", or its bytes differ\n", seq, len, want);
            exit(4);
        }
        rb_consume(&r);
        seq++;
    }
    if (seq != n_messages) {
        fprintf(stderr, "reader: end of stream after %" PRIu64 " of %" PRIu64 " messages\n", seq,
                n_messages);
        exit(5);
    }
    free(expect);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) n_messages = strtoull(argv[1], NULL, 0);
    if (argc > 2) capacity = strtoull(argv[2], NULL, 0);
    if (argc > 3) spin_ns = strtoull(argv[3], NULL, 0);
    if (!rb_capacity_valid(capacity)) {
        fprintf(stderr, "capacity must be a power of two in [64, 2**32]\n");
        return 1;
    }
    size_t size = (size_t)rb_file_size(capacity);
    mapping = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mapping == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    rb_init(mapping, capacity, 0, 0);
    if (rb_validate_header(mapping, size, &snapshot) != RB_VALID) {
        fprintf(stderr, "fresh ring does not validate\n");
        return 1;
    }
    pthread_t wt, rt;
    pthread_create(&rt, NULL, reader_main, NULL);
    pthread_create(&wt, NULL, writer_main, NULL);
    pthread_join(wt, NULL);
    pthread_join(rt, NULL);
    printf("ring_stress: %" PRIu64 " messages through a %" PRIu64 "-byte ring, all intact\n",
           n_messages, capacity);
    return 0;
}
