/* ipc_ring._core: CPython glue around the C core (_ring.h, _handle.h).
 *
 * Two heap types, Writer and Reader, each owning one rb_handle; the Python
 * layer (_api.py) subclasses them and adds the file lifecycle. Everything
 * that touches the operating system is in _handle.c; this file parses
 * arguments, raises exceptions, releases the GIL to sleep and runs signal
 * handlers.
 *
 * Memory safety (FORMAT.md "Mapping", "Lifetime"): Python code can run in
 * the middle of a call (an argument's __buffer__ or __release_buffer__, the
 * garbage collector and its callbacks on an allocation, a signal handler
 * during a wait, another thread while the GIL is released), and that code
 * may close the handle or call it again. So every call that can run Python
 * code marks the handle CALL_ACTIVE for its whole length (call_begin /
 * call_end):
 *   - a second call meanwhile (re-entrant, or from another thread) raises
 *     RuntimeError;
 *   - close() gives the role up at once but leaves the unmap to call_end,
 *     and the call checks for it (call_interrupted) after every step that
 *     can run Python code, before it touches the ring again;
 *   - the steps that can run Python code come before the ring is peeked or
 *     reserved (argument exports, result lists, slot objects), or after it
 *     is finished with; in between, only C runs, with the GIL held.
 * The fast paths run no Python code at all and need no call state.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_PYSSIZET, READONLY: __weaklistoffset__ of a heap type (3.11) */

#include <math.h>
#if defined(__linux__)
#include <sys/timerfd.h>
#endif

#include "_handle.h"

#include <fcntl.h>

/* ---- module state ---------------------------------------------------- */

typedef struct {
    PyObject *RingError;
    PyObject *RingTimeout;
    PyObject *MessageTooLarge;
    PyObject *InvalidRing;
    PyObject *RingClosed;
    PyObject *PeerDied;
    PyObject *RingBusy;
    PyObject *PipePeerDied;  /* an end of ipc_ring.Pipe receiving: PeerDied and EOFError */
    PyObject *PipePeerGone;  /* ...sending: PeerDied and BrokenPipeError */
    PyObject *pipe_send_large; /* ipc_ring._pipe's send of a message of several records */
    PyObject *pipe_in_band;    /* ...recv_bytes of a message sent with out-of-band buffers */
    PyObject *pipe_loads;      /* pickle.loads */
    PyObject *closed_hook;     /* ipc_ring._async.retire: called with a watched handle that
                                * close(), abort() or detach() closed */
    PyTypeObject *WriterType;
    PyTypeObject *ReaderType;
    PyTypeObject *SlotType;
    PyTypeObject *SenderType;
} core_state;

static struct PyModuleDef core_module;

static inline core_state *get_state(PyObject *module) {
    return (core_state *)PyModule_GetState(module);
}

/* The module state of the type that defines `self`'s methods (works for
 * Python subclasses too). Only called off the fast paths. */
static core_state *state_of(PyObject *self) {
    PyObject *module = PyType_GetModuleByDef(Py_TYPE(self), &core_module);
    return module ? get_state(module) : NULL;
}

/* ---- handles --------------------------------------------------------- */

/* The glue's bits of rb_handle.flags (the core's are RB_HANDLE_DETACHED
 * and RB_HANDLE_FORKED). Any bit set takes a call off its fast path. */
enum call_flag {
    CALL_ACTIVE = RB_HANDLE_CALLER,        /* a call is running: it may be running Python code */
    CALL_SLEEPING = RB_HANDLE_CALLER << 1, /* ...and its thread sleeps without the GIL */
    SLOT_OPEN = RB_HANDLE_CALLER << 2,     /* a reserve() or pop_view() slot is open */
    HANDLE_CLOSED = RB_HANDLE_CALLER << 3, /* close() or detach() was called */
    MESSAGES_PEEKED = RB_HANDLE_CALLER << 4, /* peek_many() left messages for consume() */
};

typedef struct {
    PyObject_HEAD
    rb_handle h;        /* h.flags == 0 while the fast paths may run */
    Py_ssize_t exports; /* buffers of this handle's slots that point into the mapping */
    PyObject *path;     /* str, as given */
    int initialised;    /* __init__ has run once (it never runs again) */
    int handed_over;    /* pickled for another process: closing leaves the role vacant */
    Py_ssize_t peeked;  /* reader: messages peek_many() returned and consume() did not */
    rb_read_mark peek_mark; /* reader: where the next peek_many() reads, while peeked > 0 */
    struct SlotObject *slot; /* the open slot (borrowed), if SLOT_OPEN */
    PyObject *weakrefs; /* the asyncio glue keeps its event-loop watch by a weak reference */
    rb_copy_choice copy; /* writer: which copy the parts of long messages take */
    int recheck;         /* this call began with RB_HANDLE_UNCHECKED: see call_end */
    uint64_t recheck_pos; /* ...and the handle's own position then, */
    Py_ssize_t recheck_peeked; /* ...and `peeked` then */
} HandleObject;

static inline int is_writer(HandleObject *self) { return self->h.role == RB_ROLE_WRITER; }

static const char *kind_of(HandleObject *self) {
    return is_writer(self) ? "RingWriter" : "RingReader";
}

/* Unmaps once nothing uses the mapping any more: no call running, no
 * exported buffer. Called by close() and by the last of those. */
static void release_if_idle(HandleObject *self) {
    if ((self->h.flags & HANDLE_CLOSED) && !(self->h.flags & CALL_ACTIVE) && self->exports == 0)
        rb_handle_unmap(&self->h);
}

static PyObject *str_release;
struct SlotObject;
static void revoke_slot_view(HandleObject *self);

/* Gives the role up, leaving it in `state` (a handle handed over to
 * another process leaves it vacant whatever the call), and unmaps unless a
 * call or an export still uses the mapping. Idempotent. */
static void handle_close(HandleObject *self, rb_role_state state) {
    if (self->h.flags & HANDLE_CLOSED) return;
    int sleeping = (self->h.flags & CALL_SLEEPING) != 0;
    self->h.flags |= HANDLE_CLOSED;
    rb_handle_release(&self->h, self->handed_over ? RB_STATE_VACANT : state, sleeping);
    revoke_slot_view(self);
    /* Buffers still pointing into the mapping must not reach the ring, which
     * belongs to a successor now: they get private memory in its place. */
    if (self->exports > 0) rb_handle_detach_memory(&self->h);
    release_if_idle(self);
}

/* Raises the exception for an rb_error. Returns -1. */
static int raise_error(HandleObject *self, const rb_error *err) {
    core_state *st = state_of((PyObject *)self);
    if (!st) return -1;
    PyObject *type;
    switch (err->code) {
    case RB_INVALID:
    case RB_CORRUPT:
    case RB_TRUNCATED: type = st->InvalidRing; break;
    case RB_BUSY: type = st->RingBusy; break;
    case RB_CLOSED: type = st->RingClosed; break;
    case RB_PEER_DIED:
        type = !self->h.pipe ? st->PeerDied : is_writer(self) ? st->PipePeerGone : st->PipePeerDied;
        break;
    case RB_TIMEOUT: type = st->RingTimeout; break;
    case RB_TOO_LARGE: type = st->MessageTooLarge; break;
    case RB_BAD_ARGUMENT: type = PyExc_ValueError; break;
    case RB_ERROR: {
        PyObject *args = Py_BuildValue("(is)", err->sys_errno, err->message);
        if (args) {
            PyErr_SetObject(PyExc_OSError, args);
            Py_DECREF(args);
        }
        return -1;
    }
    default: type = PyExc_SystemError; break;
    }
    PyErr_SetString(type, err->message);
    return -1;
}

/* Raises the error of a protocol result (RB_TOO_LARGE, RB_CLOSED,
 * RB_CORRUPT). Returns -1. */
static int raise_result(HandleObject *self, rb_result res, uint64_t length) {
    rb_error err;
    rb_handle_error(&self->h, res, length, &err);
    return raise_error(self, &err);
}

/* Raises why a handle whose flags are not 0 cannot take a call: closed,
 * inherited through fork(), a call or a slot in progress. Returns -1. */
static int raise_unusable(HandleObject *self) {
    core_state *st = state_of((PyObject *)self);
    if (!st) return -1;
    const char *what = kind_of(self);
    unsigned flags = self->h.flags;
    if (flags & (HANDLE_CLOSED | RB_HANDLE_DETACHED))
        PyErr_Format(st->RingClosed, "%s is closed", what);
    else if (flags & RB_HANDLE_FORKED)
        PyErr_Format(st->RingError,
                     "this %s was inherited through fork(); only the process that opened it may "
                     "use it: open the ring again in the child",
                     what);
    else if (flags & SLOT_OPEN)
        PyErr_Format(PyExc_RuntimeError,
                     "a reserve() or pop_view() block is open on this %s: finish it first", what);
    else if ((flags & MESSAGES_PEEKED) && !(flags & CALL_ACTIVE))
        PyErr_Format(PyExc_RuntimeError,
                     "%zd messages that peek_many() returned are not consumed yet: consume() "
                     "them (or close the reader) before another read",
                     self->peeked);
    else
        PyErr_Format(PyExc_RuntimeError,
                     "a call on this %s is already in progress (in another thread, or in Python "
                     "code that call runs: a __buffer__, a garbage-collector callback, a signal "
                     "handler); a handle takes one call at a time",
                     what);
    return -1;
}

/* The file's size against the mapping: 0, or -1 with InvalidRing if it was
 * truncated (FORMAT.md "Truncation"). */
static Py_NO_INLINE int check_intact(HandleObject *self) {
    rb_error err;
    return rb_handle_check_size(&self->h, &err) == RB_OK ? 0 : raise_error(self, &err);
}

/* Where this side stands in the ring (its own copy, not the header's). */
static inline uint64_t own_position(const HandleObject *self) {
    return self->h.role == RB_ROLE_WRITER ? self->h.ring.writer.write_pos
                                          : self->h.ring.reader.read_pos;
}

/* Starts a call that can run Python code: 0, or -1 with the reason raised.
 * `allowed`: flags that do not stop this call. */
static inline int call_begin_allowing(HandleObject *self, unsigned allowed) {
    if (RB_UNLIKELY((self->h.flags & ~allowed) != 0)) {
        if ((self->h.flags & ~allowed) != RB_HANDLE_UNCHECKED) return raise_unusable(self);
        /* fileno() is armed: the application may have waited on it since. A
         * wait is where a truncation is noticed, so the size first, as after a
         * sleep (InvalidRing; the flag stays, and every later call raises). */
        if (check_intact(self) < 0) return -1;
        self->h.flags &= ~(unsigned)RB_HANDLE_UNCHECKED;
        self->recheck = 1;
        self->recheck_pos = own_position(self);
        self->recheck_peeked = self->peeked;
    }
    self->h.flags |= CALL_ACTIVE;
    return 0;
}

static inline int call_begin(HandleObject *self) { return call_begin_allowing(self, 0); }

/* After a call that began unchecked: did it take or publish nothing (an
 * argument that raised, a timeout; consume() counts as taking nothing, the
 * peek_many() before it took the messages)? Then the handle is as idle as
 * the call found it, and the next call checks again. A call that took or
 * published (moved its position, peeked messages, opened a slot) disarms
 * the check: a reader that keeps pace with its writer, zero-copy slots
 * included, must not pay a system call per message. */
static inline int took_nothing(const HandleObject *self) {
    return own_position(self) == self->recheck_pos && self->peeked == self->recheck_peeked &&
           !(self->h.flags & SLOT_OPEN);
}

/* Ends it, and unmaps if close() came meanwhile and nothing else uses the
 * mapping; re-arms the size check after a call that took nothing. */
static inline void call_end(HandleObject *self) {
    self->h.flags &= ~(unsigned)CALL_ACTIVE;
    if (RB_UNLIKELY(self->recheck)) {
        self->recheck = 0;
        if (took_nothing(self)) self->h.flags |= RB_HANDLE_UNCHECKED;
    }
    if (RB_UNLIKELY(self->h.flags & HANDLE_CLOSED)) release_if_idle(self);
}

/* After a step of a call that may have run Python code: 0 if the handle is
 * still open, -1 with RingClosed if that code closed it (the call must then
 * not touch the ring). */
static inline int call_interrupted(HandleObject *self) {
    if (RB_LIKELY(!(self->h.flags & (HANDLE_CLOSED | RB_HANDLE_FORKED)))) return 0;
    if (PyErr_Occurred()) return -1;
    core_state *st = state_of((PyObject *)self);
    if (!st) return -1;
    if (self->h.flags & HANDLE_CLOSED)
        PyErr_Format(st->RingClosed, "%s was closed during the call", kind_of(self));
    else /* that code called os.fork(): this is the child */
        raise_unusable(self);
    return -1;
}

/* The result of parsing a call's arguments inside the call (-1 with an
 * exception, or 0), then call_interrupted: converting an argument may run
 * Python code (__float__, __index__) that closes the handle. */
static inline int args_then(HandleObject *self, int parsed) {
    return parsed < 0 ? -1 : call_interrupted(self);
}

/* ---- arguments ------------------------------------------------------- */

/* Converts a timeout argument: None -> RB_FOREVER, else seconds >= 0 in
 * nanoseconds; beyond ~31 years (where the deadline would overflow) it is
 * forever too. 0 on success, -1 with ValueError/TypeError set. May run
 * Python code (__float__): call it before call_begin. */
static int parse_timeout(PyObject *obj, uint64_t *out) {
    if (obj == NULL || obj == Py_None) {
        *out = RB_FOREVER;
        return 0;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred()) return -1;
    if (isnan(t) || t < 0) {
        PyErr_Format(PyExc_ValueError, "timeout must be None or a number >= 0, got %R", obj);
        return -1;
    }
    *out = t > 1e9 ? RB_FOREVER : (uint64_t)(t * 1e9);
    if (*out == 0 && t > 0) *out = 1; /* a positive timeout waits, however short */
    return 0;
}

/* Unpacks `[first,] timeout=None` from a METH_FASTCALL|METH_KEYWORDS call:
 * `npos` (0 or 1) required positional arguments, then `timeout` by position
 * or keyword, converted. 0 on success, -1 with TypeError/ValueError set. */
static int unpack_timeout_args(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames, Py_ssize_t npos, PyObject **first,
                               uint64_t *timeout) {
    PyObject *timeout_obj = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < npos || nargs > npos + 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd or %zd positional arguments (%zd given)",
                     fname, npos, npos + 1, nargs);
        return -1;
    }
    if (npos) *first = args[0];
    if (nargs == npos + 1) timeout_obj = args[npos];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (!PyUnicode_Check(name) || PyUnicode_CompareWithASCIIString(name, "timeout") != 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname,
                         name);
            return -1;
        }
        if (timeout_obj) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument 'timeout'",
                         fname);
            return -1;
        }
        timeout_obj = args[nargs + i];
    }
    return parse_timeout(timeout_obj, timeout);
}

/* A timeout argument the fast path may skip parsing: absent, None, or a
 * float >= 0 (NaN fails the comparison). Anything else takes the slow path,
 * which parses it properly or raises. */
static inline int timeout_trivially_valid(PyObject *t) {
    return t == NULL || t == Py_None || (PyFloat_CheckExact(t) && PyFloat_AS_DOUBLE(t) >= 0.0);
}

/* The one guard of every fast path: a usable handle, no keywords, `npos`
 * positional arguments and at most a plain timeout after them. */
static inline int fast_call(HandleObject *self, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames, Py_ssize_t npos) {
    return (nargs == npos || (nargs == npos + 1 && timeout_trivially_valid(args[npos]))) &&
           kwnames == NULL && self->h.flags == 0;
}

