/* ipc_ring._core: CPython glue around the C core in _ring.c.
 *
 * Two heap types, Writer and Reader, that own one mapping of a ring file
 * each; the Python layer (_api.py) subclasses them and adds the file
 * lifecycle. Everything here holds the GIL except the sleep in wait_*().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <math.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "_ring.h"

/* Busy-wait before sleeping: about what a futex sleep and wake-up cost here
 * (README "Performance" has the measurement that chose it). */
#define DEFAULT_SPIN_NS 10000u

#ifdef MAP_POPULATE
#define RB_MAP_POPULATE MAP_POPULATE
#else
#define RB_MAP_POPULATE 0
#endif
/* Longest single sleep: a signal that lands just before the sleep starts,
 * or a closed handle, is noticed within this time. */
#define SLEEP_SLICE_NS 50000000u

/* ---- module state ---------------------------------------------------- */

typedef struct {
    PyObject *RingError;
    PyObject *RingTimeout;
    PyObject *MessageTooLarge;
    PyObject *InvalidRing;
    PyObject *RingClosed;
    PyObject *PeerDied;
    PyObject *RingBusy;
    PyTypeObject *WriterType;
    PyTypeObject *ReaderType;
    PyTypeObject *SlotType;
} core_state;

static struct PyModuleDef core_module;

static inline core_state *get_state(PyObject *module) {
    return (core_state *)PyModule_GetState(module);
}

/* The module state of the type that defines `self`'s methods (works for
 * Python subclasses too). Only called on error paths. */
static core_state *state_of(PyObject *self) {
    PyObject *module = PyType_GetModuleByDef(Py_TYPE(self), &core_module);
    return module ? get_state(module) : NULL;
}

/* ---- shared handle state --------------------------------------------- */

enum handle_flags {
    HANDLE_CLOSED = 1, /* close() was called */
    HANDLE_BUSY = 2,   /* a thread is sleeping in a blocking call of this handle */
    HANDLE_FORKED = 4, /* this process is a fork() child of the one that attached */
    HANDLE_SLOT = 8,   /* a reserve() or pop_view() slot is open on this handle */
    HANDLE_BATCH = 16, /* push_many() is running Python code (its iterable) mid-batch */
};

/* Fields common to Writer and Reader, first in both structs. */
#define HANDLE_HEAD                                                            \
    PyObject_HEAD                                                              \
    int flags;          /* handle_flags; 0 on the fast path */                 \
    int fd;             /* the ring file, -1 once closed */                    \
    void *map;          /* the mapping, NULL once unmapped */                  \
    size_t map_size;    /* its length */                                       \
    uint64_t capacity;  /* validated once at attach; never re-read */         \
    Py_ssize_t exports; /* buffers of open slots pointing into the mapping */  \
    PyObject *path;     /* str, as given */                                    \
    int notify_rx;      /* own FIFO, read end for fileno(); -1 if none */      \
    int notify_tx;      /* peer's FIFO, to wake it; -1 if none */              \
    _Atomic uint32_t *notify_key; /* peer's flag it is registered under */     \
    uint64_t spin_ns;   /* busy-wait before sleeping */                        \
    pid_t owner_pid;    /* process that attached; a forked child is not it */  \
    struct HandleObject *prev, *next; /* live_handles list, for fork() */

typedef struct HandleObject {
    HANDLE_HEAD
} HandleObject;

/* Every attached handle of this process, so that the child of a fork() can
 * disown them (fork_child). Changed only with the GIL held. */
static HandleObject *live_handles;

static void handle_release_notify(HandleObject *h);

static void live_handles_add(HandleObject *h) {
    h->prev = NULL;
    h->next = live_handles;
    if (live_handles) live_handles->prev = h;
    live_handles = h;
}

static void live_handles_remove(HandleObject *h) {
    if (h->prev)
        h->prev->next = h->next;
    else if (live_handles == h)
        live_handles = h->next;
    if (h->next) h->next->prev = h->prev;
    h->prev = h->next = NULL;
}

/* pthread_atfork child handler: the child must not act as a second writer
 * or reader, and must not keep the parent's liveness lock alive through its
 * copy of the descriptor. Marks every handle unusable and closes its fd;
 * the mapping stays until the handle is closed or collected. */
static void fork_child(void) {
    for (HandleObject *h = live_handles; h; h = h->next) {
        h->flags |= HANDLE_FORKED;
        handle_release_notify(h);
        if (h->fd >= 0) {
            close(h->fd);
            h->fd = -1;
        }
    }
}

typedef struct {
    HANDLE_HEAD
    rb_writer ring;
} WriterObject;

typedef struct {
    HANDLE_HEAD
    rb_reader ring;
} ReaderObject;

/* Forgets and closes the notification FIFOs (FORMAT.md "Waiting on a file
 * descriptor"), if any. */
static void handle_release_notify(HandleObject *h) {
    if (h->notify_key) {
        rb_notify_unregister(h->notify_key);
        h->notify_key = NULL;
    }
    if (h->notify_rx >= 0) close(h->notify_rx);
    if (h->notify_tx >= 0) close(h->notify_tx);
    h->notify_rx = h->notify_tx = -1;
}

/* Releases the mapping and the descriptor. Never called while a thread
 * sleeps on the mapping (HANDLE_BUSY) or a buffer points into it
 * (exports > 0): see handle_release_if_idle. */
static void handle_release(HandleObject *h) {
    live_handles_remove(h);
    handle_release_notify(h);
    if (h->map) {
        munmap(h->map, h->map_size);
        h->map = NULL;
    }
    if (h->fd >= 0) {
        close(h->fd);
        h->fd = -1;
    }
}

/* After close(): unmaps now unless a sleeping thread or an exported buffer
 * still uses the mapping; the last of those calls this again. */
static void handle_release_if_idle(HandleObject *h) {
    if (!(h->flags & (HANDLE_BUSY | HANDLE_BATCH)) && h->exports == 0) handle_release(h);
}

/* Maps the ring file `fd` and validates it. Returns 0, or -1 with
 * InvalidRing or OSError set. With `capacity` > 0 the file is fresh (all
 * zeros, exactly rb_file_size(capacity) bytes) and gets a new header. */
static int handle_map(core_state *st, HandleObject *h, int fd, uint64_t capacity) {
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (!S_ISREG(sb.st_mode)) {
        PyErr_Format(st->InvalidRing, "%R is not a regular file", h->path);
        return -1;
    }
    uint64_t file_size = (uint64_t)sb.st_size;
    if (capacity) {
        if (file_size != rb_file_size(capacity)) {
            PyErr_Format(PyExc_ValueError, "fresh ring file has %llu bytes, expected %llu",
                         (unsigned long long)file_size,
                         (unsigned long long)rb_file_size(capacity));
            return -1;
        }
    }
    else {
        /* Map the header alone first so that the capacity the file claims
         * is checked against its size before anything larger is mapped. */
        if (file_size < RB_DATA_OFFSET) {
            PyErr_Format(st->InvalidRing, "%R: %s (it has %llu bytes)", h->path,
                         rb_invalid_reason(RB_INVALID_SHORT_FILE), (unsigned long long)file_size);
            return -1;
        }
        void *head = mmap(NULL, RB_DATA_OFFSET, PROT_READ, MAP_SHARED, fd, 0);
        if (head == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        const rb_header *hdr = (const rb_header *)head;
        capacity = rb_capacity_valid(hdr->capacity) ? hdr->capacity : 0;
        munmap(head, RB_DATA_OFFSET);
        if (capacity == 0 || file_size < rb_file_size(capacity)) {
            /* Let the full validation below name the reason. */
            capacity = 0;
        }
    }
    size_t map_size = capacity ? (size_t)rb_file_size(capacity) : RB_DATA_OFFSET;
    /* A mapping keeps a reference to the open file description it was made
     * from, and a fork() child inherits the mapping: mapped through `fd`,
     * a child would keep the liveness lock on `fd` alive after the parent
     * died (FORMAT.md "Liveness and roles"). So map through a second open
     * file description of the same file where the system offers one. */
    int map_fd = fd;
#if defined(__linux__)
    char self_fd[64];
    PyOS_snprintf(self_fd, sizeof self_fd, "/proc/self/fd/%d", fd);
    int reopened = open(self_fd, O_RDWR | O_CLOEXEC);
    struct stat again;
    if (reopened >= 0 && fstat(reopened, &again) == 0 && again.st_ino == sb.st_ino &&
        again.st_dev == sb.st_dev)
        map_fd = reopened;
    else if (reopened >= 0)
        close(reopened);
#endif
    /* Pre-fault the page tables (FORMAT.md "Mapping": a first lap through an
     * unpopulated mapping costs a minor fault per page on the first lap). */
    void *map =
        mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED | RB_MAP_POPULATE, map_fd, 0);
    if (map_fd != fd) close(map_fd);
    if (map == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    h->map = map;
    h->map_size = map_size;
    return 0;
}

/* Validates the mapping and fills *snap; 0 or -1 with InvalidRing set. */
static int handle_validate(core_state *st, HandleObject *h, rb_snapshot *snap) {
    struct stat sb;
    uint64_t file_size = h->map_size;
    if (fstat(h->fd, &sb) == 0 && (uint64_t)sb.st_size < file_size) file_size = (uint64_t)sb.st_size;
    rb_invalid why = rb_validate_header(h->map, file_size, snap);
    if (why != RB_VALID) {
        PyErr_Format(st->InvalidRing, "%R: %s", h->path, rb_invalid_reason(why));
        return -1;
    }
    return 0;
}

/* Parses (fd, path, capacity, spin) for the constructors and maps the file.
 * On success the handle owns fd. */
static int handle_init(PyObject *self, PyObject *args, PyObject *kwds, int writer) {
    static char *kwlist[] = {"fd", "path", "capacity", "spin", NULL};
    HandleObject *h = (HandleObject *)self;
    int fd;
    PyObject *path;
    unsigned long long capacity = 0;
    PyObject *spin_obj = Py_None;
    if (h->map || h->fd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "handle is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iU|$KO", kwlist, &fd, &path, &capacity,
                                     &spin_obj))
        return -1;
    core_state *st = state_of(self);
    if (!st) return -1;
    uint64_t spin_ns = DEFAULT_SPIN_NS;
    if (spin_obj != Py_None) {
        double v = PyFloat_AsDouble(spin_obj);
        if (v == -1.0 && PyErr_Occurred()) return -1;
        if (!(v >= 0.0 && v <= 1.0)) {
            PyErr_Format(PyExc_ValueError, "spin must be a number of seconds in [0, 1], got %R",
                         spin_obj);
            return -1;
        }
        spin_ns = (uint64_t)(v * 1e9);
    }
    if (capacity && !rb_capacity_valid(capacity)) {
        PyErr_Format(PyExc_ValueError,
                     "capacity must be a power of two between %u and %llu bytes, got %llu",
                     RB_MIN_CAPACITY, (unsigned long long)RB_MAX_CAPACITY, capacity);
        return -1;
    }
    Py_INCREF(path);
    Py_XSETREF(h->path, path);
    h->spin_ns = spin_ns;
    if (handle_map(st, h, fd, capacity) < 0) return -1;
    h->fd = fd;
    if (capacity) rb_init(h->map, capacity);
    /* The role's lock first, then the snapshot: a predecessor that moves its
     * position and exits in between cannot leave us a stale one. */
    rb_result locked = rb_lock_role(fd, writer ? RB_ROLE_WRITER : RB_ROLE_READER);
    if (locked != RB_OK) {
        if (locked == RB_BUSY)
            PyErr_Format(st->RingBusy, "%R already has a live %s", h->path,
                         writer ? "writer" : "reader");
        else
            PyErr_SetFromErrno(PyExc_OSError);
        h->fd = -1; /* the caller still owns fd on failure; closing it drops the lock */
        handle_release(h);
        return -1;
    }
    rb_snapshot snap;
    if (handle_validate(st, h, &snap) < 0) {
        h->fd = -1;
        handle_release(h);
        return -1;
    }
    if (writer && !capacity &&
        atomic_load_explicit(&((rb_header *)h->map)->writer_closed, memory_order_acquire)) {
        PyErr_Format(st->RingClosed,
                     "%R: its writer ended the stream with close(); a closed stream cannot be "
                     "continued",
                     h->path);
        h->fd = -1;
        handle_release(h);
        return -1;
    }
    h->owner_pid = getpid();
    h->capacity = snap.capacity;
    h->flags = 0;
    live_handles_add(h);
    if (writer)
        rb_writer_attach(&((WriterObject *)h)->ring, h->map, &snap);
    else
        rb_reader_attach(&((ReaderObject *)h)->ring, h->map, &snap);
    return 0;
}

