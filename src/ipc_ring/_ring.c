/* ipc_ring core: see _ring.h for the contracts and docs/FORMAT.md for the
 * layout and the protocol. Pure C11 plus the OS's sleep/wake primitive. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif
#include "_ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#elif defined(__APPLE__)
/* Private but stable since macOS 10.12; libc++ and Rust's std use it too.
 * UL_COMPARE_AND_WAIT_SHARED works across processes on shared memory. */
extern int __ulock_wait(uint32_t operation, void *addr, uint64_t value, uint32_t timeout_us);
extern int __ulock_wake(uint32_t operation, void *addr, uint64_t wake_value);
#define RB_UL_COMPARE_AND_WAIT_SHARED 3u
#define RB_ULF_WAKE_ALL 0x00000100u
#endif

#if defined(__x86_64__) || defined(__i386__)
#define rb_cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define rb_cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define rb_cpu_relax() ((void)0)
#endif

/* ---- sleeping and waking (FORMAT.md "Waiting") ----------------------- */

uint64_t rb_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void rb_copy_in(void *dst, const void *src, size_t n, int streaming) {
#if defined(__x86_64__) && defined(__SSE2__)
    if (streaming && n >= RB_STREAM_COPY_MIN) {
        char *to = dst;
        const char *from = src;
        size_t head = (16u - ((uintptr_t)to & 15u)) & 15u;
        memcpy(to, from, head);
        to += head;
        from += head;
        n -= head;
        for (; n >= 64; n -= 64, to += 64, from += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(const void *)from);
            __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(from + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(const void *)(from + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(const void *)(from + 48));
            _mm_stream_si128((__m128i *)(void *)to, a);
            _mm_stream_si128((__m128i *)(void *)(to + 16), b);
            _mm_stream_si128((__m128i *)(void *)(to + 32), c);
            _mm_stream_si128((__m128i *)(void *)(to + 48), d);
        }
        memcpy(to, from, n);
        _mm_sfence(); /* the stores above are weakly ordered: before the commit's */
        return;
    }
#endif
    memcpy(dst, src, n);
}

int rb_copy_mode = 0;

int rb_copy_pick(rb_copy_choice *c) {
#if defined(__x86_64__) && defined(__SSE2__)
    if (rb_copy_mode) return rb_copy_mode == 2;
    /* An unknown cost (0) looks cheapest: each is tried first thing. */
    int best = c->cost[1] <= c->cost[0] ? 1 : 0;
    return ++c->copies % RB_COPY_PROBE == 0 ? !best : best;
#else
    (void)c;
    return 0;
#endif
}

void rb_copy_note(rb_copy_choice *c, int streaming, uint64_t ns, uint64_t bytes) {
    if (!bytes) return;
    uint64_t sample = ns * RB_STREAM_COPY_MIN / bytes, *cost = &c->cost[streaming ? 1 : 0];
    if (!sample) sample = 1;
    if (*cost && sample > 4 * *cost) sample = 4 * *cost; /* a copy the scheduler interrupted */
    *cost = *cost ? (3 * *cost + sample) / 4 : sample;
}

/* Sleeps while *word == expected, until woken or the absolute deadline
 * (0 = none). RB_WOKEN (also for a changed value or a spurious return),
 * RB_TIMEOUT or RB_INTERRUPTED. */
static rb_result rb_sleep_on(_Atomic uint32_t *word, uint32_t expected, uint64_t deadline_ns) {
#if defined(__linux__)
    struct timespec ts, *tsp = NULL;
    if (deadline_ns) {
        ts.tv_sec = (time_t)(deadline_ns / 1000000000u);
        ts.tv_nsec = (long)(deadline_ns % 1000000000u);
        tsp = &ts;
    }
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline. Not
     * FUTEX_PRIVATE_FLAG: the peer is another process. */
    long rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_BITSET, expected, tsp, NULL,
                      FUTEX_BITSET_MATCH_ANY);
    if (rc == 0) return RB_WOKEN;
    if (errno == ETIMEDOUT) return RB_TIMEOUT;
    if (errno == EINTR) return RB_INTERRUPTED;
    return RB_WOKEN; /* EAGAIN: the word already changed */
#elif defined(__APPLE__)
    uint32_t timeout_us = 0; /* 0 = no timeout */
    if (deadline_ns) {
        uint64_t now = rb_now_ns();
        if (now >= deadline_ns) return RB_TIMEOUT;
        uint64_t us = (deadline_ns - now + 999u) / 1000u;
        timeout_us = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
    }
    int rc = __ulock_wait(RB_UL_COMPARE_AND_WAIT_SHARED, (void *)word, expected, timeout_us);
    if (rc >= 0) return RB_WOKEN;
    if (errno == ETIMEDOUT) return RB_TIMEOUT;
    if (errno == EINTR) return RB_INTERRUPTED;
    return RB_WOKEN;
