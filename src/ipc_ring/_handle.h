/* ipc_ring handles: one process's attachment to a ring file, in plain C11
 * plus POSIX (no Python.h).
 *
 * Everything around the protocol of _ring.h that involves the operating
 * system lives here, once, for every caller: the extension (_core.c), the
 * crash tests' C peer and the C benchmark create, attach, wait and detach
 * through these functions. They build ring files and their notification
 * FIFOs (FORMAT.md "Creating a ring"), map, validate and lock them
 * ("Opening and validation", "Mapping", "Roles and states"), decide what a
 * wait does before and after each sleep slice ("Waiting", "Truncation"),
 * give a role up ("End of stream"), and disown every handle in the child of
 * a fork() ("fork()").
 *
 * Thread safety: a handle is used by one thread at a time (the caller
 * serialises; the extension refuses a second call). The process-wide list
 * of handles that fork() needs is guarded by its own mutex, so handles in
 * different threads need no common lock. Errors come back as an rb_result
 * and a complete message in an rb_error; nothing here prints or exits.
 */
#ifndef IPC_RING_HANDLE_H
#define IPC_RING_HANDLE_H

#include <sys/types.h>

#include "_ring.h"

/* What went wrong, for the caller to report: `code` says which kind of
 * error (RB_INVALID, RB_BUSY, RB_CLOSED, RB_TRUNCATED, RB_PEER_DIED,
 * RB_TIMEOUT, RB_CORRUPT, RB_TOO_LARGE, RB_BAD_ARGUMENT, or RB_ERROR with
 * `sys_errno`), `message` is one line that names the path the caller gave. */
typedef struct rb_error {
    rb_result code;
    int sys_errno;      /* errno of the failed system call, for RB_ERROR */
    char message[640];  /* NUL-terminated */
} rb_error;

/* Bits of rb_handle.flags. 0 means usable: the fast paths test one word. */
enum rb_handle_flag {
    RB_HANDLE_DETACHED = 1u, /* the role was given up (rb_handle_release) or never taken */
    RB_HANDLE_FORKED = 2u,   /* this process is a fork() child of the one that attached */
    RB_HANDLE_UNCHECKED = 4u, /* fileno() was armed (rb_handle_idle): the application may
                               * wait on it, so the next call checks the file's size before it
                               * touches the mapping (the caller clears the bit) */
    RB_HANDLE_CALLER = 16u   /* first bit left to the caller (the extension's call state) */
};

typedef struct rb_handle {
    unsigned flags;     /* rb_handle_flag bits and the caller's; 0 while usable */
    rb_role role;       /* which side this is */
    int fd;             /* the ring file, holding the role's lock; -1 once released */
    void *map;          /* the mapping, NULL once unmapped */
    size_t map_size;    /* its length: rb_file_size(capacity) */
    uint64_t capacity;  /* validated once at attach, never re-read */
    uint64_t spin_ns;   /* busy-wait before a sleep */
    int notify_rx;      /* own FIFO, for fileno(); -1 if none */
    int watched;        /* fileno() was called: idle results arm the FIFO */
    const char *notify_missing; /* why there are no FIFOs (static text), if none */
    int pipe;           /* an end of ipc_ring.Pipe: the descriptors are eventfds, and a
                         * peer's death is reported on every call, not once */
    int pipe_alive;     /* ...and this socket's other end closed everywhere means the
                         * peer end is gone; -1 if none */
    pid_t owner_pid;    /* the process that attached */
    char *path;         /* as given, for messages (malloc'ed) */
    struct rb_handle *prev, *next; /* the process's live handles, for fork() */
    union {
        rb_writer writer; /* role == RB_ROLE_WRITER */
        rb_reader reader; /* role == RB_ROLE_READER */
    } ring;
} rb_handle;

/* Longest single sleep of a wait (FORMAT.md "Why sleeps are sliced"). */
#define RB_SLEEP_SLICE_NS 50000000u
/* A timeout meaning "wait forever". */
#define RB_FOREVER UINT64_MAX
/* Suffixes of the notification FIFOs next to a ring file. */
#define RB_READER_FIFO ".rd"
#define RB_WRITER_FIFO ".wr"

/* Puts `h` in the unattached state (flags RB_HANDLE_DETACHED, no
 * descriptors, no mapping). Call once before anything else. */
void rb_handle_init(rb_handle *h);

/* How to create or attach. */
typedef struct rb_options {
    const char *path;  /* the ring file's path, as the caller gave it */
    uint64_t capacity; /* rb_handle_create, rb_handle_attach of a new file: its capacity */
    unsigned mode;     /* rb_handle_create: the permission bits, applied exactly */
    uint64_t spin_ns;  /* busy-wait before a sleep (RB_DEFAULT_SPIN_NS) */
    int no_populate;   /* map without MAP_POPULATE (only to measure what it saves) */
    uint64_t fifo_ino[2]; /* rb_handle_attach of a new file: the FIFOs' inodes (reader, writer) */
} rb_options;

