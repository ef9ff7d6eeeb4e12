/* ipc_ring core: the shared-memory layout and the single-producer /
 * single-consumer protocol, in plain C11 (no Python.h).
 *
 * docs/FORMAT.md is the normative description of everything in this file;
 * the section names in comments below refer to it.
 */
#ifndef IPC_RING_RING_H
#define IPC_RING_RING_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ipc_ring's file format is little-endian; big-endian hosts are not supported"
#endif

#define RB_LIKELY(x) __builtin_expect(!!(x), 1)
#define RB_UNLIKELY(x) __builtin_expect(!!(x), 0)

/* ---- constants (FORMAT.md "Header") ---------------------------------- */

#define RB_MAGIC 0x474E495243504921ULL /* the bytes "!IPCRING" on disk */
#define RB_VERSION 2u
#define RB_DATA_OFFSET 4096u           /* header page; data area follows */
#define RB_MIN_CAPACITY 64u
#define RB_MAX_CAPACITY (1ULL << 32)
#define RB_RECORD_HEADER 8u            /* bytes before every payload */
#define RB_ALIGN 8u                    /* records start on 8-byte boundaries */
#define RB_READY 1u                    /* value of `ready` once built */

/* Record kinds (FORMAT.md "Records"). Any other value is corruption
 * (version 1's padding records, kind 2, do not exist in version 2). */
#define RB_KIND_MESSAGE 1u

/* What a role's state field says (FORMAT.md "Roles and states"). Whether
 * the process is alive is the lock's word, not the state's. */
typedef enum rb_role_state {
    RB_STATE_NONE = 0,     /* no process has attached in this role yet */
    RB_STATE_ATTACHED = 1, /* a process attached; if its lock is free, it died */
    RB_STATE_VACANT = 2,   /* released for a successor: detach(), a hand-over by pickling */
    RB_STATE_CLOSED = 3,   /* writer: end of stream; reader: gone (closed) */
    RB_STATE_FAILED = 4    /* writer only: stopped without ending the stream */
} rb_role_state;

/* ---- the header page (FORMAT.md "Header") ----------------------------
 * Every group of fields that one side writes often sits in its own
 * 128-byte block: two cache lines, so neither a shared line nor the
 * adjacent-line prefetcher makes the two cores fight over it. */

/* A break in the stream (FORMAT.md "Breaks"): a writer that died holding
 * the role, or stopped without ending the stream, left it at `pos`; its
 * successor recorded it. */
#define RB_BREAKS 4
typedef struct rb_break {
    _Atomic uint64_t pos;        /* write_pos the successor started from */
    _Atomic uint32_t generation; /* the writer_generation of the writer that stopped; 0: free */
    uint32_t reserved;           /* zero */
} rb_break;