/* Pointer and length of bytes or bytearray without a buffer export: only
 * valid while the GIL is held and no Python code runs. */
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

/* ---- waiting --------------------------------------------------------- */

/* One step of waiting for the peer (rb_wait_prepare / _sleep / _finish),
 * the GIL released for the sleep: 0 when the caller should retry its
 * operation, -1 with an exception set (RingTimeout, PeerDied, InvalidRing,
 * RingClosed if the handle was closed meanwhile, or a signal handler's). */
static int handle_wait(HandleObject *self, rb_wait_state *ws) {
    rb_error err;
    rb_result res = rb_wait_prepare(&self->h, ws, &err);
    if (res == RB_WOKEN) return 0;
    if (res != RB_OK) return raise_error(self, &err);
    self->h.flags |= CALL_SLEEPING;
    Py_BEGIN_ALLOW_THREADS
    rb_wait_sleep(&self->h, ws);
    Py_END_ALLOW_THREADS
    self->h.flags &= ~(unsigned)CALL_SLEEPING;
    /* PEP 475: run the signal handlers; an exception from one ends the call. */
    int signalled = PyErr_CheckSignals();
    if (call_interrupted(self) < 0) return -1; /* closed meanwhile: do not touch the header */
    res = rb_wait_finish(&self->h, &err);
    if (signalled < 0) return -1;
    return res == RB_OK ? 0 : raise_error(self, &err);
}

/* ---- slots: reserve() and pop_view() ----------------------------------
 * A slot is a piece of the mapping lent to Python as a buffer: the payload
 * of a reserved record (writable) or of the next message (read-only). While
 * it is open its handle refuses other calls (SLOT_OPEN). The mapping
 * outlives every exported buffer: the unmap waits for the last release. */

/* "release", interned once (module exec): memoryview.release per slot. */

typedef struct SlotObject {
    PyObject_HEAD
    HandleObject *owner; /* strong reference; NULL until the slot is filled */
    uint8_t *payload;    /* inside owner's mapping */
    Py_ssize_t size;     /* bytes reserved, or the message's length */
    PyObject *view;      /* the memoryview __enter__ returned, or NULL */
    int writer;          /* 1: a reservation (writable); 0: a message view (read-only) */
    int open;            /* 1 until committed, discarded or consumed */
} SlotObject;

/* close() of a handle with an open slot: the memoryview handed out is
 * released, so that the block's next use of it raises ValueError (it cannot
 * be while a buffer derived from it lives; such buffers are detached from
 * the ring by rb_handle_detach_memory). Keeps any exception being raised. */
static void revoke_slot_view(HandleObject *self) {
    if (!self->slot || !self->slot->view) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethodNoArgs(self->slot->view, str_release);
    Py_XDECREF(r);
    PyErr_Clear(); /* BufferError: a derived buffer still exists */
    PyErr_Restore(type, value, tb);
}

static int slot_getbuffer(PyObject *op, Py_buffer *view, int flags) {
    SlotObject *slot = (SlotObject *)op;
    if (!slot->open) {
        PyErr_SetString(PyExc_ValueError, "the slot is finished: its memory is back in the ring");
        return -1;
    }
    if (slot->owner->h.flags & (HANDLE_CLOSED | RB_HANDLE_FORKED)) {
        PyErr_SetString(PyExc_ValueError, "the ring handle of this slot is closed");
        return -1;
    }
    if (PyBuffer_FillInfo(view, op, slot->payload, slot->size, !slot->writer, flags) < 0)
        return -1;
    slot->owner->exports++;
    return 0;
}

static void slot_releasebuffer(PyObject *op, Py_buffer *Py_UNUSED(view)) {
    HandleObject *h = ((SlotObject *)op)->owner;
    if (--h->exports == 0) release_if_idle(h);
}

/* Finishes an open slot: releases the memoryview handed out (derived
 * buffers, e.g. a numpy array, may outlive it: the mapping stays valid),
 * then commits `size` bytes (writer, size >= 0), discards (writer, size < 0),
 * consumes (reader, consume = 1) or leaves the message (reader, consume = 0).
 * 0, or -1 with an exception set (the slot is finished either way). Runs no
 * Python code between its check of the handle and the ring. */
static int slot_finish(SlotObject *slot, Py_ssize_t size, int consume) {
    if (!slot->open) {
        PyErr_SetString(PyExc_ValueError, "the slot is already finished");
        return -1;
    }
    slot->open = 0;
    if (slot->view) {
        PyObject *r = PyObject_CallMethodNoArgs(slot->view, str_release);
        if (r)
            Py_DECREF(r);
        else
            PyErr_Clear(); /* BufferError: a derived buffer still exists; harmless */
        Py_CLEAR(slot->view);
    }
    HandleObject *h = slot->owner;
    h->h.flags &= ~(unsigned)SLOT_OPEN;
    h->slot = NULL;
    if (h->h.flags & (HANDLE_CLOSED | RB_HANDLE_FORKED)) {
        release_if_idle(h);
        /* Only a finish that would have touched the ring says so: a block that
         * raised, or a discard, keeps its own outcome. */
        if (size < 0 || !(slot->writer || consume)) return 0;
        core_state *st = state_of((PyObject *)h);
        if (st && !(h->h.flags & RB_HANDLE_FORKED))
            PyErr_SetString(st->RingClosed,
                            slot->writer ? "the RingWriter was closed during the reserve() "
                                           "block: nothing was published"
                                         : "the RingReader was closed during the pop_view() "
                                           "block: the message was not consumed, the next "
                                           "reader gets it again");
        else
            raise_unusable(h);
        return -1;
    }
    if (!(slot->writer ? size >= 0 : consume)) {
        /* Discarded, or the message left: the slot took and published nothing,
         * and a watched handle's application may wait next (call_end). */
        if (h->h.watched) h->h.flags |= RB_HANDLE_UNCHECKED;
        return 0;
    }
    /* fileno() armed while the slot was open: the size first (InvalidRing,
     * the ring untouched), as for a call. */
    if ((h->h.flags & RB_HANDLE_UNCHECKED) && check_intact(h) < 0) return -1;
    if (slot->writer && size >= 0)
        rb_commit(&h->h.ring.writer, (uint64_t)size);
    else if (!slot->writer && consume)
        rb_consume(&h->h.ring.reader);
    return 0;
}

/* A slot object not yet bound to a record: allocated before the ring is
 * touched, because the allocation can run the garbage collector. */
static SlotObject *slot_alloc(HandleObject *owner) {
    core_state *st = state_of((PyObject *)owner);
    if (!st) return NULL;
    SlotObject *slot = PyObject_GC_New(SlotObject, st->SlotType);
    if (!slot) return NULL;
    slot->owner = NULL;
    slot->payload = NULL;
    slot->size = 0;
    slot->view = NULL;
    slot->writer = is_writer(owner);
    slot->open = 0;
    return slot;
}

/* Binds the slot to the record at `payload`; no Python code runs. */
static PyObject *slot_bind(SlotObject *slot, HandleObject *owner, void *payload, uint64_t size) {
    slot->owner = (HandleObject *)Py_NewRef(owner);
    slot->payload = payload;
    slot->size = (Py_ssize_t)size;
    slot->open = 1;
    owner->h.flags |= SLOT_OPEN;
    owner->slot = slot;
    PyObject_GC_Track(slot);
    return (PyObject *)slot;
}

PyDoc_STRVAR(slot_enter_doc,
"__enter__($self, /)\n--\n\n"
"Return a memoryview of the slot's bytes inside the ring (writable for a\n"
"reservation, read-only for a message). It is released when the block exits.");