#else
    /* Polling fallback: sleep 1 ms at a time. */
    if (atomic_load_explicit(word, memory_order_acquire) != expected) return RB_WOKEN;
    struct timespec ts = {0, 1000000};
    if (deadline_ns) {
        uint64_t now = rb_now_ns();
        if (now >= deadline_ns) return RB_TIMEOUT;
        if (deadline_ns - now < 1000000u) ts.tv_nsec = (long)(deadline_ns - now);
    }
    if (nanosleep(&ts, NULL) != 0 && errno == EINTR) return RB_INTERRUPTED;
    return RB_WOKEN;
#endif
}

/* Bumps the futex word and wakes every sleeper on it. */
static void rb_wake_on(_Atomic uint32_t *word) {
    atomic_fetch_add_explicit(word, 1u, memory_order_seq_cst);
#if defined(__linux__)
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
#elif defined(__APPLE__)
    __ulock_wake(RB_UL_COMPARE_AND_WAIT_SHARED | RB_ULF_WAKE_ALL, (void *)word, 0);
#endif
}

void rb_wake_reader(rb_header *hdr) { rb_wake_on(&hdr->data_seq); }
void rb_wake_writer(rb_header *hdr) { rb_wake_on(&hdr->space_seq); }

void rb_notify_fd(const rb_notify *notify) {
    uint64_t one = 1; /* an eventfd takes 8 bytes, a FIFO the first one */
    ssize_t n = write(notify->fd, &one, notify->eventfd ? sizeof one : 1);
    (void)n; /* EAGAIN: the FIFO is full, a wake-up is pending anyway */
}

void rb_drain_fd(int fd) {
    char buf[4096];
    for (size_t total = 0; total < RB_DRAIN_MAX;) {
        ssize_t n = read(fd, buf, sizeof buf);
        /* A read shorter than asked emptied it (an eventfd reads 8 bytes and
         * resets): no second read to see EAGAIN. */
        if (n <= 0 || (size_t)n < sizeof buf) return;
        total += (size_t)n;
    }
}

void rb_wake_waiting_peer(_Atomic uint32_t *peer_waiting, _Atomic uint32_t *peer_seq,
                          const rb_notify *notify) {
    /* Whoever clears the flag makes the one system call its value asks for:
     * RB_WAITING_FD, the byte in the peer's FIFO; RB_WAITING_FUTEX, the futex
     * wake. A side waits one way at a time (a handle takes one call at a
     * time, and a blocking call's futex sleep stores 1 over an armed 2), so a
     * 2 has no futex sleeper behind it. */
    uint32_t was = atomic_exchange_explicit(peer_waiting, 0u, memory_order_seq_cst);
    if (was == RB_WAITING_FD && notify->fd >= 0)
        rb_notify_fd(notify);
    else if (was)
        rb_wake_on(peer_seq);
}

/* ---- crash points ---------------------------------------------------- */

#ifdef RB_CRASH_POINTS
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

void rb_crash_point(const char *name) {
    static int parsed;
    static char target[64];
    static long remaining;
    if (!parsed) {
        parsed = 1;
        const char *spec = getenv("IPC_RING_CRASH_AT");
        if (!spec) return;
        const char *colon = strchr(spec, ':');
        size_t n = colon ? (size_t)(colon - spec) : strlen(spec);
        if (n >= sizeof target) n = sizeof target - 1;
        memcpy(target, spec, n);
        target[n] = 0;
        remaining = colon ? strtol(colon + 1, NULL, 10) : 1;
    }
    if (target[0] && strcmp(name, target) == 0 && --remaining == 0) kill(getpid(), SIGKILL);
}
#endif

/* ---- liveness -------------------------------------------------------- */

#if defined(F_OFD_SETLK)
#define RB_SETLK F_OFD_SETLK
#define RB_GETLK F_OFD_GETLK
#else
#define RB_SETLK F_SETLK
#define RB_GETLK F_GETLK
#endif

static void rb_role_range(struct flock *fl, rb_role role, short type) {
    memset(fl, 0, sizeof *fl);
    fl->l_type = type;
    fl->l_whence = SEEK_SET;
    fl->l_start = role == RB_ROLE_WRITER ? RB_LOCK_WRITER_OFFSET : RB_LOCK_READER_OFFSET;
    fl->l_len = RB_LOCK_LENGTH;
}

rb_result rb_lock_role(int fd, rb_role role) {
    struct flock fl;
    rb_role_range(&fl, role, F_WRLCK);
    if (fcntl(fd, RB_SETLK, &fl) == 0) return RB_OK;
    return (errno == EAGAIN || errno == EACCES) ? RB_BUSY : RB_ERROR;
}