typedef struct rb_header {
    /* block 0 (offset 0): written once by the creator, then read-only */
    uint64_t magic;              /* RB_MAGIC */
    uint32_t version;            /* RB_VERSION */
    _Atomic uint32_t ready;      /* RB_READY once every other field is set; release */
    uint64_t capacity;           /* data area size in bytes, a power of two */
    uint64_t data_offset;        /* byte offset of the data area in the file */
    uint64_t max_message_size;   /* capacity - RB_RECORD_HEADER */
    uint64_t reader_fifo_ino;    /* inode of PATH.rd, the reader's FIFO; 0: none by name */
    uint64_t writer_fifo_ino;    /* inode of PATH.wr, the writer's FIFO; 0: none by name */
    uint8_t reserved0[128 - 56]; /* zero */

    /* block 1 (offset 128): producer-owned, written on every push */
    _Atomic uint64_t write_pos;  /* bytes ever published by the writer */
    _Atomic uint64_t messages_pushed; /* messages ever published; stored with write_pos */
    _Atomic uint64_t bytes_pushed;    /* their payload bytes; stored with write_pos */
    _Atomic uint64_t wrap_pos;   /* where the writer last skipped to the next lap; 0: never */
    _Atomic uint32_t break_generation; /* the latest writer that stopped without ending the
                                        * stream and was succeeded: its writer_generation; 0: none */
    uint32_t reserved1a;         /* zero */
    rb_break breaks[RB_BREAKS];  /* where such writers left the stream, recorded by their
                                  * successors at attach (FORMAT.md "Breaks") */
    uint8_t reserved1[128 - 40 - 16 * RB_BREAKS]; /* zero */

    /* block 2 (offset 256): consumer-owned, written on every pop */
    _Atomic uint64_t read_pos;   /* bytes ever consumed by the reader */
    _Atomic uint64_t messages_popped; /* messages ever consumed; stored with read_pos */
    _Atomic uint64_t bytes_popped;    /* their payload bytes; stored with read_pos */
    _Atomic uint32_t reported_generation; /* the latest writer whose stop without an end a
                                           * reader reported (FORMAT.md "Breaks"); 0: none */
    uint32_t reserved2a;         /* zero */
    uint8_t reserved2[128 - 32]; /* zero */

    /* block 3 (offset 384): the reader's sleep (FORMAT.md "Waiting") */
    _Atomic uint32_t reader_waiting; /* 1 while the reader may be asleep; set by reader, cleared by either */
    _Atomic uint32_t data_seq;       /* futex word the reader sleeps on; bumped by whoever wakes it */
    _Atomic uint32_t reader_state;   /* rb_role_state of the reader role; set by readers */
    uint32_t reserved3a;             /* zero */
    _Atomic uint64_t reader_empty_waits; /* sleep slices of the reader on an empty ring */
    uint8_t reserved3[128 - 24];     /* zero */

    /* block 4 (offset 512): the writer's sleep and end of stream */
    _Atomic uint32_t writer_waiting; /* 1 while the writer may be asleep; set by writer, cleared by either */
    _Atomic uint32_t space_seq;      /* futex word the writer sleeps on; bumped by whoever wakes it */
    _Atomic uint32_t writer_state;   /* rb_role_state of the writer role; set by writers */
    _Atomic uint32_t writer_generation; /* + 1 at every attach of a writer */
    _Atomic uint64_t writer_full_waits; /* sleep slices of the writer on a full ring */
    _Atomic uint64_t high_water;     /* largest write_pos - read_pos the writer saw on a reload */
    uint8_t reserved4[128 - 32];     /* zero */

    uint8_t reserved5[RB_DATA_OFFSET - 640]; /* zero; rest of the header page */
} rb_header;

_Static_assert(offsetof(rb_header, magic) == 0, "FORMAT.md: magic");
_Static_assert(offsetof(rb_header, version) == 8, "FORMAT.md: version");
_Static_assert(offsetof(rb_header, ready) == 12, "FORMAT.md: ready");
_Static_assert(offsetof(rb_header, capacity) == 16, "FORMAT.md: capacity");
_Static_assert(offsetof(rb_header, data_offset) == 24, "FORMAT.md: data_offset");
_Static_assert(offsetof(rb_header, max_message_size) == 32, "FORMAT.md: max_message_size");
_Static_assert(offsetof(rb_header, reader_fifo_ino) == 40, "FORMAT.md: reader_fifo_ino");
_Static_assert(offsetof(rb_header, writer_fifo_ino) == 48, "FORMAT.md: writer_fifo_ino");
_Static_assert(offsetof(rb_header, write_pos) == 128, "FORMAT.md: write_pos");
_Static_assert(offsetof(rb_header, messages_pushed) == 136, "FORMAT.md: messages_pushed");
_Static_assert(offsetof(rb_header, bytes_pushed) == 144, "FORMAT.md: bytes_pushed");
_Static_assert(offsetof(rb_header, wrap_pos) == 152, "FORMAT.md: wrap_pos");
_Static_assert(offsetof(rb_header, break_generation) == 160, "FORMAT.md: break_generation");
_Static_assert(offsetof(rb_header, breaks) == 168, "FORMAT.md: breaks");
_Static_assert(offsetof(rb_header, read_pos) == 256, "FORMAT.md: read_pos");
_Static_assert(offsetof(rb_header, messages_popped) == 264, "FORMAT.md: messages_popped");
_Static_assert(offsetof(rb_header, bytes_popped) == 272, "FORMAT.md: bytes_popped");
_Static_assert(offsetof(rb_header, reported_generation) == 280, "FORMAT.md: reported_generation");
_Static_assert(offsetof(rb_header, reader_waiting) == 384, "FORMAT.md: reader_waiting");
_Static_assert(offsetof(rb_header, data_seq) == 388, "FORMAT.md: data_seq");
_Static_assert(offsetof(rb_header, reader_state) == 392, "FORMAT.md: reader_state");
_Static_assert(offsetof(rb_header, reader_empty_waits) == 400, "FORMAT.md: reader_empty_waits");
_Static_assert(offsetof(rb_header, writer_waiting) == 512, "FORMAT.md: writer_waiting");
_Static_assert(offsetof(rb_header, space_seq) == 516, "FORMAT.md: space_seq");
_Static_assert(offsetof(rb_header, writer_state) == 520, "FORMAT.md: writer_state");
_Static_assert(offsetof(rb_header, writer_generation) == 524, "FORMAT.md: writer_generation");
_Static_assert(offsetof(rb_header, writer_full_waits) == 528, "FORMAT.md: writer_full_waits");
_Static_assert(offsetof(rb_header, high_water) == 536, "FORMAT.md: high_water");
_Static_assert(sizeof(rb_header) == RB_DATA_OFFSET, "FORMAT.md: header page is 4096 bytes");
_Static_assert(sizeof(_Atomic uint64_t) == 8 && sizeof(_Atomic uint32_t) == 4,
               "atomics must have the size of their plain types");