static PyObject *slot_enter(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    SlotObject *slot = (SlotObject *)op;
    if (!slot->view) {
        /* Allocating the view can run the collector, and its Python code may
         * finish the slot (or enter it) meanwhile. */
        PyObject *view = PyMemoryView_FromObject(op);
        if (!view) return NULL;
        if (!slot->open) {
            PyObject *r = PyObject_CallMethodNoArgs(view, str_release);
            Py_XDECREF(r);
            Py_DECREF(view);
            if (!r) return NULL;
            PyErr_SetString(PyExc_ValueError,
                            "the slot is finished: its memory is back in the ring");
            return NULL;
        }
        if (slot->view)
            Py_DECREF(view);
        else
            slot->view = view;
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
    if (slot_finish(slot, failed ? -1 : slot->size, 1) < 0) return NULL;
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
        size = PyNumber_AsSsize_t(args[0], PyExc_OverflowError); /* may run __index__ */
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

/* ---- construction, close, dealloc (both types) ------------------------ */

/* The longest spin a handle accepts, in seconds. */
#define MAX_SPIN_S 1.0

/* Converts the `capacity` keyword, which only a new ring has: an int (not a
 * bool); absent for an existing ring (0). 0 on success, -1 with
 * TypeError/ValueError set. */
static int parse_capacity(PyObject *obj, uint64_t *out) {
    *out = 0;
    if (obj == NULL) return 0;
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "capacity must be an int, got %s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow || v <= 0 || !rb_capacity_valid((uint64_t)v)) {
        PyErr_Format(PyExc_ValueError,
                     "capacity must be a power of two between %u and %llu bytes, got %R",
                     RB_MIN_CAPACITY, (unsigned long long)RB_MAX_CAPACITY, obj);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* Writer(path, *, capacity=..., mode=0o600, spin=None): creates a ring at
 * path (with capacity) or attaches to the existing one (without).
 * Reader(path, *, spin=None): attaches to the existing ring. */
static int handle_init(PyObject *op, PyObject *args, PyObject *kwds, rb_role role) {
    static char *writer_kwlist[] = {"path", "capacity", "mode", "spin", "_pipe", NULL};
    static char *reader_kwlist[] = {"path", "spin", "_pipe", NULL};
    HandleObject *self = (HandleObject *)op;
    PyObject *path, *capacity_obj = NULL, *spin_obj = Py_None, *pipe_obj = NULL;
    unsigned int mode = 0600;
    /* ipc_ring._pipe: (ring fd, own eventfd, peer's eventfd, liveness socket) */
    int fd = -1, fds[3] = {-1, -1, -1};
    if (self->initialised) {
        PyErr_SetString(PyExc_RuntimeError, "a ring handle is initialised only once");
        return -1;
    }
    self->initialised = 1;
    int parsed = role == RB_ROLE_WRITER
                     ? PyArg_ParseTupleAndKeywords(args, kwds, "U|$OIOO:Writer", writer_kwlist,
                                                   &path, &capacity_obj, &mode, &spin_obj,
                                                   &pipe_obj)
                     : PyArg_ParseTupleAndKeywords(args, kwds, "U|$OO:Reader", reader_kwlist,
                                                   &path, &spin_obj, &pipe_obj);
    if (!parsed) return -1;
    uint64_t capacity;
    if (parse_capacity(capacity_obj, &capacity) < 0) return -1;
    if (mode > 07777) {
        PyErr_Format(PyExc_ValueError, "mode must be permission bits (at most 0o7777), got %#o",
                     mode);
        return -1;
    }
    uint64_t spin_ns = RB_DEFAULT_SPIN_NS;
    if (spin_obj != Py_None) {
        double v = PyFloat_AsDouble(spin_obj);
        if (v == -1.0 && PyErr_Occurred()) return -1;
        if (!(v >= 0.0 && v <= MAX_SPIN_S)) {
            PyErr_Format(PyExc_ValueError, "spin must be a number of seconds in [0, 1], got %R",
                         spin_obj);
            return -1;
        }
        spin_ns = (uint64_t)(v * 1e9);
    }
    if (self->h.flags & HANDLE_CLOSED) { /* by Python code an argument ran */
        core_state *st = state_of(op);
        if (st) PyErr_SetString(st->RingClosed, "the handle was closed during __init__");
        return -1;
    }
    /* An exact str, so that no __repr__ of a subclass runs inside a call. */
    PyObject *name = PyUnicode_FromObject(path);
    if (!name) return -1;
    Py_XSETREF(self->path, name);
    PyObject *encoded = PyUnicode_EncodeFSDefault(name);
    if (!encoded) return -1;
    rb_options opt = {.path = PyBytes_AS_STRING(encoded), .capacity = capacity, .mode = mode,
                      .spin_ns = spin_ns};
    rb_error err;
    rb_result res;
    if (pipe_obj && !PyArg_ParseTuple(pipe_obj, "iiii:_pipe", &fd, &fds[0], &fds[1], &fds[2])) {
        Py_DECREF(encoded);
        return -1;
    }
    if (pipe_obj) {
        /* An ipc_ring.Pipe end: `fd` is an open file description of its own
         * (the role's lock goes on it); the handle keeps duplicates of it and
         * of the others, the caller closes its own. `path` only names the
         * end in messages. */
        int own[3] = {-1, -1, -1}, ring_fd = -1;
        int failed = fd < 0 || (ring_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0;
        for (int i = 0; i < 3 && !failed; i++)
            failed = fds[i] >= 0 && (own[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 0)) < 0;
        res = RB_ERROR;
        if (!failed) {
            Py_BEGIN_ALLOW_THREADS
            res = rb_handle_attach(&self->h, ring_fd, role, &opt, &err);
            Py_END_ALLOW_THREADS
        }
        Py_DECREF(encoded);
        if (res != RB_OK) {
            int e = fd < 0 ? EBADF : errno;
            for (int i = 0; i < 3; i++)
                if (own[i] >= 0) close(own[i]);
            if (ring_fd >= 0) close(ring_fd);
            if (failed) {
                errno = e;
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            return raise_error(self, &err);
        }
        rb_handle_set_notify(&self->h, own[0], own[1], 1);
        self->h.pipe_alive = own[2];
        self->h.notify_missing = NULL;
        self->h.pipe = 1;
        /* No announce: the other end of a Pipe waits for messages, not for
         * this end to attach. */
        return 0;
    }
    Py_BEGIN_ALLOW_THREADS /* file system calls; nothing else sees this handle yet */
    res = capacity ? rb_handle_create(&self->h, &opt, &err) : rb_handle_open(&self->h, role, &opt, &err);
    Py_END_ALLOW_THREADS
    Py_DECREF(encoded);
    return res == RB_OK ? 0 : raise_error(self, &err);
}

static int writer_init(PyObject *self, PyObject *args, PyObject *kwds) {
    return handle_init(self, args, kwds, RB_ROLE_WRITER);
}

static int reader_init(PyObject *self, PyObject *args, PyObject *kwds) {
    return handle_init(self, args, kwds, RB_ROLE_READER);
}

static PyObject *handle_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    HandleObject *self = (HandleObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    rb_handle_init(&self->h);
    core_state *st = state_of((PyObject *)self);
    self->h.role = st && PyType_IsSubtype(type, st->ReaderType) ? RB_ROLE_READER : RB_ROLE_WRITER;
    return (PyObject *)self;
}

/* A handle dropped without close() did not end its stream (FORMAT.md
 * "Roles and states"): say so with a ResourceWarning, and leave the role so
 * that the peer knows (a writer: stopped without an end; a reader: gone).
 * tp_finalize, so that the warning's Python code sees a live object. */
static void handle_finalize(PyObject *op) {
    HandleObject *self = (HandleObject *)op;
    if (self->h.flags & (HANDLE_CLOSED | RB_HANDLE_DETACHED | RB_HANDLE_FORKED)) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (!self->handed_over &&
        PyErr_ResourceWarning(op, 1, "unclosed %s %R: collected without close()", kind_of(self),
                              self->path) < 0)
        PyErr_WriteUnraisable(op);
    handle_close(self, is_writer(self) ? RB_STATE_FAILED : RB_STATE_CLOSED);
    PyErr_Restore(type, value, tb);
}

static void handle_dealloc(PyObject *op) {
    PyTypeObject *tp = Py_TYPE(op);
    HandleObject *self = (HandleObject *)op;
    if (PyObject_CallFinalizerFromDealloc(op) < 0) return; /* resurrected */
    if (self->weakrefs) PyObject_ClearWeakRefs(op);
    /* Nothing can use the mapping now: slots and their buffers hold a
     * reference to the handle, and so does every running call. */
    handle_close(self, is_writer(self) ? RB_STATE_FAILED : RB_STATE_CLOSED);
    rb_handle_unmap(&self->h);
    Py_CLEAR(self->path);
    tp->tp_free(op);
    Py_DECREF(tp);
}

PyDoc_STRVAR(writer_close_doc,
"close($self, /)\n--\n\n"
"End the stream: the reader drains what is left, then sees the end\n"
"(RingClosed). Releases the writer role and the file descriptors at once,\n"
"and the mapping as soon as no call and no buffer uses it. Idempotent.");

PyDoc_STRVAR(reader_close_doc,
"close($self, /)\n--\n\n"
"Detach from the ring: releases the reader role and the file descriptors at\n"
"once, and the mapping as soon as no call and no buffer uses it. Messages\n"
"not read stay in the ring for the next reader. Idempotent.");

/* close(), abort() and detach(): then an event loop that watches a dup of this
 * handle's fileno() (the asyncio glue) is told, so that it stops. Only for a
 * handle whose fileno() was called: the others pay nothing. */
static PyObject *close_as(PyObject *op, rb_role_state state) {
    HandleObject *self = (HandleObject *)op;
    int watched = self->h.watched;
    handle_close(self, state);
    core_state *st = watched ? state_of(op) : NULL;
    if (st && st->closed_hook) {
        PyObject *r = PyObject_CallOneArg(st->closed_hook, op);
        if (!r) return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

static PyObject *handle_close_method(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    return close_as(op, RB_STATE_CLOSED);
}

PyDoc_STRVAR(writer_abort_doc,
"abort($self, /)\n--\n\n"
"Stop writing without ending the stream: the reader drains every message\n"
"already written, then gets PeerDied instead of the end of the stream (what\n"
"an exception leaving a with block does). A new writer may continue the\n"
"stream (RingWriter.open). The handle is closed afterwards. Idempotent.");

static PyObject *writer_abort(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    /* Said explicitly, it stands even for a handle that was pickled: a
     * hand-over that did not happen must not leave the stream waiting. */
    ((HandleObject *)op)->handed_over = 0;
    return close_as(op, RB_STATE_FAILED);
}

PyDoc_STRVAR(handle_detach_doc,
"detach($self, /)\n--\n\n"
"Release the role for a successor without ending anything: another process\n"
"continues it with open(path), or by unpickling a copy of this handle (how a\n"
"handle is handed to a child process). Until one attaches, the other side\n"
"waits for it (within its own timeout) instead of raising PeerDied. The\n"
"handle is closed afterwards. Idempotent.");

static PyObject *handle_detach(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    return close_as(op, RB_STATE_VACANT);
}

PyDoc_STRVAR(handle_hand_over_doc,
"_hand_over($self, /)\n--\n\n"
"Internal (pickling): this handle is being handed to another process, so\n"
"closing it, or collecting it, leaves the role vacant for the successor.");

static PyObject *handle_hand_over(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    ((HandleObject *)op)->handed_over = 1;
    Py_RETURN_NONE;
}

/* ---- Writer ---------------------------------------------------------- */

typedef struct {
    rb_wait_state ws;
    Py_ssize_t written; /* published */
    Py_ssize_t staged;  /* copied into the ring, not yet published */
} batch_state;

/* Publishes what the batch has staged. Called before anything that can run
 * Python code or wait, and before an error: a record is never left staged
 * while code that may close the handle runs, so close() has nothing to
 * publish and `written` never counts a message the reader cannot see. */
static inline void batch_flush(HandleObject *self, batch_state *bs) {
    if (bs->staged) {
        /* Python code (an item's finalizer) may have closed the handle, or
         * forked: then the staged records are dropped, never published. */
        if (!(self->h.flags & (HANDLE_CLOSED | RB_HANDLE_FORKED))) {
            rb_flush(&self->h.ring.writer);
            bs->written += bs->staged;
        }
        bs->staged = 0;
    }
}

/* True if taking a buffer from `item` and releasing it runs no Python code. */
static inline int export_runs_no_python(PyObject *item) {
    return PyBytes_CheckExact(item) || PyByteArray_CheckExact(item) ||
           Py_IS_TYPE(item, &PyMemoryView_Type);
}

/* Copies one message into the ring without publishing it (rb_stage),
 * waiting for space as `bs->ws` says. Returns 1 when staged, 0 when the ring
 * is full and `report_full` (no exception), -1 with an exception set. The
 * slow path of push and try_push, and every message of push_many. Runs
 * inside a call (call_begin). */
static int writer_stage(HandleObject *self, PyObject *item, batch_state *bs, int report_full) {
    Py_buffer view;
    const void *buf = NULL;
    Py_ssize_t len = 0;
    int have_view = 0, ret = 1;
    if (!PyBytes_CheckExact(item) && !PyByteArray_CheckExact(item)) {
        if (!export_runs_no_python(item)) batch_flush(self, bs);
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) return -1;
        have_view = 1;
        buf = view.buf;
        len = view.len;
        if (call_interrupted(self) < 0) { /* its __buffer__ closed the handle */
            PyBuffer_Release(&view);
            return -1;
        }
    }
    for (;;) {
        void *payload;
        /* bytes and bytearray are read without a buffer export, afresh on
         * every attempt: a wait releases the GIL, and another thread may
         * resize a bytearray meanwhile. */
        if (!have_view) borrow_simple_bytes(item, &buf, &len);
        rb_result res = rb_reserve(&self->h.ring.writer, (uint64_t)len, &payload);
        if (RB_LIKELY(res == RB_OK)) {
            memcpy(payload, buf, (size_t)len);
            rb_stage(&self->h.ring.writer, (uint64_t)len);
            bs->staged++;
            bs->ws.spun = 0;
            break;
        }
        /* Hand the reader what is staged before waiting or failing. */
        batch_flush(self, bs);
        if (res != RB_FULL) {
            ret = raise_result(self, res, (uint64_t)len);
            break;
        }
        if (report_full) {
            rb_handle_idle(&self->h); /* fileno(): readable when room frees */
            ret = 0;
            break;
        }
        if (handle_wait(self, &bs->ws) < 0) {
            ret = -1;
            break;
        }
    }
    if (have_view) {
        /* __release_buffer__ may run Python code: publish first. */
        if (!export_runs_no_python(item)) batch_flush(self, bs);
        PyBuffer_Release(&view);
    }
    return ret;
}

/* Writes one message, waiting up to `timeout`: 1 if written, 0 if full and
 * `report_full`, -1 with an exception set. */
static int writer_put(HandleObject *self, PyObject *data, uint64_t timeout, int report_full,
                      const char *op) {
    batch_state bs = {.written = 0, .staged = 0};
    rb_wait_init(&bs.ws, timeout, op);
    int ret = writer_stage(self, data, &bs, report_full);
    batch_flush(self, &bs);
    return ret;
}

PyDoc_STRVAR(writer_push_doc,
"push($self, data, /, timeout=None)\n--\n\n"
"Write one message: any C-contiguous bytes-like object.\n\n"
"Blocks while the ring is full: timeout=None waits forever, 0 tries once,\n"
"a positive number is a limit in seconds. Raises RingTimeout when it\n"
"expires, MessageTooLarge (before waiting) for more than max_message_size\n"
"bytes, RingClosed on a closed writer.");

static Py_NO_INLINE PyObject *writer_push_slow(HandleObject *self, PyObject *const *args,
                                                Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *data;
    uint64_t timeout;
    if (call_begin(self) < 0) return NULL;
    int r = args_then(self, unpack_timeout_args("push", args, nargs, kwnames, 1, &data, &timeout));
    if (r == 0) r = writer_put(self, data, timeout, 0, "push");
    call_end(self);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *writer_push(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames) {
    HandleObject *self = (HandleObject *)op;
    const void *buf;
    Py_ssize_t len;
    if (RB_LIKELY(fast_call(self, args, nargs, kwnames, 1) &&
                  borrow_simple_bytes(args[0], &buf, &len) &&
                  rb_try_push(&self->h.ring.writer, buf, (uint64_t)len) == RB_OK))
        Py_RETURN_NONE;
    return writer_push_slow(self, args, nargs, kwnames);
}

PyDoc_STRVAR(writer_try_push_doc,
"try_push($self, data, /)\n--\n\n"
"Write one message if there is room now: True if written, False if the\n"
"ring is full. Never blocks.");

static Py_NO_INLINE PyObject *writer_try_push_slow(HandleObject *self, PyObject *data) {
    if (call_begin(self) < 0) return NULL;
    int r = writer_put(self, data, 0, 1, "try_push");
    call_end(self);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

static PyObject *writer_try_push(PyObject *op, PyObject *data) {
    HandleObject *self = (HandleObject *)op;
    const void *buf;
    Py_ssize_t len;
    if (RB_LIKELY(self->h.flags == 0 && borrow_simple_bytes(data, &buf, &len) &&
                  rb_try_push(&self->h.ring.writer, buf, (uint64_t)len) == RB_OK))
        Py_RETURN_TRUE;
    return writer_try_push_slow(self, data);
}

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
"per batch (or per part that fits) instead of once per message, for a list\n"
"or tuple of bytes, bytearray or memoryview objects; other iterables and\n"
"objects publish before running their Python code. timeout bounds the\n"
"whole call. If it raises part-way (RingTimeout, MessageTooLarge, PeerDied,\n"
"...), the messages before the failing one are written and the exception's\n"
"`written` attribute says how many, so a retry with messages[e.written:]\n"
"neither loses nor duplicates anything.");

static PyObject *writer_push_many(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames) {
    HandleObject *self = (HandleObject *)op;
    PyObject *messages;
    uint64_t timeout;
    if (call_begin(self) < 0) {
        note_written(0);
        return NULL;
    }
    if (args_then(self, unpack_timeout_args("push_many", args, nargs, kwnames, 1, &messages,
                                            &timeout)) < 0) {
        call_end(self);
        note_written(0);
        return NULL;
    }
    batch_state bs = {.written = 0, .staged = 0};
    rb_wait_init(&bs.ws, timeout, "push_many");
    int failed = 0;
    if (PyList_CheckExact(messages) || PyTuple_CheckExact(messages)) {
        /* No iterator; the size is re-read every round, as Python code an
         * item runs may shrink a list (it publishes first, see writer_stage). */
        for (Py_ssize_t i = 0; !failed && i < PySequence_Fast_GET_SIZE(messages); i++) {
            PyObject *item = Py_NewRef(PySequence_Fast_GET_ITEM(messages, i));
            failed = call_interrupted(self) < 0 || writer_stage(self, item, &bs, 0) < 0;
            if (!export_runs_no_python(item)) batch_flush(self, &bs); /* its __del__ may run */
            Py_DECREF(item);
        }
    }
    else {
        PyObject *iter = PyObject_GetIter(messages);
        if (!iter) failed = 1;
        while (!failed) {
            batch_flush(self, &bs); /* the iterator runs Python code */
            PyObject *item = PyIter_Next(iter);
            if (!item) {
                failed = PyErr_Occurred() != NULL;
                break;
            }
            failed = call_interrupted(self) < 0 || writer_stage(self, item, &bs, 0) < 0;
            batch_flush(self, &bs);
            Py_DECREF(item);
        }
        Py_XDECREF(iter);
    }
    if (!(self->h.flags & HANDLE_CLOSED)) batch_flush(self, &bs);
    call_end(self);
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
    HandleObject *self = (HandleObject *)op;
    PyObject *size_obj;
    uint64_t timeout;
    Py_ssize_t size = -1;
    if (call_begin(self) < 0) return NULL;
    PyObject *result = NULL;
    SlotObject *slot = NULL;
    if (unpack_timeout_args("reserve", args, nargs, kwnames, 1, &size_obj, &timeout) == 0) {
        size = PyNumber_AsSsize_t(size_obj, PyExc_OverflowError); /* may run __index__ */
        if (size < 0 && !PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "size must be >= 0, got %zd", size);
    }
    if (size >= 0 && call_interrupted(self) == 0)
        slot = slot_alloc(self); /* may run the collector */
    if (slot && call_interrupted(self) == 0) {
        rb_wait_state ws;
        rb_wait_init(&ws, timeout, "reserve");
        for (;;) {
            void *payload;
            rb_result res = rb_reserve(&self->h.ring.writer, (uint64_t)size, &payload);
            if (res == RB_OK) {
                result = slot_bind(slot, self, payload, (uint64_t)size);
                slot = NULL;
                break;
            }
            if (res != RB_FULL) {
                raise_result(self, res, (uint64_t)size);
                break;
            }
            if (handle_wait(self, &ws) < 0) break;
        }
    }
    call_end(self);
    Py_XDECREF(slot);
    return result;
}

/* ---- Reader ---------------------------------------------------------- */

/* Waits for the next message and leaves it peeked. Returns 1 with *payload
 * and *length set, 0 when the ring is empty and `report_empty`, or on
 * RB_CLOSED when `report_closed` (no exception either way), -1 with an
 * exception set. Runs inside a call (call_begin). */
static int reader_next(HandleObject *self, uint64_t timeout, int report_empty, int report_closed,
                       const char *op, const void **payload, uint64_t *length) {
    rb_wait_state ws;
    rb_wait_init(&ws, timeout, op);
    for (;;) {
        rb_result res = rb_peek(&self->h.ring.reader, payload, length);
        if (RB_LIKELY(res == RB_OK)) return 1;
        if (res == RB_EMPTY) {
            if (report_empty) {
                rb_handle_idle(&self->h); /* fileno(): readable when a message comes */
                return 0;
            }
            if (handle_wait(self, &ws) < 0) return -1;
            continue;
        }
        if (res == RB_CLOSED && report_closed) return 0;
        return raise_result(self, res, 0);
    }
}

/* Copies the peeked message into a new bytes object and consumes it. No
 * Python code runs: a bytes object is not tracked by the collector. */
static PyObject *reader_take_bytes(HandleObject *self, const void *payload, uint64_t length) {
    PyObject *msg = PyBytes_FromStringAndSize((const char *)payload, (Py_ssize_t)length);
    if (msg) rb_consume(&self->h.ring.reader);
    return msg;
}

/* pop, try_pop and iteration, inside a call: the next message as bytes,
 * waiting up to `timeout`; None when empty and `report_empty`; NULL without
 * an exception at the end of the stream when `report_closed`. */
static PyObject *reader_get(HandleObject *self, uint64_t timeout, int report_empty,
                            int report_closed, const char *op) {
    const void *payload;
    uint64_t length;
    int r = reader_next(self, timeout, report_empty, report_closed, op, &payload, &length);
    if (r > 0) return reader_take_bytes(self, payload, length);
    if (r == 0 && report_empty) Py_RETURN_NONE;
    return NULL;
}

PyDoc_STRVAR(reader_pop_doc,
"pop($self, /, timeout=None)\n--\n\n"
"Read the next message as bytes.\n\n"
"Blocks while the ring is empty: timeout=None waits forever, 0 tries once,\n"
"a positive number is a limit in seconds. Raises RingTimeout when it\n"
"expires, RingClosed once the writer has closed and every message is read.");

static Py_NO_INLINE PyObject *reader_pop_slow(HandleObject *self, PyObject *const *args,
                                               Py_ssize_t nargs, PyObject *kwnames) {
    uint64_t timeout;
    if (call_begin(self) < 0) return NULL;
    PyObject *result = NULL;
    if (args_then(self, unpack_timeout_args("pop", args, nargs, kwnames, 0, NULL, &timeout)) == 0)
        result = reader_get(self, timeout, 0, 0, "pop");
    call_end(self);
    return result;
}

static PyObject *reader_pop(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames) {
    HandleObject *self = (HandleObject *)op;
    const void *payload;
    uint64_t length;
    if (RB_LIKELY(fast_call(self, args, nargs, kwnames, 0) &&
                  rb_peek(&self->h.ring.reader, &payload, &length) == RB_OK))
        return reader_take_bytes(self, payload, length);
    return reader_pop_slow(self, args, nargs, kwnames);
}

PyDoc_STRVAR(reader_try_pop_doc,
"try_pop($self, /)\n--\n\n"
"Read the next message as bytes, or return None if the ring is empty.\n"
"Never blocks. Raises RingClosed once the writer has closed and every\n"
"message is read.");

static Py_NO_INLINE PyObject *reader_try_pop_slow(HandleObject *self) {
    if (call_begin(self) < 0) return NULL;
    PyObject *result = reader_get(self, 0, 1, 0, "try_pop");
    call_end(self);
    return result;
}

static PyObject *reader_try_pop(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *self = (HandleObject *)op;
    const void *payload;
    uint64_t length;
    if (RB_LIKELY(self->h.flags == 0 && rb_peek(&self->h.ring.reader, &payload, &length) == RB_OK))
        return reader_take_bytes(self, payload, length);
    return reader_try_pop_slow(self);
}

static PyObject *reader_iternext(PyObject *op) {
    HandleObject *self = (HandleObject *)op;
    if (call_begin(self) < 0) return NULL;
    PyObject *result = reader_get(self, RB_FOREVER, 0, 1, "iteration");
    call_end(self);
    return result;
}

PyDoc_STRVAR(reader_pop_into_doc,
"pop_into($self, buffer, /, timeout=None)\n--\n\n"
"Copy the next message into a writable buffer and return its length.\n\n"
"Waits like pop(). If the message is longer than the buffer, raises\n"
"ValueError and the message stays in the ring.");

static Py_NO_INLINE PyObject *reader_pop_into_slow(HandleObject *self, PyObject *const *args,
                                                    Py_ssize_t nargs, PyObject *kwnames) {
    const void *payload;
    uint64_t length;
    PyObject *target;
    uint64_t timeout;
    if (call_begin(self) < 0) return NULL;
    PyObject *result = NULL;
    Py_buffer view;
    if (unpack_timeout_args("pop_into", args, nargs, kwnames, 1, &target, &timeout) < 0 ||
        PyObject_GetBuffer(target, &view, PyBUF_WRITABLE) < 0) { /* may run __buffer__ */
        call_end(self);
        return NULL;
    }
    if (call_interrupted(self) == 0 &&
        reader_next(self, timeout, 0, 0, "pop_into", &payload, &length) > 0) {
        if (length > (uint64_t)view.len) {
            PyErr_Format(PyExc_ValueError,
                         "message of %llu bytes does not fit in a buffer of %zd bytes",
                         (unsigned long long)length, view.len);
        }
        else {
            memcpy(view.buf, payload, (size_t)length);
            rb_consume(&self->h.ring.reader);
            result = PyLong_FromUnsignedLongLong(length);
        }
    }
    PyBuffer_Release(&view); /* may run __release_buffer__: the ring is done with */
    call_end(self);
    return result;
}

static PyObject *reader_pop_into(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    HandleObject *self = (HandleObject *)op;
    const void *payload;
    uint64_t length;
    /* Fast path: a bytearray target needs no buffer export while the GIL is
     * held and nothing waits. */
    if (RB_LIKELY(fast_call(self, args, nargs, kwnames, 1) && PyByteArray_CheckExact(args[0]) &&
                  rb_peek(&self->h.ring.reader, &payload, &length) == RB_OK &&
                  length <= (uint64_t)PyByteArray_GET_SIZE(args[0]))) {
        memcpy(PyByteArray_AS_STRING(args[0]), payload, (size_t)length);
        rb_consume(&self->h.ring.reader);
        return PyLong_FromUnsignedLongLong(length);
    }
    return reader_pop_into_slow(self, args, nargs, kwnames);
}

PyDoc_STRVAR(reader_pop_many_doc,
"pop_many($self, max_messages, timeout=None, max_bytes=None)\n--\n\n"
"Wait for at least one message like pop(), then return every message\n"
"available, up to max_messages and up to max_bytes of payload in total (a\n"
"first message longer than max_bytes comes alone), as a list of bytes. The\n"
"read position is published once for the batch. With timeout=0 it never\n"
"waits and returns [] when the ring is empty.");

PyDoc_STRVAR(reader_peek_many_doc,
"peek_many($self, max_messages, timeout=None, max_bytes=None)\n--\n\n"
"Like pop_many(), but the messages stay in the ring until consume(count)\n"
"releases them: for at-least-once processing (write them out, then consume).\n"
"Successive calls return the messages after those already peeked. Until\n"
"every peeked message is consumed, other reads raise RuntimeError; a reader\n"
"closed (or killed) before consume() leaves them to the next reader.");

/* Parses the arguments of pop_many and peek_many (which may run __index__
 * and __float__). 0, or -1 with an exception set. */
static int pop_many_args(PyObject *args, PyObject *kwds, const char *name,
                         Py_ssize_t *max_messages, uint64_t *timeout, Py_ssize_t *max_bytes) {
    static char *kwlist[] = {"max_messages", "timeout", "max_bytes", NULL};
    PyObject *timeout_obj = Py_None, *max_bytes_obj = Py_None;
    char format[32];
    PyOS_snprintf(format, sizeof format, "n|OO:%s", name);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, format, kwlist, max_messages, &timeout_obj,
                                     &max_bytes_obj))
        return -1;
    if (*max_messages < 1) {
        PyErr_Format(PyExc_ValueError, "max_messages must be >= 1, got %zd", *max_messages);
        return -1;
    }
    if (max_bytes_obj != Py_None) {
        *max_bytes = PyNumber_AsSsize_t(max_bytes_obj, PyExc_OverflowError);
        if (*max_bytes == -1 && PyErr_Occurred()) return -1;
        if (*max_bytes < 0) {
            PyErr_Format(PyExc_ValueError, "max_bytes must be >= 0 or None, got %zd", *max_bytes);
            return -1;
        }
    }
    return parse_timeout(timeout_obj, timeout);
}

/* pop_many (peek = 0) and peek_many (peek = 1): waits for one message, then
 * copies every available one up to the limits. pop_many publishes read_pos
 * once; peek_many reads ahead from its own mark and leaves read_pos alone. */
static PyObject *reader_batch(HandleObject *self, PyObject *args, PyObject *kwds, int peek) {
    const char *name = peek ? "peek_many" : "pop_many";
    Py_ssize_t max_messages, max_bytes = PY_SSIZE_T_MAX;
    uint64_t timeout;
    if (call_begin_allowing(self, peek ? MESSAGES_PEEKED : 0) < 0) return NULL;
    if (pop_many_args(args, kwds, name, &max_messages, &timeout, &max_bytes) < 0) {
        call_end(self);
        return NULL;
    }
    /* The list first: allocating it can run the collector, and with it
     * Python code that may close this handle. */
    PyObject *list = PyList_New(0);
    if (!list || call_interrupted(self) < 0) {
        Py_XDECREF(list);
        call_end(self);
        return NULL;
    }
    rb_reader *r = &self->h.ring.reader;
    rb_read_mark consumed;
    rb_mark(r, &consumed);
    if (peek && self->peeked) rb_rewind(r, &self->peek_mark);
    const void *payload;
    uint64_t length;
    int got = reader_next(self, timeout, 0, 0, name, &payload, &length);
    Py_ssize_t n = 0;
    if (got > 0) {
        /* From here to the end no Python code runs (bytes objects are not
         * tracked by the collector; growing the list only reallocates). */
        uint64_t taken = 0;
        for (;;) {
            PyObject *msg = PyBytes_FromStringAndSize((const char *)payload, (Py_ssize_t)length);
            if (!msg || PyList_Append(list, msg) < 0) {
                /* Out of memory: this message stays in the ring. Return what
                 * was taken (the next call raises again if memory is short). */
                Py_XDECREF(msg);
                if (n == 0)
                    Py_CLEAR(list);
                else
                    PyErr_Clear();
                break;
            }
            Py_DECREF(msg);
            rb_skip(r);
            taken += length;
            if (++n >= max_messages) break;
            /* Anything but a message that fits (empty, end, corruption) ends
             * the batch; the next call reports it. */
            if (rb_peek(r, &payload, &length) != RB_OK) break;
            if (taken + length > (uint64_t)max_bytes) break;
        }
    }
    else if (got < 0) {
        core_state *st = state_of((PyObject *)self);
        /* timeout=0 polls: an empty ring is an empty list (armed for fileno()). */
        if (timeout == 0 && st && PyErr_ExceptionMatches(st->RingTimeout))
            PyErr_Clear();
        else
            Py_CLEAR(list);
    }
    if (!(self->h.flags & HANDLE_CLOSED)) {
        if (peek) {
            rb_mark(r, &self->peek_mark);
            rb_rewind(r, &consumed);
            self->peeked += n;
            if (self->peeked) self->h.flags |= MESSAGES_PEEKED;
        }
        else if (n) {
            rb_release(r);
        }
    }
    call_end(self);
    return list;
}

static PyObject *reader_pop_many(PyObject *op, PyObject *args, PyObject *kwds) {
    return reader_batch((HandleObject *)op, args, kwds, 0);
}

static PyObject *reader_peek_many(PyObject *op, PyObject *args, PyObject *kwds) {
    return reader_batch((HandleObject *)op, args, kwds, 1);
}

PyDoc_STRVAR(reader_consume_doc,
"consume($self, count, /)\n--\n\n"
"Release the first `count` messages that peek_many() returned and no\n"
"consume() released yet: the read position moves past them and their space\n"
"goes back to the writer. ValueError if count is negative or more than that.");

static PyObject *reader_consume(PyObject *op, PyObject *arg) {
    HandleObject *self = (HandleObject *)op;
    if (call_begin_allowing(self, MESSAGES_PEEKED) < 0) return NULL;
    Py_ssize_t count = PyNumber_AsSsize_t(arg, PyExc_OverflowError); /* may run __index__ */
    PyObject *result = NULL;
    if (count == -1 && PyErr_Occurred()) {
    }
    else if (count < 0 || count > self->peeked) {
        PyErr_Format(PyExc_ValueError, "consume count must be in [0, %zd] (the messages peeked "
                     "and not consumed), got %zd", self->peeked, count);
    }
    else if (call_interrupted(self) == 0) {
        rb_reader *r = &self->h.ring.reader;
        Py_ssize_t done = 0;
        for (; done < count; done++) {
            const void *payload;
            uint64_t length;
            rb_result res = rb_peek(r, &payload, &length);
            if (res != RB_OK) { /* the peeked records changed under us: a hostile writer */
                raise_result(self, res == RB_CORRUPT ? res : RB_CORRUPT, 0);
                break;
            }
            rb_skip(r);
        }
        if (done) rb_release(r);
        self->peeked -= done;
        if (!self->peeked) self->h.flags &= ~(unsigned)MESSAGES_PEEKED;
        if (done == count) result = Py_NewRef(Py_None);
        /* peek_many() took these; releasing them after an empty peek_many()
         * leaves the handle idle, its check armed (call_end). */
        self->recheck_pos = own_position(self);
        self->recheck_peeked = self->peeked;
    }
    call_end(self);
    return result;
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
    HandleObject *self = (HandleObject *)op;
    uint64_t timeout;
    if (call_begin(self) < 0) return NULL;
    PyObject *result = NULL;
    SlotObject *slot = NULL;
    if (args_then(self, unpack_timeout_args("pop_view", args, nargs, kwnames, 0, NULL,
                                            &timeout)) == 0)
        slot = slot_alloc(self); /* may run the collector */
    const void *payload;
    uint64_t length;
    if (slot && call_interrupted(self) == 0 &&
        reader_next(self, timeout, 0, 0, "pop_view", &payload, &length) > 0) {
        result = slot_bind(slot, self, (void *)(uintptr_t)payload, length);
        slot = NULL;
    }
    call_end(self);
    Py_XDECREF(slot);
    return result;
}

/* ---- properties shared by both types --------------------------------- */

/* -1 with an exception if `self` was never attached. */
static int require_attached(HandleObject *self) {
    if (self->h.capacity) return 0;
    raise_unusable(self);
    return -1;
}

static PyObject *handle_get_capacity(PyObject *op, void *Py_UNUSED(closure)) {
    HandleObject *self = (HandleObject *)op;
    if (require_attached(self) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(self->h.capacity);
}

static PyObject *handle_get_max_message_size(PyObject *op, void *Py_UNUSED(closure)) {
    HandleObject *self = (HandleObject *)op;
    if (require_attached(self) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(self->h.capacity - RB_RECORD_HEADER);
}

static PyObject *handle_get_path(PyObject *op, void *Py_UNUSED(closure)) {
    HandleObject *self = (HandleObject *)op;
    if (!self->path) Py_RETURN_NONE;
    return Py_NewRef(self->path);
}

static PyObject *handle_get_closed(PyObject *op, void *Py_UNUSED(closure)) {
    return PyBool_FromLong((((HandleObject *)op)->h.flags & HANDLE_CLOSED) != 0);
}

static PyObject *handle_get_spin(PyObject *op, void *Py_UNUSED(closure)) {
    return PyFloat_FromDouble((double)((HandleObject *)op)->h.spin_ns / 1e9);
}

/* The peer_alive property: is a live process attached as the other side? */
static PyObject *handle_get_peer_alive(PyObject *op, void *Py_UNUSED(closure)) {
    HandleObject *self = (HandleObject *)op;
    if (self->h.flags & (HANDLE_CLOSED | RB_HANDLE_DETACHED | RB_HANDLE_FORKED)) {
        raise_unusable(self);
        return NULL;
    }
    int alive = rb_handle_peer_alive(&self->h);
    if (alive < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(alive);
}

/* ---- waiting on a file descriptor (FORMAT.md "Waiting on a file
 * descriptor") --------------------------------------------------------- */

/* 0 if the handle may take a call from outside a call (not closed, not
 * forked, no call of its own running), else -1 with the reason. The file's
 * size is for the caller to check before it touches the header
 * (require_intact; rb_handle_watch checks on its own). */
static int require_usable(HandleObject *self) {
    unsigned allowed = SLOT_OPEN | MESSAGES_PEEKED | RB_HANDLE_UNCHECKED;
    return (self->h.flags & ~allowed) == 0 ? 0 : raise_unusable(self);
}

/* ---- ipc_ring.Pipe ends (docs/FORMAT.md "Pipe messages") ------------- */

/* Every record of a Pipe ring starts with a frame word (u64, little-endian
 * on every platform this runs on). PIPE_WHOLE: the record is a whole message,
 * its bytes follow. Any other value is a part of a message of several
 * records, or a message with out-of-band buffers: ipc_ring._pipe reads and
 * writes those. */
#define PIPE_FRAME 8u
#define PIPE_WHOLE 3u
#define PIPE_HEAD 4u /* the first record of a message of several; high 32 bits: segments */

/* The reader of this writer's ring is attached: a send goes ahead without
 * a look at the other end. */
static inline int pipe_reader_attached(HandleObject *self) {
    return atomic_load_explicit(&self->h.ring.writer.hdr->reader_state, memory_order_relaxed) ==
           RB_STATE_ATTACHED;
}

/* Else the other end may be gone: its reader closed, or (never attached, or
 * handed over) the end closed in every process. -1 with PipePeerGone if so,
 * as a pipe's send fails at once; 0 if not. One poll while no reader is
 * attached, none once one is. */
static int pipe_check_peer(HandleObject *self) {
    uint32_t state =
        atomic_load_explicit(&self->h.ring.writer.hdr->reader_state, memory_order_acquire);
    if (state == RB_STATE_ATTACHED || state == RB_STATE_FAILED) return 0;
    if (state != RB_STATE_CLOSED && !rb_handle_pipe_peer_closed(&self->h)) return 0;
    core_state *st = state_of((PyObject *)self);
    if (st)
        PyErr_Format(st->PipePeerGone, "%U: the other end was closed%s", self->path,
                     state == RB_STATE_CLOSED ? "" : " in every process");
    return -1;
}

/* A whole message out of the ring, as bytes. An end someone watches
 * (fileno() was called: multiprocessing.connection.wait, a selector) keeps
 * its descriptor readable exactly while messages wait, as a pipe's is: the
 * receive that takes the last one re-arms it (FORMAT.md "Pipe messages"). */
static PyObject *pipe_take_bytes(HandleObject *self, const void *payload, uint64_t length) {
    PyObject *msg = PyBytes_FromStringAndSize((const char *)payload + PIPE_FRAME,
                                              (Py_ssize_t)(length - PIPE_FRAME));
    if (!msg) return NULL;
    rb_reader *r = &self->h.ring.reader;
    rb_consume(r);
    if (RB_UNLIKELY(self->h.watched) && r->read_pos == r->readable_end) rb_handle_idle(&self->h);
    return msg;
}

/* The frame word of a peeked record (0 if it is too short to have one). */
static inline uint64_t pipe_frame(const void *payload, uint64_t length) {
    uint64_t frame = 0;
    if (length >= PIPE_FRAME) memcpy(&frame, payload, sizeof frame);
    return frame;
}

static int require_pipe(HandleObject *self, const char *op) {
    if (self->h.pipe) return 0;
    PyErr_Format(PyExc_TypeError, "%s() is for the ends of ipc_ring.Pipe", op);
    return -1;
}

/* send_bytes(buf, offset=0, size=None): mp.Connection's arguments. Unpacks
 * them without converting (0, or -1 with TypeError). */
static int unpack_send_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                            PyObject **buf, PyObject **offset, PyObject **size) {
    static const char *const names[] = {"buf", "offset", "size"};
    PyObject **slots[] = {buf, offset, size};
    *buf = *offset = *size = NULL;
    if (nargs > 3) {
        PyErr_Format(PyExc_TypeError, "send_bytes() takes at most 3 arguments (%zd given)", nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) *slots[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        int found = 0;
        for (int i = 0; i < 3; i++) {
            if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, names[i]) == 0) {
                if (*slots[i]) {
                    PyErr_Format(PyExc_TypeError,
                                 "send_bytes() got multiple values for argument '%s'", names[i]);
                    return -1;
                }
                *slots[i] = args[nargs + k];
                found = 1;
            }
        }
        if (!found) {
            PyErr_Format(PyExc_TypeError, "send_bytes() got an unexpected keyword argument %R",
                         name);
            return -1;
        }
    }
    if (!*buf) {
        PyErr_SetString(PyExc_TypeError, "send_bytes() missing required argument 'buf'");
        return -1;
    }
    return 0;
}

/* Copies `len` bytes into one record framed PIPE_WHOLE, waiting for room
 * as long as it takes. 0, or -1 with an exception. Inside a call. */
static int pipe_put_whole(HandleObject *self, const char *buf, Py_ssize_t len) {
    rb_writer *w = &self->h.ring.writer;
    rb_wait_state ws;
    rb_wait_init(&ws, RB_FOREVER, "send_bytes");
    for (;;) {
        void *payload;
        rb_result res = rb_reserve(w, (uint64_t)len + PIPE_FRAME, &payload);
        if (res == RB_OK) {
            uint64_t frame = PIPE_WHOLE;
            memcpy(payload, &frame, sizeof frame);
            memcpy((char *)payload + PIPE_FRAME, buf, (size_t)len);
            rb_commit(w, (uint64_t)len + PIPE_FRAME);
            return 0;
        }
        if (res != RB_FULL) return raise_result(self, res, (uint64_t)len);
        if (handle_wait(self, &ws) < 0) return -1;
    }
}

PyDoc_STRVAR(writer_send_parts_doc,
"_send_parts($self, segments, /)\n--\n\n"
"ipc_ring.Pipe: one message of several records (docs/FORMAT.md \"Pipe\n"
"messages\"): the segments' lengths, then the segments (bytes-like objects),\n"
"a quarter of the ring per record, waiting for room as long as it takes.");

#define PIPE_PART 5u
#define PIPE_READONLY (1ULL << 63)

static PyObject *writer_send_parts(PyObject *op, PyObject *arg) {
    HandleObject *self = (HandleObject *)op;
    if (require_pipe(self, "_send_parts") < 0) return NULL;
    /* A tuple of its own: the __buffer__ of one segment cannot change the list. */
    PyObject *items = PySequence_Tuple(arg);
    if (!items) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    if (n < 1 || n > (1 << 20)) {
        Py_DECREF(items);
        PyErr_Format(PyExc_ValueError, "a message of %zd segments", n);
        return NULL;
    }
    if (call_begin(self) < 0) {
        Py_DECREF(items);
        return NULL;
    }
    Py_buffer *views = PyMem_Calloc((size_t)n, sizeof *views);
    uint64_t *lengths = PyMem_Calloc((size_t)n, sizeof *lengths);
    Py_ssize_t got = 0;
    int r = views && lengths ? 0 : (PyErr_NoMemory(), -1);
    for (; r == 0 && got < n; got++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(items, got), &views[got], PyBUF_SIMPLE) < 0) {
            r = -1;
            break;
        }
        lengths[got] = (uint64_t)views[got].len | (views[got].readonly ? PIPE_READONLY : 0);
    }
    if (r == 0) r = call_interrupted(self); /* a __buffer__ closed the handle */
    if (r == 0 && !pipe_reader_attached(self)) r = pipe_check_peer(self);
    if (r == 0) {
        rb_writer *w = &self->h.ring.writer;
        uint64_t chunk = self->h.capacity / 4 > 24 ? self->h.capacity / 4 - 16 : 8;
        uint64_t frame = PIPE_HEAD | ((uint64_t)n << 32);
        /* The stream: segment -1 is the lengths, then the segments. */
        Py_ssize_t seg = -1;
        uint64_t offset = 0, left = (uint64_t)n * 8;
        for (Py_ssize_t i = 0; i < n; i++) left += (uint64_t)views[i].len;
        rb_wait_state ws;
        rb_wait_init(&ws, RB_FOREVER, "send");
        while (left && r == 0) {
            uint64_t take = left < chunk ? left : chunk;
            void *payload;
            rb_result res = rb_reserve(w, take + PIPE_FRAME, &payload);
            if (res == RB_FULL) {
                r = handle_wait(self, &ws);
                continue;
            }
            if (res != RB_OK) {
                r = raise_result(self, res, take + PIPE_FRAME);
                break;
            }
            memcpy(payload, &frame, sizeof frame);
            char *to = (char *)payload + PIPE_FRAME;
            int timed = take >= RB_STREAM_COPY_MIN;
            int streaming = timed && rb_copy_pick(&self->copy);
            uint64_t start = timed ? rb_now_ns() : 0;
            for (uint64_t done = 0; done < take;) {
                const char *from = seg < 0 ? (const char *)lengths : (const char *)views[seg].buf;
                uint64_t size = seg < 0 ? (uint64_t)n * 8 : (uint64_t)views[seg].len;
                uint64_t k = size - offset < take - done ? size - offset : take - done;
                rb_copy_in(to + done, from + offset, (size_t)k, streaming);
                done += k;
                offset += k;
                if (offset == size) {
                    seg++;
                    offset = 0;
                }
            }
            if (timed) rb_copy_note(&self->copy, streaming, rb_now_ns() - start, take);
            rb_commit(w, take + PIPE_FRAME);
            left -= take;
            frame = PIPE_PART;
            rb_wait_init(&ws, RB_FOREVER, "send");
        }
    }
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(lengths);
    Py_DECREF(items);
    call_end(self);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(writer_send_bytes_doc,
"_send_bytes($self, /, buf, offset=0, size=None)\n--\n\n"
"ipc_ring.Pipe: Connection.send_bytes on this end's ring.");

static Py_NO_INLINE PyObject *writer_send_bytes_slow(HandleObject *self, PyObject *const *args,
                                                      Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *obj, *offset_obj, *size_obj;
    if (require_pipe(self, "send_bytes") < 0 ||
        unpack_send_args(args, nargs, kwnames, &obj, &offset_obj, &size_obj) < 0)
        return NULL;
    if (call_begin(self) < 0) return NULL;
    Py_ssize_t offset = 0, size = -1;
    int failed = 0;
    if (offset_obj) {
        offset = PyNumber_AsSsize_t(offset_obj, PyExc_OverflowError);
        failed = offset == -1 && PyErr_Occurred();
    }
    if (!failed && size_obj && size_obj != Py_None) {
        size = PyNumber_AsSsize_t(size_obj, PyExc_OverflowError);
        failed = size == -1 && PyErr_Occurred();
        if (!failed && size < 0) {
            PyErr_SetString(PyExc_ValueError, "size is negative");
            failed = 1;
        }
    }
    Py_buffer view;
    if (failed || args_then(self, PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)) < 0) {
        call_end(self);
        return NULL;
    }
    if (call_interrupted(self) < 0) { /* its __buffer__ closed the handle */
        PyBuffer_Release(&view);
        call_end(self);
        return NULL;
    }
    int r = 0, large = 0;
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "offset is negative");
        r = -1;
    }
    else if (view.len < offset) {
        PyErr_SetString(PyExc_ValueError, "buffer length < offset");
        r = -1;
    }
    else {
        if (size < 0) size = view.len - offset;
        if (view.len - offset < size) {
            PyErr_SetString(PyExc_ValueError, "buffer length < offset + size");
            r = -1;
        }
        else if (!pipe_reader_attached(self) && pipe_check_peer(self) < 0)
            r = -1;
        else if ((uint64_t)size + PIPE_FRAME > self->h.capacity - RB_RECORD_HEADER)
            large = 1;
        else
            r = pipe_put_whole(self, (const char *)view.buf + offset, size);
    }
    PyBuffer_Release(&view);
    call_end(self);
    if (r < 0) return NULL;
    if (!large) Py_RETURN_NONE;
    core_state *st = state_of((PyObject *)self);
    if (!st) return NULL;
    if (!st->pipe_send_large) {
        PyErr_SetString(PyExc_RuntimeError, "ipc_ring._pipe is not loaded");
        return NULL;
    }
    return PyObject_CallFunction(st->pipe_send_large, "OOnn", (PyObject *)self, obj, offset,
                                 size);
}

static PyObject *writer_send_bytes(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames) {
    HandleObject *self = (HandleObject *)op;
    const void *buf;
    Py_ssize_t len;
    void *payload;
    if (RB_LIKELY(nargs == 1 && kwnames == NULL && self->h.flags == 0 && self->h.pipe &&
                  borrow_simple_bytes(args[0], &buf, &len) && pipe_reader_attached(self))) {
        rb_writer *w = &self->h.ring.writer;
        if (RB_LIKELY(rb_reserve(w, (uint64_t)len + PIPE_FRAME, &payload) == RB_OK)) {
            uint64_t frame = PIPE_WHOLE;
            memcpy(payload, &frame, sizeof frame);
            memcpy((char *)payload + PIPE_FRAME, buf, (size_t)len);
            rb_commit(w, (uint64_t)len + PIPE_FRAME);
            Py_RETURN_NONE;
        }
    }
    return writer_send_bytes_slow(self, args, nargs, kwnames);
}

/* ---- ipc_ring.Pipe: Connection.send ------------------------------------
 * A Sender is the send of one attached end: a pickler kept from one send to
 * the next (protocol 5, multiprocessing's reducers), writing into the
 * Sender itself (write, _buffer), so that an object pickled into one chunk
 * without out-of-band buffers goes into the ring from here, with no Python
 * frame in between. Anything else (several chunks, out-of-band buffers, a
 * send while this one's pickling runs) goes to ipc_ring._pipe's slow send. */

typedef struct {
    PyObject_HEAD
    PyObject *writer;      /* the end's Writer */
    PyObject *tables;      /* tuple of the dicts the pickler's dispatch table is made from */
    PyObject *new_pickler; /* new_pickler(sender): a pickler writing into the sender */
    PyObject *slow;        /* slow(writer, obj, chunks, buffers); chunks None: pickle afresh */
    PyObject *dump;        /* the kept pickler's bound dump and clear_memo, or NULL */
    PyObject *clear_memo;
    PyObject *chunks;      /* list: what the pickler wrote during this dump */
    PyObject *buffers;     /* list: its out-of-band buffers */
    PyObject *snapshot;    /* list: the tables' keys and values, in order, when the pickler
                            * was made (a registration since makes it again) */
    int busy;              /* a dump is running (it may run Python code) */
} SenderObject;

/* Its fields are set (__init__ ran, and the collector has not cleared it). */
static int sender_ready(SenderObject *self) {
    if (self->chunks && self->buffers && self->writer && self->slow) return 1;
    PyErr_SetString(PyExc_TypeError, "the _Sender is not initialised");
    return 0;
}

/* A key or value of the tables differs from the snapshot taken when the
 * pickler was made (copyreg.pickle or ForkingPickler.register since, a
 * replacement or removal included), or there is no pickler yet. Pointer
 * comparisons along the tables' order: no Python code runs. */
static int sender_stale(SenderObject *self) {
    if (!self->dump || !self->snapshot) return 1;
    Py_ssize_t at = 0, end = PyList_GET_SIZE(self->snapshot);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->tables); i++) {
        PyObject *table = PyTuple_GET_ITEM(self->tables, i), *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(table, &pos, &key, &value)) {
            if (at + 2 > end || PyList_GET_ITEM(self->snapshot, at) != key ||
                PyList_GET_ITEM(self->snapshot, at + 1) != value)
                return 1;
            at += 2;
        }
    }
    return at != end;
}