void rb_unlock_role(int fd, rb_role role) {
    struct flock fl;
    rb_role_range(&fl, role, F_UNLCK);
    (void)fcntl(fd, RB_SETLK, &fl);
}

int rb_role_alive(int fd, rb_role role) {
    struct flock fl;
    rb_role_range(&fl, role, F_WRLCK);
    if (fcntl(fd, RB_GETLK, &fl) != 0) return -1;
    return fl.l_type != F_UNLCK;
}

/* ---- header ---------------------------------------------------------- */

int rb_capacity_valid(uint64_t capacity) {
    return capacity >= RB_MIN_CAPACITY && capacity <= RB_MAX_CAPACITY &&
           (capacity & (capacity - 1)) == 0;
}

void rb_init(void *base, uint64_t capacity, uint64_t reader_fifo_ino, uint64_t writer_fifo_ino) {
    rb_header *hdr = (rb_header *)base;
    hdr->magic = RB_MAGIC;
    hdr->version = RB_VERSION;
    hdr->capacity = capacity;
    hdr->data_offset = RB_DATA_OFFSET;
    hdr->max_message_size = capacity - RB_RECORD_HEADER;
    hdr->reader_fifo_ino = reader_fifo_ino;
    hdr->writer_fifo_ino = writer_fifo_ino;
    atomic_store_explicit(&hdr->write_pos, 0, memory_order_relaxed);
    atomic_store_explicit(&hdr->read_pos, 0, memory_order_relaxed);
    atomic_store_explicit(&hdr->wrap_pos, 0, memory_order_relaxed);
    atomic_store_explicit(&hdr->ready, RB_READY, memory_order_release);
}

/* The start of the lap after the one `position` lies in. */
static inline uint64_t rb_next_lap(uint64_t position, uint64_t capacity) {
    return (position | (capacity - 1)) + 1;
}

/* 1 if a writer at `w` and a reader at `r` are consistent (FORMAT.md "Wrap
 * rule"): at most `capacity` bytes apart, or, with the reader standing at
 * the wrap point, at most `capacity` bytes beyond the lap it wrapped to. */
static inline int rb_span_ok(uint64_t w, uint64_t r, uint64_t wrap, uint64_t capacity) {
    if (w - r <= capacity) return 1;
    if (r != wrap || !(wrap & (capacity - 1))) return 0;
    uint64_t lap = rb_next_lap(wrap, capacity);
    return w - r >= lap - r && w - lap <= capacity;
}

rb_invalid rb_validate_header(const void *base, uint64_t map_size, rb_snapshot *snap) {
    if (map_size < RB_DATA_OFFSET) return RB_INVALID_SHORT_FILE;
    const volatile rb_header *hdr = (const volatile rb_header *)base;
    if (hdr->magic != RB_MAGIC) return RB_INVALID_MAGIC;
    if (hdr->version != RB_VERSION) return RB_INVALID_VERSION;
    if (atomic_load_explicit(&((rb_header *)(uintptr_t)base)->ready, memory_order_acquire) !=
        RB_READY)
        return RB_INVALID_NOT_READY;
    uint64_t capacity = hdr->capacity;
    if (!rb_capacity_valid(capacity)) return RB_INVALID_CAPACITY;
    if (hdr->data_offset != RB_DATA_OFFSET) return RB_INVALID_DATA_OFFSET;
    if (hdr->max_message_size != capacity - RB_RECORD_HEADER) return RB_INVALID_MAX_MESSAGE;
    if (map_size < rb_file_size(capacity)) return RB_INVALID_TRUNCATED;
    rb_header *live = (rb_header *)(uintptr_t)base;
    uint64_t w = atomic_load_explicit(&live->write_pos, memory_order_acquire);
    uint64_t r = atomic_load_explicit(&live->read_pos, memory_order_acquire);
    uint64_t wrap = atomic_load_explicit(&live->wrap_pos, memory_order_acquire);
    if (((w | r | wrap) & (RB_ALIGN - 1)) || !rb_span_ok(w, r, wrap, capacity))
        return RB_INVALID_POSITIONS;
    snap->capacity = capacity;
    snap->write_pos = w;
    snap->read_pos = r;
    snap->wrap_pos = wrap;
    return RB_VALID;
}