/* Creates a ring file at opt->path with opt->capacity and opt->mode, and
 * its two notification FIFOs, and attaches `h` as its writer (FORMAT.md
 * "Creating a ring"): everything is built under temporary names in the
 * same directory, the ring is linked into place (which never replaces or
 * follows anything: RB_ERROR with EEXIST if the path exists), then the
 * FIFOs are renamed into place. A create that fails, or loses a race to
 * another create of the same path, leaves nothing behind and touches no
 * file but its own. */
rb_result rb_handle_create(rb_handle *h, const rb_options *opt, rb_error *err);

/* Opens the ring file at opt->path and attaches `h` as `role`
 * (rb_handle_attach), then its notification FIFOs if they are the ones its
 * creator made (same inode, owner and no wider mode than the ring; else the
 * handle has none, and notify_missing says why). */
rb_result rb_handle_open(rb_handle *h, rb_role role, const rb_options *opt, rb_error *err);

/* Attaches `h` as `role` to the ring file open read-write on `fd`. With
 * opt->capacity > 0 the file is new and empty (the caller created it): it is
 * sized to rb_file_size(capacity), its blocks are reserved (ENOSPC now
 * rather than SIGBUS later) and a fresh header is written. In order: lock
 * the role, map, validate the header into a snapshot, refuse to continue a
 * closed stream (writer re-attach), attach from the snapshot. RB_OK: `h`
 * owns `fd` from now on. Otherwise RB_INVALID, RB_BUSY, RB_CLOSED,
 * RB_BAD_ARGUMENT or RB_ERROR with `err` filled; `fd` is still the caller's
 * (its lock given up again) and `h` holds nothing. */
rb_result rb_handle_attach(rb_handle *h, int fd, rb_role role, const rb_options *opt,
                           rb_error *err);

/* Gives the handle notification descriptors (FORMAT.md "Waiting on a file
 * descriptor"): `rx` its own, read for fileno(), `tx` the peer's, written
 * to wake it; both non-blocking, eventfds if `eventfd`. The handle owns them. */
void rb_handle_set_notify(rb_handle *h, int rx, int tx, int eventfd);

/* An end of ipc_ring.Pipe: 1 if every process closed the peer end's
 * liveness socket (a hang-up on ours; one poll), else 0. */
int rb_handle_pipe_peer_closed(rb_handle *h);

/* Tells a waiting peer that this side attached, as a publication would: a
 * peer asleep is woken on the futex, one armed on its descriptor gets a
 * byte (a peer waiting for a successor looks at once). */
void rb_handle_announce(rb_handle *h);

/* Gives up the role at once, leaving it in `state` (FORMAT.md "Roles and
 * states"): a writer with RB_STATE_CLOSED ends the stream, RB_STATE_VACANT
 * hands it over, RB_STATE_FAILED stops it without an end; a reader leaves
 * RB_STATE_CLOSED or RB_STATE_VACANT. The peer is woken. With `wake_own` a
 * thread of this process asleep in this handle's wait is woken too (it
 * must then not touch the ring). Then the descriptors are closed, which
 * releases the role's lock. Nothing is stored into the file in a fork()
 * child or a file truncated under the mapping. The mapping stays until
 * rb_handle_unmap, so memory that a caller still uses stays valid.
 * Idempotent. */
void rb_handle_release(rb_handle *h, rb_role_state state, int wake_own);

/* After rb_handle_release, for memory that buffers of the caller still
 * point into: replaces the mapping with private, zeroed memory at the same
 * address, so those buffers stay valid memory but no longer reach the ring
 * (its role belongs to a successor now). rb_handle_unmap frees it later. */
void rb_handle_detach_memory(rb_handle *h);

/* Unmaps and frees what rb_handle_release left (releasing first if needed,
 * as RB_STATE_VACANT). Idempotent. */
void rb_handle_unmap(rb_handle *h);

/* RB_OK if the file still covers the mapping, else RB_TRUNCATED with `err`
 * filled (FORMAT.md "Truncation"). One lseek. */
rb_result rb_handle_check_size(rb_handle *h, rb_error *err);

/* 1 if a live process holds the peer role's lock, 0 if none does, -1 with
 * errno set. */
int rb_handle_peer_alive(rb_handle *h);

/* fileno(): the own FIFO's descriptor, from now on armed whenever a call
 * finds nothing to do (rb_handle_idle), and armed now. -1 if the handle has
 * no FIFOs (notify_missing says why). */