static PyObject *handle_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    HandleObject *h = (HandleObject *)type->tp_alloc(type, 0);
    if (!h) return NULL;
    h->fd = -1;
    h->notify_rx = h->notify_tx = -1;
    h->flags = HANDLE_CLOSED;
    return (PyObject *)h;
}

/* Raises the error for a handle whose flags are not 0: closed, in use by
 * another thread, or inherited through fork(). Returns NULL. */
static PyObject *handle_unusable(HandleObject *h, const char *what) {
    core_state *st = state_of((PyObject *)h);
    if (!st) return NULL;
    if (h->flags & HANDLE_CLOSED)
        PyErr_Format(st->RingClosed, "%s is closed", what);
    else if (h->flags & HANDLE_FORKED)
        PyErr_Format(st->RingError,
                     "this %s was inherited through fork(); only the process that opened it may "
                     "use it: open the ring again in the child",
                     what);
    else if (h->flags & HANDLE_BUSY)
        PyErr_Format(PyExc_RuntimeError,
                     "another thread is blocked in a call on this %s; a handle is for one thread "
                     "at a time",
                     what);
    else if (h->flags & HANDLE_SLOT)
        PyErr_Format(PyExc_RuntimeError,
                     "a reserve() or pop_view() block is open on this %s: finish it first",
                     what);
    else
        PyErr_Format(PyExc_RuntimeError,
                     "push_many() on this %s is iterating its messages: the iterable must not "
                     "use the same handle",
                     what);
    return NULL;
}

#define CHECK_USABLE(h, what)                                                  \
    do {                                                                       \
        if (((HandleObject *)(h))->flags != 0)                                 \
            return handle_unusable((HandleObject *)(h), what);                 \
    } while (0)

/* ---- arguments ------------------------------------------------------- */

#define TIMEOUT_FOREVER (-1.0)

/* Converts a timeout argument: None -> TIMEOUT_FOREVER, else seconds >= 0.
 * 0 on success, -1 with ValueError/TypeError set. */
static int parse_timeout(PyObject *obj, double *out) {
    if (obj == NULL || obj == Py_None) {
        *out = TIMEOUT_FOREVER;
        return 0;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred()) return -1;
    if (isnan(t) || t < 0) {
        PyErr_Format(PyExc_ValueError, "timeout must be None or a number >= 0, got %R", obj);
        return -1;
    }
    /* Beyond ~31 years a deadline in nanoseconds would overflow: wait forever. */
    *out = t > 1e9 ? TIMEOUT_FOREVER : t;
    return 0;
}

/* Unpacks `[first,] timeout=None` from a METH_FASTCALL|METH_KEYWORDS call:
 * `npos` (0 or 1) required positional arguments, then `timeout` by position
 * or keyword. 0 on success, -1 with TypeError set. */
static int unpack_timeout_args(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames, Py_ssize_t npos, PyObject **first,
                               PyObject **timeout) {
    *timeout = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < npos || nargs > npos + 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd or %zd positional arguments (%zd given)",
                     fname, npos, npos + 1, nargs);
        return -1;
    }
    if (npos) *first = args[0];
    if (nargs == npos + 1) *timeout = args[npos];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (!PyUnicode_Check(name) || PyUnicode_CompareWithASCIIString(name, "timeout") != 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname,
                         name);
            return -1;
        }
        if (*timeout) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument 'timeout'",
                         fname);
            return -1;
        }
        *timeout = args[nargs + i];
    }
    return 0;
}

/* ---- waiting --------------------------------------------------------- */

typedef struct {
    double timeout;    /* seconds, TIMEOUT_FOREVER, or 0 */
    int spun;          /* the spin phase is over */
    int peer_dead;     /* the peer's liveness lock was found free: retry once, then PeerDied */
    uint64_t deadline; /* CLOCK_MONOTONIC ns, 0 = none; set when the spin ends */
} wait_state;

static void raise_timeout(HandleObject *h, const char *op, double timeout) {
    core_state *st = state_of((PyObject *)h);
    char msg[128];
    PyOS_snprintf(msg, sizeof msg, "%s timed out after %.6g s", op, timeout);
    if (st) PyErr_SetString(st->RingTimeout, msg);
}

/* 1 if the ring file still covers the whole mapping (an fstat), else 0. */
static int file_intact(HandleObject *h, long long *size) {
    struct stat sb;
    if (fstat(h->fd, &sb) != 0) return 1; /* cannot tell: assume it is */
    *size = (long long)sb.st_size;
    return (uint64_t)sb.st_size >= h->map_size;
}

/* Raises InvalidRing for a ring file truncated to `size` bytes under the
 * mapping (FORMAT.md "Truncation"). Returns -1. */
static int raise_truncated(HandleObject *h, long long size) {
    core_state *st = state_of((PyObject *)h);
    if (st)
        PyErr_Format(st->InvalidRing,
                     "%R was truncated to %lld bytes while mapped (it needs %zu); stop using it: "
                     "touching the missing pages raises SIGBUS",
                     h->path, size, h->map_size);
    return -1;
}

/* 0 if the ring file still covers the mapping, else -1 with InvalidRing. */
static int check_truncated(HandleObject *h) {
    long long size = 0;
    return file_intact(h, &size) ? 0 : raise_truncated(h, size);
}

/* Sets ws->peer_dead if the peer this side waits for is gone: for a reader,
 * nobody holds the writer's lock; for a writer, a reader has attached at
 * some point and nobody holds the reader's lock now. Also fails if the file
 * was truncated under the mapping. 0, or -1 with an exception set. */
static int check_peer(HandleObject *h, wait_state *ws, int writer) {
    if (check_truncated(h) < 0) return -1;
    rb_header *hdr = (rb_header *)h->map;
    int alive;
    if (writer)
        alive = !atomic_load_explicit(&hdr->reader_attached, memory_order_acquire) ||
                rb_role_alive(h->fd, RB_ROLE_READER) != 0;
    else
        alive = rb_role_alive(h->fd, RB_ROLE_WRITER) != 0;
    if (!alive) ws->peer_dead = 1;
    return 0;
}

/* One step of waiting for the peer: spin once with the GIL, then sleep in
 * slices without it, checking before each slice that the peer still lives.
 * Returns 0 when the caller should retry its operation (and, if
 * ws->peer_dead is set, raise PeerDied if it still cannot proceed), -1 with
 * an exception set (RingTimeout, RingClosed, InvalidRing, or a signal's).
 * `writer` says which side `h` is. */