static int sender_renew(SenderObject *self) {
    /* The snapshot first: a registration while new_pickler runs makes the
     * next send renew again. */
    PyObject *snapshot = PyList_New(0);
    if (!snapshot) return -1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->tables); i++) {
        PyObject *table = PyTuple_GET_ITEM(self->tables, i), *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(table, &pos, &key, &value))
            if (PyList_Append(snapshot, key) < 0 || PyList_Append(snapshot, value) < 0) {
                Py_DECREF(snapshot);
                return -1;
            }
    }
    PyObject *pickler = PyObject_CallOneArg(self->new_pickler, (PyObject *)self);
    PyObject *dump = pickler ? PyObject_GetAttrString(pickler, "dump") : NULL;
    PyObject *clear_memo = dump ? PyObject_GetAttrString(pickler, "clear_memo") : NULL;
    Py_XDECREF(pickler);
    if (!clear_memo) {
        Py_XDECREF(dump);
        Py_DECREF(snapshot);
        return -1;
    }
    Py_XSETREF(self->dump, dump);
    Py_XSETREF(self->clear_memo, clear_memo);
    Py_XSETREF(self->snapshot, snapshot);
    return 0;
}

/* Empties a list the pickler filled. */
static int list_reset(PyObject *list) {
    return PyList_GET_SIZE(list) ? PyList_SetSlice(list, 0, PY_SSIZE_T_MAX, NULL) : 0;
}