/* The record header (FORMAT.md "Records"): payload length, then kind. */
typedef struct rb_record {
    uint32_t length; /* payload bytes, not counting this header or padding */
    uint32_t kind;   /* RB_KIND_MESSAGE */
} rb_record;
_Static_assert(sizeof(rb_record) == RB_RECORD_HEADER, "FORMAT.md: record header is 8 bytes");

/* ---- results ---------------------------------------------------------- */

typedef enum rb_result {
    RB_OK = 0,
    RB_FULL,        /* writer: not enough free space now */
    RB_EMPTY,       /* reader: no message now */
    RB_CLOSED,      /* reader: writer closed and everything is consumed */
    RB_TOO_LARGE,   /* writer: longer than max_message_size */
    RB_CORRUPT,     /* the shared state breaks a FORMAT.md invariant */
    RB_TIMEOUT,     /* a wait reached its deadline */
    RB_INTERRUPTED, /* a wait was interrupted by a signal (EINTR) */
    RB_WOKEN,       /* a wait returned: the condition may have changed */
    RB_BUSY,        /* a live process already holds this role's lock */
    RB_ERROR,       /* a system call failed; errno says why */
    RB_INVALID,     /* attach: the file is not a usable ring (rb_invalid says why) */
    RB_TRUNCATED,   /* the file was truncated under the mapping */
    RB_PEER_DIED,   /* a wait: the peer this side waits for is gone */
    RB_BAD_ARGUMENT /* a caller's value is out of range (a capacity, say) */
} rb_result;

/* Why a header is refused (rb_validate_header); text in rb_invalid_reason. */
typedef enum rb_invalid {
    RB_VALID = 0,
    RB_INVALID_SHORT_FILE,
    RB_INVALID_MAGIC,
    RB_INVALID_VERSION,
    RB_INVALID_NOT_READY,
    RB_INVALID_CAPACITY,
    RB_INVALID_DATA_OFFSET,
    RB_INVALID_MAX_MESSAGE,
    RB_INVALID_TRUNCATED,
    RB_INVALID_POSITIONS,
    RB_INVALID_RECORD
} rb_invalid;

/* ---- per-process handles ---------------------------------------------
 * Private to one process. Each side keeps its own position here and
 * never re-reads it from the file, so a hostile peer cannot move it. */

/* The descriptor a side writes a wake-up to: the peer's FIFO (one byte),
 * or for ipc_ring.Pipe the peer's eventfd (a count of 1). Neither raises
 * SIGPIPE. */
typedef struct rb_notify {
    int fd;      /* -1 if none */
    int eventfd; /* fd is an eventfd */
} rb_notify;