const char *rb_invalid_reason(rb_invalid why) {
    switch (why) {
    case RB_VALID: return "valid";
    case RB_INVALID_SHORT_FILE: return "file is shorter than the 4096-byte header";
    case RB_INVALID_MAGIC: return "bad magic: not an ipc_ring file";
    case RB_INVALID_VERSION: return "unsupported format version";
    case RB_INVALID_NOT_READY: return "ring was never completely initialised";
    case RB_INVALID_CAPACITY: return "capacity is not a power of two in [64, 2**32]";
    case RB_INVALID_DATA_OFFSET: return "data_offset is not 4096";
    case RB_INVALID_MAX_MESSAGE: return "max_message_size is not capacity - 8";
    case RB_INVALID_TRUNCATED: return "file is shorter than data_offset + capacity";
    case RB_INVALID_POSITIONS:
        return "write_pos/read_pos/wrap_pos are misaligned or write_pos and read_pos are more "
               "than capacity apart";
    case RB_INVALID_RECORD: return "corrupted record";
    }
    return "unknown reason";
}

uint64_t rb_used_bytes(uint64_t write_pos, uint64_t read_pos, uint64_t wrap_pos,
                       uint64_t capacity) {
    if (read_pos == wrap_pos && (wrap_pos & (capacity - 1)) &&
        write_pos - read_pos >= rb_next_lap(wrap_pos, capacity) - read_pos)
        read_pos = rb_next_lap(wrap_pos, capacity);
    uint64_t used = write_pos - read_pos;
    return used > capacity ? capacity : used;
}

/* ---- writer (FORMAT.md "Push", "Wrap rule") ---------------------------- */

void rb_writer_attach(rb_writer *w, void *base, const rb_snapshot *snap) {
    w->hdr = (rb_header *)base;
    w->data = (uint8_t *)base + RB_DATA_OFFSET;
    w->capacity = snap->capacity;
    w->mask = snap->capacity - 1;
    w->write_pos = snap->write_pos;
    w->need_start = w->need_end = snap->write_pos;
    w->notify.fd = -1;
    w->notify.eventfd = 0;
    rb_header *hdr = w->hdr;
    w->reader_state_seen = atomic_load_explicit(&hdr->reader_state, memory_order_seq_cst);
    /* A wrap recorded at or beyond the published write_pos was never
     * published (its writer died first): the records that come next go
     * there, so the reader must not skip them. */
    uint64_t wrap = snap->wrap_pos;
    if ((wrap & w->mask) == 0 || wrap - snap->read_pos >= snap->write_pos - snap->read_pos ||
        wrap - snap->read_pos > w->capacity) {
        if (wrap) atomic_store_explicit(&hdr->wrap_pos, 0, memory_order_relaxed);
        w->wrap_from = w->wrap_to = 0;
    }
    else {
        w->wrap_from = wrap;
        w->wrap_to = rb_next_lap(wrap, w->capacity);
    }
    w->read_pos_seen = snap->read_pos == w->wrap_from ? w->wrap_to : snap->read_pos;
    /* Counters continue from the header; they are statistics, trusted for
     * nothing (FORMAT.md "Counters"). */
    w->messages_pushed = atomic_load_explicit(&hdr->messages_pushed, memory_order_relaxed);
    w->bytes_pushed = atomic_load_explicit(&hdr->bytes_pushed, memory_order_relaxed);
    w->full_waits = atomic_load_explicit(&hdr->writer_full_waits, memory_order_relaxed);
    w->high_water = atomic_load_explicit(&hdr->high_water, memory_order_relaxed);
    /* A predecessor that died holding the role, or stopped without ending
     * the stream, broke it here: the reader reports that at this position,
     * before the records that come next (FORMAT.md "Roles and states"). The
     * position first, then the generation with release: a reader that sees
     * the generation sees the position. */
    uint32_t before = atomic_load_explicit(&hdr->writer_state, memory_order_acquire);
    uint32_t generation = atomic_load_explicit(&hdr->writer_generation, memory_order_relaxed);
    /* Not if a reader has reported that writer's end already, with nothing
     * of it left unread: the break is known. */
    int known = atomic_load_explicit(&hdr->reported_generation, memory_order_acquire) ==
                    generation &&
                snap->read_pos == snap->write_pos;
    if (generation && !known && (before == RB_STATE_ATTACHED || before == RB_STATE_FAILED)) {
        /* A free entry: never used, or behind the published read_pos (the
         * reader passed it). None: the break merges into the latest one,
         * reported at that one's position. */
        uint64_t read = atomic_load_explicit(&hdr->read_pos, memory_order_acquire);
        int slot = -1, latest = -1;
        uint32_t latest_generation = 0;
        for (int i = 0; i < RB_BREAKS; i++) {
            uint32_t g = atomic_load_explicit(&hdr->breaks[i].generation, memory_order_relaxed);
            uint64_t at = atomic_load_explicit(&hdr->breaks[i].pos, memory_order_relaxed);
            if (g == 0 || at - read > snap->write_pos - read) {
                if (slot < 0) slot = i;
            }
            else if (g > latest_generation) {
                latest = i;
                latest_generation = g;
            }
        }
        if (slot >= 0)
            atomic_store_explicit(&hdr->breaks[slot].pos, snap->write_pos, memory_order_relaxed);
        else
            slot = latest;
        atomic_store_explicit(&hdr->breaks[slot].generation, generation, memory_order_release);
        atomic_store_explicit(&hdr->break_generation, generation, memory_order_release);
    }
    atomic_fetch_add_explicit(&hdr->writer_generation, 1u, memory_order_relaxed);
    atomic_store_explicit(&hdr->writer_state, RB_STATE_ATTACHED, memory_order_seq_cst);
}