static int handle_wait(HandleObject *h, wait_state *ws, int writer, const char *op) {
    if (!ws->spun) {
        ws->spun = 1;
        if (ws->timeout != 0) {
            rb_result spun = writer ? rb_spin_writable(&((WriterObject *)h)->ring, h->spin_ns)
                                    : rb_spin_readable(&((ReaderObject *)h)->ring, h->spin_ns);
            if (ws->timeout > 0 && !ws->deadline)
                ws->deadline = rb_now_ns() + (uint64_t)(ws->timeout * 1e9);
            if (spun == RB_WOKEN) return 0;
        }
    }
    if (check_peer(h, ws, writer) < 0) return -1;
    if (ws->peer_dead) return 0;
    uint64_t now = ws->timeout == 0 ? 0 : rb_now_ns();
    if (ws->timeout == 0 || (ws->deadline && now >= ws->deadline)) {
        raise_timeout(h, op, ws->timeout);
        return -1;
    }
    uint64_t until = now + SLEEP_SLICE_NS;
    if (ws->deadline && ws->deadline < until) until = ws->deadline;
    h->flags |= HANDLE_BUSY;
    Py_BEGIN_ALLOW_THREADS
    if (writer)
        rb_wait_writable(&((WriterObject *)h)->ring, until);
    else
        rb_wait_readable(&((ReaderObject *)h)->ring, until);
    Py_END_ALLOW_THREADS
    /* Still marked busy: a signal handler that closes this handle leaves the
     * unmap to us too. */
    int signalled = PyErr_CheckSignals();
    h->flags &= ~HANDLE_BUSY;
    if (h->flags & HANDLE_CLOSED) {
        /* close() ran in another thread, or in a signal handler, while we
         * slept: it left the unmap to us. */
        handle_release_if_idle(h);
        core_state *st = state_of((PyObject *)h);
        if (signalled == 0 && st)
            PyErr_Format(st->RingClosed, "%s: the handle was closed while waiting", op);
        return -1;
    }
    /* The file may have been truncated while we slept: look before touching
     * the header again (a waiting flag left set costs the peer one needless
     * wake-up call, never a lost one). */
    long long size = 0;
    int intact = file_intact(h, &size);
    if (intact) {
        if (writer)
            rb_end_wait_writable(&((WriterObject *)h)->ring);
        else
            rb_end_wait_readable(&((ReaderObject *)h)->ring);
    }
    if (signalled < 0) return -1;
    return intact ? 0 : raise_truncated(h, size);
}

static void raise_peer_died(HandleObject *h, int writer) {
    core_state *st = state_of((PyObject *)h);
    if (!st) return;
    if (writer)
        PyErr_Format(st->PeerDied,
                     "%R: the reader is gone (it died or closed) and the ring is full; a new "
                     "reader may attach and the writer can continue",
                     h->path);
    else
        PyErr_Format(st->PeerDied,
                     "%R: the writer died without close(); every message it committed has "
                     "been read",
                     h->path);
}

/* Raises the exception for a result of the C core. Returns NULL. */
static PyObject *raise_result(HandleObject *h, rb_result res, uint64_t length) {
    core_state *st = state_of((PyObject *)h);
    if (!st) return NULL;
    switch (res) {
    case RB_TOO_LARGE:
        PyErr_Format(st->MessageTooLarge, "message of %llu bytes exceeds max_message_size=%llu",
                     (unsigned long long)length,
                     (unsigned long long)(h->capacity - RB_RECORD_HEADER));
        break;
    case RB_CLOSED:
        PyErr_SetString(st->RingClosed, "the writer closed the ring and every message was read");
        break;
    case RB_CORRUPT:
        PyErr_Format(st->InvalidRing, "%R: %s", h->path, rb_invalid_reason(RB_INVALID_RECORD));
        break;
    default:
        PyErr_Format(PyExc_SystemError, "unexpected ring result %d", (int)res);
    }
    return NULL;
}

/* ---- slots: reserve() and pop_view() ----------------------------------
 * A slot is a piece of the mapping lent to Python as a buffer: the payload
 * of a reserved record (writable) or of the next message (read-only). While
 * it is open its handle refuses other calls (HANDLE_SLOT). The mapping
 * outlives every exported buffer: close() defers the unmap (exports). */

/* "release", interned once (module exec): memoryview.release per slot. */
static PyObject *str_release;

typedef struct {
    PyObject_HEAD
    HandleObject *owner; /* strong reference */
    uint8_t *payload;    /* inside owner's mapping */
    Py_ssize_t size;     /* bytes reserved, or the message's length */
    Py_ssize_t exports;  /* buffers currently exported by this slot */
    PyObject *view;      /* the memoryview __enter__ returned, or NULL */
    int writer;          /* 1: a reservation (writable); 0: a message view (read-only) */
    int open;            /* 1 until committed, discarded or consumed */
} SlotObject;

static int slot_getbuffer(PyObject *op, Py_buffer *view, int flags) {
    SlotObject *slot = (SlotObject *)op;
    if (!slot->open) {
        PyErr_SetString(PyExc_ValueError, "the slot is finished: its memory is back in the ring");
        return -1;
    }
    if (slot->owner->flags & (HANDLE_CLOSED | HANDLE_FORKED) || !slot->owner->map) {
        PyErr_SetString(PyExc_ValueError, "the ring handle of this slot is closed");
        return -1;
    }
    if (PyBuffer_FillInfo(view, op, slot->payload, slot->size, !slot->writer, flags) < 0)
        return -1;
    slot->exports++;
    slot->owner->exports++;
    return 0;
}

static void slot_releasebuffer(PyObject *op, Py_buffer *Py_UNUSED(view)) {
    SlotObject *slot = (SlotObject *)op;
    HandleObject *h = slot->owner;
    slot->exports--;
    if (--h->exports == 0 && (h->flags & HANDLE_CLOSED)) handle_release_if_idle(h);
}

/* Finishes an open slot: releases the memoryview handed out (derived
 * buffers, e.g. a numpy array, may outlive it: the mapping stays valid),
 * then commits `size` bytes (writer, size >= 0), discards (writer, size < 0),
 * consumes (reader, consume = 1) or leaves the message (reader, consume = 0).
 * 0, or -1 with an exception set (the slot is finished either way). */
static int slot_finish(SlotObject *slot, Py_ssize_t size, int consume) {
    if (!slot->open) {
        PyErr_SetString(PyExc_ValueError, "the slot is already finished");
        return -1;
    }
    if (slot->view) {
        PyObject *r = PyObject_CallMethodNoArgs(slot->view, str_release);
        if (r)
            Py_DECREF(r);
        else
            PyErr_Clear(); /* BufferError: a derived buffer still exists; harmless */
        Py_CLEAR(slot->view);
    }
    slot->open = 0;
    HandleObject *h = slot->owner;
    h->flags &= ~HANDLE_SLOT;
    if (h->flags & (HANDLE_CLOSED | HANDLE_FORKED)) {
        if (!(slot->writer && size >= 0)) return 0;
        handle_unusable(h, "RingWriter");
        return -1;
    }
    if (slot->writer && size >= 0)
        rb_commit(&((WriterObject *)h)->ring, (uint64_t)size);
    else if (!slot->writer && consume)
        rb_consume(&((ReaderObject *)h)->ring);
    return 0;
}

static PyObject *slot_new_for(PyTypeObject *type, HandleObject *owner, void *payload,
                              uint64_t size, int writer) {
    SlotObject *slot = PyObject_GC_New(SlotObject, type);
    if (!slot) return NULL;
    slot->owner = (HandleObject *)Py_NewRef(owner);
    slot->payload = payload;
    slot->size = (Py_ssize_t)size;
    slot->exports = 0;
    slot->view = NULL;
    slot->writer = writer;
    slot->open = 1;
    owner->flags |= HANDLE_SLOT;
    PyObject_GC_Track(slot);
    return (PyObject *)slot;
}

static PyTypeObject *slot_type_of(PyObject *handle) {
    core_state *st = state_of(handle);
    return st ? st->SlotType : NULL;
}

PyDoc_STRVAR(slot_enter_doc,
"__enter__($self, /)\n--\n\n"
"Return a memoryview of the slot's bytes inside the ring (writable for a\n"
"reservation, read-only for a message). It is released when the block exits.");

static PyObject *slot_enter(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    SlotObject *slot = (SlotObject *)op;
    if (!slot->view) {
        slot->view = PyMemoryView_FromObject(op);
        if (!slot->view) return NULL;
    }
    return Py_NewRef(slot->view);
}

PyDoc_STRVAR(slot_exit_doc,
"__exit__($self, exc_type, exc, tb, /)\n--\n\n"
"A reservation is published when the block exits normally and discarded when\n"
"it raises; a message view is consumed either way.");

static PyObject *slot_exit(PyObject *op, PyObject *const *args, Py_ssize_t nargs) {
    SlotObject *slot = (SlotObject *)op;
    int failed = nargs > 0 && args[0] != Py_None;
    if (!slot->open) Py_RETURN_FALSE; /* commit() or discard() already finished it */
    if (slot_finish(slot, slot->writer ? (failed ? -1 : slot->size) : 0, 1) < 0) return NULL;
    Py_RETURN_FALSE;
}

PyDoc_STRVAR(slot_commit_doc,
"commit($self, size=None, /)\n--\n\n"
"Publish the reservation now with its first `size` bytes (all of them by\n"
"default; at most the reserved size).");