typedef struct rb_writer {
    rb_header *hdr;         /* start of the mapping */
    uint8_t *data;          /* start of the data area */
    uint64_t capacity;      /* copied from the validated header */
    uint64_t mask;          /* capacity - 1 */
    uint64_t write_pos;     /* own position; the shared one is a copy of it */
    uint64_t read_pos_seen; /* last read_pos loaded, as an effective position: a reader
                             * standing at wrap_from counts as standing at wrap_to */
    uint64_t wrap_from;     /* the last wrap: the position skipped from (0: none) ... */
    uint64_t wrap_to;       /* ... and the start of the next lap it skipped to */
    uint64_t need_start;    /* the record the last RB_FULL was placing: its start ... */
    uint64_t need_end;      /* ... and its end (the wait conditions test these) */
    uint32_t reader_state_seen; /* reader_state when the current wait began */
    /* Counters (FORMAT.md "Counters"), private copies. The two that every
     * message bumps are not adjacent: GCC would pair their additions into a
     * slower SSE sequence. */
    uint64_t messages_pushed; /* stored into the header by rb_flush */
    uint64_t full_waits;      /* stored by rb_end_wait_writable */
    uint64_t bytes_pushed;    /* stored into the header by rb_flush */
    uint64_t high_water;      /* stored by rb_ensure_free when it grows */
    rb_notify notify;         /* the reader's FIFO, written when a publication clears
                               * reader_waiting == RB_WAITING_FD; fd -1 if none */
} rb_writer;

typedef struct rb_reader {
    rb_header *hdr;          /* start of the mapping */
    uint8_t *data;           /* start of the data area */
    uint64_t capacity;       /* copied from the validated header */
    uint64_t mask;           /* capacity - 1 */
    uint64_t read_pos;       /* own position; the shared one is a copy of it */
    uint64_t readable_end;   /* how far records may be read: write_pos_seen, or the wrap
                              * point if one lies ahead (FORMAT.md "Wrap rule") */
    uint64_t write_pos_seen; /* last write_pos loaded from the file */
    uint64_t wrap_seen;      /* wrap_pos loaded with it */
    uint32_t writer_state_seen; /* writer_state when the current wait began */
    uint32_t reported_generation; /* the latest writer whose stop without an end this reader
                                   * reported (RB_PEER_DIED); 0: none */
    uint32_t break_generation;    /* the one rb_peek last found at a break (break_pos) */
    /* Counters (FORMAT.md "Counters"), private copies; not adjacent, as in
     * rb_writer. */
    uint64_t messages_popped; /* stored into the header by rb_release */
    uint64_t peeked_length;   /* payload length of the message rb_peek returned */
    uint64_t empty_waits;     /* stored by rb_end_wait_readable */
    uint64_t bytes_popped;    /* stored into the header by rb_release */
    rb_notify notify;         /* the writer's FIFO, written when a publication clears
                               * writer_waiting == RB_WAITING_FD; fd -1 if none */
} rb_reader;

/* ---- functions --------------------------------------------------------
 * None of them takes locks, allocates or keeps process-wide state. Only
 * rb_wait_*, rb_wake_*, the FIFO and lock functions make system calls.
 * Thread safety: one rb_writer / rb_reader must not be used by two threads
 * at once; the caller serialises (_handle.h says how). */

/* Size of the record that carries `length` payload bytes. */
static inline uint64_t rb_record_size(uint64_t length) {
    return (RB_RECORD_HEADER + length + (RB_ALIGN - 1)) & ~(uint64_t)(RB_ALIGN - 1);
}

/* Total file size for a ring of `capacity` bytes. */
static inline uint64_t rb_file_size(uint64_t capacity) { return RB_DATA_OFFSET + capacity; }

/* True if `capacity` is a power of two in [RB_MIN_CAPACITY, RB_MAX_CAPACITY]. */
int rb_capacity_valid(uint64_t capacity);

/* Writes a fresh header for `capacity` into zeroed memory of at least
 * rb_file_size(capacity) bytes, with the inodes of the two notification
 * FIFOs (0: none by name); `ready` is stored last, with release. */
void rb_init(void *base, uint64_t capacity, uint64_t reader_fifo_ino, uint64_t writer_fifo_ino);

/* What rb_validate_header read and checked, for rb_*_attach: each shared
 * field is loaded once, so a process rewriting the header concurrently
 * cannot slip an unchecked value past the check. */
typedef struct rb_snapshot {
    uint64_t capacity;  /* a valid capacity that fits in the mapping */
    uint64_t write_pos; /* 8-aligned, at most capacity ahead of read_pos */
    uint64_t read_pos;  /* 8-aligned */
    uint64_t wrap_pos;  /* 8-aligned */
} rb_snapshot;