/* A read position as the writer counts free space: a reader standing at the
 * last wrap point has nothing before the next lap left to read. */
static inline uint64_t rb_effective_read(const rb_writer *w, uint64_t r) {
    return r == w->wrap_from ? w->wrap_to : r;
}

/* 1 if a record from `start` to `end` fits with the reader at the effective
 * position `r`. A record that wraps (start beyond write_pos) into a ring the
 * reader has drained completely (r == write_pos) has all of the next lap. */
static inline int rb_room(const rb_writer *w, uint64_t r, uint64_t start, uint64_t end) {
    if (r == w->write_pos && start != w->write_pos) r = start;
    return end - r <= w->capacity;
}

/* RB_OK if the record from `start` to `end` fits, reloading read_pos only
 * when the cached value says it does not; else RB_FULL (remembering the
 * record) or RB_CORRUPT. */
static rb_result rb_ensure_room(rb_writer *w, uint64_t start, uint64_t end) {
    if (rb_room(w, w->read_pos_seen, start, end)) return RB_OK;
    uint64_t raw = atomic_load_explicit(&w->hdr->read_pos, memory_order_acquire);
    if (RB_UNLIKELY(!rb_span_ok(w->write_pos, raw, w->wrap_from, w->capacity) ||
                    (raw & (RB_ALIGN - 1))))
        return RB_CORRUPT;
    uint64_t r = rb_effective_read(w, raw);
    w->read_pos_seen = r;
    uint64_t used = w->write_pos - r;
    if (RB_UNLIKELY(used > w->high_water)) {
        w->high_water = used;
        atomic_store_explicit(&w->hdr->high_water, used, memory_order_relaxed);
    }
    if (rb_room(w, r, start, end)) return RB_OK;
    w->need_start = start;
    w->need_end = end;
    return RB_FULL;
}

rb_result rb_reserve_slow(rb_writer *w, uint64_t length, void **payload) {
    if (length > w->capacity - RB_RECORD_HEADER) return RB_TOO_LARGE;
    uint64_t size = rb_record_size(length);
    uint64_t start = w->write_pos;
    if (size > w->capacity - (start & w->mask)) start = rb_next_lap(start, w->capacity);
    rb_result res = rb_ensure_room(w, start, start + size);
    if (res != RB_OK) return res;
    if (start != w->write_pos) {
        /* Wrap rule: the record goes at the start of the next lap; the bytes
         * to the end of this one hold no record. wrap_pos says so, before
         * the publication that makes the record visible (release). */
        atomic_store_explicit(&w->hdr->wrap_pos, w->write_pos, memory_order_relaxed);
        w->wrap_from = w->write_pos;
        w->wrap_to = start;
        if (w->read_pos_seen == w->wrap_from) w->read_pos_seen = start;
        w->write_pos = start;
        RB_CRASH_POINT("writer_wrap_recorded");
    }
    *payload = w->data + (start & w->mask) + RB_RECORD_HEADER;
    return RB_OK;
}

void rb_writer_leave(rb_writer *w, rb_role_state state) {
    atomic_store_explicit(&w->hdr->writer_state, (uint32_t)state, memory_order_seq_cst);
    if (state == RB_STATE_CLOSED) RB_CRASH_POINT("writer_stream_ended");
    rb_wake_reader(w->hdr);
    if (w->notify.fd >= 0) rb_notify_fd(&w->notify); /* a reader armed on its FIFO */
}

void rb_writer_note_peer_state(rb_writer *w) {
    w->reader_state_seen = atomic_load_explicit(&w->hdr->reader_state, memory_order_seq_cst);
}

/* The condition a waiting writer waits for: room for the record of its last
 * RB_FULL, or a change of the reader's state. */
static inline int rb_writable_now(rb_writer *w, memory_order order) {
    uint64_t r = atomic_load_explicit(&w->hdr->read_pos, order);
    return rb_room(w, rb_effective_read(w, r), w->need_start, w->need_end) ||
           atomic_load_explicit(&w->hdr->reader_state, order) != w->reader_state_seen;
}