PyDoc_STRVAR(sender_send_doc,
"send($self, obj, /)\n--\n\n"
"ipc_ring.Pipe: Connection.send, obj pickled (protocol 5, multiprocessing's\n"
"reducers) into this end's ring.");

/* The writer was closed or handed over while the pickling ran (the end was
 * pickled into its own message, say): the slow send attaches again. */
static inline int sender_writer_gone(SenderObject *self) {
    return (((HandleObject *)self->writer)->h.flags & HANDLE_CLOSED) != 0;
}

static PyObject *sender_send(PyObject *op, PyObject *obj) {
    SenderObject *self = (SenderObject *)op;
    if (!sender_ready(self)) return NULL;
    if (self->busy) /* a send from this pickling (a __reduce__), or another thread's */
        return PyObject_CallFunctionObjArgs(self->slow, self->writer, obj, Py_None, Py_None,
                                            NULL);
    self->busy = 1;
    PyObject *r = NULL;
    if (sender_stale(self) && sender_renew(self) < 0) goto failed;
    if (list_reset(self->chunks) < 0 || list_reset(self->buffers) < 0) goto failed;
    r = PyObject_CallOneArg(self->dump, obj);
    /* The memo holds every object pickled: let them go now, not at the next
     * send (the dump's exception kept across the call). */
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (!r) PyErr_Fetch(&type, &value, &tb);
    PyObject *cleared = PyObject_CallNoArgs(self->clear_memo);
    if (!r) {
        if (!cleared) PyErr_Clear();
        PyErr_Restore(type, value, tb);
    }
    else if (!cleared)
        Py_CLEAR(r);
    Py_XDECREF(cleared);
    if (!r) goto failed;
    Py_DECREF(r);
    if (PyList_GET_SIZE(self->chunks) == 1 && PyList_GET_SIZE(self->buffers) == 0 &&
        !sender_writer_gone(self)) {
        PyObject *chunk = Py_NewRef(PyList_GET_ITEM(self->chunks, 0));
        int bad = list_reset(self->chunks);
        self->busy = 0;
        r = bad ? NULL : writer_send_bytes(self->writer, &chunk, 1, NULL);
        Py_DECREF(chunk);
        return r;
    }
    /* Handed over whole: the slow send may run Python code that sends again. */
    PyObject *chunks = self->chunks, *buffers = self->buffers;
    self->chunks = PyList_New(0);
    self->buffers = PyList_New(0);
    if (!self->chunks || !self->buffers) {
        Py_XSETREF(self->chunks, chunks);
        Py_XSETREF(self->buffers, buffers);
        goto failed;
    }
    self->busy = 0;
    r = PyObject_CallFunctionObjArgs(self->slow, self->writer, obj, chunks, buffers, NULL);
    Py_DECREF(chunks);
    Py_DECREF(buffers);
    return r;
failed:
    self->busy = 0;
    if (self->chunks) {
        PyObject *etype, *evalue, *etb;
        PyErr_Fetch(&etype, &evalue, &etb);
        if (list_reset(self->chunks) < 0 || list_reset(self->buffers) < 0) PyErr_Clear();
        PyErr_Restore(etype, evalue, etb);
    }
    return NULL;
}