/* Checks a mapping of `map_size` bytes: every header field and the positions.
 * Returns RB_VALID (and fills *snap) or the first reason it is not a usable ring. */
rb_invalid rb_validate_header(const void *base, uint64_t map_size, rb_snapshot *snap);

/* One line of text for an rb_invalid value. */
const char *rb_invalid_reason(rb_invalid why);

/* Attach to a mapping that rb_validate_header accepted, with its snapshot,
 * and mark the role ATTACHED (a writer also bumps writer_generation and
 * forgets an unpublished wrap of a predecessor). Call with the role's lock. */
void rb_writer_attach(rb_writer *w, void *base, const rb_snapshot *snap);
void rb_reader_attach(rb_reader *r, void *base, const rb_snapshot *snap);

/* Leave the role in `state` and wake the peer, so that a waiting peer
 * looks at it now (on the futex, and on its FIFO if `notify` has one).
 * Writer: RB_STATE_CLOSED ends the stream (FORMAT.md "End of stream"),
 * RB_STATE_VACANT hands it over, RB_STATE_FAILED stops it without an end.
 * Reader: RB_STATE_CLOSED or RB_STATE_VACANT. */
void rb_writer_leave(rb_writer *w, rb_role_state state);
void rb_reader_leave(rb_reader *r, rb_role_state state);

/* The bytes published and not yet consumed, seen from positions loaded
 * from the file: a reader standing at the wrap point has the skipped bytes
 * behind it. */
uint64_t rb_used_bytes(uint64_t write_pos, uint64_t read_pos, uint64_t wrap_pos,
                       uint64_t capacity);

/* Spins with a CPU pause for up to `budget_ns` nanoseconds (a time, not a
 * count: a pause lasts 1 to 150 cycles depending on the CPU): RB_WOKEN as soon as the
 * condition may hold (reader: data or end of stream; writer: the room that
 * the last RB_FULL asked for), else RB_TIMEOUT. No system call. */
/* Default busy-wait before a sleep (README "Performance" has the sweep). */
#define RB_DEFAULT_SPIN_NS 10000u
rb_result rb_spin_readable(rb_reader *r, uint64_t budget_ns);
rb_result rb_spin_writable(rb_writer *w, uint64_t budget_ns);

/* Sleeps until the peer signals, the deadline (CLOCK_MONOTONIC ns; 0 = no
 * deadline) passes, or a signal arrives. Sets the side's waiting flag first
 * and re-checks the condition, so no wake-up is lost (FORMAT.md "Waiting");
 * the condition includes a change of the peer's state since
 * rb_*_note_peer_state. RB_WOKEN, RB_TIMEOUT or RB_INTERRUPTED. Call without
 * the GIL. */
void rb_writer_note_peer_state(rb_writer *w);
void rb_reader_note_peer_state(rb_reader *r);
/* The RB_PEER_DIED that rb_peek returned at a break has been raised. */
void rb_reader_reported_break(rb_reader *r);
/* A reader reported the end of writer `generation` (raised RB_PEER_DIED):
 * recorded for this reader and in the header, for the readers after it. */
void rb_reader_reported(rb_reader *r, uint32_t generation);
rb_result rb_wait_readable(rb_reader *r, uint64_t deadline_ns);
rb_result rb_wait_writable(rb_writer *w, uint64_t deadline_ns);

/* Clears the side's waiting flag after rb_wait_* and counts the slice in
 * reader_empty_waits / writer_full_waits (FORMAT.md "Counters"). Separate
 * from rb_wait_*, so that the caller can first check that the file still
 * covers the header (a wait is where a truncation is noticed: the glue
 * checks the file's size before touching it). A flag left set only costs the
 * peer one needless wake-up call, and the slice goes uncounted. */
void rb_end_wait_readable(rb_reader *r);
void rb_end_wait_writable(rb_writer *w);

/* ---- waiting on a file descriptor (FORMAT.md "Waiting on a file descriptor")
 * A waiting flag says how its side sleeps: RB_WAITING_FUTEX in rb_wait_*,
 * RB_WAITING_FD when an event loop watches the side's notification FIFO.
 * The publisher that clears a flag of RB_WAITING_FD also writes one byte
 * to the peer's FIFO (rb_wake_waiting_peer, on the rare branch only). */
