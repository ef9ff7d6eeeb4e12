/* ipc_ring handles: see _handle.h for the contracts and docs/FORMAT.md for
 * the protocol they follow. Plain C11 plus POSIX; no Python.h. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif
#include "_handle.h"

#include <poll.h>

#ifdef POLLRDHUP
#define RB_POLLRDHUP POLLRDHUP
#else
#define RB_POLLRDHUP 0
#endif

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

/* `path` + `suffix` into `out` of `size` bytes; 0, or -1 if it is too long. */
static int rb_join(char *out, size_t size, const char *path, const char *suffix) {
    int n = snprintf(out, size, "%s%s", path, suffix);
    return n < 0 || (size_t)n >= size ? -1 : 0;
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
static void rb_close_descriptors(rb_handle *h);

static void rb_registry_child(void) {
    for (rb_handle *h = rb_registry; h; h = h->next) {
        h->flags |= RB_HANDLE_FORKED;
        rb_close_descriptors(h);
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
    h->pipe_alive = -1;
    h->ring.writer.notify.fd = -1;
    h->ring.reader.notify.fd = -1;
    h->notify_missing = "it was not opened by name";
}

static rb_notify *rb_notify_tx(rb_handle *h) {
    return h->role == RB_ROLE_WRITER ? &h->ring.writer.notify : &h->ring.reader.notify;
}

/* Closes the ring file and both notification descriptors (the lock goes
 * with the ring file's descriptor). */
static void rb_close_descriptors(rb_handle *h) {
    rb_notify *tx = rb_notify_tx(h);
    if (tx->fd >= 0) close(tx->fd);
    tx->fd = -1;
    if (h->notify_rx >= 0) close(h->notify_rx);
    h->notify_rx = -1;
    if (h->pipe_alive >= 0) close(h->pipe_alive);
    h->pipe_alive = -1;
    if (h->fd >= 0) close(h->fd);
    h->fd = -1;
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

/* The message for a header that rb_validate_header refused. */
static rb_result rb_fail_invalid(rb_error *err, const char *path, rb_invalid why,
                                 const void *header) {
    if (why == RB_INVALID_VERSION)
        return rb_fail(err, RB_INVALID, 0,
                       "'%s': unsupported format version %u (this library reads version %u)",
                       path, ((const volatile rb_header *)header)->version, RB_VERSION);
    return rb_fail(err, RB_INVALID, 0, "'%s': %s", path, rb_invalid_reason(why));
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
    if (capacity) rb_init(map, capacity, opt->fifo_ino[0], opt->fifo_ino[1]);
    /* Validate what is mapped, or less if the file shrank meanwhile. */
    uint64_t valid_size = length;
    if (fstat(fd, &sb) == 0 && (uint64_t)sb.st_size < valid_size) valid_size = (uint64_t)sb.st_size;
    rb_snapshot snap;
    rb_invalid why = rb_validate_header(map, valid_size, &snap);
    if (why != RB_VALID) {
        res = rb_fail_invalid(err, path, why, map);
        munmap(map, length);
        return res;
    }
    if (role == RB_ROLE_WRITER && !capacity &&
        atomic_load_explicit(&((rb_header *)map)->writer_state, memory_order_acquire) ==
            RB_STATE_CLOSED) {
        munmap(map, length);
        return rb_fail(err, RB_CLOSED, 0,
                       "'%s': its writer ended the stream with close(); a closed stream cannot "
                       "be continued (remove it with ipc_ring.unlink and create a new ring)",
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

void rb_handle_set_notify(rb_handle *h, int rx, int tx, int eventfd) {
    h->notify_rx = rx;
    rb_notify *notify = rb_notify_tx(h);
    notify->fd = tx;
    notify->eventfd = eventfd;
}

/* ---- notification FIFOs (FORMAT.md "Waiting on a file descriptor") ------ */

#define RB_FIFO_FLAGS (O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW)

/* Opens the FIFO at `path` if it is the one the ring's creator made: the
 * inode the header names, on the ring's device, owned by the ring's owner,
 * with no permission the ring file lacks. The descriptor, or -1 with *why
 * set (static text). */
static int rb_open_fifo(const char *path, uint64_t ino, const struct stat *ring, const char **why) {
    int fd = open(path, RB_FIFO_FLAGS);
    if (fd < 0) {
        *why = errno == ENOENT ? "a FIFO is missing (removed without ipc_ring.unlink?)"
                               : "a FIFO cannot be opened";
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISFIFO(sb.st_mode))
        *why = "a FIFO's name is taken by something that is not a FIFO";
    else if ((uint64_t)sb.st_ino != ino || sb.st_dev != ring->st_dev)
        *why = "a FIFO is not the one its creator made (it was replaced)";
    else if (sb.st_uid != ring->st_uid)
        *why = "a FIFO is owned by another user than the ring file";
    else if ((sb.st_mode & 07777 & ~ring->st_mode) != 0)
        *why = "a FIFO's mode is wider than the ring file's";
    else
        return fd;
    close(fd);
    return -1;
}

/* Opens both FIFOs of an attached handle, validated; on any failure the
 * handle has none and notify_missing says why. */
static void rb_open_fifos(rb_handle *h) {
    const rb_header *hdr = (const rb_header *)h->map;
    uint64_t reader_ino = hdr->reader_fifo_ino, writer_ino = hdr->writer_fifo_ino;
    if (!reader_ino || !writer_ino) {
        h->notify_missing = "its creator made no FIFOs";
        return;
    }
    char rd[4096], wr[4096];
    struct stat ring;
    if (rb_join(rd, sizeof rd, h->path, RB_READER_FIFO) < 0 ||
        rb_join(wr, sizeof wr, h->path, RB_WRITER_FIFO) < 0 || fstat(h->fd, &ring) != 0) {
        h->notify_missing = "the FIFOs' names are too long";
        return;
    }
    /* A ring just linked into place gets its FIFOs renamed next to it a
     * moment later (FORMAT.md "Creating a ring"): give that a few ms. */
    for (int attempt = 0; attempt < 10; attempt++) {
        const char *why = NULL;
        int rd_fd = rb_open_fifo(rd, reader_ino, &ring, &why);
        int wr_fd = rd_fd >= 0 ? rb_open_fifo(wr, writer_ino, &ring, &why) : -1;
        if (rd_fd >= 0 && wr_fd >= 0) {
            if (h->role == RB_ROLE_WRITER)
                rb_handle_set_notify(h, wr_fd, rd_fd, 0);
            else
                rb_handle_set_notify(h, rd_fd, wr_fd, 0);
            h->notify_missing = NULL;
            return;
        }
        if (rd_fd >= 0) close(rd_fd);
        h->notify_missing = why;
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
}

static int rb_file_intact(rb_handle *h, long long *size);

int rb_handle_watch(rb_handle *h) {
    if (h->notify_rx < 0) return -1;
    h->watched = 1;
    rb_handle_idle(h);
    return h->notify_rx;
}

void rb_handle_idle(rb_handle *h) {
    if (!h->watched || h->notify_rx < 0) return;
    /* What the application does next is wait on the descriptor: a truncation
     * meanwhile must be seen before the next call touches the header (a wait
     * is where a truncation is noticed, FORMAT.md "Truncation"). */
    h->flags |= RB_HANDLE_UNCHECKED;
    long long size = 0;
    if (!rb_file_intact(h, &size)) return; /* truncated */
    rb_drain_fd(h->notify_rx);
    if (h->pipe) {
        /* An end of ipc_ring.Pipe is readable for a message or the other end's
         * close, failure or death, as a pipe is: not for its attaching or
         * handing over. */
        rb_header *hdr = (rb_header *)h->map;
        uint32_t peer = atomic_load_explicit(
            h->role == RB_ROLE_WRITER ? &hdr->reader_state : &hdr->writer_state,
            memory_order_seq_cst);
        if (peer == RB_STATE_ATTACHED || peer == RB_STATE_VACANT || peer == RB_STATE_NONE) {
            if (h->role == RB_ROLE_WRITER)
                rb_writer_note_peer_state(&h->ring.writer);
            else
                rb_reader_note_peer_state(&h->ring.reader);
        }
    }
    int armed = h->role == RB_ROLE_WRITER ? rb_arm_writable(&h->ring.writer)
                                          : rb_arm_readable(&h->ring.reader);
    /* What it would wait for holds already: make fileno() readable now. A
     * change of the peer's state is told once: the next call sees it, and
     * the next idle moment waits for the change after it. */
    if (!armed) {
        rb_notify self = {.fd = h->notify_rx, .eventfd = h->pipe};
        rb_notify_fd(&self);
        if (h->role == RB_ROLE_WRITER)
            rb_writer_note_peer_state(&h->ring.writer);
        else
            rb_reader_note_peer_state(&h->ring.reader);
    }
}

/* ---- creating (FORMAT.md "Creating a ring") ----------------------------- */

/* Makes a FIFO at `path` with exactly `mode`, opens it and gives its inode.
 * The descriptor, or -1 with errno set (the FIFO is removed again). */
static int rb_make_fifo(const char *path, unsigned mode, uint64_t *ino) {
    if (mkfifo(path, (mode_t)mode) != 0) return -1;
    int fd = open(path, RB_FIFO_FLAGS);
    struct stat sb;
    if (fd >= 0 && fchmod(fd, (mode_t)mode) == 0 && fstat(fd, &sb) == 0) {
        *ino = (uint64_t)sb.st_ino;
        return fd;
    }
    int e = errno;
    if (fd >= 0) close(fd);
    unlink(path);
    errno = e;
    return -1;
}

rb_result rb_handle_create(rb_handle *h, const rb_options *opt, rb_error *err) {
    const char *path = opt->path;
    if (!rb_capacity_valid(opt->capacity))
        return rb_fail(err, RB_BAD_ARGUMENT, 0,
                       "capacity must be a power of two between %u and %llu bytes, got %llu",
                       RB_MIN_CAPACITY, (unsigned long long)RB_MAX_CAPACITY,
                       (unsigned long long)opt->capacity);
    /* Temporary names in the path's directory (link(2) and rename(2) stay on
     * one file system): .NAME.PID.RANDOM.tmp, and .rd / .wr after it. */
    char tmp[4096], tmp_rd[4100], tmp_wr[4100], rd[4096], wr[4096];
    const char *slash = strrchr(path, '/');
    int dir_len = slash ? (int)(slash - path) + 1 : 0;
    if (rb_join(rd, sizeof rd, path, RB_READER_FIFO) < 0 ||
        rb_join(wr, sizeof wr, path, RB_WRITER_FIFO) < 0)
        return rb_fail(err, RB_ERROR, ENAMETOOLONG, "'%s': the path is too long", path);
    int fd = -1, rx = -1, tx = -1;
    for (int attempt = 0; fd < 0; attempt++) {
        static _Atomic uint64_t counter;
        uint64_t nonce = rb_now_ns() ^ ((uint64_t)getpid() << 40) ^
                         (atomic_fetch_add(&counter, 1) * 0x9E3779B97F4A7C15ULL);
        /* At most 64 bytes of NAME: a long one still leaves room in the
         * component (NAME_MAX) for the rest of the temporary name. */
        int n = snprintf(tmp, sizeof tmp, "%.*s.%.64s.%ld.%012llx.tmp", dir_len, path,
                         path + dir_len, (long)getpid(),
                         (unsigned long long)(nonce & 0xFFFFFFFFFFFFULL));
        if (n < 0 || (size_t)n >= sizeof tmp - 3)
            return rb_fail(err, RB_ERROR, ENAMETOOLONG, "'%s': the path is too long", path);
        fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, (mode_t)opt->mode);
        if (fd < 0 && (errno != EEXIST || attempt > 16))
            return rb_fail_errno(err, path, "create a temporary file next to it");
    }
    rb_join(tmp_rd, sizeof tmp_rd, tmp, RB_READER_FIFO);
    rb_join(tmp_wr, sizeof tmp_wr, tmp, RB_WRITER_FIFO);
    rb_result res = RB_OK;
    int linked = 0, tmp_rd_made = 0, tmp_wr_made = 0;
    rb_options fresh = *opt;
    if (fchmod(fd, (mode_t)opt->mode) != 0) {
        res = rb_fail_errno(err, path, "fchmod");
        goto fail;
    }
    /* The FIFOs exist (under temporary names) before the header, which
     * names their inodes, so that a reader can tell them from stale ones. */
    if ((tx = rb_make_fifo(tmp_rd, opt->mode, &fresh.fifo_ino[0])) < 0) {
        res = rb_fail_errno(err, path, "make the reader's FIFO");
        goto fail;
    }
    tmp_rd_made = 1;
    if ((rx = rb_make_fifo(tmp_wr, opt->mode, &fresh.fifo_ino[1])) < 0) {
        res = rb_fail_errno(err, path, "make the writer's FIFO");
        goto fail;
    }
    tmp_wr_made = 1;
    /* Sized, initialised and locked as the writer before the name exists:
     * no reader ever sees the ring half-built or without its writer. */
    if ((res = rb_handle_attach(h, fd, RB_ROLE_WRITER, &fresh, err)) != RB_OK) goto fail;
    if (link(tmp, path) != 0) {
        if (errno == EEXIST)
            res = rb_fail(err, RB_ERROR, EEXIST,
                          "'%s' exists: to continue its stream, RingWriter.open(path) (or "
                          "RingWriter.create(..., exist_ok=True)); to remove a stale ring, "
                          "ipc_ring.unlink(path)",
                          path);
        else
            res = rb_fail_errno(err, path, "link the new ring into place");
        goto fail;
    }
    linked = 1;
    /* The ring's name is ours: its FIFO names belong to it. A FIFO there is
     * stale (a ring removed without ipc_ring.unlink): replace it. Anything
     * else is someone's file: refuse, and leave it alone. */
    for (int i = 0; i < 2; i++) {
        struct stat sb;
        const char *name = i == 0 ? rd : wr;
        if (lstat(name, &sb) == 0 && !S_ISFIFO(sb.st_mode)) {
            res = rb_fail(err, RB_ERROR, EEXIST,
                          "'%s' exists and is not a FIFO: the ring needs that name for its "
                          "notifications; move the file away",
                          name);
            goto fail;
        }
    }
    if (rename(tmp_rd, rd) != 0 || (tmp_rd_made = 0, rename(tmp_wr, wr) != 0)) {
        res = rb_fail_errno(err, path, "move its FIFOs into place");
        goto fail;
    }
    tmp_wr_made = 0;
    unlink(tmp);
    rb_handle_set_notify(h, rx, tx, 0);
    h->notify_missing = NULL;
    return RB_OK;
fail:
    if (linked) {
        struct stat mine, there;
        if (fstat(h->fd, &mine) == 0 && lstat(path, &there) == 0 && mine.st_ino == there.st_ino &&
            mine.st_dev == there.st_dev)
            unlink(path);
        if (!tmp_rd_made) unlink(rd); /* ours: renamed before the failure */
    }
    if (!(h->flags & RB_HANDLE_DETACHED)) {
        h->fd = -1; /* closed below */
        rb_handle_unmap(h);
    }
    if (rx >= 0) close(rx);
    if (tx >= 0) close(tx);
    if (tmp_rd_made) unlink(tmp_rd);
    if (tmp_wr_made) unlink(tmp_wr);
    close(fd);
    unlink(tmp);
    return res;
}

void rb_handle_announce(rb_handle *h) {
    /* A peer waiting for a successor, asleep or armed on its descriptor,
     * looks at the new state now. */
    rb_header *hdr = (rb_header *)h->map;
    const rb_notify *tx = rb_notify_tx(h);
    if (h->role == RB_ROLE_WRITER)
        rb_wake_waiting_peer(&hdr->reader_waiting, &hdr->data_seq, tx);
    else
        rb_wake_waiting_peer(&hdr->writer_waiting, &hdr->space_seq, tx);
}

rb_result rb_handle_open(rb_handle *h, rb_role role, const rb_options *opt, rb_error *err) {
    /* O_NONBLOCK: opening a FIFO or a device must not block before the check. */
    int fd = open(opt->path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        if (errno == EISDIR)
            return rb_fail(err, RB_INVALID, 0, "'%s' is a directory, not a ring file", opt->path);
        return rb_fail_errno(err, opt->path, "open");
    }
    rb_options existing = *opt;
    existing.capacity = 0;
    rb_result res = rb_handle_attach(h, fd, role, &existing, err);
    if (res != RB_OK) {
        close(fd);
        return res;
    }
    rb_open_fifos(h);
    rb_handle_announce(h);
    return RB_OK;
}

rb_result rb_check_ring_file(const char *path, rb_error *err) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ELOOP)
            return rb_fail(err, RB_INVALID, 0, "'%s' is a symbolic link, not a ring file", path);
        if (errno == EISDIR)
            return rb_fail(err, RB_INVALID, 0, "'%s' is a directory, not a ring file", path);
        return rb_fail_errno(err, path, "open");
    }
    struct stat sb;
    uint64_t magic = 0;
    rb_result res = RB_OK;
    if (fstat(fd, &sb) != 0)
        res = rb_fail_errno(err, path, "fstat");
    else if (!S_ISREG(sb.st_mode))
        res = rb_fail(err, RB_INVALID, 0, "'%s' is not a regular file, not a ring file", path);
    else if (pread(fd, &magic, sizeof magic, 0) != (ssize_t)sizeof magic || magic != RB_MAGIC)
        res = rb_fail(err, RB_INVALID, 0, "'%s' does not start with a ring's magic number",
                      path);
    close(fd);
    return res;
}

rb_result rb_unlink(const char *path, rb_error *err) {
    /* Only a ring file, of any version: a typo must not delete somebody's
     * data, and a ring of an older version must still be removable. */
    rb_result res = rb_check_ring_file(path, err);
    if (res != RB_OK) return res;
    if (unlink(path) != 0) return rb_fail_errno(err, path, "unlink");
    const char *suffixes[] = {RB_READER_FIFO, RB_WRITER_FIFO};
    for (int i = 0; i < 2; i++) {
        char name[4096];
        struct stat sb;
        if (rb_join(name, sizeof name, path, suffixes[i]) == 0 && lstat(name, &sb) == 0 &&
            S_ISFIFO(sb.st_mode))
            unlink(name);
    }
    return RB_OK;
}

/* ---- giving a role up (FORMAT.md "Roles and states", "End of stream") --- */

/* 1 if the file still covers the mapping, 0 if not; *size gets the file's
 * size. One lseek to the end: the size alone, and less than half the cost of
 * an fstat, which sits on the path of every wake-up (a failing lseek counts
 * as intact). The descriptor's offset means nothing here: the ring is only
 * mapped and locked through it. */
static int rb_file_intact(rb_handle *h, long long *size) {
    if (h->fd < 0) return 1;
    off_t end = lseek(h->fd, 0, SEEK_END);
    if (end < 0) return 1;
    *size = (long long)end;
    return (uint64_t)end >= h->map_size;
}

void rb_handle_release(rb_handle *h, rb_role_state state, int wake_own) {
    if (h->flags & RB_HANDLE_DETACHED) return;
    long long size = 0;
    /* No store in a fork() child (its descriptors are gone already), nor in
     * a file truncated under the mapping (the store would raise SIGBUS). */
    if (!(h->flags & RB_HANDLE_FORKED) && h->owner_pid == getpid() && rb_file_intact(h, &size)) {
        if (h->role == RB_ROLE_WRITER) {
            rb_writer_leave(&h->ring.writer, state);
            if (wake_own) rb_wake_writer(h->ring.writer.hdr);
        }
        else {
            rb_reader_leave(&h->ring.reader, state == RB_STATE_VACANT ? state : RB_STATE_CLOSED);
            if (wake_own) rb_wake_reader(h->ring.reader.hdr);
        }
    }
    rb_registry_remove(h);
    rb_close_descriptors(h);
    h->flags |= RB_HANDLE_DETACHED;
}

void rb_handle_detach_memory(rb_handle *h) {
    if (!h->map) return;
    /* MAP_FIXED replaces the pages in place; on failure the shared mapping
     * stays, which is still valid memory. */
    void *p = mmap(h->map, h->map_size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    (void)p;
}

void rb_handle_unmap(rb_handle *h) {
    rb_handle_release(h, RB_STATE_VACANT, 0);
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
        return rb_fail(err, res, 0,
                       h->pipe ? "ipc_ring.Pipe: the other end was closed and everything it "
                                 "sent has been received"
                               : "the writer closed the ring and every message was read");
    case RB_CORRUPT:
        return rb_fail(err, res, 0, "'%s': %s", h->path, rb_invalid_reason(RB_INVALID_RECORD));
    case RB_PEER_DIED:
        rb_reader_reported_break(&h->ring.reader);
        return rb_fail(err, res, 0,
                       "'%s': a writer stopped here without ending the stream (it died, or "
                       "stopped without close()); every message it committed has been read, "
                       "and a new writer continued the stream: the next messages are its",
                       h->path);
    default:
        return rb_fail(err, res, 0, "unexpected ring result %d", (int)res);
    }
}

/* ---- waiting (FORMAT.md "Waiting", "Roles and states") ----------------- */

void rb_wait_init(rb_wait_state *ws, uint64_t timeout_ns, const char *op) {
    ws->timeout_ns = timeout_ns;
    ws->deadline = 0;
    ws->until = 0;
    ws->op = op;
    ws->spun = 0;
    ws->peer_gone = 0;
    ws->vacant = 0;
    ws->generation = 0;
}

static rb_result rb_fail_timeout(rb_handle *h, rb_wait_state *ws, rb_error *err) {
    rb_handle_idle(h);
    const char *why = "";
    if (ws->vacant)
        why = h->role == RB_ROLE_WRITER ? " (no reader is attached: the role is vacant)"
                                        : " (no writer is attached: the role is vacant)";
    return rb_fail(err, RB_TIMEOUT, 0, "%s timed out after %.6g s%s", ws->op,
                   (double)ws->timeout_ns / 1e9, why);
}

/* What the peer's role says, for a side that cannot proceed (FORMAT.md
 * "Roles and states"): 1 if its process is gone for good (died holding the
 * role, a reader that closed, a writer that stopped without ending the
 * stream), 0 if a process holds it or it is vacant for a successor. Sets
 * ws->vacant. A failing lock test counts as alive. */
/* An end of ipc_ring.Pipe whose peer never attached or let go: gone if
 * every process closed the peer end's socket (a hang-up on ours). */
int rb_handle_pipe_peer_closed(rb_handle *h) {
    if (!h->pipe || h->pipe_alive < 0) return 0;
    struct pollfd p = {.fd = h->pipe_alive, .events = POLLIN | RB_POLLRDHUP, .revents = 0};
    return poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | RB_POLLRDHUP)) != 0;
}

static int rb_peer_gone(rb_handle *h, rb_wait_state *ws, uint32_t state) {
    ws->vacant = state == RB_STATE_NONE || state == RB_STATE_VACANT;
    if (rb_handle_peer_alive(h) != 0) {
        ws->vacant = 0;
        return 0;
    }
    if (ws->vacant && rb_handle_pipe_peer_closed(h)) {
        ws->vacant = 0;
        return 1;
    }
    if (h->role == RB_ROLE_WRITER) return state == RB_STATE_ATTACHED || state == RB_STATE_CLOSED;
    if (state != RB_STATE_ATTACHED && state != RB_STATE_FAILED) return 0;
    if (h->pipe) return 1; /* no successor can come: every call reports it */
    /* A reader reports the end of each writer once; then it waits for the
     * next one (FORMAT.md "PeerDied"). */
    if (h->ring.reader.reported_generation == ws->generation) {
        ws->vacant = 1;
        return 0;
    }
    return 1;
}

static rb_result rb_fail_peer_died(rb_handle *h, rb_wait_state *ws, uint32_t state,
                                   rb_error *err) {
    if (h->pipe)
        return rb_fail(err, RB_PEER_DIED, 0, "%s: the other end %s", h->path,
                       state == RB_STATE_CLOSED    ? "was closed"
                       : state == RB_STATE_FAILED  ? "stopped without closing"
                       : state == RB_STATE_ATTACHED ? "died (its process is gone)"
                                                    : "was closed in every process");
    if (h->role == RB_ROLE_WRITER)
        return rb_fail(err, RB_PEER_DIED, 0,
                       "'%s': the reader %s and the ring is full; a new reader may attach and "
                       "the writer can continue",
                       h->path, state == RB_STATE_CLOSED ? "closed" : "died");
    /* The generation loaded before the lock test: a successor that attached
     * since is not the writer reported here (FORMAT.md "Breaks"). */
    rb_reader_reported(&h->ring.reader, ws->generation);
    return rb_fail(err, RB_PEER_DIED, 0,
                   "'%s': the writer %s; every message it committed has been read (a new "
                   "writer may attach and continue the stream)",
                   h->path,
                   state == RB_STATE_FAILED
                       ? "stopped without ending the stream (an exception, or no close())"
                       : "died without close()");
}

rb_result rb_wait_prepare(rb_handle *h, rb_wait_state *ws, rb_error *err) {
    /* The peer's state as this wait sees it: a change wakes the sleep. */
    uint32_t state;
    if (h->role == RB_ROLE_WRITER) {
        rb_writer_note_peer_state(&h->ring.writer);
        state = h->ring.writer.reader_state_seen;
    }
    else {
        rb_reader_note_peer_state(&h->ring.reader);
        state = h->ring.reader.writer_state_seen;
        if (state == RB_STATE_CLOSED) return RB_WOKEN; /* the retry sees the end */
        /* Before the lock test: the writer whose death that test may show. */
        ws->generation =
            atomic_load_explicit(&h->ring.reader.hdr->writer_generation, memory_order_acquire);
    }
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
    rb_result res = rb_handle_check_size(h, err);
    if (res != RB_OK) return res;
    if (rb_peer_gone(h, ws, state)) {
        /* The kernel released the lock after the peer stopped running: one
         * more try sees everything it published (FORMAT.md "PeerDied"). */
        if (ws->peer_gone) return rb_fail_peer_died(h, ws, state, err);
        ws->peer_gone = 1;
        return RB_WOKEN;
    }
    ws->peer_gone = 0;
    if (ws->timeout_ns == 0) return rb_fail_timeout(h, ws, err);
    uint64_t now = rb_now_ns();
    if (ws->deadline && now >= ws->deadline) return rb_fail_timeout(h, ws, err);
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
     * header again, even after the peer's wake-up (it proves the header page
     * was there, not the pages of a record it reserved, or read in place,
     * before a truncation). A flag left up costs the peer one needless
     * wake-up. */
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
    RB_FIELD(reader_fifo_ino),
    RB_FIELD(writer_fifo_ino),
    RB_FIELD(write_pos),
    RB_FIELD(messages_pushed),
    RB_FIELD(bytes_pushed),
    RB_FIELD(wrap_pos),
    RB_FIELD(break_generation),
    RB_FIELD(read_pos),
    RB_FIELD(messages_popped),
    RB_FIELD(bytes_popped),
    RB_FIELD(reported_generation),
    RB_FIELD(reader_waiting),
    RB_FIELD(data_seq),
    RB_FIELD(reader_state),
    RB_FIELD(reader_empty_waits),
    RB_FIELD(writer_waiting),
    RB_FIELD(space_seq),
    RB_FIELD(writer_state),
    RB_FIELD(writer_generation),
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
    if (why != RB_VALID) res = rb_fail_invalid(err, path, why, head);
    munmap(head, RB_DATA_OFFSET);
    if (res != RB_OK) goto done;
    /* The positions as validation loaded them, so that they agree with
     * used_bytes on a ring that moves meanwhile. */
    for (int i = 0; rb_header_fields[i].name; i++) {
        uint32_t offset = rb_header_fields[i].offset;
        if (offset == offsetof(rb_header, write_pos)) out->values[i] = snap.write_pos;
        if (offset == offsetof(rb_header, read_pos)) out->values[i] = snap.read_pos;
        if (offset == offsetof(rb_header, wrap_pos)) out->values[i] = snap.wrap_pos;
    }
    out->used_bytes = rb_used_bytes(snap.write_pos, snap.read_pos, snap.wrap_pos, snap.capacity);
    out->writer_alive = rb_role_alive(fd, RB_ROLE_WRITER);
    out->reader_alive = rb_role_alive(fd, RB_ROLE_READER);
    if (out->writer_alive < 0 || out->reader_alive < 0)
        res = rb_fail_errno(err, path, "test the role locks");
done:
    close(fd);
    return res;
}