PyDoc_STRVAR(sender_write_doc, "write($self, data, /)\n--\n\nThe kept pickler's output.");

static PyObject *sender_write(PyObject *op, PyObject *data) {
    if (!sender_ready((SenderObject *)op)) return NULL;
    /* The pickler's own buffer comes as bytes; a large bytearray (or buffer)
     * pickled in band comes as itself, and what pickles after it in the same
     * dump may change it: copied now, as a file's write would. */
    PyObject *chunk = PyBytes_CheckExact(data) ? Py_NewRef(data) : PyBytes_FromObject(data);
    if (!chunk) return NULL;
    int r = PyList_Append(((SenderObject *)op)->chunks, chunk);
    Py_DECREF(chunk);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sender_buffer_doc,
"_buffer($self, buffer, /)\n--\n\nThe kept pickler's buffer_callback.");

static PyObject *sender_buffer(PyObject *op, PyObject *buffer) {
    if (!sender_ready((SenderObject *)op)) return NULL;
    if (PyList_Append(((SenderObject *)op)->buffers, buffer) < 0) return NULL;
    Py_RETURN_NONE;
}

static int sender_init(PyObject *op, PyObject *args, PyObject *kwds) {
    SenderObject *self = (SenderObject *)op;
    PyObject *writer, *tables, *new_pickler, *slow;
    if (kwds && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "_Sender() takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OO!OO:_Sender", &writer, &PyTuple_Type, &tables, &new_pickler,
                          &slow))
        return -1;
    if (self->writer) { /* its pickler may be running: nothing of it may go */
        PyErr_SetString(PyExc_TypeError, "_Sender.__init__ runs once");
        return -1;
    }
    core_state *st = state_of(op);
    if (!st) return -1;
    if (!PyObject_TypeCheck(writer, st->WriterType)) {
        PyErr_SetString(PyExc_TypeError, "_Sender() needs a Writer");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tables); i++)
        if (!PyDict_Check(PyTuple_GET_ITEM(tables, i))) {
            PyErr_SetString(PyExc_TypeError, "_Sender() tables are dicts");
            return -1;
        }
    PyObject *chunks = PyList_New(0), *buffers = PyList_New(0);
    if (!chunks || !buffers) {
        Py_XDECREF(chunks);
        Py_XDECREF(buffers);
        return -1;
    }
    Py_XSETREF(self->writer, Py_NewRef(writer));
    Py_XSETREF(self->tables, Py_NewRef(tables));
    Py_XSETREF(self->new_pickler, Py_NewRef(new_pickler));
    Py_XSETREF(self->slow, Py_NewRef(slow));
    Py_XSETREF(self->chunks, chunks);
    Py_XSETREF(self->buffers, buffers);
    self->busy = 0;
    return 0;
}

static int sender_traverse(PyObject *op, visitproc visit, void *arg) {
    SenderObject *self = (SenderObject *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->writer);
    Py_VISIT(self->tables);
    Py_VISIT(self->new_pickler);
    Py_VISIT(self->slow);
    Py_VISIT(self->dump);
    Py_VISIT(self->clear_memo);
    Py_VISIT(self->chunks);
    Py_VISIT(self->buffers);
    Py_VISIT(self->snapshot);
    return 0;
}

static int sender_clear(PyObject *op) {
    SenderObject *self = (SenderObject *)op;
    Py_CLEAR(self->writer);
    Py_CLEAR(self->tables);
    Py_CLEAR(self->new_pickler);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->dump);
    Py_CLEAR(self->clear_memo);
    Py_CLEAR(self->chunks);
    Py_CLEAR(self->buffers);
    Py_CLEAR(self->snapshot);
    return 0;
}

static void sender_dealloc(PyObject *op) {
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    sender_clear(op);
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyMethodDef sender_methods[] = {
    {"send", sender_send, METH_O, sender_send_doc},
    {"write", sender_write, METH_O, sender_write_doc},
    {"_buffer", sender_buffer, METH_O, sender_buffer_doc},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot sender_slots[] = {
    {Py_tp_doc, "_Sender(writer, tables, new_pickler, slow, /)\n--\n\n"
                "Internal (ipc_ring._pipe): Connection.send of an attached end."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, sender_init},
    {Py_tp_dealloc, sender_dealloc},
    {Py_tp_traverse, sender_traverse},
    {Py_tp_clear, sender_clear},
    {Py_tp_methods, sender_methods},
    {0, NULL},
};

static PyType_Spec sender_spec = {
    .name = "ipc_ring._core._Sender",
    .basicsize = sizeof(SenderObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = sender_slots,
};

/* The one optional argument of recv_bytes(maxlength=None) and
 * poll(timeout=0.0), positional or by keyword: *out, or NULL if not given.
 * 0, or -1 with TypeError. */
static int one_optional_arg(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                            const char *func, const char *name, PyObject **out) {
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    *out = NULL;
    if (nargs + nkw > 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most 1 argument (%zd given)", func,
                     nargs + nkw);
        return -1;
    }
    if (nkw) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, 0);
        if (!PyUnicode_Check(key) || PyUnicode_CompareWithASCIIString(key, name) != 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", func,
                         key);
            return -1;
        }
        *out = args[0];
    }
    else if (nargs)
        *out = args[0];
    return 0;
}

/* maxlength of recv_bytes: None (-1) or an int >= 0. */
static int parse_maxlength(PyObject *obj, Py_ssize_t *out) {
    *out = -1;
    if (obj == NULL || obj == Py_None) return 0;
    Py_ssize_t v = PyNumber_AsSsize_t(obj, PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "negative maxlength");
        return -1;
    }
    *out = v;
    return 0;
}

#define PIPE_MAX_SEGMENTS (1u << 20) /* out-of-band buffers in one message, and the pickle */
#define PIPE_MAX_STREAM (1ULL << 46) /* bytes in one message */

/* A message of several records being collected (FORMAT.md "Pipe messages"). */
typedef struct {
    uint32_t nseg;
    uint64_t *lengths;   /* nseg words, the read-only bit kept */
    uint64_t got;        /* bytes of the lengths received */
    PyObject **segments; /* nseg new objects once the lengths are in, else NULL */
    uint32_t index;      /* the segment being filled */
    uint64_t filled;     /* its bytes so far */
} pipe_stream;

static void stream_free(pipe_stream *s) {
    if (s->segments)
        for (uint32_t i = 0; i < s->nseg; i++) Py_XDECREF(s->segments[i]);
    PyMem_Free(s->segments);
    PyMem_Free(s->lengths);
    memset(s, 0, sizeof *s);
}

static inline uint64_t stream_length(const pipe_stream *s, uint32_t i) {
    return s->lengths[i] & ~PIPE_READONLY;
}

/* A segment's writable bytes (bytes objects are filled before anyone else
 * sees them). */
static inline char *segment_bytes(PyObject *segment) {
    return PyBytes_CheckExact(segment) ? PyBytes_AS_STRING(segment)
                                       : PyByteArray_AS_STRING(segment);
}

static void stream_skip_empty(pipe_stream *s) {
    while (s->index < s->nseg && s->filled == stream_length(s, s->index)) {
        s->index++;
        s->filled = 0;
    }
}

/* Makes the segments once the lengths are in: the first (the pickle, or the
 * send_bytes payload) as bytes if `data_bytes`, else a bytearray; a buffer as
 * bytes if it was read-only, else a bytearray. Not zeroed: every byte is
 * written. No Python code runs (neither type is tracked by the collector). */
static int stream_make_segments(pipe_stream *s, int data_bytes) {
    uint64_t total = 0;
    for (uint32_t i = 0; i < s->nseg && total <= PIPE_MAX_STREAM; i++) {
        uint64_t n = stream_length(s, i);
        total = n > PIPE_MAX_STREAM ? n : total + n; /* no wrap: each term is checked */
    }
    if (total > PIPE_MAX_STREAM) {
        PyErr_Format(PyExc_OSError, "ipc_ring.Pipe: a message of %llu bytes",
                     (unsigned long long)total);
        return -1;
    }
    s->segments = PyMem_Calloc(s->nseg, sizeof *s->segments);
    if (!s->segments) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint32_t i = 0; i < s->nseg; i++) {
        Py_ssize_t n = (Py_ssize_t)stream_length(s, i);
        int as_bytes = i == 0 ? data_bytes : (s->lengths[i] & PIPE_READONLY) != 0;
        s->segments[i] = as_bytes ? PyBytes_FromStringAndSize(NULL, n)
                                  : PyByteArray_FromStringAndSize(NULL, n);
        if (!s->segments[i]) return -1;
    }
    stream_skip_empty(s);
    return 0;
}

/* Feeds one record's stream bytes. 0, or -1 with OSError (more bytes than
 * the lengths say, a bad length) or MemoryError. */
static int stream_feed(pipe_stream *s, const char *data, uint64_t size, int data_bytes) {
    while (size) {
        if (!s->segments) {
            uint64_t need = (uint64_t)s->nseg * 8 - s->got;
            uint64_t take = size < need ? size : need;
            memcpy((char *)s->lengths + s->got, data, (size_t)take);
            s->got += take;
            data += take;
            size -= take;
            if (s->got == (uint64_t)s->nseg * 8 && stream_make_segments(s, data_bytes) < 0)
                return -1;
            continue;
        }
        if (s->index >= s->nseg) {
            PyErr_SetString(PyExc_OSError, "ipc_ring.Pipe: a message longer than its lengths say");
            return -1;
        }
        uint64_t room = stream_length(s, s->index) - s->filled;
        uint64_t take = size < room ? size : room;
        memcpy(segment_bytes(s->segments[s->index]) + s->filled, data, (size_t)take);
        s->filled += take;
        data += take;
        size -= take;
        stream_skip_empty(s);
    }
    return 0;
}

static inline int stream_done(const pipe_stream *s) {
    return s->segments && s->index >= s->nseg;
}

/* The head of a message of several records is peeked: collects its stream
 * straight from the records into new objects, consuming each record once
 * copied, waiting for the next as long as it takes. Inside a call. 1 with
 * *data (the first segment) and *buffers (a list of the others) when the
 * message is complete; 0 when a new message began before it was (a head or
 * a whole message, left peeked: the caller starts again; what was collected
 * is dropped, FORMAT.md); -1 with an exception (the partial message is
 * dropped). */
static int pipe_collect(HandleObject *self, const char *op, int data_bytes, const void *payload,
                        uint64_t length, PyObject **data, PyObject **buffers) {
    pipe_stream s = {0};
    uint64_t frame = pipe_frame(payload, length);
    s.nseg = (uint32_t)(frame >> 32);
    if (s.nseg < 1 || s.nseg > PIPE_MAX_SEGMENTS) {
        rb_consume(&self->h.ring.reader);
        PyErr_Format(PyExc_OSError, "ipc_ring.Pipe: a message of %u segments", s.nseg);
        return -1;
    }
    s.lengths = PyMem_Calloc(s.nseg, sizeof *s.lengths);
    if (!s.lengths) {
        PyErr_NoMemory();
        return -1; /* left in the ring */
    }
    int r;
    for (;;) {
        r = stream_feed(&s, (const char *)payload + PIPE_FRAME, length - PIPE_FRAME, data_bytes);
        rb_consume(&self->h.ring.reader);
        if (r < 0 || stream_done(&s)) break;
        if (reader_next(self, RB_FOREVER, 0, 0, op, &payload, &length) < 0) {
            r = -1;
            break;
        }
        uint32_t kind = (uint32_t)pipe_frame(payload, length);
        if (kind == PIPE_WHOLE || kind == PIPE_HEAD) {
            r = 0; /* the sender stopped in the middle of this one */
            break;
        }
        if (kind != PIPE_PART) {
            rb_consume(&self->h.ring.reader);
            PyErr_SetString(PyExc_OSError, "ipc_ring.Pipe: a record that is not part of a message");
            r = -1;
            break;
        }
    }
    if (r < 0 || !stream_done(&s)) {
        stream_free(&s);
        return r < 0 ? -1 : 0;
    }
    PyObject *list = PyList_New((Py_ssize_t)s.nseg - 1);
    if (!list) {
        stream_free(&s);
        return -1;
    }
    for (uint32_t i = 1; i < s.nseg; i++) {
        PyList_SET_ITEM(list, (Py_ssize_t)i - 1, s.segments[i]);
        s.segments[i] = NULL;
    }
    *data = s.segments[0];
    s.segments[0] = NULL;
    *buffers = list;
    stream_free(&s);
    return 1;
}

/* recv_bytes (want_bytes = 1) and recv (0), past the fast path: waits for
 * the next message. A whole one comes back as bytes; one of several records
 * is collected here (pipe_collect): recv gets (data, buffers), recv_bytes
 * bytes (its pickle with the buffers put in band by ipc_ring._pipe when it
 * was sent with out-of-band buffers). */