#define RB_WAITING_FUTEX 1u
#define RB_WAITING_FD 2u

/* Arms the side for a wait on its FIFO: sets its flag to RB_WAITING_FD
 * (seq_cst), then re-checks the condition (seq_cst), as rb_wait_* do.
 * 1: armed, the caller may wait for its FIFO to become readable; 0: the
 * condition holds now (flag taken down again), retry the operation. The
 * writer's condition is the free space its last RB_FULL asked for. */
int rb_arm_readable(rb_reader *r);
int rb_arm_writable(rb_writer *w);

/* Writes one byte to the peer's descriptor without blocking; a full FIFO
 * (EAGAIN) already has a wake-up pending, so errors are ignored. */
void rb_notify_fd(const rb_notify *notify);

/* Reads the FIFO or eventfd `fd` (non-blocking) until a read comes back
 * short (it is empty then), or at most RB_DRAIN_MAX bytes: a peer that keeps
 * writing cannot hold the caller. */
#define RB_DRAIN_MAX 65536u
void rb_drain_fd(int fd);

/* Wakes any thread of any process sleeping in rb_wait_readable /
 * rb_wait_writable on this ring, whether or not its flag is set. */
void rb_wake_reader(rb_header *hdr);
void rb_wake_writer(rb_header *hdr);

/* ---- liveness (FORMAT.md "Liveness and roles") -----------------------
 * Each attached side holds a write lock on its role's byte range of the
 * file: an open-file-description lock on Linux (owned by the open file, so
 * two handles in one process are told apart), a POSIX record lock
 * elsewhere. The kernel drops it when the process dies, however it dies. */

typedef enum rb_role { RB_ROLE_WRITER = 0, RB_ROLE_READER = 1 } rb_role;

#define RB_LOCK_WRITER_OFFSET 128u /* the write_pos block */
#define RB_LOCK_READER_OFFSET 256u /* the read_pos block */
#define RB_LOCK_LENGTH 8u

/* Takes `role`'s lock on `fd` without waiting. RB_OK, RB_BUSY if a live
 * process holds it, or RB_ERROR with errno set. */
rb_result rb_lock_role(int fd, rb_role role);

/* Gives `role`'s lock on `fd` up again (after a failed attach). */
void rb_unlock_role(int fd, rb_role role);

/* 1 if some other open file (another process, or another handle in this
 * one on Linux) holds `role`'s lock, 0 if nobody does, -1 with errno set. */
int rb_role_alive(int fd, rb_role role);

/* CLOCK_MONOTONIC in nanoseconds. */
uint64_t rb_now_ns(void);

/* Copies n bytes into the ring for the peer to read: with memcpy, or with
 * `streaming` from RB_STREAM_COPY_MIN bytes on (x86-64) with non-temporal
 * stores, which do not first fetch the destination's cache lines from the
 * peer's cache, where they were read last; those end with a store fence, so
 * a commit after the copy publishes them. */
#define RB_STREAM_COPY_MIN (64u * 1024u)
void rb_copy_in(void *dst, const void *src, size_t n, int streaming);

/* Which of the two copies a writer uses for long copies: each is timed, and
 * the cheaper one per byte lately is taken; every RB_COPY_PROBE-th copy is
 * the other one, so that a change of the machine's state (where the peer
 * runs, what else shares the cache) is seen. Which is faster depends on it,
 * by 2-3x either way (README, "A drop-in for multiprocessing.Pipe"). */
#define RB_COPY_PROBE 64u
typedef struct {
    uint64_t cost[2]; /* ns per 64 KiB, a moving average: [0] memcpy, [1] streaming; 0 unknown */
    uint32_t copies;
} rb_copy_choice;
int rb_copy_pick(rb_copy_choice *c);
/* For tests: 0 (the default) picks as above, 1 always memcpy, 2 always streaming. */
extern int rb_copy_mode;
void rb_copy_note(rb_copy_choice *c, int streaming, uint64_t ns, uint64_t bytes);