/* The writer's spin on a full ring (FORMAT.md "Waiting", step 1) waits, for
 * its first RB_SPIN_SLACK_NS, for room for its record plus a sixteenth of
 * the capacity (if the record is no longer than that), looking every
 * RB_SPIN_POLL pauses; after that, room for its record will do. Measured on
 * a reader slower than the writer: a writer that took each message's worth
 * of room the moment it appeared, looking after every pause, pulled the line
 * of read_pos away from the reader at each message, and both ran at 2.1 M
 * 256-byte messages/s; with the slack and the polls spaced, 3.1-3.4 M
 * (FORMAT.md "Waiting"). */
#define RB_SPIN_POLL 16u
#define RB_SPIN_SLACK 16u           /* a sixteenth of the capacity */
#define RB_SPIN_SLACK_NS RB_DEFAULT_SPIN_NS /* a longer spin= waits no longer for it */

rb_result rb_spin_writable(rb_writer *w, uint64_t budget_ns) {
    if (budget_ns == 0) return rb_writable_now(w, memory_order_relaxed) ? RB_WOKEN : RB_TIMEOUT;
    uint64_t start = rb_now_ns(), now = start, slack = w->capacity / RB_SPIN_SLACK;
    if (w->need_end - w->need_start > slack) slack = 0; /* a long record: as soon as it fits */
    for (;;) {
        for (uint32_t k = 0; k < RB_SPIN_POLL; k++) rb_cpu_relax();
        if (now - start >= RB_SPIN_SLACK_NS) slack = 0;
        uint64_t r = atomic_load_explicit(&w->hdr->read_pos, memory_order_relaxed);
        if (rb_room(w, rb_effective_read(w, r), w->need_start, w->need_end + slack) ||
            atomic_load_explicit(&w->hdr->reader_state, memory_order_relaxed) !=
                w->reader_state_seen)
            return RB_WOKEN;
        now = rb_now_ns();
        if (now - start >= budget_ns)
            return rb_writable_now(w, memory_order_relaxed) ? RB_WOKEN : RB_TIMEOUT;
    }
}

rb_result rb_wait_writable(rb_writer *w, uint64_t deadline_ns) {
    rb_header *hdr = w->hdr;
    uint32_t seq = atomic_load_explicit(&hdr->space_seq, memory_order_seq_cst);
    atomic_store_explicit(&hdr->writer_waiting, RB_WAITING_FUTEX, memory_order_seq_cst);
    if (rb_writable_now(w, memory_order_seq_cst)) {
        /* No sleep after all: take the flag down at once, or the reader
         * would make a wake-up call for nobody. */
        atomic_store_explicit(&hdr->writer_waiting, 0u, memory_order_relaxed);
        return RB_WOKEN;
    }
    return rb_sleep_on(&hdr->space_seq, seq, deadline_ns);
}

void rb_end_wait_writable(rb_writer *w) {
    atomic_store_explicit(&w->hdr->writer_waiting, 0u, memory_order_relaxed);
    atomic_store_explicit(&w->hdr->writer_full_waits, ++w->full_waits, memory_order_relaxed);
}

/* ---- reader (FORMAT.md "Pop", "Wrap rule") ----------------------------- */

/* Caches write_pos `w` and wrap_pos `wrap`: records may be read up to the
 * wrap point if it lies ahead, else up to `w`. */
static inline void rb_see(rb_reader *r, uint64_t w, uint64_t wrap) {
    r->write_pos_seen = w;
    r->wrap_seen = wrap;
    r->readable_end = (wrap & r->mask) && wrap - r->read_pos < w - r->read_pos ? wrap : w;
}

static inline rb_result rb_check_break(rb_reader *r, uint64_t w);

void rb_reader_attach(rb_reader *r, void *base, const rb_snapshot *snap) {
    r->hdr = (rb_header *)base;
    r->data = (uint8_t *)base + RB_DATA_OFFSET;
    r->capacity = snap->capacity;
    r->mask = snap->capacity - 1;
    r->read_pos = snap->read_pos;
    rb_see(r, snap->write_pos, snap->wrap_pos);
    r->peeked_length = 0;
    r->notify.fd = -1;
    r->notify.eventfd = 0;
    rb_header *hdr = r->hdr;
    r->writer_state_seen = atomic_load_explicit(&hdr->writer_state, memory_order_seq_cst);
    r->reported_generation = 0;
    r->break_generation = 0;
    /* What the snapshot made readable stops at a break ahead (the next peek
     * reports it when the reader stands on it). */
    (void)rb_check_break(r, snap->write_pos);
    r->messages_popped = atomic_load_explicit(&hdr->messages_popped, memory_order_relaxed);
    r->bytes_popped = atomic_load_explicit(&hdr->bytes_popped, memory_order_relaxed);
    r->empty_waits = atomic_load_explicit(&hdr->reader_empty_waits, memory_order_relaxed);
    atomic_store_explicit(&hdr->reader_state, RB_STATE_ATTACHED, memory_order_seq_cst);
}