static PyObject *reader_recv_slow(HandleObject *self, PyObject *maxlength_obj, int want_bytes) {
    const char *op = want_bytes ? "recv_bytes" : "recv";
    Py_ssize_t maxlength = -1;
    if (require_pipe(self, op) < 0 || call_begin(self) < 0) return NULL;
    if (args_then(self, parse_maxlength(maxlength_obj, &maxlength)) < 0) {
        call_end(self);
        return NULL;
    }
    const void *payload;
    uint64_t length;
    PyObject *result = NULL, *data = NULL, *buffers = NULL;
    int collected = 0;
    while (reader_next(self, RB_FOREVER, 0, 0, op, &payload, &length) > 0) {
        uint64_t frame = pipe_frame(payload, length);
        uint32_t kind = (uint32_t)frame;
        if (kind == PIPE_WHOLE) {
            if (maxlength >= 0 && length - PIPE_FRAME > (uint64_t)maxlength)
                PyErr_SetString(PyExc_OSError, "bad message length"); /* left in the ring */
            else
                result = pipe_take_bytes(self, payload, length);
            break;
        }
        if (kind == PIPE_HEAD) {
            uint64_t total = 0;
            if (frame >> 32 == 1 && length >= PIPE_FRAME + 8)
                memcpy(&total, (const char *)payload + PIPE_FRAME, sizeof total);
            total &= ~PIPE_READONLY; /* the flag of an out-of-band buffer, not its length */
            if (want_bytes && maxlength >= 0 && total > (uint64_t)maxlength) {
                PyErr_SetString(PyExc_OSError, "bad message length"); /* left in the ring */
                break;
            }
            int c = pipe_collect(self, op, want_bytes && frame >> 32 == 1, payload, length, &data,
                                 &buffers);
            if (c < 0) break;
            if (c > 0) {
                collected = 1;
                break;
            }
            continue; /* a new message began: this one was abandoned */
        }
        rb_consume(&self->h.ring.reader);
        if (kind != PIPE_PART) {
            PyErr_SetString(PyExc_OSError, "ipc_ring.Pipe: a record that is not part of a message");
            break;
        }
        /* else the rest of a message abandoned earlier: skipped */
    }
    /* As pipe_take_bytes: a watched end is readable again only when the next
     * message comes. */
    if (collected && RB_UNLIKELY(self->h.watched) &&
        self->h.ring.reader.read_pos == self->h.ring.reader.readable_end)
        rb_handle_idle(&self->h);
    call_end(self);
    if (!collected) return result;
    if (!want_bytes) {
        result = PyTuple_Pack(2, data, buffers);
    }
    else if (PyList_GET_SIZE(buffers) == 0) {
        result = Py_NewRef(data); /* bytes, its length checked above */
    }
    else {
        core_state *st = state_of((PyObject *)self);
        if (st && !st->pipe_in_band)
            PyErr_SetString(PyExc_RuntimeError, "ipc_ring._pipe is not loaded");
        else if (st)
            result = PyObject_CallFunctionObjArgs(st->pipe_in_band, data, buffers, NULL);
        if (result && !PyBytes_Check(result)) {
            Py_CLEAR(result);
            PyErr_SetString(PyExc_TypeError, "ipc_ring._pipe: in_band() returned no bytes");
        }
        if (result && maxlength >= 0 && PyBytes_GET_SIZE(result) > maxlength) {
            Py_CLEAR(result);
            PyErr_SetString(PyExc_OSError, "bad message length");
        }
    }
    Py_DECREF(data);
    Py_DECREF(buffers);
    return result;
}

PyDoc_STRVAR(reader_recv_bytes_doc,
"_recv_bytes($self, /, maxlength=None)\n--\n\n"
"ipc_ring.Pipe: Connection.recv_bytes on this end's ring.");

static PyObject *reader_recv_bytes(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames) {
    HandleObject *self = (HandleObject *)op;
    const void *payload;
    uint64_t length;
    if (RB_LIKELY(nargs == 0 && kwnames == NULL && self->h.flags == 0 && self->h.pipe &&
                  rb_peek(&self->h.ring.reader, &payload, &length) == RB_OK &&
                  pipe_frame(payload, length) == PIPE_WHOLE))
        return pipe_take_bytes(self, payload, length);
    PyObject *maxlength;
    if (one_optional_arg(args, nargs, kwnames, "recv_bytes", "maxlength", &maxlength) < 0)
        return NULL;
    return reader_recv_slow(self, maxlength, 1);
}

PyDoc_STRVAR(reader_recv_doc,
"_recv($self, /)\n--\n\n"
"ipc_ring.Pipe: the next message as bytes, or as (data, buffers) when it\n"
"was sent with out-of-band buffers.");

static PyObject *reader_recv(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *self = (HandleObject *)op;
    const void *payload;
    uint64_t length;
    if (RB_LIKELY(self->h.flags == 0 && self->h.pipe &&
                  rb_peek(&self->h.ring.reader, &payload, &length) == RB_OK &&
                  pipe_frame(payload, length) == PIPE_WHOLE))
        return pipe_take_bytes(self, payload, length);
    return reader_recv_slow(self, NULL, 0);
}

PyDoc_STRVAR(reader_recv_obj_doc,
"_recv_obj($self, /)\n--\n\n"
"ipc_ring.Pipe: Connection.recv, the next message unpickled. The message\n"
"leaves the ring before pickle.loads runs.");

static PyObject *reader_recv_obj(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    PyObject *raw = reader_recv(op, NULL);
    if (!raw) return NULL;
    core_state *st = state_of(op);
    if (!st || !st->pipe_loads) {
        Py_DECREF(raw);
        if (st) PyErr_SetString(PyExc_RuntimeError, "ipc_ring._pipe is not loaded");
        return NULL;
    }
    PyObject *obj;
    if (PyBytes_CheckExact(raw))
        obj = PyObject_CallOneArg(st->pipe_loads, raw);
    else if (PyTuple_Check(raw) && PyTuple_GET_SIZE(raw) == 2) {
        /* (data, buffers): a message with out-of-band buffers */
        PyObject *args = PyTuple_Pack(1, PyTuple_GET_ITEM(raw, 0));
        PyObject *kwargs = args ? Py_BuildValue("{sO}", "buffers", PyTuple_GET_ITEM(raw, 1)) : NULL;
        obj = kwargs ? PyObject_Call(st->pipe_loads, args, kwargs) : NULL;
        Py_XDECREF(args);
        Py_XDECREF(kwargs);
    }
    else {
        PyErr_SetString(PyExc_RuntimeError, "ipc_ring._pipe: unexpected receive result");
        obj = NULL;
    }
    Py_DECREF(raw);
    return obj;
}

PyDoc_STRVAR(reader_poll_doc,
"_poll($self, /, timeout=0.0)\n--\n\n"
"ipc_ring.Pipe: Connection.poll. True if a message is waiting, or if recv\n"
"would raise at once (the other end closed or died); False once timeout\n"
"seconds passed (None: wait as long as it takes).");

static PyObject *reader_poll(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames) {
    HandleObject *self = (HandleObject *)op;
    const void *payload;
    uint64_t length;
    PyObject *timeout_obj;
    if (one_optional_arg(args, nargs, kwnames, "poll", "timeout", &timeout_obj) < 0) return NULL;
    if (RB_LIKELY(self->h.flags == 0 && rb_peek(&self->h.ring.reader, &payload, &length) == RB_OK &&
                  (uint32_t)pipe_frame(payload, length) != PIPE_PART))
        Py_RETURN_TRUE;
    if (require_pipe(self, "poll") < 0 || call_begin(self) < 0) return NULL;
    uint64_t timeout = 0;
    /* As multiprocessing's poll: a negative timeout is no wait. */
    int parsed = 0;
    if (timeout_obj && timeout_obj != Py_None) {
        double t = PyFloat_AsDouble(timeout_obj);
        parsed = t == -1.0 && PyErr_Occurred() ? -1 : t < 0 ? 0 : parse_timeout(timeout_obj, &timeout);
    }
    else if (timeout_obj)
        parsed = parse_timeout(timeout_obj, &timeout);
    if (args_then(self, parsed) < 0) {
        call_end(self);
        return NULL;
    }
    /* The rest of a message abandoned earlier (its receiver died in the
     * middle) is skipped, as recv skips it: it is not a message waiting. */
    uint64_t deadline = timeout == RB_FOREVER ? 0 : rb_now_ns() + timeout;
    int r, expired = 0;
    for (;;) {
        r = reader_next(self, timeout, 0, 1, "poll", &payload, &length);
        if (r <= 0 || (uint32_t)pipe_frame(payload, length) != PIPE_PART) break;
        rb_reader *rd = &self->h.ring.reader;
        rb_consume(rd);
        if (self->h.watched && rd->read_pos == rd->readable_end) rb_handle_idle(&self->h);
        if (timeout != RB_FOREVER) {
            uint64_t now = rb_now_ns();
            if (now >= deadline) { /* parts that keep coming do not stretch the timeout */
                expired = 1;
                break;
            }
            timeout = deadline - now;
        }
    }
    PyObject *result = NULL;
    if (expired)
        result = Py_NewRef(Py_False);
    else if (r >= 0)
        result = Py_NewRef(Py_True); /* a message, or the end of the stream */
    else {
        core_state *st = state_of(op);
        if (st && PyErr_ExceptionMatches(st->RingTimeout)) {
            PyErr_Clear();
            result = Py_NewRef(Py_False);
        }
        else if (st && PyErr_ExceptionMatches(st->PipePeerDied)) {
            PyErr_Clear(); /* recv will raise it */
            result = Py_NewRef(Py_True);
        }
    }
    call_end(self);
    return result;
}

PyDoc_STRVAR(copy_mode_doc,
"_copy_mode($module, mode, /)\n--\n\n"
"Internal, for tests: how a Pipe writer copies the parts of long messages\n"
"into the ring: 0 picks by timing both (the default), 1 memcpy, 2\n"
"non-temporal stores (x86-64; memcpy elsewhere).");

static PyObject *core_copy_mode(PyObject *Py_UNUSED(module), PyObject *arg) {
    long mode = PyLong_AsLong(arg);
    if (mode == -1 && PyErr_Occurred()) return NULL;
    if (mode < 0 || mode > 2) {
        PyErr_SetString(PyExc_ValueError, "mode is 0, 1 or 2");
        return NULL;
    }
    rb_copy_mode = (int)mode;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pipe_fallbacks_doc,
"_pipe_fallbacks($module, send_large, in_band, loads, /)\n--\n\n"
"Internal: ipc_ring._pipe's handling of messages of several records.");

PyDoc_STRVAR(closed_hook_doc,
"_closed_hook($module, hook, /)\n--\n\n"
"Internal (ipc_ring._async): hook(handle) runs after close(), abort() or\n"
"detach() of a handle whose fileno() was called.");

static PyObject *core_closed_hook(PyObject *module, PyObject *hook) {
    Py_XSETREF(get_state(module)->closed_hook, Py_NewRef(hook));
    Py_RETURN_NONE;
}

static PyObject *core_pipe_fallbacks(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_pipe_fallbacks() takes 3 arguments");
        return NULL;
    }
    core_state *st = get_state(module);
    Py_XSETREF(st->pipe_send_large, Py_NewRef(args[0]));
    Py_XSETREF(st->pipe_in_band, Py_NewRef(args[1]));
    Py_XSETREF(st->pipe_loads, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

PyDoc_STRVAR(handle_fileno_doc,
"fileno($self, /)\n--\n\n"
"A file descriptor for select, selectors, epoll, multiprocessing.connection.wait\n"
"or an event loop. After a call found nothing to do (reader: try_pop()\n"
"returned None, pop_many(timeout=0) returned [], a pop timed out; writer:\n"
"try_push() returned False, a push timed out), it becomes readable as soon\n"
"as the peer publishes (reader: a message or the end of the stream; writer:\n"
"free space), or at once if that happened already; then call again. See\n"
"docs/FORMAT.md, \"Waiting on a file descriptor\". RingError if the ring has\n"
"no notification FIFOs.");

static PyObject *handle_fileno(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *self = (HandleObject *)op;
    if (require_usable(self) < 0) return NULL;
    int fd = rb_handle_watch(&self->h);
    if (fd >= 0) return PyLong_FromLong(fd);
    core_state *st = state_of(op);
    if (st)
        PyErr_Format(st->RingError,
                     "%R has no usable notification FIFOs (%U.rd and %U.wr): %s; fileno() and "
                     "the async methods need them, the blocking API works without",
                     self->path, self->path, self->path,
                     self->h.notify_missing ? self->h.notify_missing : "unknown");
    return NULL;
}

/* ---- stats() --------------------------------------------------------- */

PyDoc_STRVAR(handle_stats_doc,
"stats($self, /)\n--\n\n"
"Return the ring's counters as a dict, read from the shared header, so\n"
"each side also sees the other's: messages_pushed, bytes_pushed,\n"
"messages_popped, bytes_popped (payload bytes), writer_full_waits,\n"
"reader_empty_waits (sleep slices of up to 50 ms on a full / empty ring),\n"
"high_water (the fullest the writer found the ring, in bytes, when it\n"
"reloaded the reader's position), plus capacity and used_bytes (bytes\n"
"published and not yet consumed). See docs/FORMAT.md \"Counters\".");

/* require_usable, then the file's size against the mapping (InvalidRing if
 * truncated): before a call that touches the header outside a call. 0 or -1. */
static int require_intact(HandleObject *self) {
    return require_usable(self) < 0 ? -1 : check_intact(self);
}

static PyObject *handle_stats(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *self = (HandleObject *)op;
    if (require_intact(self) < 0) return NULL;
    rb_header *hdr = (rb_header *)self->h.map;
    /* Own position from the handle, the peer's from the header. */
    uint64_t write_pos = is_writer(self)
                             ? self->h.ring.writer.write_pos
                             : atomic_load_explicit(&hdr->write_pos, memory_order_acquire);
    uint64_t read_pos = is_writer(self)
                            ? atomic_load_explicit(&hdr->read_pos, memory_order_relaxed)
                            : self->h.ring.reader.read_pos;
    uint64_t used = rb_used_bytes(write_pos, read_pos,
                                  atomic_load_explicit(&hdr->wrap_pos, memory_order_relaxed),
                                  self->h.capacity);
#define RB_LOAD(field) \
    (unsigned long long)atomic_load_explicit(&hdr->field, memory_order_relaxed)
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsK}", "capacity", (unsigned long long)self->h.capacity, "used_bytes",
        (unsigned long long)used, "messages_pushed", RB_LOAD(messages_pushed), "bytes_pushed",
        RB_LOAD(bytes_pushed), "messages_popped", RB_LOAD(messages_popped), "bytes_popped",
        RB_LOAD(bytes_popped), "writer_full_waits", RB_LOAD(writer_full_waits),
        "reader_empty_waits", RB_LOAD(reader_empty_waits), "high_water", RB_LOAD(high_water));
#undef RB_LOAD
}

PyDoc_STRVAR(handle_check_size_doc,
"_check_size($self, /)\n--\n\n"
"Internal (asyncio): after an await, before the handle touches the mapping\n"
"again, check that the file still covers it, as a blocking call does after\n"
"each sleep (docs/FORMAT.md \"Truncation\"): InvalidRing if it was\n"
"truncated; RingClosed if the handle was closed.");

static PyObject *handle_check_size(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *self = (HandleObject *)op;
    if (require_intact(self) < 0) return NULL;
    /* The asyncio glue's check after an await, followed at once by a call
     * that takes a message or arms again: that call need not check too. */
    self->h.flags &= ~(unsigned)RB_HANDLE_UNCHECKED;
    Py_RETURN_NONE;
}

