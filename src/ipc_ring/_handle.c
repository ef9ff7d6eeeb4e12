/* ipc_ring handles: see _handle.h for the contracts and docs/FORMAT.md for
 * the protocol they follow. Plain C11 plus POSIX; no Python.h. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif
#include "_handle.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef MAP_POPULATE
#define RB_MAP_POPULATE MAP_POPULATE
#else
#define RB_MAP_POPULATE 0
#endif

/* ---- errors ----------------------------------------------------------- */

/* Fills `err` with `code` and a formatted message; returns `code`. */
static rb_result rb_fail(rb_error *err, rb_result code, int sys_errno, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static rb_result rb_fail(rb_error *err, rb_result code, int sys_errno, const char *fmt, ...) {
    err->code = code;
    err->sys_errno = sys_errno;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return code;
}

/* RB_ERROR for the system call `what` that just failed. */
static rb_result rb_fail_errno(rb_error *err, const char *path, const char *what) {
    int e = errno;
    return rb_fail(err, RB_ERROR, e, "'%s': %s: %s", path, what, strerror(e));
}

static const char *rb_role_name(rb_role role) {
    return role == RB_ROLE_WRITER ? "writer" : "reader";
}

/* ---- the process's handles, for fork() -------------------------------- */

static pthread_mutex_t rb_registry_lock = PTHREAD_MUTEX_INITIALIZER;
static rb_handle *rb_registry;
static pthread_once_t rb_atfork_once = PTHREAD_ONCE_INIT;

static void rb_registry_prepare(void) { pthread_mutex_lock(&rb_registry_lock); }
static void rb_registry_parent(void) { pthread_mutex_unlock(&rb_registry_lock); }

/* In the child of a fork(): the child must neither act as a second writer
 * or reader nor keep the parent's liveness lock alive through its copy of
 * the descriptor (FORMAT.md "fork()"). Marks every handle and closes its
 * descriptors; the mapping stays until the handle is unmapped. */
static void rb_registry_child(void) {
    for (rb_handle *h = rb_registry; h; h = h->next) {
        h->flags |= RB_HANDLE_FORKED;
        int *tx = h->role == RB_ROLE_WRITER ? &h->ring.writer.notify_fd : &h->ring.reader.notify_fd;
        if (*tx >= 0) close(*tx);
        *tx = -1;
        if (h->notify_rx >= 0) close(h->notify_rx);
        h->notify_rx = -1;
        if (h->fd >= 0) close(h->fd);
        h->fd = -1;
    }
    pthread_mutex_unlock(&rb_registry_lock);
}

static void rb_register_atfork(void) {
    pthread_atfork(rb_registry_prepare, rb_registry_parent, rb_registry_child);
}

static void rb_registry_add(rb_handle *h) {
    pthread_once(&rb_atfork_once, rb_register_atfork);
    pthread_mutex_lock(&rb_registry_lock);
    h->prev = NULL;
    h->next = rb_registry;
    if (rb_registry) rb_registry->prev = h;
    rb_registry = h;
    pthread_mutex_unlock(&rb_registry_lock);
}

static void rb_registry_remove(rb_handle *h) {
    pthread_mutex_lock(&rb_registry_lock);
    if (h->prev)
        h->prev->next = h->next;
    else if (rb_registry == h)
        rb_registry = h->next;
    if (h->next) h->next->prev = h->prev;
    h->prev = h->next = NULL;
    pthread_mutex_unlock(&rb_registry_lock);
}

/* ---- attaching (FORMAT.md "Opening and validation", "Mapping") --------- */

void rb_handle_init(rb_handle *h) {
    memset(h, 0, sizeof *h);
    h->flags = RB_HANDLE_DETACHED;
    h->fd = -1;
    h->notify_rx = -1;
    h->ring.writer.notify_fd = -1;
    h->ring.reader.notify_fd = -1;
}

static int *rb_notify_tx(rb_handle *h) {
    return h->role == RB_ROLE_WRITER ? &h->ring.writer.notify_fd : &h->ring.reader.notify_fd;
}

/* Sizes a fresh, empty file for `capacity` and reserves its blocks. */
static rb_result rb_prepare_fresh(int fd, uint64_t capacity, const char *path, rb_error *err) {
    off_t size = (off_t)rb_file_size(capacity);
    if (ftruncate(fd, size) != 0) return rb_fail_errno(err, path, "ftruncate");
#if defined(__linux__) || defined(__FreeBSD__)
    /* Reserve the blocks now, so that a full file system (a 64 MiB /dev/shm
     * in Docker) is ENOSPC here rather than SIGBUS on first touch. */
    int rc = posix_fallocate(fd, 0, size);
    if (rc != 0 && rc != EOPNOTSUPP && rc != ENOSYS && rc != EINVAL) {
        errno = rc;
        return rb_fail_errno(err, path, "posix_fallocate");
    }
#endif
    return RB_OK;
}

/* The length to map for a file of `file_size` bytes: the whole ring if the
 * capacity its header claims is valid and fits in the file, else the header
 * page alone, so that validation names the reason and nothing beyond the
 * end of the file is ever mapped. */
static rb_result rb_map_length(int fd, uint64_t file_size, const char *path, size_t *length,
                               rb_error *err) {
    void *head = mmap(NULL, RB_DATA_OFFSET, PROT_READ, MAP_SHARED, fd, 0);
    if (head == MAP_FAILED) return rb_fail_errno(err, path, "mmap");
    uint64_t capacity = ((const volatile rb_header *)head)->capacity;
    munmap(head, RB_DATA_OFFSET);
    *length = RB_DATA_OFFSET;
    if (rb_capacity_valid(capacity) && file_size >= rb_file_size(capacity))
        *length = (size_t)rb_file_size(capacity);
    return RB_OK;
}

/* Maps `length` bytes of the file read-write and pre-faulted. A mapping
 * keeps a reference to the open file description it was made from, and a
 * fork() child inherits the mapping: mapped through `fd`, a child would keep
 * the liveness lock alive after the parent died. So map through a second
 * open file description of the same file where the system offers one. */
static void *rb_map(int fd, const struct stat *sb, size_t length, int populate) {
    int map_fd = fd;
#if defined(__linux__)
    char self_fd[64];
    snprintf(self_fd, sizeof self_fd, "/proc/self/fd/%d", fd);
    int reopened = open(self_fd, O_RDWR | O_CLOEXEC);
    struct stat again;
    if (reopened >= 0 && fstat(reopened, &again) == 0 && again.st_ino == sb->st_ino &&
        again.st_dev == sb->st_dev)
        map_fd = reopened;
    else if (reopened >= 0)
        close(reopened);
#else
    (void)sb;
#endif
    int flags = MAP_SHARED | (populate ? RB_MAP_POPULATE : 0);
    void *map = mmap(NULL, length, PROT_READ | PROT_WRITE, flags, map_fd, 0);
    if (map_fd != fd) close(map_fd);
    return map;
}

static rb_result rb_map_and_attach(rb_handle *h, int fd, const struct stat *st, rb_role role,
                                   const rb_options *opt, rb_error *err);

rb_result rb_handle_attach(rb_handle *h, int fd, rb_role role, const rb_options *opt,
                           rb_error *err) {
    const char *path = opt->path;
    uint64_t capacity = opt->capacity;
    struct stat sb;
    if (capacity && !rb_capacity_valid(capacity))
        return rb_fail(err, RB_BAD_ARGUMENT, 0,
                       "capacity must be a power of two between %u and %llu bytes, got %llu",
                       RB_MIN_CAPACITY, (unsigned long long)RB_MAX_CAPACITY,
                       (unsigned long long)capacity);
    if (fstat(fd, &sb) != 0) return rb_fail_errno(err, path, "fstat");
    if (!S_ISREG(sb.st_mode))
        return rb_fail(err, RB_INVALID, 0, "'%s' is not a regular file", path);
    /* The role's lock first, before anything is mapped or read: a
     * predecessor that moves its position and exits in between cannot leave
     * a stale snapshot, and a busy role costs no mapping. */
    rb_result locked = rb_lock_role(fd, role);
    if (locked == RB_BUSY)
        return rb_fail(err, RB_BUSY, 0, "'%s' already has a live %s", path, rb_role_name(role));
    if (locked != RB_OK) return rb_fail_errno(err, path, "lock the role");
    rb_result res = rb_map_and_attach(h, fd, &sb, role, opt, err);
    if (res != RB_OK) rb_unlock_role(fd, role);
    return res;
}

/* rb_handle_attach after the lock is taken. */
static rb_result rb_map_and_attach(rb_handle *h, int fd, const struct stat *st, rb_role role,
                                   const rb_options *opt, rb_error *err) {
    const char *path = opt->path;
    uint64_t capacity = opt->capacity;
    struct stat sb = *st;
    rb_result res;
    size_t length = (size_t)rb_file_size(capacity);
    if (capacity) {
        if ((res = rb_prepare_fresh(fd, capacity, path, err)) != RB_OK) return res;
    }
    else {
        if ((uint64_t)sb.st_size < RB_DATA_OFFSET)
            return rb_fail(err, RB_INVALID, 0, "'%s': %s (it has %lld bytes)", path,
                           rb_invalid_reason(RB_INVALID_SHORT_FILE), (long long)sb.st_size);
        if ((res = rb_map_length(fd, (uint64_t)sb.st_size, path, &length, err)) != RB_OK)
            return res;
    }
    void *map = rb_map(fd, &sb, length, !opt->no_populate);
    if (map == MAP_FAILED) return rb_fail_errno(err, path, "mmap");
    if (capacity) rb_init(map, capacity);
    /* Validate what is mapped, or less if the file shrank meanwhile. */
    uint64_t valid_size = length;
    if (fstat(fd, &sb) == 0 && (uint64_t)sb.st_size < valid_size) valid_size = (uint64_t)sb.st_size;
    rb_snapshot snap;
    rb_invalid why = rb_validate_header(map, valid_size, &snap);
    if (why != RB_VALID) {
        munmap(map, length);
        return rb_fail(err, RB_INVALID, 0, "'%s': %s", path, rb_invalid_reason(why));
    }
    if (role == RB_ROLE_WRITER && !capacity &&
        atomic_load_explicit(&((rb_header *)map)->writer_closed, memory_order_acquire)) {
        munmap(map, length);
        return rb_fail(err, RB_CLOSED, 0,
                       "'%s': its writer ended the stream with close(); a closed stream cannot "
                       "be continued",
                       path);
    }
    char *name = strdup(path);
    if (!name) {
        munmap(map, length);
        return rb_fail(err, RB_ERROR, ENOMEM, "'%s': out of memory", path);
    }
    rb_handle_init(h);
    h->role = role;
    h->fd = fd;
    h->map = map;
    h->map_size = length;
    h->capacity = snap.capacity;
    h->spin_ns = opt->spin_ns;
    h->owner_pid = getpid();
    h->path = name;
    if (role == RB_ROLE_WRITER)
        rb_writer_attach(&h->ring.writer, map, &snap);
    else
        rb_reader_attach(&h->ring.reader, map, &snap);
    h->flags = 0;
    rb_registry_add(h);
    return RB_OK;
}

void rb_handle_set_notify(rb_handle *h, int rx, int tx) {
    h->notify_rx = rx;
    *rb_notify_tx(h) = tx;
}

/* 1 if the file still covers the mapping (one fstat; a failing fstat counts
 * as intact), 0 if not; *size gets the file's size. */
static int rb_file_intact(rb_handle *h, long long *size) {
    struct stat sb;
    if (h->fd < 0 || fstat(h->fd, &sb) != 0) return 1;
    *size = (long long)sb.st_size;
    return (uint64_t)sb.st_size >= h->map_size;
}

void rb_handle_release(rb_handle *h, int end_stream, int wake_own) {
    if (h->flags & RB_HANDLE_DETACHED) return;
    long long size = 0;
    /* No store in a fork() child (its descriptors are gone already), nor in
     * a file truncated under the mapping (the store would raise SIGBUS). */
    if (!(h->flags & RB_HANDLE_FORKED) && h->owner_pid == getpid() && rb_file_intact(h, &size)) {
        if (h->role == RB_ROLE_WRITER) {
            /* Records that a batch has staged are complete: publish them. */
            rb_flush(&h->ring.writer);
            if (end_stream) rb_writer_close(&h->ring.writer);
            if (wake_own) rb_wake_writer(h->ring.writer.hdr);
        }
        else if (wake_own) {
            rb_wake_reader(h->ring.reader.hdr);
        }
    }
    rb_registry_remove(h);
    int *tx = rb_notify_tx(h);
    if (*tx >= 0) close(*tx);
    *tx = -1;
    if (h->notify_rx >= 0) close(h->notify_rx);
    h->notify_rx = -1;
    if (h->fd >= 0) close(h->fd);
    h->fd = -1;
    h->flags |= RB_HANDLE_DETACHED;
}

void rb_handle_unmap(rb_handle *h) {
    rb_handle_release(h, 0, 0);
    if (h->map) munmap(h->map, h->map_size);
    h->map = NULL;
    free(h->path);
    h->path = NULL;
}

rb_result rb_handle_check_size(rb_handle *h, rb_error *err) {
    long long size = 0;
    if (rb_file_intact(h, &size)) return RB_OK;
    return rb_fail(err, RB_TRUNCATED, 0,
                   "'%s' was truncated to %lld bytes while mapped (it needs %zu); stop using it: "
                   "touching the missing pages raises SIGBUS",
                   h->path, size, h->map_size);
}

int rb_handle_peer_alive(rb_handle *h) {
    return rb_role_alive(h->fd, h->role == RB_ROLE_WRITER ? RB_ROLE_READER : RB_ROLE_WRITER);
}

rb_result rb_handle_error(rb_handle *h, rb_result res, uint64_t length, rb_error *err) {
    switch (res) {
    case RB_TOO_LARGE:
        return rb_fail(err, res, 0, "message of %llu bytes exceeds max_message_size=%llu",
                       (unsigned long long)length,
                       (unsigned long long)(h->capacity - RB_RECORD_HEADER));
    case RB_CLOSED:
        return rb_fail(err, res, 0, "the writer closed the ring and every message was read");
    case RB_CORRUPT:
        return rb_fail(err, res, 0, "'%s': %s", h->path, rb_invalid_reason(RB_INVALID_RECORD));
    default:
        return rb_fail(err, res, 0, "unexpected ring result %d", (int)res);
    }
}

/* ---- waiting (FORMAT.md "Waiting") ------------------------------------- */

void rb_wait_init(rb_wait_state *ws, uint64_t timeout_ns, const char *op) {
    ws->timeout_ns = timeout_ns;
    ws->deadline = 0;
    ws->until = 0;
    ws->op = op;
    ws->spun = 0;
    ws->peer_dead = 0;
}

/* 1 if the peer this side waits for is gone: for a reader, nobody holds the
 * writer's lock; for a writer, a reader has attached at some point and
 * nobody holds the reader's lock now. A failing test counts as alive. */
static int rb_peer_gone(rb_handle *h) {
    if (h->role == RB_ROLE_WRITER &&
        !atomic_load_explicit(&h->ring.writer.hdr->reader_attached, memory_order_acquire))
        return 0;
    return rb_handle_peer_alive(h) == 0;
}

static rb_result rb_fail_timeout(rb_wait_state *ws, rb_error *err) {
    return rb_fail(err, RB_TIMEOUT, 0, "%s timed out after %.6g s", ws->op,
                   (double)ws->timeout_ns / 1e9);
}

static rb_result rb_fail_peer_died(rb_handle *h, rb_error *err) {
    if (h->role == RB_ROLE_WRITER)
        return rb_fail(err, RB_PEER_DIED, 0,
                       "'%s': the reader is gone (it died or closed) and the ring is full; a "
                       "new reader may attach and the writer can continue",
                       h->path);
    return rb_fail(err, RB_PEER_DIED, 0,
                   "'%s': the writer died without close(); every message it committed has "
                   "been read",
                   h->path);
}

rb_result rb_wait_prepare(rb_handle *h, rb_wait_state *ws, rb_error *err) {
    if (!ws->spun) {
        ws->spun = 1;
        if (ws->timeout_ns != 0) {
            rb_result spun = h->role == RB_ROLE_WRITER
                                 ? rb_spin_writable(&h->ring.writer, h->spin_ns)
                                 : rb_spin_readable(&h->ring.reader, h->spin_ns);
            if (ws->timeout_ns != RB_FOREVER && !ws->deadline)
                ws->deadline = rb_now_ns() + ws->timeout_ns;
            if (spun == RB_WOKEN) return RB_WOKEN;
        }
    }
    if (ws->peer_dead) return rb_fail_peer_died(h, err);
    rb_result res = rb_handle_check_size(h, err);
    if (res != RB_OK) return res;
    if (rb_peer_gone(h)) {
        /* The kernel released the lock after the peer stopped running: one
         * more try sees everything it published (FORMAT.md "PeerDied"). */
        ws->peer_dead = 1;
        return RB_WOKEN;
    }
    if (ws->timeout_ns == 0) return rb_fail_timeout(ws, err);
    uint64_t now = rb_now_ns();
    if (ws->deadline && now >= ws->deadline) return rb_fail_timeout(ws, err);
    ws->until = now + RB_SLEEP_SLICE_NS;
    if (ws->deadline && ws->deadline < ws->until) ws->until = ws->deadline;
    return RB_OK;
}

rb_result rb_wait_sleep(rb_handle *h, rb_wait_state *ws) {
    if (h->role == RB_ROLE_WRITER) return rb_wait_writable(&h->ring.writer, ws->until);
    return rb_wait_readable(&h->ring.reader, ws->until);
}

rb_result rb_wait_finish(rb_handle *h, rb_error *err) {
    /* A sleep is where a truncation is noticed: look before touching the
     * header again. A flag left up costs the peer one needless wake-up. */
    rb_result res = rb_handle_check_size(h, err);
    if (res != RB_OK) return res;
    if (h->role == RB_ROLE_WRITER)
        rb_end_wait_writable(&h->ring.writer);
    else
        rb_end_wait_readable(&h->ring.reader);
    return RB_OK;
}

rb_result rb_wait(rb_handle *h, rb_wait_state *ws, rb_error *err) {
    rb_result res = rb_wait_prepare(h, ws, err);
    if (res == RB_WOKEN) return RB_OK;
    if (res != RB_OK) return res;
    rb_wait_sleep(h, ws);
    return rb_wait_finish(h, err);
}

/* ---- inspecting -------------------------------------------------------- */

#define RB_FIELD(name) {#name, (uint32_t)offsetof(rb_header, name), \
                        (uint32_t)sizeof(((rb_header *)0)->name)}