void rb_reader_leave(rb_reader *r, rb_role_state state) {
    atomic_store_explicit(&r->hdr->reader_state, (uint32_t)state, memory_order_seq_cst);
    rb_wake_writer(r->hdr);
    if (r->notify.fd >= 0) rb_notify_fd(&r->notify); /* a writer armed on its FIFO */
}

void rb_reader_reported(rb_reader *r, uint32_t generation) {
    if (generation > r->reported_generation) r->reported_generation = generation;
    uint32_t shared = atomic_load_explicit(&r->hdr->reported_generation, memory_order_relaxed);
    if (generation > shared)
        atomic_store_explicit(&r->hdr->reported_generation, generation, memory_order_release);
}

void rb_reader_reported_break(rb_reader *r) {
    /* Told to the header (for later readers) only once nothing before the
     * break is left unconsumed: a reader that peeked up to it and stops
     * before consume() leaves the break to the next one (FORMAT.md "Breaks"). */
    if (atomic_load_explicit(&r->hdr->read_pos, memory_order_relaxed) == r->read_pos)
        rb_reader_reported(r, r->break_generation);
    else if (r->break_generation > r->reported_generation)
        r->reported_generation = r->break_generation;
}

void rb_reader_note_peer_state(rb_reader *r) {
    r->writer_state_seen = atomic_load_explicit(&r->hdr->writer_state, memory_order_seq_cst);
}

/* A break recorded by a writer's successor (break_pos) that this reader has
 * not reported and that lies at or ahead of its position, within `w`:
 * reading stops there. RB_PEER_DIED if the reader stands on it now (it
 * counts as reported once the caller says so, rb_reader_reported_break),
 * else RB_OK with readable_end capped. */
static __attribute__((noinline)) rb_result rb_check_break_slow(rb_reader *r, uint64_t w,
                                                               uint32_t latest) {
    /* A break an earlier reader reported is not reported again. */
    uint32_t shared = atomic_load_explicit(&r->hdr->reported_generation, memory_order_acquire);
    if (shared > r->reported_generation) r->reported_generation = shared;
    if (latest <= r->reported_generation) return RB_OK;
    /* The earliest break not reported yet that lies at or ahead of the
     * reader (generations grow along the stream). */
    uint32_t generation = 0;
    uint64_t at = 0;
    for (int i = 0; i < RB_BREAKS; i++) {
        uint32_t g = atomic_load_explicit(&r->hdr->breaks[i].generation, memory_order_acquire);
        uint64_t p = atomic_load_explicit(&r->hdr->breaks[i].pos, memory_order_relaxed);
        if (g <= r->reported_generation || p - r->read_pos > w - r->read_pos) continue;
        if (generation == 0 || g < generation) {
            generation = g;
            at = p;
        }
    }
    if (generation == 0) return RB_OK;
    if (at == r->read_pos) {
        r->break_generation = generation; /* reported once the caller raises it */
        r->readable_end = r->read_pos;    /* the next read looks again: more may follow */
        return RB_PEER_DIED;
    }
    if (at - r->read_pos < r->readable_end - r->read_pos) r->readable_end = at;
    return RB_OK;
}

/* Nothing to look at while no break is newer than the last one reported:
 * one load, on every refresh. */
static inline rb_result rb_check_break(rb_reader *r, uint64_t w) {
    uint32_t latest = atomic_load_explicit(&r->hdr->break_generation, memory_order_acquire);
    if (RB_LIKELY(latest <= r->reported_generation)) return RB_OK;
    return rb_check_break_slow(r, w, latest);
}

/* Loads write_pos (and the wrap_pos published with it). RB_OK if there are
 * bytes to read, RB_EMPTY, RB_CLOSED, RB_PEER_DIED (a break, see above) or
 * RB_CORRUPT. */
static rb_result rb_refresh(rb_reader *r) {
    uint64_t w = atomic_load_explicit(&r->hdr->write_pos, memory_order_acquire);
    if (w == r->read_pos) {
        if (RB_UNLIKELY(rb_check_break(r, w) == RB_PEER_DIED)) return RB_PEER_DIED;
        if (atomic_load_explicit(&r->hdr->writer_state, memory_order_acquire) != RB_STATE_CLOSED)
            return RB_EMPTY;
        /* Closed: everything the writer published is visible now. */
        w = atomic_load_explicit(&r->hdr->write_pos, memory_order_acquire);
        if (w == r->read_pos) return RB_CLOSED;
    }
    /* Loaded after write_pos (acquire): the wrap_pos stored before it. */
    uint64_t wrap = atomic_load_explicit(&r->hdr->wrap_pos, memory_order_relaxed);
    if (RB_UNLIKELY(!rb_span_ok(w, r->read_pos, wrap, r->capacity) || (w & (RB_ALIGN - 1))))
        return RB_CORRUPT;
    rb_see(r, w, wrap);
    return rb_check_break(r, w);
}