/* ---- crash points (FORMAT.md "Crash contract") -----------------------
 * Built only with -DRB_CRASH_POINTS (the crash tests' C peer): the process
 * kills itself with SIGKILL at the named step when IPC_RING_CRASH_AT is
 * "name" or "name:N" (the N-th time the step is reached, from 1). */
#ifdef RB_CRASH_POINTS
void rb_crash_point(const char *name);
#define RB_CRASH_POINT(name) rb_crash_point(name)
#else
#define RB_CRASH_POINT(name) ((void)0)
#endif

/* ---- the per-message path, inline (FORMAT.md "Push and pop") ----------
 * The common case of each call is here so that it inlines into the glue;
 * anything unusual (wrap, full, empty, corruption, a sleeping peer) goes
 * to an out-of-line *_slow function in _ring.c. */

/* Out-of-line halves of the functions below. */
rb_result rb_reserve_slow(rb_writer *w, uint64_t length, void **payload);
rb_result rb_peek_slow(rb_reader *r, const void **payload, uint64_t *length);
void rb_wake_waiting_peer(_Atomic uint32_t *peer_waiting, _Atomic uint32_t *peer_seq,
                          const rb_notify *notify);

/* Publishes a new position and wakes the peer only if it said it may be
 * asleep. Both the store and the flag load are seq_cst: either this side
 * sees the flag, or the peer sees the new position before it sleeps
 * (FORMAT.md "Waiting"). */
static inline void rb_publish(_Atomic uint64_t *position, uint64_t value,
                              _Atomic uint32_t *peer_waiting, _Atomic uint32_t *peer_seq,
                              const rb_notify *notify) {
    atomic_exchange_explicit(position, value, memory_order_seq_cst);
    if (RB_UNLIKELY(atomic_load_explicit(peer_waiting, memory_order_seq_cst)))
        rb_wake_waiting_peer(peer_waiting, peer_seq, notify);
}

/* Writer: makes room for a message of `length` bytes and returns a pointer
 * to its payload in *payload (8-byte aligned). Nothing is visible to the
 * reader until rb_commit. A record that does not fit before the end of the
 * data area goes at the start of the next lap, and wrap_pos records the
 * skip (FORMAT.md "Wrap rule"). RB_OK, RB_FULL, RB_TOO_LARGE or
 * RB_CORRUPT. */
static inline rb_result rb_reserve(rb_writer *w, uint64_t length, void **payload) {
    uint64_t index = w->write_pos & w->mask;
    if (RB_LIKELY(length <= w->capacity - RB_RECORD_HEADER)) {
        uint64_t size = rb_record_size(length);
        if (RB_LIKELY(size <= w->capacity - index &&
                      size <= w->capacity - (w->write_pos - w->read_pos_seen))) {
            *payload = w->data + index + RB_RECORD_HEADER;
            return RB_OK;
        }
    }
    return rb_reserve_slow(w, length, payload);
}

/* Writer: completes the record reserved by rb_reserve with `length` bytes
 * (at most the reserved length) but does not publish it: the reader sees
 * it with the next rb_flush. Batches use it to publish, and check the
 * reader's flag, once. */
static inline void rb_stage(rb_writer *w, uint64_t length) {
    rb_record rec = {(uint32_t)length, RB_KIND_MESSAGE};
    memcpy(w->data + (w->write_pos & w->mask), &rec, sizeof rec);
    RB_CRASH_POINT("writer_header_written");
    w->write_pos += rb_record_size(length);
    w->messages_pushed++;
    w->bytes_pushed += length;
}

/* Writer: publishes every staged record and wakes a sleeping reader. The
 * counters go first, with relaxed stores, on the line write_pos is about to
 * dirty anyway (FORMAT.md "Counters"). */
static inline void rb_flush(rb_writer *w) {
    /* Locals: the compiler cannot tell that the stores leave *w alone. */
    rb_header *hdr = w->hdr;
    uint64_t write_pos = w->write_pos, messages = w->messages_pushed, bytes = w->bytes_pushed;
    atomic_store_explicit(&hdr->messages_pushed, messages, memory_order_relaxed);
    atomic_store_explicit(&hdr->bytes_pushed, bytes, memory_order_relaxed);
    rb_publish(&hdr->write_pos, write_pos, &hdr->reader_waiting, &hdr->data_seq, &w->notify);
    RB_CRASH_POINT("writer_published");
}