const rb_field rb_header_fields[] = {
    RB_FIELD(magic),
    RB_FIELD(version),
    RB_FIELD(ready),
    RB_FIELD(capacity),
    RB_FIELD(data_offset),
    RB_FIELD(max_message_size),
    RB_FIELD(write_pos),
    RB_FIELD(messages_pushed),
    RB_FIELD(bytes_pushed),
    RB_FIELD(read_pos),
    RB_FIELD(messages_popped),
    RB_FIELD(bytes_popped),
    RB_FIELD(reader_waiting),
    RB_FIELD(data_seq),
    RB_FIELD(reader_attached),
    RB_FIELD(reader_empty_waits),
    RB_FIELD(writer_waiting),
    RB_FIELD(space_seq),
    RB_FIELD(writer_closed),
    RB_FIELD(writer_full_waits),
    RB_FIELD(high_water),
    {NULL, 0, 0},
};
_Static_assert(sizeof(rb_header_fields) / sizeof(rb_header_fields[0]) <=
                   sizeof(((rb_inspection *)0)->values) / sizeof(uint64_t) + 1,
               "rb_inspection.values has room for every field");

rb_result rb_inspect(const char *path, rb_inspection *out, rb_error *err) {
    memset(out, 0, sizeof *out);
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        if (errno == EISDIR)
            return rb_fail(err, RB_INVALID, 0, "'%s' is a directory, not a ring file", path);
        return rb_fail_errno(err, path, "open");
    }
    rb_result res = RB_OK;
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        res = rb_fail_errno(err, path, "fstat");
        goto done;
    }
    if (!S_ISREG(sb.st_mode)) {
        res = rb_fail(err, RB_INVALID, 0, "'%s' is not a regular file", path);
        goto done;
    }
    out->file_size = (uint64_t)sb.st_size;
    if (out->file_size < RB_DATA_OFFSET) {
        res = rb_fail(err, RB_INVALID, 0, "'%s': %s (it has %lld bytes)", path,
                      rb_invalid_reason(RB_INVALID_SHORT_FILE), (long long)sb.st_size);
        goto done;
    }
    void *head = mmap(NULL, RB_DATA_OFFSET, PROT_READ, MAP_SHARED, fd, 0);
    if (head == MAP_FAILED) {
        res = rb_fail_errno(err, path, "mmap");
        goto done;
    }
    for (int i = 0; rb_header_fields[i].name; i++) {
        const volatile uint8_t *at = (const volatile uint8_t *)head + rb_header_fields[i].offset;
        out->values[i] = rb_header_fields[i].size == 8 ? *(const volatile uint64_t *)at
                                                        : *(const volatile uint32_t *)at;
    }
    /* The header page alone is mapped; validation reads only the header and
     * compares the capacity with the size of the file. */
    rb_snapshot snap;
    rb_invalid why = rb_validate_header(head, out->file_size, &snap);
    munmap(head, RB_DATA_OFFSET);
    if (why != RB_VALID) {
        res = rb_fail(err, RB_INVALID, 0, "'%s': %s", path, rb_invalid_reason(why));
        goto done;
    }
    out->used_bytes = snap.write_pos - snap.read_pos;
    out->writer_alive = rb_role_alive(fd, RB_ROLE_WRITER);
    out->reader_alive = rb_role_alive(fd, RB_ROLE_READER);
    if (out->writer_alive < 0 || out->reader_alive < 0)
        res = rb_fail_errno(err, path, "test the role locks");
done:
    close(fd);
    return res;
}