rb_result rb_peek_slow(rb_reader *r, const void **payload, uint64_t *length) {
    for (;;) {
        if (r->readable_end == r->read_pos) {
            if (r->read_pos == r->wrap_seen && (r->read_pos & r->mask) &&
                r->write_pos_seen != r->read_pos) {
                /* A break at the wrap point is reported before the jump. */
                if (rb_check_break(r, r->write_pos_seen) == RB_PEER_DIED) return RB_PEER_DIED;
                /* The writer skipped from here to the next lap, and published
                 * beyond it. A write_pos inside the skip is corruption. */
                uint64_t lap = rb_next_lap(r->read_pos, r->capacity);
                if (r->write_pos_seen - r->read_pos <= lap - r->read_pos) return RB_CORRUPT;
                r->read_pos = lap;
                r->readable_end = r->write_pos_seen;
                /* A break in the next lap caps what is readable there. */
                if (rb_check_break(r, r->write_pos_seen) == RB_PEER_DIED) return RB_PEER_DIED;
                continue;
            }
            rb_result res = rb_refresh(r);
            if (res != RB_OK) return res;
            continue;
        }
        uint64_t index = r->read_pos & r->mask;
        uint64_t word = *(const volatile uint64_t *)(const void *)(r->data + index);
        uint64_t len = (uint32_t)word;
        uint64_t size = rb_record_size(len);
        if ((uint32_t)(word >> 32) != RB_KIND_MESSAGE || size > r->readable_end - r->read_pos ||
            size > r->capacity - index)
            return RB_CORRUPT;
        *payload = r->data + index + RB_RECORD_HEADER;
        *length = len;
        r->peeked_length = len;
        return RB_OK;
    }
}

/* The condition a waiting reader waits for: a message, the end of the
 * stream, or a change of the writer's state. */
static inline int rb_readable_now(rb_reader *r, memory_order order) {
    return atomic_load_explicit(&r->hdr->write_pos, order) != r->read_pos ||
           atomic_load_explicit(&r->hdr->writer_state, order) != r->writer_state_seen;
}

rb_result rb_spin_readable(rb_reader *r, uint64_t budget_ns) {
    if (rb_readable_now(r, memory_order_relaxed)) return RB_WOKEN;
    if (budget_ns == 0) return RB_TIMEOUT;
    uint64_t start = rb_now_ns();
    for (uint32_t i = 1;; i++) {
        rb_cpu_relax();
        if (rb_readable_now(r, memory_order_relaxed)) return RB_WOKEN;
        if ((i & 15) == 0 && rb_now_ns() - start >= budget_ns) return RB_TIMEOUT;
    }
}

rb_result rb_wait_readable(rb_reader *r, uint64_t deadline_ns) {
    rb_header *hdr = r->hdr;
    uint32_t seq = atomic_load_explicit(&hdr->data_seq, memory_order_seq_cst);
    atomic_store_explicit(&hdr->reader_waiting, RB_WAITING_FUTEX, memory_order_seq_cst);
    if (rb_readable_now(r, memory_order_seq_cst)) {
        atomic_store_explicit(&hdr->reader_waiting, 0u, memory_order_relaxed);
        return RB_WOKEN;
    }
    return rb_sleep_on(&hdr->data_seq, seq, deadline_ns);
}

void rb_end_wait_readable(rb_reader *r) {
    atomic_store_explicit(&r->hdr->reader_waiting, 0u, memory_order_relaxed);
    atomic_store_explicit(&r->hdr->reader_empty_waits, ++r->empty_waits, memory_order_relaxed);
}

/* ---- waiting on a file descriptor (FORMAT.md "Waiting on a file descriptor") */

int rb_arm_readable(rb_reader *r) {
    atomic_store_explicit(&r->hdr->reader_waiting, RB_WAITING_FD, memory_order_seq_cst);
    if (rb_readable_now(r, memory_order_seq_cst)) {
        atomic_store_explicit(&r->hdr->reader_waiting, 0u, memory_order_relaxed);
        return 0;
    }
    return 1;
}

int rb_arm_writable(rb_writer *w) {
    atomic_store_explicit(&w->hdr->writer_waiting, RB_WAITING_FD, memory_order_seq_cst);
    if (rb_writable_now(w, memory_order_seq_cst)) {
        atomic_store_explicit(&w->hdr->writer_waiting, 0u, memory_order_relaxed);
        return 0;
    }
    return 1;
}