/* Writer: rb_stage + rb_flush. */
static inline void rb_commit(rb_writer *w, uint64_t length) {
    rb_stage(w, length);
    rb_flush(w);
}

/* Writer: copy + publish in one call. RB_OK, RB_FULL, RB_TOO_LARGE, RB_CORRUPT. */
static inline rb_result rb_try_push(rb_writer *w, const void *src, uint64_t length) {
    void *payload;
    rb_result res = rb_reserve(w, length, &payload);
    if (RB_UNLIKELY(res != RB_OK)) return res;
    memcpy(payload, src, length);
    RB_CRASH_POINT("writer_payload_copied");
    rb_commit(w, length);
    return RB_OK;
}

/* Reader: finds the next message, jumping over a wrap. On RB_OK *payload
 * and *length describe it, inside the mapping, until rb_consume. RB_OK,
 * RB_EMPTY, RB_CLOSED or RB_CORRUPT. */
static inline rb_result rb_peek(rb_reader *r, const void **payload, uint64_t *length) {
    if (RB_LIKELY(r->readable_end != r->read_pos)) {
        uint64_t index = r->read_pos & r->mask;
        /* One load of the record header: a hostile writer cannot change it
         * between the check and the use. */
        uint64_t word = *(const volatile uint64_t *)(const void *)(r->data + index);
        uint64_t size = rb_record_size((uint32_t)word);
        if (RB_LIKELY((uint32_t)(word >> 32) == RB_KIND_MESSAGE &&
                      size <= r->readable_end - r->read_pos && size <= r->capacity - index)) {
            *payload = r->data + index + RB_RECORD_HEADER;
            *length = (uint32_t)word;
            r->peeked_length = (uint32_t)word;
            return RB_OK;
        }
    }
    return rb_peek_slow(r, payload, length);
}

/* Reader: moves past the message returned by rb_peek without publishing
 * read_pos: its space is not handed back until rb_release. */
static inline void rb_skip(rb_reader *r) {
    r->read_pos += rb_record_size(r->peeked_length);
    r->messages_popped++;
    r->bytes_popped += r->peeked_length;
}

/* Reader: publishes read_pos, handing back the space of every message
 * skipped so far, and wakes a sleeping writer; the counters go first, as
 * in rb_flush. */
static inline void rb_release(rb_reader *r) {
    rb_header *hdr = r->hdr;
    uint64_t read_pos = r->read_pos, messages = r->messages_popped, bytes = r->bytes_popped;
    atomic_store_explicit(&hdr->messages_popped, messages, memory_order_relaxed);
    atomic_store_explicit(&hdr->bytes_popped, bytes, memory_order_relaxed);
    rb_publish(&hdr->read_pos, read_pos, &hdr->writer_waiting, &hdr->space_seq, &r->notify);
    RB_CRASH_POINT("reader_consumed");
}

/* Reader: a place in the stream to come back to (rb_mark, rb_rewind): the
 * private position and everything cached relative to it. Reading ahead
 * from a mark and rewinding to it leaves the ring as it was: nothing is
 * published in between. */
typedef struct rb_read_mark {
    uint64_t read_pos, readable_end, write_pos_seen, wrap_seen;
    uint64_t messages_popped, bytes_popped;
} rb_read_mark;

static inline void rb_mark(const rb_reader *r, rb_read_mark *m) {
    m->read_pos = r->read_pos;
    m->readable_end = r->readable_end;
    m->write_pos_seen = r->write_pos_seen;
    m->wrap_seen = r->wrap_seen;
    m->messages_popped = r->messages_popped;
    m->bytes_popped = r->bytes_popped;
}

static inline void rb_rewind(rb_reader *r, const rb_read_mark *m) {
    r->read_pos = m->read_pos;
    r->readable_end = m->readable_end;
    r->write_pos_seen = m->write_pos_seen;
    r->wrap_seen = m->wrap_seen;
    r->messages_popped = m->messages_popped;
    r->bytes_popped = m->bytes_popped;
}

/* Reader: rb_skip + rb_release: done with the message returned by rb_peek. */
static inline void rb_consume(rb_reader *r) {
    rb_skip(r);
    rb_release(r);
}

#endif /* IPC_RING_RING_H */