static PyObject *slot_commit(PyObject *op, PyObject *const *args, Py_ssize_t nargs) {
    SlotObject *slot = (SlotObject *)op;
    Py_ssize_t size = slot->size;
    if (!slot->writer) {
        PyErr_SetString(PyExc_TypeError, "commit() is for reserve() slots; a pop_view() slot is "
                                         "consumed when its block exits");
        return NULL;
    }
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "commit() takes at most 1 argument (%zd given)", nargs);
        return NULL;
    }
    if (nargs == 1 && args[0] != Py_None) {
        size = PyNumber_AsSsize_t(args[0], PyExc_OverflowError);
        if (size == -1 && PyErr_Occurred()) return NULL;
        if (size < 0 || size > slot->size) {
            PyErr_Format(PyExc_ValueError, "commit size must be in [0, %zd], got %zd", slot->size,
                         size);
            return NULL;
        }
    }
    if (slot_finish(slot, size, 0) < 0) return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(slot_discard_doc,
"discard($self, /)\n--\n\n"
"Give the reservation back without publishing anything (a message view:\n"
"leave the message in the ring, unread).");

static PyObject *slot_discard(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    if (slot_finish((SlotObject *)op, -1, 0) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *slot_get_size(PyObject *op, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(((SlotObject *)op)->size);
}

static PyObject *slot_get_open(PyObject *op, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(((SlotObject *)op)->open);
}

/* The slot and the memoryview __enter__ returned refer to each other (the
 * view exports the slot's buffer): a cycle that only the collector can
 * break when a block is entered and then abandoned. */
static int slot_traverse(PyObject *op, visitproc visit, void *arg) {
    SlotObject *slot = (SlotObject *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(slot->view);
    Py_VISIT(slot->owner);
    return 0;
}

static int slot_clear(PyObject *op) {
    Py_CLEAR(((SlotObject *)op)->view);
    return 0;
}

static void slot_dealloc(PyObject *op) {
    SlotObject *slot = (SlotObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    if (slot->open) {
        /* Dropped without a block: a reservation is discarded, a message stays. */
        if (slot_finish(slot, -1, 0) < 0) PyErr_WriteUnraisable(op);
    }
    Py_CLEAR(slot->view);
    Py_CLEAR(slot->owner);
    PyObject_GC_Del(op);
    Py_DECREF(tp);
}

static PyMethodDef slot_methods[] = {
    {"__enter__", slot_enter, METH_NOARGS, slot_enter_doc},
    {"__exit__", _PyCFunction_CAST(slot_exit), METH_FASTCALL, slot_exit_doc},
    {"commit", _PyCFunction_CAST(slot_commit), METH_FASTCALL, slot_commit_doc},
    {"discard", slot_discard, METH_NOARGS, slot_discard_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef slot_getset[] = {
    {"size", slot_get_size, NULL, "Bytes reserved, or the message's length.", NULL},
    {"open", slot_get_open, NULL, "True until committed, discarded or consumed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot slot_slots[] = {
    {Py_tp_doc, "A reservation (RingWriter.reserve) or a message view (RingReader.pop_view):\n"
                "use it in a with block, which gives a memoryview into the ring."},
    {Py_tp_dealloc, slot_dealloc},
    {Py_tp_methods, slot_methods},
    {Py_tp_getset, slot_getset},
    {Py_bf_getbuffer, slot_getbuffer},
    {Py_tp_traverse, slot_traverse},
    {Py_tp_clear, slot_clear},
    {Py_bf_releasebuffer, slot_releasebuffer},
    {0, NULL},
};

static PyType_Spec slot_spec = {
    .name = "ipc_ring._core.Slot",
    .basicsize = sizeof(SlotObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION |
             Py_TPFLAGS_HAVE_GC,
    .slots = slot_slots,
};

/* ---- Writer ---------------------------------------------------------- */

static int writer_init(PyObject *self, PyObject *args, PyObject *kwds) {
    return handle_init(self, args, kwds, 1);
}

/* A timeout argument the fast path may skip parsing: absent, None, or a
 * float >= 0 (NaN fails the comparison). Anything else takes the slow path,
 * which parses it properly or raises. */
static inline int timeout_trivially_valid(PyObject *t) {
    return t == NULL || t == Py_None || (PyFloat_CheckExact(t) && PyFloat_AS_DOUBLE(t) >= 0.0);
}

/* Pointer and length of bytes or bytearray without a buffer export: only
 * valid while the GIL is held, so only for the non-waiting fast path. */
static inline int borrow_simple_bytes(PyObject *data, const void **buf, Py_ssize_t *len) {
    if (PyBytes_CheckExact(data)) {
        *buf = PyBytes_AS_STRING(data);
        *len = PyBytes_GET_SIZE(data);
        return 1;
    }
    if (PyByteArray_CheckExact(data)) {
        *buf = PyByteArray_AS_STRING(data);
        *len = PyByteArray_GET_SIZE(data);
        return 1;
    }
    return 0;
}

/* The writer's side of waiting: PeerDied once the last wait found the
 * reader gone, else one step of handle_wait. 0 to retry, -1 with an
 * exception set. */
static int writer_wait_space(WriterObject *self, wait_state *ws, const char *op) {
    if (ws->peer_dead) {
        raise_peer_died((HandleObject *)self, 1);
        return -1;
    }
    return handle_wait((HandleObject *)self, ws, 1, op);
}

typedef struct {
    wait_state ws;
    Py_ssize_t written; /* published */
    Py_ssize_t staged;  /* copied into the ring, not yet published */
} batch_state;

/* Copies one message into the ring without publishing it (rb_stage),
 * waiting for space as `bs->ws` says; what is staged is published first
 * before any wait or error. Returns 1 when staged, 0 when the ring is full
 * and `report_full` (no exception), -1 with an exception set. The slow
 * path of push and try_push, and every message of push_many. */
static int writer_stage(WriterObject *self, PyObject *item, batch_state *bs, int report_full,
                        const char *op) {
    Py_buffer view;
    const void *buf = NULL;
    Py_ssize_t len = 0;
    int have_view = 0, ret = 1;
    if (!PyBytes_CheckExact(item) && !PyByteArray_CheckExact(item)) {
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) return -1;
        have_view = 1;
        buf = view.buf;
        len = view.len;
    }
    for (;;) {
        void *payload;
        /* bytes and bytearray are read without a buffer export, afresh on
         * every attempt: a wait releases the GIL, and another thread may
         * resize a bytearray meanwhile. */
        if (!have_view) borrow_simple_bytes(item, &buf, &len);
        rb_result res = rb_reserve(&self->ring, (uint64_t)len, &payload);
        if (RB_LIKELY(res == RB_OK)) {
            memcpy(payload, buf, (size_t)len);
            rb_stage(&self->ring, (uint64_t)len);
            bs->staged++;
            bs->ws.spun = 0;
            break;
        }
        /* Hand the reader what is staged before waiting or failing. */
        if (bs->staged) {
            rb_flush(&self->ring);
            bs->written += bs->staged;
            bs->staged = 0;
        }
        if (res != RB_FULL) {
            raise_result((HandleObject *)self, res, (uint64_t)len);
            ret = -1;
            break;
        }
        if (report_full) {
            ret = 0;
            break;
        }
        if (writer_wait_space(self, &bs->ws, op) < 0) {
            ret = -1;
            break;
        }
    }
    if (have_view) PyBuffer_Release(&view);
    return ret;
}

/* Writes one message, waiting per `timeout`: 1 if written, 0 if full and
 * `report_full`, -1 with an exception set. */
static int writer_put(WriterObject *self, PyObject *data, double timeout, int report_full,
                      const char *op) {
    batch_state bs = {{timeout, 0, 0, 0}, 0, 0};
    int ret = writer_stage(self, data, &bs, report_full, op);
    if (bs.staged) rb_flush(&self->ring);
    return ret;
}

PyDoc_STRVAR(writer_push_doc,
"push($self, data, /, timeout=None)\n--\n\n"
"Write one message: any C-contiguous bytes-like object.\n\n"
"Blocks while the ring is full: timeout=None waits forever, 0 tries once,\n"
"a positive number is a limit in seconds. Raises RingTimeout when it\n"
"expires, MessageTooLarge (before waiting) for more than max_message_size\n"
"bytes, RingClosed on a closed writer.");

static PyObject *writer_push_slow(WriterObject *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames) {
    PyObject *data, *timeout_obj;
    double timeout;
    if (unpack_timeout_args("push", args, nargs, kwnames, 1, &data, &timeout_obj) < 0)
        return NULL;
    if (parse_timeout(timeout_obj, &timeout) < 0) return NULL;
    CHECK_USABLE(self, "RingWriter");
    if (writer_put(self, data, timeout, 0, "push") < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *writer_push(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames) {
    WriterObject *self = (WriterObject *)op;
    const void *buf;
    Py_ssize_t len;
    if (RB_LIKELY((nargs == 1 || (nargs == 2 && timeout_trivially_valid(args[1]))) &&
                  kwnames == NULL && self->flags == 0 && borrow_simple_bytes(args[0], &buf, &len) &&
                  rb_try_push(&self->ring, buf, (uint64_t)len) == RB_OK))
        Py_RETURN_NONE;
    return writer_push_slow(self, args, nargs, kwnames);
}

PyDoc_STRVAR(writer_try_push_doc,
"try_push($self, data, /)\n--\n\n"
"Write one message if there is room now: True if written, False if the\n"
"ring is full. Never blocks.");

static PyObject *writer_try_push(PyObject *op, PyObject *data) {
    WriterObject *self = (WriterObject *)op;
    CHECK_USABLE(self, "RingWriter");
    const void *buf;
    Py_ssize_t len;
    if (RB_LIKELY(borrow_simple_bytes(data, &buf, &len) &&
                  rb_try_push(&self->ring, buf, (uint64_t)len) == RB_OK))
        Py_RETURN_TRUE;
    int r = writer_put(self, data, 0, 1, "try_push");
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

/* ---- Writer: batches and reservations --------------------------------- */

/* Sets `written` on the exception being raised (push_many's progress). */
static void note_written(Py_ssize_t written) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value) {
        PyObject *n = PyLong_FromSsize_t(written);
        if (!n || PyObject_SetAttrString(value, "written", n) < 0) PyErr_Clear();
        Py_XDECREF(n);
    }
    PyErr_Restore(type, value, tb);
}

PyDoc_STRVAR(writer_push_many_doc,
"push_many($self, messages, /, timeout=None)\n--\n\n"
"Write every message of an iterable of bytes-like objects, in order, and\n"
"return how many were written.\n\n"
"The write position is published, and the reader's sleep flag checked, once\n"
"per batch (or per part that fits) instead of once per message. timeout\n"
"bounds the whole call. If it raises part-way (RingTimeout, MessageTooLarge,\n"
"PeerDied, ...), the messages before the failing one are written and the\n"
"exception's `written` attribute says how many, so a retry with\n"
"messages[e.written:] neither loses nor duplicates anything.");

/* One message of push_many: 1 (stop) if the handle was closed by Python code
 * the iterable or a buffer export ran (sets *closed) or on an error. */
static int push_many_item(WriterObject *self, PyObject *item, batch_state *bs, int *closed) {
    if (self->flags & HANDLE_CLOSED) {
        *closed = 1;
        return 1;
    }
    return writer_stage(self, item, bs, 0, "push_many") < 0;
}

static PyObject *writer_push_many(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames) {
    WriterObject *self = (WriterObject *)op;
    PyObject *messages, *timeout_obj;
    double timeout;
    if (unpack_timeout_args("push_many", args, nargs, kwnames, 1, &messages, &timeout_obj) < 0)
        return NULL;
    if (parse_timeout(timeout_obj, &timeout) < 0) return NULL;
    CHECK_USABLE(self, "RingWriter");
    batch_state bs = {{timeout, 0, 0, 0}, 0, 0};
    int failed = 0;
    int closed = 0;
    /* Python code may run mid-batch (an iterator, a buffer export): it may
     * call this handle (refused) or close it (the unmap waits for us). */
    self->flags |= HANDLE_BATCH;
    if (PyList_CheckExact(messages) || PyTuple_CheckExact(messages)) {
        /* No iterator: the size is re-read every round, as such code may
         * shrink a list. */
        for (Py_ssize_t i = 0; !failed && i < PySequence_Fast_GET_SIZE(messages); i++) {
            PyObject *item = Py_NewRef(PySequence_Fast_GET_ITEM(messages, i));
            failed = push_many_item(self, item, &bs, &closed);
            Py_DECREF(item);
        }
    }
    else {
        PyObject *iter = PyObject_GetIter(messages);
        if (!iter) {
            failed = 1;
        }
        else {
            PyObject *item;
            while (!failed && (item = PyIter_Next(iter)) != NULL) {
                failed = push_many_item(self, item, &bs, &closed);
                Py_DECREF(item);
            }
            Py_DECREF(iter);
        }
    }
    self->flags &= ~HANDLE_BATCH;
    if (closed) handle_unusable((HandleObject *)self, "RingWriter");
    if (bs.staged && !(self->flags & HANDLE_CLOSED)) rb_flush(&self->ring);
    /* (closed by the iterable: close() published them) */
    bs.written += bs.staged;
    if (self->flags & HANDLE_CLOSED) handle_release_if_idle((HandleObject *)self);
    if (failed || PyErr_Occurred()) {
        note_written(bs.written);
        return NULL;
    }
    return PyLong_FromSsize_t(bs.written);
}

PyDoc_STRVAR(writer_reserve_doc,
"reserve($self, size, /, timeout=None)\n--\n\n"
"Reserve room for a message of `size` bytes and return a slot:\n\n"
"    with writer.reserve(n) as mv:   # a writable memoryview inside the ring\n"
"        mv[:] = ...                 # or numpy.frombuffer(mv, dtype)[:] = ...\n\n"
"The message is published when the block exits normally and discarded if\n"
"it raises; slot.commit(k) publishes only the first k bytes. The payload is\n"
"8-byte aligned. Waits for space like push().");

static PyObject *writer_reserve(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames) {
    WriterObject *self = (WriterObject *)op;
    PyObject *size_obj, *timeout_obj;
    double timeout;
    if (unpack_timeout_args("reserve", args, nargs, kwnames, 1, &size_obj, &timeout_obj) < 0)
        return NULL;
    if (parse_timeout(timeout_obj, &timeout) < 0) return NULL;
    Py_ssize_t size = PyNumber_AsSsize_t(size_obj, PyExc_OverflowError);
    if (size == -1 && PyErr_Occurred()) return NULL;
    if (size < 0) {
        PyErr_Format(PyExc_ValueError, "size must be >= 0, got %zd", size);
        return NULL;
    }
    CHECK_USABLE(self, "RingWriter");
    PyTypeObject *slot_type = slot_type_of(op);
    if (!slot_type) return NULL;
    wait_state ws = {timeout, 0, 0, 0};
    for (;;) {
        void *payload;
        rb_result res = rb_reserve(&self->ring, (uint64_t)size, &payload);
        if (res == RB_OK) return slot_new_for(slot_type, (HandleObject *)self, payload,
                                              (uint64_t)size, 1);
        if (res != RB_FULL) return raise_result((HandleObject *)self, res, (uint64_t)size);
        if (writer_wait_space(self, &ws, "reserve") < 0) return NULL;
    }
}

/* Marks end of stream if `end_stream` (only in the process that attached)
 * and unmaps, or leaves the unmap to a thread sleeping in this handle. */
static void writer_close_impl(WriterObject *self, int end_stream) {
    if (self->flags & HANDLE_CLOSED) return;
    int busy = self->flags & HANDLE_BUSY;
    self->flags |= HANDLE_CLOSED;
    if (!self->map) return;
    long long size = 0;
    int intact = file_intact((HandleObject *)self, &size);
    /* Not in a fork() child, nor in a file truncated under us (the store
     * would raise SIGBUS): then the reader sees PeerDied instead. */
    if (self->owner_pid == getpid() && intact) {
        /* Records a push_many() in progress has staged are complete:
         * publish them before the end of stream. */
        if (self->flags & HANDLE_BATCH) rb_flush(&self->ring);
        if (end_stream) {
            rb_writer_close(&self->ring);
            if (self->notify_tx >= 0) rb_notify_fd(self->notify_tx); /* a reader on its FIFO */
        }
    }
    if (busy && intact) rb_wake_writer(self->ring.hdr);
    handle_release_if_idle((HandleObject *)self);
}

PyDoc_STRVAR(writer_detach_doc,
"detach($self, /)\n--\n\n"
"Release the writer role without ending the stream, so that another process\n"
"continues it: RingWriter.open(path), or unpickling a copy of this handle\n"
"(how a writer is handed to a child process). Until one attaches, the reader\n"
"sees no live writer: it drains the ring, then gets PeerDied. The handle is\n"
"closed afterwards. Idempotent.");

static PyObject *writer_detach(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    writer_close_impl((WriterObject *)op, 0);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(writer_close_doc,
"close($self, /)\n--\n\n"
"End the stream: the reader drains what is left, then sees the end.\n"
"Releases the mapping and the file descriptor. Idempotent.");

static PyObject *writer_close(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    writer_close_impl((WriterObject *)op, 1);
    Py_RETURN_NONE;
}

static void writer_dealloc(PyObject *op) {
    PyTypeObject *tp = Py_TYPE(op);
    writer_close_impl((WriterObject *)op, 1);
    handle_release((HandleObject *)op);
    Py_CLEAR(((HandleObject *)op)->path);
    tp->tp_free(op);
    Py_DECREF(tp);
}

/* ---- Reader ---------------------------------------------------------- */

static int reader_init(PyObject *self, PyObject *args, PyObject *kwds) {
    return handle_init(self, args, kwds, 0);
}

/* Waits for the next message and leaves it peeked in self->ring.
 * Returns RB_OK with *payload and *length set, RB_EMPTY when timeout == 0 and
 * `report_empty` (no exception), RB_CLOSED when the stream ended and
 * `report_closed` (no exception), or RB_TIMEOUT with an exception set. */
static rb_result reader_next(ReaderObject *self, double timeout, int report_empty,
                             int report_closed, const char *op, const void **payload,
                             uint64_t *length) {
    wait_state ws = {timeout, 0, 0, 0};
    for (;;) {
        rb_result res = rb_peek(&self->ring, payload, length);
        if (RB_LIKELY(res == RB_OK)) return RB_OK;
        if (res == RB_EMPTY) {
            if (report_empty) return RB_EMPTY;
            if (ws.peer_dead) {
                raise_peer_died((HandleObject *)self, 0);
                return RB_TIMEOUT;
            }
            if (handle_wait((HandleObject *)self, &ws, 0, op) < 0) return RB_TIMEOUT;
            continue;
        }
        if (res == RB_CLOSED && report_closed) return RB_CLOSED;
        raise_result((HandleObject *)self, res, 0);
        return RB_TIMEOUT;
    }
}

/* Copies the peeked message into a new bytes object and consumes it. */
static PyObject *reader_take_bytes(ReaderObject *self, const void *payload, uint64_t length) {
    PyObject *msg = PyBytes_FromStringAndSize((const char *)payload, (Py_ssize_t)length);
    if (msg) rb_consume(&self->ring);
    return msg;
}

PyDoc_STRVAR(reader_pop_doc,
"pop($self, /, timeout=None)\n--\n\n"
"Read the next message as bytes.\n\n"
"Blocks while the ring is empty: timeout=None waits forever, 0 tries once,\n"
"a positive number is a limit in seconds. Raises RingTimeout when it\n"
"expires, RingClosed once the writer has closed and every message is read.");

static PyObject *reader_pop_slow(ReaderObject *self, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    PyObject *timeout_obj;
    double timeout;
    if (unpack_timeout_args("pop", args, nargs, kwnames, 0, NULL, &timeout_obj) < 0) return NULL;
    if (parse_timeout(timeout_obj, &timeout) < 0) return NULL;
    CHECK_USABLE(self, "RingReader");
    const void *payload;
    uint64_t length;
    if (reader_next(self, timeout, 0, 0, "pop", &payload, &length) != RB_OK) return NULL;
    return reader_take_bytes(self, payload, length);
}

static PyObject *reader_pop(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames) {
    ReaderObject *self = (ReaderObject *)op;
    const void *payload;
    uint64_t length;
    if (RB_LIKELY((nargs == 0 || (nargs == 1 && timeout_trivially_valid(args[0]))) &&
                  kwnames == NULL && self->flags == 0 &&
                  rb_peek(&self->ring, &payload, &length) == RB_OK))
        return reader_take_bytes(self, payload, length);
    return reader_pop_slow(self, args, nargs, kwnames);
}

PyDoc_STRVAR(reader_try_pop_doc,
"try_pop($self, /)\n--\n\n"
"Read the next message as bytes, or return None if the ring is empty.\n"
"Never blocks. Raises RingClosed once the writer has closed and every\n"
"message is read.");

static PyObject *reader_try_pop(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    ReaderObject *self = (ReaderObject *)op;
    CHECK_USABLE(self, "RingReader");
    const void *payload;
    uint64_t length;
    rb_result res = reader_next(self, 0, 1, 0, "try_pop", &payload, &length);
    if (res == RB_EMPTY) Py_RETURN_NONE;
    if (res != RB_OK) return NULL;
    return reader_take_bytes(self, payload, length);
}

PyDoc_STRVAR(reader_pop_into_doc,
"pop_into($self, buffer, /, timeout=None)\n--\n\n"
"Copy the next message into a writable buffer and return its length.\n\n"
"Waits like pop(). If the message is longer than the buffer, raises\n"
"ValueError and the message stays in the ring.");

static PyObject *reader_pop_into_slow(ReaderObject *self, PyObject *const *args,
                                      Py_ssize_t nargs, PyObject *kwnames);

static PyObject *reader_pop_into(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    ReaderObject *self = (ReaderObject *)op;
    const void *payload;
    uint64_t length;
    /* Fast path: a bytearray target needs no buffer export while the GIL is
     * held and nothing waits. */
    if (RB_LIKELY((nargs == 1 || (nargs == 2 && timeout_trivially_valid(args[1]))) &&
                  kwnames == NULL && self->flags == 0 && PyByteArray_CheckExact(args[0]) &&
                  rb_peek(&self->ring, &payload, &length) == RB_OK &&
                  length <= (uint64_t)PyByteArray_GET_SIZE(args[0]))) {
        memcpy(PyByteArray_AS_STRING(args[0]), payload, (size_t)length);
        rb_consume(&self->ring);
        return PyLong_FromUnsignedLongLong(length);
    }
    return reader_pop_into_slow(self, args, nargs, kwnames);
}

static PyObject *reader_pop_into_slow(ReaderObject *self, PyObject *const *args,
                                      Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *target, *timeout_obj;
    double timeout;
    if (unpack_timeout_args("pop_into", args, nargs, kwnames, 1, &target, &timeout_obj) < 0)
        return NULL;
    if (parse_timeout(timeout_obj, &timeout) < 0) return NULL;
    CHECK_USABLE(self, "RingReader");
    Py_buffer view;
    if (PyObject_GetBuffer(target, &view, PyBUF_WRITABLE) < 0) return NULL;
    PyObject *result = NULL;
    const void *payload;
    uint64_t length;
    if (reader_next(self, timeout, 0, 0, "pop_into", &payload, &length) == RB_OK) {
        if (length > (uint64_t)view.len) {
            PyErr_Format(PyExc_ValueError,
                         "message of %llu bytes does not fit in a buffer of %zd bytes",
                         (unsigned long long)length, view.len);
        }
        else {
            memcpy(view.buf, payload, (size_t)length);
            rb_consume(&self->ring);
            result = PyLong_FromUnsignedLongLong(length);
        }
    }
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(reader_pop_many_doc,
"pop_many($self, max_messages, timeout=None, max_bytes=None)\n--\n\n"
"Wait for at least one message like pop(), then return every message\n"
"available, up to max_messages and up to max_bytes of payload in total (a\n"
"first message longer than max_bytes comes alone), as a list of bytes. The\n"
"read position is published once for the batch.");

static PyObject *reader_pop_many(PyObject *op, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"max_messages", "timeout", "max_bytes", NULL};
    ReaderObject *self = (ReaderObject *)op;
    Py_ssize_t max_messages;
    PyObject *timeout_obj = Py_None, *max_bytes_obj = Py_None;
    double timeout;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|OO:pop_many", kwlist, &max_messages,
                                     &timeout_obj, &max_bytes_obj))
        return NULL;
    if (max_messages < 1) {
        PyErr_Format(PyExc_ValueError, "max_messages must be >= 1, got %zd", max_messages);
        return NULL;
    }
    Py_ssize_t max_bytes = PY_SSIZE_T_MAX;
    if (max_bytes_obj != Py_None) {
        max_bytes = PyNumber_AsSsize_t(max_bytes_obj, PyExc_OverflowError);
        if (max_bytes == -1 && PyErr_Occurred()) return NULL;
        if (max_bytes < 0) {
            PyErr_Format(PyExc_ValueError, "max_bytes must be >= 0 or None, got %zd", max_bytes);
            return NULL;
        }
    }
    if (parse_timeout(timeout_obj, &timeout) < 0) return NULL;
    CHECK_USABLE(self, "RingReader");
    const void *payload;
    uint64_t length;
    if (reader_next(self, timeout, 0, 0, "pop_many", &payload, &length) != RB_OK) return NULL;
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    uint64_t taken = 0;
    for (Py_ssize_t n = 0;;) {
        PyObject *msg = PyBytes_FromStringAndSize((const char *)payload, (Py_ssize_t)length);
        if (!msg || PyList_Append(list, msg) < 0) {
            /* Out of memory: this message stays in the ring. Return what was
             * taken (the next call raises again if memory is still short). */
            Py_XDECREF(msg);
            if (n == 0) Py_CLEAR(list);
            else PyErr_Clear();
            break;
        }
        Py_DECREF(msg);
        rb_skip(&self->ring);
        taken += length;
        if (++n >= max_messages) break;
        /* Anything but a message that fits (empty, end, corruption) ends the
         * batch; the next call reports it. */
        if (rb_peek(&self->ring, &payload, &length) != RB_OK) break;
        if (taken + length > (uint64_t)max_bytes) break;
    }
    rb_release(&self->ring);
    return list;
}

PyDoc_STRVAR(reader_pop_view_doc,
"pop_view($self, /, timeout=None)\n--\n\n"
"Wait for the next message like pop() and return a slot for it:\n\n"
"    with reader.pop_view() as mv:   # a read-only memoryview inside the ring\n"
"        process(mv)\n\n"
"No copy is made. The message is consumed when the block exits (also if it\n"
"raises); the memoryview is released then, and using it raises ValueError.");

static PyObject *reader_pop_view(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    ReaderObject *self = (ReaderObject *)op;
    PyObject *timeout_obj;
    double timeout;
    if (unpack_timeout_args("pop_view", args, nargs, kwnames, 0, NULL, &timeout_obj) < 0)
        return NULL;
    if (parse_timeout(timeout_obj, &timeout) < 0) return NULL;
    CHECK_USABLE(self, "RingReader");
    PyTypeObject *slot_type = slot_type_of(op);
    if (!slot_type) return NULL;
    const void *payload;
    uint64_t length;
    if (reader_next(self, timeout, 0, 0, "pop_view", &payload, &length) != RB_OK) return NULL;
    return slot_new_for(slot_type, (HandleObject *)self, (void *)(uintptr_t)payload, length, 0);
}

static PyObject *reader_iternext(PyObject *op) {
    ReaderObject *self = (ReaderObject *)op;
    CHECK_USABLE(self, "RingReader");
    const void *payload;
    uint64_t length;
    rb_result res = reader_next(self, TIMEOUT_FOREVER, 0, 1, "iteration", &payload, &length);
    if (res == RB_OK) return reader_take_bytes(self, payload, length);
    return NULL; /* RB_CLOSED without an exception: StopIteration */
}

static void reader_close_impl(ReaderObject *self) {
    if (self->flags & HANDLE_CLOSED) return;
    int busy = self->flags & HANDLE_BUSY;
    self->flags |= HANDLE_CLOSED;
    if (!self->map) return;
    long long size = 0;
    if (busy && file_intact((HandleObject *)self, &size)) rb_wake_reader(self->ring.hdr);
    handle_release_if_idle((HandleObject *)self);
}

PyDoc_STRVAR(reader_close_doc,
"close($self, /)\n--\n\n"
"Detach from the ring: releases the mapping and the file descriptor.\n"
"Messages not read stay in the ring. Idempotent.");

static PyObject *reader_close(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    reader_close_impl((ReaderObject *)op);
    Py_RETURN_NONE;
}

static void reader_dealloc(PyObject *op) {
    PyTypeObject *tp = Py_TYPE(op);
    reader_close_impl((ReaderObject *)op);
    handle_release((HandleObject *)op);
    Py_CLEAR(((HandleObject *)op)->path);
    tp->tp_free(op);
    Py_DECREF(tp);
}

/* ---- properties shared by both types --------------------------------- */

static PyObject *handle_get_capacity(PyObject *op, void *Py_UNUSED(closure)) {
    HandleObject *h = (HandleObject *)op;
    if (!h->map) return handle_unusable(h, "ring handle");
    return PyLong_FromUnsignedLongLong(h->capacity);
}

static PyObject *handle_get_max_message_size(PyObject *op, void *Py_UNUSED(closure)) {
    HandleObject *h = (HandleObject *)op;
    if (!h->map) return handle_unusable(h, "ring handle");
    return PyLong_FromUnsignedLongLong(h->capacity - RB_RECORD_HEADER);
}

static PyObject *handle_get_path(PyObject *op, void *Py_UNUSED(closure)) {
    HandleObject *h = (HandleObject *)op;
    if (!h->path) Py_RETURN_NONE;
    return Py_NewRef(h->path);
}

static PyObject *handle_get_closed(PyObject *op, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(((HandleObject *)op)->flags & HANDLE_CLOSED);
}

static PyObject *handle_get_spin(PyObject *op, void *Py_UNUSED(closure)) {
    return PyFloat_FromDouble((double)((HandleObject *)op)->spin_ns / 1e9);
}

static PyObject *role_alive(HandleObject *h, rb_role role) {
    if (h->flags & (HANDLE_CLOSED | HANDLE_FORKED) || h->fd < 0)
        return handle_unusable(h, "ring handle");
    int alive = rb_role_alive(h->fd, role);
    if (alive < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(alive);
}

static PyObject *writer_get_reader_attached(PyObject *op, void *Py_UNUSED(closure)) {
    return role_alive((HandleObject *)op, RB_ROLE_READER);
}

static PyObject *reader_get_writer_alive(PyObject *op, void *Py_UNUSED(closure)) {
    return role_alive((HandleObject *)op, RB_ROLE_WRITER);
}

/* ---- waiting on a file descriptor (FORMAT.md "Waiting on a file
 * descriptor"): the primitives under fileno() and ipc_ring._async ------ */

/* 1 if `op` is a Writer, 0 if a Reader, -1 with an exception set. */
static int handle_is_writer(PyObject *op) {
    core_state *st = state_of(op);
    return st ? PyObject_TypeCheck(op, st->WriterType) : -1;
}

PyDoc_STRVAR(handle_attach_notify_doc,
"_attach_notify($self, rx, tx, /)\n--\n\n"
"Internal: take ownership of the descriptors of the own FIFO (rx) and the\n"
"peer's FIFO (tx), both open O_RDWR | O_NONBLOCK.");

static PyObject *handle_attach_notify(PyObject *op, PyObject *args) {
    HandleObject *h = (HandleObject *)op;
    int rx, tx;
    if (!PyArg_ParseTuple(args, "ii:_attach_notify", &rx, &tx)) return NULL;
    CHECK_USABLE(h, "ring handle");
    if (h->notify_rx >= 0 || h->notify_tx >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "notification FIFOs are already attached");
        return NULL;
    }
    int writer = handle_is_writer(op);
    if (writer < 0) return NULL;
    rb_header *hdr = (rb_header *)h->map;
    _Atomic uint32_t *key = writer ? &hdr->reader_waiting : &hdr->writer_waiting;
    h->notify_rx = rx;
    h->notify_tx = tx;
    /* A full table leaves the peer to notice by polling, never blocked. */
    if (rb_notify_register(key, tx) == 0) h->notify_key = key;
    Py_RETURN_NONE;
}

/* -1 with RingError set if `h` has no notification FIFOs, else 0. */
static int require_notify(HandleObject *h) {
    if (h->notify_rx >= 0) return 0;
    core_state *st = state_of((PyObject *)h);
    if (st)
        PyErr_Format(st->RingError,
                     "%R has no notification FIFOs (%U.rd and %U.wr): it was created by a version "
                     "of ipc_ring without fileno() support, or they were removed; fileno() and the "
                     "async methods need them, the blocking API works without",
                     h->path, h->path, h->path);
    return -1;
}

PyDoc_STRVAR(handle_fileno_doc,
"fileno($self, /)\n--\n\n"
"A file descriptor that becomes readable when this side was armed and the\n"
"peer then published (reader: a message or end of stream; writer: free\n"
"space). For event loops; see docs/FORMAT.md, \"Waiting on a file\n"
"descriptor\". RingError if the ring has no notification FIFOs.");

static PyObject *handle_fileno(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *h = (HandleObject *)op;
    CHECK_USABLE(h, "ring handle");
    if (require_notify(h) < 0) return NULL;
    return PyLong_FromLong(h->notify_rx);
}

PyDoc_STRVAR(handle_arm_doc,
"_arm($self, /)\n--\n\n"
"Set this side's waiting flag to 2 (asleep on its FIFO), then re-check.\n"
"True: armed, wait for fileno() to become readable, then call _disarm().\n"
"False: the condition holds already (flag taken down), retry now.");

static PyObject *handle_arm(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *h = (HandleObject *)op;
    CHECK_USABLE(h, "ring handle");
    if (require_notify(h) < 0) return NULL;
    if (check_truncated(h) < 0) return NULL;
    int writer = handle_is_writer(op);
    if (writer < 0) return NULL;
    int armed = writer ? rb_arm_writable(&((WriterObject *)h)->ring)
                    : rb_arm_readable(&((ReaderObject *)h)->ring);
    return PyBool_FromLong(armed);
}

PyDoc_STRVAR(handle_disarm_doc,
"_disarm($self, /)\n--\n\n"
"Drain fileno() and take this side's waiting flag down. Idempotent; does\n"
"nothing on a closed handle or a truncated file.");

static PyObject *handle_disarm(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *h = (HandleObject *)op;
    long long size = 0;
    if (h->flags & (HANDLE_CLOSED | HANDLE_FORKED) || !h->map || h->notify_rx < 0)
        Py_RETURN_NONE;
    rb_drain_fd(h->notify_rx);
    if (!file_intact(h, &size)) Py_RETURN_NONE;
    int writer = handle_is_writer(op);
    if (writer < 0) return NULL;
    if (writer)
        rb_end_wait_writable(&((WriterObject *)h)->ring);
    else
        rb_end_wait_readable(&((ReaderObject *)h)->ring);
    Py_RETURN_NONE;
}

#define HANDLE_NOTIFY_METHODS                                                          \
    {"fileno", handle_fileno, METH_NOARGS, handle_fileno_doc},                        \
    {"_attach_notify", handle_attach_notify, METH_VARARGS, handle_attach_notify_doc}, \
    {"_arm", handle_arm, METH_NOARGS, handle_arm_doc},                                \
    {"_disarm", handle_disarm, METH_NOARGS, handle_disarm_doc},
/* ---- stats() --------------------------------------------------------- */

PyDoc_STRVAR(handle_stats_doc,
"stats($self, /)\n--\n\n"
"Return the ring's counters as a dict, read from the shared header, so\n"
"each side also sees the other's: messages_pushed, bytes_pushed,\n"
"messages_popped, bytes_popped (payload bytes), writer_full_waits,\n"
"reader_empty_waits (sleep slices of up to 50 ms on a full / empty ring),\n"
"high_water (the fullest the writer found the ring, in bytes, when it\n"
"reloaded the reader's position), plus capacity and used (bytes published\n"
"and not yet consumed). See docs/FORMAT.md \"Counters\".");

/* Reads the counters of FORMAT.md "Counters" from the header. A new dict,
 * or NULL with RingClosed / RingError / InvalidRing set. GIL held. */
static PyObject *handle_stats(HandleObject *h, int writer, const char *what) {
    if (h->flags & (HANDLE_CLOSED | HANDLE_FORKED) || !h->map) return handle_unusable(h, what);
    if (check_truncated(h) < 0) return NULL;
    rb_header *hdr = (rb_header *)h->map;
    /* Own position from the handle, the peer's from the header: the
     * difference cannot be torn by the peer moving between two loads. */
    uint64_t used;
    if (writer)
        used = ((WriterObject *)h)->ring.write_pos -
               atomic_load_explicit(&hdr->read_pos, memory_order_relaxed);
    else
        used = atomic_load_explicit(&hdr->write_pos, memory_order_relaxed) -
               ((ReaderObject *)h)->ring.read_pos;
    if (used > h->capacity) used = h->capacity; /* only a hostile peer gets here */
#define RB_LOAD(field) \
    (unsigned long long)atomic_load_explicit(&hdr->field, memory_order_relaxed)
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsK}", "capacity", (unsigned long long)h->capacity, "used",
        (unsigned long long)used, "messages_pushed", RB_LOAD(messages_pushed), "bytes_pushed",
        RB_LOAD(bytes_pushed), "messages_popped", RB_LOAD(messages_popped), "bytes_popped",
        RB_LOAD(bytes_popped), "writer_full_waits", RB_LOAD(writer_full_waits),
        "reader_empty_waits", RB_LOAD(reader_empty_waits), "high_water", RB_LOAD(high_water));
#undef RB_LOAD
}

static PyObject *writer_stats(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    return handle_stats((HandleObject *)op, 1, "RingWriter");
}

static PyObject *reader_stats(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    return handle_stats((HandleObject *)op, 0, "RingReader");
}

#define HANDLE_GETSET_ENTRIES \
    {"capacity", handle_get_capacity, NULL, "Size of the data area in bytes (a power of two).", \
     NULL}, \
    {"max_message_size", handle_get_max_message_size, NULL, \
     "Largest message that fits: capacity - 8.", NULL}, \
    {"path", handle_get_path, NULL, "The ring file's path, as given.", NULL}, \
    {"closed", handle_get_closed, NULL, "True once close() was called.", NULL}, \
    {"spin", handle_get_spin, NULL, "Seconds a blocking call busy-waits before it sleeps.", NULL},

static PyGetSetDef writer_getset[] = {
    HANDLE_GETSET_ENTRIES
    {"reader_attached", writer_get_reader_attached, NULL,
     "True while a live reader is attached (the kernel holds its lock).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyGetSetDef reader_getset[] = {
    HANDLE_GETSET_ENTRIES
    {"writer_alive", reader_get_writer_alive, NULL,
     "True while a live writer is attached (the kernel holds its lock).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

/* ---- type specs ------------------------------------------------------ */

static PyMethodDef writer_methods[] = {
    {"push", _PyCFunction_CAST(writer_push), METH_FASTCALL | METH_KEYWORDS, writer_push_doc},
    {"try_push", writer_try_push, METH_O, writer_try_push_doc},
    {"push_many", _PyCFunction_CAST(writer_push_many), METH_FASTCALL | METH_KEYWORDS,
     writer_push_many_doc},
    {"reserve", _PyCFunction_CAST(writer_reserve), METH_FASTCALL | METH_KEYWORDS,
     writer_reserve_doc},
    {"close", writer_close, METH_NOARGS, writer_close_doc},
    {"detach", writer_detach, METH_NOARGS, writer_detach_doc},
    HANDLE_NOTIFY_METHODS
    {"stats", writer_stats, METH_NOARGS, handle_stats_doc},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot writer_slots[] = {
    {Py_tp_doc, "Writer(fd, path, *, capacity=0, spin=None)\n--\n\n"
                "Low-level writer handle; use ipc_ring.RingWriter."},
    {Py_tp_new, handle_new},
    {Py_tp_init, writer_init},
    {Py_tp_dealloc, writer_dealloc},
    {Py_tp_methods, writer_methods},
    {Py_tp_getset, writer_getset},
    {0, NULL},
};

static PyType_Spec writer_spec = {
    .name = "ipc_ring._core.Writer",
    .basicsize = sizeof(WriterObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = writer_slots,
};

static PyMethodDef reader_methods[] = {
    {"pop", _PyCFunction_CAST(reader_pop), METH_FASTCALL | METH_KEYWORDS, reader_pop_doc},
    {"try_pop", reader_try_pop, METH_NOARGS, reader_try_pop_doc},
    {"pop_many", _PyCFunction_CAST(reader_pop_many), METH_VARARGS | METH_KEYWORDS,
     reader_pop_many_doc},
    {"pop_view", _PyCFunction_CAST(reader_pop_view), METH_FASTCALL | METH_KEYWORDS,
     reader_pop_view_doc},
    {"pop_into", _PyCFunction_CAST(reader_pop_into), METH_FASTCALL | METH_KEYWORDS,
     reader_pop_into_doc},
    {"close", reader_close, METH_NOARGS, reader_close_doc},
    HANDLE_NOTIFY_METHODS
    {"stats", reader_stats, METH_NOARGS, handle_stats_doc},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot reader_slots[] = {
    {Py_tp_doc, "Reader(fd, path, *, spin=None)\n--\n\n"
                "Low-level reader handle; use ipc_ring.RingReader."},
    {Py_tp_new, handle_new},
    {Py_tp_init, reader_init},
    {Py_tp_dealloc, reader_dealloc},
    {Py_tp_methods, reader_methods},
    {Py_tp_getset, reader_getset},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, reader_iternext},
    {0, NULL},
};

static PyType_Spec reader_spec = {
    .name = "ipc_ring._core.Reader",
    .basicsize = sizeof(ReaderObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = reader_slots,
};

/* ---- module ---------------------------------------------------------- */

PyDoc_STRVAR(capacity_valid_doc,
"capacity_valid($module, capacity, /)\n--\n\n"
"True if capacity is a power of two in [64, 2**32].");

static PyObject *core_capacity_valid(PyObject *Py_UNUSED(module), PyObject *arg) {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (v == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(!overflow && v > 0 && rb_capacity_valid((uint64_t)v));
}

static PyMethodDef core_methods[] = {
    {"capacity_valid", core_capacity_valid, METH_O, capacity_valid_doc},
    {NULL, NULL, 0, NULL},
};

/* Creates an exception class `ipc_ring.<name>` with the given bases and adds it. */
static PyObject *add_exception(PyObject *module, const char *name, const char *doc,
                               PyObject *bases) {
    char qualname[64];
    PyOS_snprintf(qualname, sizeof qualname, "ipc_ring.%s", name);
    PyObject *exc = PyErr_NewExceptionWithDoc(qualname, doc, bases, NULL);
    if (!exc) return NULL;
    if (PyModule_AddObjectRef(module, name, exc) < 0) {
        Py_DECREF(exc);
        return NULL;
    }
    return exc;
}

static int atfork_registered;

static int core_exec(PyObject *module) {
    core_state *st = get_state(module);
    PyObject *bases;

    st->RingError = add_exception(module, "RingError",
                                  "Base class of every ipc_ring error.", NULL);
    if (!st->RingError) return -1;

    bases = PyTuple_Pack(2, st->RingError, PyExc_TimeoutError);
    if (!bases) return -1;
    st->RingTimeout = add_exception(module, "RingTimeout", "A push or pop timed out.", bases);
    Py_DECREF(bases);
    if (!st->RingTimeout) return -1;

    bases = PyTuple_Pack(2, st->RingError, PyExc_ValueError);
    if (!bases) return -1;
    st->MessageTooLarge = add_exception(module, "MessageTooLarge",
                                        "A message is longer than max_message_size.", bases);
    Py_DECREF(bases);
    if (!st->MessageTooLarge) return -1;

    st->InvalidRing = add_exception(
        module, "InvalidRing", "Not a ring file, an unknown version, or corrupted contents.",
        st->RingError);
    if (!st->InvalidRing) return -1;

    bases = PyTuple_Pack(2, st->RingError, PyExc_EOFError);
    if (!bases) return -1;
    st->RingClosed = add_exception(
        module, "RingClosed",
        "The writer closed the ring and it is drained, or this handle is closed.", bases);
    Py_DECREF(bases);
    if (!st->RingClosed) return -1;

    st->PeerDied = add_exception(
        module, "PeerDied",
        "The other side is gone: the writer died without close() (raised once every message "
        "it committed is read), or the reader died while the writer waits for space.",
        st->RingError);
    if (!st->PeerDied) return -1;

    st->RingBusy = add_exception(
        module, "RingBusy", "The ring already has a live writer (or reader) of this kind.",
        st->RingError);
    if (!st->RingBusy) return -1;

    if (!str_release) {
        str_release = PyUnicode_InternFromString("release");
        if (!str_release) return -1;
    }

    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, fork_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return -1;
        }
        atfork_registered = 1;
    }

    st->WriterType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &writer_spec, NULL);
    if (!st->WriterType || PyModule_AddType(module, st->WriterType) < 0) return -1;
    st->ReaderType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &reader_spec, NULL);
    if (!st->ReaderType || PyModule_AddType(module, st->ReaderType) < 0) return -1;
    st->SlotType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &slot_spec, NULL);
    if (!st->SlotType || PyModule_AddType(module, st->SlotType) < 0) return -1;
    /* push_many() sets `written` on the exceptions it raises part-way. */
    PyObject *zero = PyLong_FromLong(0);
    if (!zero) return -1;
    int bad = PyObject_SetAttrString(st->RingTimeout, "written", zero) < 0 ||
              PyObject_SetAttrString(st->MessageTooLarge, "written", zero) < 0;
    Py_DECREF(zero);
    if (bad) return -1;

    if (PyModule_AddIntConstant(module, "DATA_OFFSET", RB_DATA_OFFSET) < 0) return -1;
    if (PyModule_AddIntConstant(module, "FORMAT_VERSION", RB_VERSION) < 0) return -1;
    if (PyModule_AddIntConstant(module, "MIN_CAPACITY", RB_MIN_CAPACITY) < 0) return -1;
    if (PyModule_AddObject(module, "MAX_CAPACITY",
                           PyLong_FromUnsignedLongLong(RB_MAX_CAPACITY)) < 0)
        return -1;
    if (PyModule_AddObject(module, "DEFAULT_SPIN", PyFloat_FromDouble(DEFAULT_SPIN_NS / 1e9)) < 0)
        return -1;
    return 0;
}

static int core_traverse(PyObject *module, visitproc visit, void *arg) {
    core_state *st = get_state(module);
    Py_VISIT(st->RingError);
    Py_VISIT(st->RingTimeout);
    Py_VISIT(st->MessageTooLarge);
    Py_VISIT(st->InvalidRing);
    Py_VISIT(st->RingClosed);
    Py_VISIT(st->RingBusy);
    Py_VISIT(st->PeerDied);
    Py_VISIT(st->WriterType);
    Py_VISIT(st->ReaderType);
    Py_VISIT(st->SlotType);
    return 0;
}

static int core_clear(PyObject *module) {
    core_state *st = get_state(module);
    Py_CLEAR(st->RingError);
    Py_CLEAR(st->RingTimeout);
    Py_CLEAR(st->MessageTooLarge);
    Py_CLEAR(st->InvalidRing);
    Py_CLEAR(st->RingClosed);
    Py_CLEAR(st->RingBusy);
    Py_CLEAR(st->PeerDied);
    Py_CLEAR(st->WriterType);
    Py_CLEAR(st->ReaderType);
    Py_CLEAR(st->SlotType);
    return 0;
}

static void core_free(void *module) { core_clear((PyObject *)module); }

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ipc_ring._core",
    .m_doc = "C core of ipc_ring: the Writer and Reader handles and the exceptions.",
    .m_size = sizeof(core_state),
    .m_methods = core_methods,
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&core_module); }