#define HANDLE_METHODS                                                          \
    {"fileno", handle_fileno, METH_NOARGS, handle_fileno_doc},                 \
    {"_check_size", handle_check_size, METH_NOARGS, handle_check_size_doc},    \
    {"detach", handle_detach, METH_NOARGS, handle_detach_doc},                 \
    {"_hand_over", handle_hand_over, METH_NOARGS, handle_hand_over_doc},       \
    {"stats", handle_stats, METH_NOARGS, handle_stats_doc},

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
    {"reader_alive", handle_get_peer_alive, NULL,
     "True while a live reader is attached (the kernel holds its lock).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyGetSetDef reader_getset[] = {
    HANDLE_GETSET_ENTRIES
    {"writer_alive", handle_get_peer_alive, NULL,
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
    {"close", handle_close_method, METH_NOARGS, writer_close_doc},
    {"abort", writer_abort, METH_NOARGS, writer_abort_doc},
    {"_send_bytes", _PyCFunction_CAST(writer_send_bytes), METH_FASTCALL | METH_KEYWORDS,
     writer_send_bytes_doc},
    {"_send_parts", writer_send_parts, METH_O, writer_send_parts_doc},
    HANDLE_METHODS
    {NULL, NULL, 0, NULL},
};

static PyMemberDef handle_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(HandleObject, weakrefs), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot writer_slots[] = {
    {Py_tp_doc, "Writer(path, *, capacity=..., mode=0o600, spin=None, _pipe=...)\n--\n\n"
                "Low-level writer handle; use ipc_ring.RingWriter."},
    {Py_tp_new, handle_new},
    {Py_tp_init, writer_init},
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_finalize, handle_finalize},
    {Py_tp_methods, writer_methods},
    {Py_tp_getset, writer_getset},
    {Py_tp_members, handle_members},
    {0, NULL},
};

static PyType_Spec writer_spec = {
    .name = "ipc_ring._core.Writer",
    .basicsize = sizeof(HandleObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = writer_slots,
};

static PyMethodDef reader_methods[] = {
    {"pop", _PyCFunction_CAST(reader_pop), METH_FASTCALL | METH_KEYWORDS, reader_pop_doc},
    {"try_pop", reader_try_pop, METH_NOARGS, reader_try_pop_doc},
    {"pop_many", _PyCFunction_CAST(reader_pop_many), METH_VARARGS | METH_KEYWORDS,
     reader_pop_many_doc},
    {"peek_many", _PyCFunction_CAST(reader_peek_many), METH_VARARGS | METH_KEYWORDS,
     reader_peek_many_doc},
    {"consume", reader_consume, METH_O, reader_consume_doc},
    {"pop_view", _PyCFunction_CAST(reader_pop_view), METH_FASTCALL | METH_KEYWORDS,
     reader_pop_view_doc},
    {"pop_into", _PyCFunction_CAST(reader_pop_into), METH_FASTCALL | METH_KEYWORDS,
     reader_pop_into_doc},
    {"close", handle_close_method, METH_NOARGS, reader_close_doc},
    {"_recv_bytes", _PyCFunction_CAST(reader_recv_bytes), METH_FASTCALL | METH_KEYWORDS,
     reader_recv_bytes_doc},
    {"_recv", reader_recv, METH_NOARGS, reader_recv_doc},
    {"_recv_obj", reader_recv_obj, METH_NOARGS, reader_recv_obj_doc},
    {"_poll", _PyCFunction_CAST(reader_poll), METH_FASTCALL | METH_KEYWORDS, reader_poll_doc},
    HANDLE_METHODS
    {NULL, NULL, 0, NULL},
};

static PyType_Slot reader_slots[] = {
    {Py_tp_doc, "Reader(path, *, spin=None, _pipe=...)\n--\n\n"
                "Low-level reader handle; use ipc_ring.RingReader."},
    {Py_tp_new, handle_new},
    {Py_tp_init, reader_init},
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_finalize, handle_finalize},
    {Py_tp_methods, reader_methods},
    {Py_tp_getset, reader_getset},
    {Py_tp_members, handle_members},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, reader_iternext},
    {0, NULL},
};

static PyType_Spec reader_spec = {
    .name = "ipc_ring._core.Reader",
    .basicsize = sizeof(HandleObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = reader_slots,
};

/* ---- module functions ------------------------------------------------ */

PyDoc_STRVAR(capacity_valid_doc,
"capacity_valid($module, capacity, /)\n--\n\n"
"True if capacity is a power of two in [64, 2**32].");

static PyObject *core_capacity_valid(PyObject *Py_UNUSED(module), PyObject *arg) {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (v == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(!overflow && v > 0 && rb_capacity_valid((uint64_t)v));
}

PyDoc_STRVAR(check_timeout_doc,
"check_timeout($module, timeout, /)\n--\n\n"
"Validate a timeout as every blocking call does: None, or a number of\n"
"seconds >= 0. Returns it as a float, or None for no limit (also beyond\n"
"about 31 years). ValueError or TypeError otherwise.");

static PyObject *core_check_timeout(PyObject *Py_UNUSED(module), PyObject *arg) {
    uint64_t ns;
    if (parse_timeout(arg, &ns) < 0) return NULL;
    if (ns == RB_FOREVER) Py_RETURN_NONE;
    return PyFloat_FromDouble((double)ns / 1e9);
}

PyDoc_STRVAR(inspect_doc,
"inspect($module, path, /)\n--\n\n"
"Read a ring file's header without writing anything (O_RDONLY, PROT_READ):\n"
"a dict of every header field under its docs/FORMAT.md name, in that order,\n"
"then used_bytes, free_bytes, writer_alive and reader_alive (the role locks'\n"
"test). InvalidRing if the file is not a valid ring, OSError if it cannot\n"
"be opened.");

static PyObject *core_inspect(PyObject *module, PyObject *arg) {
    PyObject *encoded;
    if (!PyUnicode_FSConverter(arg, &encoded)) return NULL;
    rb_inspection out;
    rb_error err;
    rb_result res;
    Py_BEGIN_ALLOW_THREADS
    res = rb_inspect(PyBytes_AS_STRING(encoded), &out, &err);
    Py_END_ALLOW_THREADS
    Py_DECREF(encoded);
    if (res != RB_OK) {
        core_state *st = get_state(module);
        if (res == RB_ERROR) {
            errno = err.sys_errno;
            return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
        }
        PyErr_SetString(st->InvalidRing, err.message);
        return NULL;
    }
    PyObject *dict = PyDict_New();
    if (!dict) return NULL;
    for (int i = 0; rb_header_fields[i].name; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(out.values[i]);
        if (!v || PyDict_SetItemString(dict, rb_header_fields[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(dict);
            return NULL;
        }
        Py_DECREF(v);
    }
    uint64_t capacity = 0;
    for (int i = 0; rb_header_fields[i].name; i++)
        if (strcmp(rb_header_fields[i].name, "capacity") == 0) capacity = out.values[i];
    uint64_t writer_state = 0;
    for (int i = 0; rb_header_fields[i].name; i++)
        if (strcmp(rb_header_fields[i].name, "writer_state") == 0) writer_state = out.values[i];
    PyObject *extra = Py_BuildValue("{sKsKsOsOsO}", "used_bytes",
                                    (unsigned long long)out.used_bytes, "free_bytes",
                                    (unsigned long long)(capacity - out.used_bytes),
                                    "writer_alive", out.writer_alive ? Py_True : Py_False,
                                    "reader_alive", out.reader_alive ? Py_True : Py_False,
                                    "closed", writer_state == RB_STATE_CLOSED ? Py_True : Py_False);
    if (!extra || PyDict_Update(dict, extra) < 0) {
        Py_XDECREF(extra);
        Py_DECREF(dict);
        return NULL;
    }
    Py_DECREF(extra);
    return dict;
}

PyDoc_STRVAR(unlink_doc,
"unlink($module, path, /)\n--\n\n"
"Remove the ring file at path and its notification FIFOs (path + \".rd\",\n"
"path + \".wr\", where they are FIFOs). FileNotFoundError if the ring file\n"
"does not exist; InvalidRing, and nothing removed, if it is not a ring\n"
"file (see check_ring_file). Open handles keep working; nobody new can open\n"
"the ring.");

/* unlink (check_only = 0) and check_ring_file (1). */
static PyObject *unlink_or_check(PyObject *module, PyObject *arg, int check_only) {
    PyObject *encoded;
    if (!PyUnicode_FSConverter(arg, &encoded)) return NULL;
    rb_error err;
    rb_result res = check_only ? rb_check_ring_file(PyBytes_AS_STRING(encoded), &err)
                               : rb_unlink(PyBytes_AS_STRING(encoded), &err);
    Py_DECREF(encoded);
    if (res == RB_OK) Py_RETURN_NONE;
    if (err.code == RB_INVALID) {
        PyErr_SetString(get_state(module)->InvalidRing, err.message);
        return NULL;
    }
    errno = err.sys_errno;
    return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
}

static PyObject *core_unlink(PyObject *module, PyObject *arg) {
    return unlink_or_check(module, arg, 0);
}

PyDoc_STRVAR(check_ring_file_doc,
"check_ring_file($module, path, /)\n--\n\n"
"None if path is a ring file of any version (a regular file, not followed\n"
"if it is a symlink, that starts with the ring magic); InvalidRing or\n"
"OSError otherwise. What unlink() checks before it removes anything.");

static PyObject *core_check_ring_file(PyObject *module, PyObject *arg) {
    return unlink_or_check(module, arg, 1);
}

PyDoc_STRVAR(timer_fd_doc,
"_timer_fd($module, /)\n--\n\n"
"A new one-shot CLOCK_MONOTONIC timer descriptor (non-blocking, close-on-exec),\n"
"readable once its time has come; -1 where the system has none. The asyncio\n"
"glue's liveness slice: a descriptor in the loop, where a loop timer would\n"
"cost every wake-up its bookkeeping.");

static PyObject *core_timer_fd(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
#if defined(__linux__)
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
#else
    return PyLong_FromLong(-1);
#endif
}

PyDoc_STRVAR(timer_set_doc,
"_timer_set($module, fd, seconds, /)\n--\n\n"
"Arm the timer descriptor fd (from _timer_fd) to become readable in `seconds`\n"
"(at least 1 us; a new time replaces the old one).");

static PyObject *core_timer_set(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "_timer_set expected 2 arguments, got %zd", nargs);
        return NULL;
    }
    long fd_long = PyLong_AsLong(args[0]);
    if (fd_long == -1 && PyErr_Occurred()) return NULL;
    if (fd_long < 0 || fd_long > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "_timer_set: not a file descriptor");
        return NULL;
    }
    int fd = (int)fd_long;
    double seconds = PyFloat_AsDouble(args[1]);
    if (seconds == -1.0 && PyErr_Occurred()) return NULL;
#if defined(__linux__)
    if (!(seconds >= 1e-6)) seconds = 1e-6; /* 0 would disarm it; NaN too */
    if (seconds > 1e9) seconds = 1e9;
    struct itimerspec spec = {{0, 0}, {(time_t)seconds, 0}};
    spec.it_value.tv_nsec = (long)((seconds - (double)spec.it_value.tv_sec) * 1e9);
    if (timerfd_settime(fd, 0, &spec, NULL) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
#else
    (void)fd;
    PyErr_SetString(PyExc_OSError, "no timer descriptors on this system");
    return NULL;
#endif
}

static PyMethodDef core_methods[] = {
    {"capacity_valid", core_capacity_valid, METH_O, capacity_valid_doc},
    {"unlink", core_unlink, METH_O, unlink_doc},
    {"check_ring_file", core_check_ring_file, METH_O, check_ring_file_doc},
    {"check_timeout", core_check_timeout, METH_O, check_timeout_doc},
    {"inspect", core_inspect, METH_O, inspect_doc},
    {"_pipe_fallbacks", _PyCFunction_CAST(core_pipe_fallbacks), METH_FASTCALL, pipe_fallbacks_doc},
    {"_copy_mode", core_copy_mode, METH_O, copy_mode_doc},
    {"_timer_fd", core_timer_fd, METH_NOARGS, timer_fd_doc},
    {"_closed_hook", core_closed_hook, METH_O, closed_hook_doc},
    {"_timer_set", _PyCFunction_CAST(core_timer_set), METH_FASTCALL, timer_set_doc},
    {NULL, NULL, 0, NULL},
};

/* ---- module ---------------------------------------------------------- */

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

    bases = PyTuple_Pack(2, st->PeerDied, PyExc_EOFError);
    if (!bases) return -1;
    st->PipePeerDied = add_exception(
        module, "PipePeerDied",
        "ipc_ring.Pipe: the other end is gone (its process died, or it stopped without "
        "closing) and everything it sent has been received. An EOFError, as "
        "multiprocessing.Pipe raises when the other end goes away.",
        bases);
    Py_DECREF(bases);
    if (!st->PipePeerDied) return -1;

    bases = PyTuple_Pack(2, st->PeerDied, PyExc_BrokenPipeError);
    if (!bases) return -1;
    st->PipePeerGone = add_exception(
        module, "PipePeerGone",
        "ipc_ring.Pipe: sending to an end that was closed, or whose process died. A "
        "BrokenPipeError, as multiprocessing.Pipe raises.",
        bases);
    Py_DECREF(bases);
    if (!st->PipePeerGone) return -1;

    if (!str_release) {
        str_release = PyUnicode_InternFromString("release");
        if (!str_release) return -1;
    }

    st->WriterType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &writer_spec, NULL);
    if (!st->WriterType || PyModule_AddType(module, st->WriterType) < 0) return -1;
    st->ReaderType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &reader_spec, NULL);
    if (!st->ReaderType || PyModule_AddType(module, st->ReaderType) < 0) return -1;
    st->SlotType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &slot_spec, NULL);
    if (!st->SlotType || PyModule_AddType(module, st->SlotType) < 0) return -1;
    st->SenderType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &sender_spec, NULL);
    if (!st->SenderType || PyModule_AddType(module, st->SenderType) < 0) return -1;
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
    if (PyModule_AddIntConstant(module, "RECORD_HEADER", RB_RECORD_HEADER) < 0) return -1;
    if (PyModule_AddObject(module, "MAX_SPIN", PyFloat_FromDouble(MAX_SPIN_S)) < 0) return -1;
    if (PyModule_AddObject(module, "MAX_CAPACITY",
                           PyLong_FromUnsignedLongLong(RB_MAX_CAPACITY)) < 0)
        return -1;
    if (PyModule_AddObject(module, "DEFAULT_SPIN",
                           PyFloat_FromDouble(RB_DEFAULT_SPIN_NS / 1e9)) < 0)
        return -1;
    if (PyModule_AddObject(module, "SLEEP_SLICE",
                           PyFloat_FromDouble(RB_SLEEP_SLICE_NS / 1e9)) < 0)
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
    Py_VISIT(st->PipePeerDied);
    Py_VISIT(st->PipePeerGone);
    Py_VISIT(st->pipe_send_large);
    Py_VISIT(st->pipe_in_band);
    Py_VISIT(st->pipe_loads);
    Py_VISIT(st->closed_hook);
    Py_VISIT(st->WriterType);
    Py_VISIT(st->ReaderType);
    Py_VISIT(st->SlotType);
    Py_VISIT(st->SenderType);
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
    Py_CLEAR(st->PipePeerDied);
    Py_CLEAR(st->PipePeerGone);
    Py_CLEAR(st->pipe_send_large);
    Py_CLEAR(st->pipe_in_band);
    Py_CLEAR(st->pipe_loads);
    Py_CLEAR(st->closed_hook);
    Py_CLEAR(st->WriterType);
    Py_CLEAR(st->ReaderType);
    Py_CLEAR(st->SlotType);
    Py_CLEAR(st->SenderType);
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