int rb_handle_watch(rb_handle *h);

/* A call found nothing to do (try_pop found no message, try_push no room,
 * a wait timed out). If fileno() is watched: drain the own FIFO, arm it,
 * and if the condition already holds again, make the FIFO readable at once
 * (FORMAT.md "Waiting on a file descriptor"); and set RB_HANDLE_UNCHECKED.
 * Else nothing: no system call. */
void rb_handle_idle(rb_handle *h);

/* Removes the ring file at `path` and its FIFOs (those that are FIFOs).
 * RB_OK, or RB_ERROR (ENOENT: no ring file). */
/* RB_OK if `path` names a regular file (not followed if a symlink) that
 * starts with the ring magic, of any version; RB_INVALID or RB_ERROR. */
rb_result rb_check_ring_file(const char *path, rb_error *err);
rb_result rb_unlink(const char *path, rb_error *err);

/* ---- waiting (FORMAT.md "Waiting") -------------------------------------
 * A blocking call that cannot proceed calls rb_wait_prepare; RB_WOKEN says
 * retry now; RB_OK says sleep: rb_wait_sleep (the extension releases the
 * GIL around it), then rb_wait_finish, then retry. Anything else is the
 * error to report. rb_wait does the three in a row for callers without an
 * interpreter. */

typedef struct rb_wait_state {
    uint64_t timeout_ns; /* RB_FOREVER, 0 (try once), or a limit */
    uint64_t deadline;   /* CLOCK_MONOTONIC ns; set when the spin ends; 0 = none */
    uint64_t until;      /* end of the current sleep slice */
    const char *op;      /* the call's name, for messages */
    int spun;            /* the spin phase is over */
    int peer_gone;       /* the peer's lock was found free: one retry, then RB_PEER_DIED */
    int vacant;          /* the peer's role is vacant (for the timeout's message) */
    uint32_t generation; /* reader: writer_generation, loaded before the lock test */
} rb_wait_state;

void rb_wait_init(rb_wait_state *ws, uint64_t timeout_ns, const char *op);

/* Before a sleep, with the interpreter's lock held: spins once per call,
 * then checks the file's size, the peer's role (its lock and its state)
 * and the deadline. RB_WOKEN (retry), RB_OK (sleep), RB_TIMEOUT,
 * RB_TRUNCATED, RB_PEER_DIED. */
rb_result rb_wait_prepare(rb_handle *h, rb_wait_state *ws, rb_error *err);

/* Sleeps one slice (needs no interpreter lock). RB_WOKEN, RB_TIMEOUT or
 * RB_INTERRUPTED: all mean "go on with rb_wait_finish". */
rb_result rb_wait_sleep(rb_handle *h, rb_wait_state *ws);

/* After a sleep: checks the file's size (FORMAT.md "Truncation") before it
 * touches the header, then takes the waiting flag down. RB_OK or
 * RB_TRUNCATED. */
rb_result rb_wait_finish(rb_handle *h, rb_error *err);

/* rb_wait_prepare, and if it says so rb_wait_sleep and rb_wait_finish:
 * RB_OK (retry the operation) or the error. */
rb_result rb_wait(rb_handle *h, rb_wait_state *ws, rb_error *err);

/* The error for a result of the protocol (RB_TOO_LARGE with `length`,
 * RB_CLOSED, RB_CORRUPT): fills `err`, returns `res`. */
rb_result rb_handle_error(rb_handle *h, rb_result res, uint64_t length, rb_error *err);

/* ---- inspecting a ring file read-only ---------------------------------- */

/* A named header field (FORMAT.md "Header"), for listing them all. */
typedef struct rb_field {
    const char *name;
    uint32_t offset;
    uint32_t size; /* 4 or 8 */
} rb_field;

/* Every named field of the header, in FORMAT.md order; `name` NULL ends it. */
extern const rb_field rb_header_fields[];

typedef struct rb_inspection {
    uint64_t values[32];  /* rb_header_fields[i]'s value, loaded once */
    uint64_t file_size;
    int writer_alive;     /* a live process holds the writer's lock */
    int reader_alive;     /* a live process holds the reader's lock */
    uint64_t used_bytes;  /* published and not yet consumed (rb_used_bytes) */
} rb_inspection;

/* Opens `path` read-only, maps its header page PROT_READ, loads every field
 * once and validates them as rb_handle_attach does, and tests both role
 * locks. Never writes. RB_OK, RB_INVALID or RB_ERROR with `err` filled. */
rb_result rb_inspect(const char *path, rb_inspection *out, rb_error *err);

#endif /* IPC_RING_HANDLE_H */
