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

#include <math.h>

#include "_handle.h"

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
};

typedef struct {
    PyObject_HEAD
    rb_handle h;        /* h.flags == 0 while the fast paths may run */
    Py_ssize_t exports; /* buffers of this handle's slots that point into the mapping */
    PyObject *path;     /* str, as given */
    int initialised;    /* __init__ has run once (it never runs again) */
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

/* Gives the role up (ending the stream if `end_stream`) and unmaps unless
 * a call or an export still uses the mapping. Idempotent. */
static void handle_close(HandleObject *self, int end_stream) {
    if (self->h.flags & HANDLE_CLOSED) return;
    int sleeping = (self->h.flags & CALL_SLEEPING) != 0;
    self->h.flags |= HANDLE_CLOSED;
    rb_handle_release(&self->h, end_stream, sleeping);
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
    case RB_PEER_DIED: type = st->PeerDied; break;
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
    else
        PyErr_Format(PyExc_RuntimeError,
                     "a call on this %s is already in progress (in another thread, or in Python "
                     "code that call runs: a __buffer__, a garbage-collector callback, a signal "
                     "handler); a handle takes one call at a time",
                     what);
    return -1;
}

/* Starts a call that can run Python code: 0, or -1 with the reason raised. */
static inline int call_begin(HandleObject *self) {
    if (RB_UNLIKELY(self->h.flags != 0)) return raise_unusable(self);
    self->h.flags |= CALL_ACTIVE;
    return 0;
}

/* Ends it, and unmaps if close() came meanwhile and nothing else uses the
 * mapping. */
static inline void call_end(HandleObject *self) {
    self->h.flags &= ~(unsigned)CALL_ACTIVE;
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
static PyObject *str_release;

typedef struct {
    PyObject_HEAD
    HandleObject *owner; /* strong reference; NULL until the slot is filled */
    uint8_t *payload;    /* inside owner's mapping */
    Py_ssize_t size;     /* bytes reserved, or the message's length */
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
    if (h->h.flags & (HANDLE_CLOSED | RB_HANDLE_FORKED)) {
        release_if_idle(h);
        if (!(slot->writer && size >= 0)) return 0;
        return raise_unusable(h);
    }
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
        PyObject *view = PyMemoryView_FromObject(op);
        if (!view) return NULL;
        if (slot->view) /* the collector ran __enter__ meanwhile: keep the first */
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

/* Writer(fd, path, *, capacity=..., spin=None) / Reader(fd, path, *, spin=None):
 * attaches to the ring file open on fd; with capacity, fd is a new, empty
 * file that becomes a ring of that capacity.
 * On success the handle owns fd. */
static int handle_init(PyObject *op, PyObject *args, PyObject *kwds, rb_role role) {
    static char *writer_kwlist[] = {"fd", "path", "capacity", "spin", NULL};
    static char *reader_kwlist[] = {"fd", "path", "spin", NULL};
    HandleObject *self = (HandleObject *)op;
    int fd;
    PyObject *path, *capacity_obj = NULL, *spin_obj = Py_None;
    if (self->initialised) {
        PyErr_SetString(PyExc_RuntimeError, "a ring handle is initialised only once");
        return -1;
    }
    self->initialised = 1;
    int parsed = role == RB_ROLE_WRITER
                     ? PyArg_ParseTupleAndKeywords(args, kwds, "iU|$OO:Writer", writer_kwlist, &fd,
                                                   &path, &capacity_obj, &spin_obj)
                     : PyArg_ParseTupleAndKeywords(args, kwds, "iU|$O:Reader", reader_kwlist, &fd,
                                                   &path, &spin_obj);
    if (!parsed) return -1;
    uint64_t capacity;
    if (parse_capacity(capacity_obj, &capacity) < 0) return -1;
    uint64_t spin_ns = RB_DEFAULT_SPIN_NS;
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
    /* An exact str, so that no __repr__ of a subclass runs inside a call. */
    PyObject *name = PyUnicode_FromObject(path);
    if (!name) return -1;
    Py_XSETREF(self->path, name);
    PyObject *encoded = PyUnicode_EncodeFSDefault(name);
    if (!encoded) return -1;
    rb_options opt = {.path = PyBytes_AS_STRING(encoded), .capacity = capacity,
                      .spin_ns = spin_ns};
    rb_error err;
    rb_result res = rb_handle_attach(&self->h, fd, role, &opt, &err);
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

static void handle_dealloc(PyObject *op) {
    PyTypeObject *tp = Py_TYPE(op);
    HandleObject *self = (HandleObject *)op;
    /* Nothing can use the mapping now: slots and their buffers hold a
     * reference to the handle, and so does every running call. */
    handle_close(self, 1);
    rb_handle_unmap(&self->h);
    Py_CLEAR(self->path);
    tp->tp_free(op);
    Py_DECREF(tp);
}

PyDoc_STRVAR(writer_close_doc,
"close($self, /)\n--\n\n"
"End the stream: the reader drains what is left, then sees the end.\n"
"Releases the writer role and the file descriptors at once, and the mapping\n"
"as soon as no call and no buffer uses it. Idempotent.");

PyDoc_STRVAR(reader_close_doc,
"close($self, /)\n--\n\n"
"Detach from the ring: releases the reader role and the file descriptors at\n"
"once, and the mapping as soon as no call and no buffer uses it. Messages\n"
"not read stay in the ring. Idempotent.");

static PyObject *handle_close_method(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    handle_close((HandleObject *)op, 1);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(writer_detach_doc,
"detach($self, /)\n--\n\n"
"Release the writer role without ending the stream, so that another process\n"
"continues it: RingWriter.open(path), or unpickling a copy of this handle\n"
"(how a writer is handed to a child process). Until one attaches, the reader\n"
"sees no live writer: it drains the ring, then gets PeerDied. The handle is\n"
"closed afterwards. Idempotent.");

static PyObject *writer_detach(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    handle_close((HandleObject *)op, 0);
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
        rb_flush(&self->h.ring.writer);
        bs->written += bs->staged;
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
    if (call_begin(self) < 0) return NULL;
    if (args_then(self, unpack_timeout_args("push_many", args, nargs, kwnames, 1, &messages,
                                            &timeout)) < 0) {
        call_end(self);
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
            if (report_empty) return 0;
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
"read position is published once for the batch.");

/* Parses pop_many's arguments (which may run __index__ and __float__). 0, or
 * -1 with an exception set. */
static int pop_many_args(PyObject *args, PyObject *kwds, Py_ssize_t *max_messages,
                         uint64_t *timeout, Py_ssize_t *max_bytes) {
    static char *kwlist[] = {"max_messages", "timeout", "max_bytes", NULL};
    PyObject *timeout_obj = Py_None, *max_bytes_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|OO:pop_many", kwlist, max_messages,
                                     &timeout_obj, &max_bytes_obj))
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

static PyObject *reader_pop_many(PyObject *op, PyObject *args, PyObject *kwds) {
    HandleObject *self = (HandleObject *)op;
    Py_ssize_t max_messages, max_bytes = PY_SSIZE_T_MAX;
    uint64_t timeout;
    if (call_begin(self) < 0) return NULL;
    if (pop_many_args(args, kwds, &max_messages, &timeout, &max_bytes) < 0) {
        call_end(self);
        return NULL;
    }
    /* The list first: allocating it can run the collector, and with it
     * Python code that may close this handle. */
    PyObject *list = PyList_New(0);
    const void *payload;
    uint64_t length;
    if (!list || call_interrupted(self) < 0 ||
        reader_next(self, timeout, 0, 0, "pop_many", &payload, &length) <= 0) {
        Py_CLEAR(list);
        call_end(self);
        return NULL;
    }
    /* From here to rb_release no Python code runs (bytes objects are not
     * tracked by the collector; growing the list only reallocates). */
    uint64_t taken = 0;
    for (Py_ssize_t n = 0;;) {
        PyObject *msg = PyBytes_FromStringAndSize((const char *)payload, (Py_ssize_t)length);
        if (!msg || PyList_Append(list, msg) < 0) {
            /* Out of memory: this message stays in the ring. Return what was
             * taken (the next call raises again if memory is still short). */
            Py_XDECREF(msg);
            if (n == 0)
                Py_CLEAR(list);
            else
                PyErr_Clear();
            break;
        }
        Py_DECREF(msg);
        rb_skip(&self->h.ring.reader);
        taken += length;
        if (++n >= max_messages) break;
        /* Anything but a message that fits (empty, end, corruption) ends the
         * batch; the next call reports it. */
        if (rb_peek(&self->h.ring.reader, &payload, &length) != RB_OK) break;
        if (taken + length > (uint64_t)max_bytes) break;
    }
    rb_release(&self->h.ring.reader);
    call_end(self);
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
 * descriptor"): the primitives under fileno() and ipc_ring._async ------ */

/* 0 if the handle may take a call that touches the header now (not closed,
 * not forked, no call of its own running), else -1 with the reason. */
static int require_usable(HandleObject *self) {
    return (self->h.flags & ~(unsigned)SLOT_OPEN) == 0 ? 0 : raise_unusable(self);
}

PyDoc_STRVAR(handle_attach_notify_doc,
"_attach_notify($self, rx, tx, /)\n--\n\n"
"Internal: take ownership of the descriptors of the own FIFO (rx) and the\n"
"peer's FIFO (tx), both open O_RDWR | O_NONBLOCK.");

static PyObject *handle_attach_notify(PyObject *op, PyObject *args) {
    HandleObject *self = (HandleObject *)op;
    int rx, tx;
    if (!PyArg_ParseTuple(args, "ii:_attach_notify", &rx, &tx)) return NULL;
    if (require_usable(self) < 0) return NULL;
    if (self->h.notify_rx >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "notification FIFOs are already attached");
        return NULL;
    }
    rb_handle_set_notify(&self->h, rx, tx);
    Py_RETURN_NONE;
}

/* -1 with RingError set if the handle has no notification FIFOs, else 0. */
static int require_notify(HandleObject *self) {
    if (self->h.notify_rx >= 0) return 0;
    core_state *st = state_of((PyObject *)self);
    if (st)
        PyErr_Format(st->RingError,
                     "%R has no notification FIFOs (%U.rd and %U.wr): it was created by a version "
                     "of ipc_ring without fileno() support, or they were removed; fileno() and the "
                     "async methods need them, the blocking API works without",
                     self->path, self->path, self->path);
    return -1;
}

PyDoc_STRVAR(handle_fileno_doc,
"fileno($self, /)\n--\n\n"
"A file descriptor that becomes readable when this side was armed and the\n"
"peer then published (reader: a message or end of stream; writer: free\n"
"space). For event loops; see docs/FORMAT.md, \"Waiting on a file\n"
"descriptor\". RingError if the ring has no notification FIFOs.");

static PyObject *handle_fileno(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *self = (HandleObject *)op;
    if (require_usable(self) < 0 || require_notify(self) < 0) return NULL;
    return PyLong_FromLong(self->h.notify_rx);
}

PyDoc_STRVAR(handle_arm_doc,
"_arm($self, /)\n--\n\n"
"Set this side's waiting flag to 2 (asleep on its FIFO), then re-check.\n"
"True: armed, wait for fileno() to become readable, then call _disarm().\n"
"False: the condition holds already (flag taken down), retry now.");

static PyObject *handle_arm(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *self = (HandleObject *)op;
    if (require_usable(self) < 0 || require_notify(self) < 0) return NULL;
    rb_error err;
    if (rb_handle_check_size(&self->h, &err) != RB_OK) {
        raise_error(self, &err);
        return NULL;
    }
    int armed = is_writer(self) ? rb_arm_writable(&self->h.ring.writer)
                                : rb_arm_readable(&self->h.ring.reader);
    return PyBool_FromLong(armed);
}

PyDoc_STRVAR(handle_disarm_doc,
"_disarm($self, /)\n--\n\n"
"Drain fileno() and take this side's waiting flag down. Idempotent; does\n"
"nothing on a closed handle or a truncated file.");

static PyObject *handle_disarm(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *self = (HandleObject *)op;
    if ((self->h.flags & ~(unsigned)SLOT_OPEN) != 0 || self->h.notify_rx < 0) Py_RETURN_NONE;
    rb_drain_fd(self->h.notify_rx);
    rb_error err;
    if (rb_handle_check_size(&self->h, &err) != RB_OK) Py_RETURN_NONE;
    if (is_writer(self))
        rb_end_wait_writable(&self->h.ring.writer);
    else
        rb_end_wait_readable(&self->h.ring.reader);
    Py_RETURN_NONE;
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

static PyObject *handle_stats(PyObject *op, PyObject *Py_UNUSED(ignored)) {
    HandleObject *self = (HandleObject *)op;
    if (require_usable(self) < 0) return NULL;
    rb_error err;
    if (rb_handle_check_size(&self->h, &err) != RB_OK) {
        raise_error(self, &err);
        return NULL;
    }
    rb_header *hdr = (rb_header *)self->h.map;
    /* Own position from the handle, the peer's from the header: the
     * difference cannot be torn by the peer moving between two loads. */
    uint64_t used;
    if (is_writer(self))
        used = self->h.ring.writer.write_pos -
               atomic_load_explicit(&hdr->read_pos, memory_order_relaxed);
    else
        used = atomic_load_explicit(&hdr->write_pos, memory_order_relaxed) -
               self->h.ring.reader.read_pos;
    if (used > self->h.capacity) used = self->h.capacity; /* only a hostile peer gets here */
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

#define HANDLE_METHODS                                                                 \
    {"fileno", handle_fileno, METH_NOARGS, handle_fileno_doc},                        \
    {"_attach_notify", handle_attach_notify, METH_VARARGS, handle_attach_notify_doc}, \
    {"_arm", handle_arm, METH_NOARGS, handle_arm_doc},                                \
    {"_disarm", handle_disarm, METH_NOARGS, handle_disarm_doc},                       \
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
    {"detach", writer_detach, METH_NOARGS, writer_detach_doc},
    HANDLE_METHODS
    {NULL, NULL, 0, NULL},
};

static PyType_Slot writer_slots[] = {
    {Py_tp_doc, "Writer(fd, path, *, capacity=..., spin=None)\n--\n\n"
                "Low-level writer handle; use ipc_ring.RingWriter."},
    {Py_tp_new, handle_new},
    {Py_tp_init, writer_init},
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_methods, writer_methods},
    {Py_tp_getset, writer_getset},
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
    {"pop_view", _PyCFunction_CAST(reader_pop_view), METH_FASTCALL | METH_KEYWORDS,
     reader_pop_view_doc},
    {"pop_into", _PyCFunction_CAST(reader_pop_into), METH_FASTCALL | METH_KEYWORDS,
     reader_pop_into_doc},
    {"close", handle_close_method, METH_NOARGS, reader_close_doc},
    HANDLE_METHODS
    {NULL, NULL, 0, NULL},
};

static PyType_Slot reader_slots[] = {
    {Py_tp_doc, "Reader(fd, path, *, spin=None)\n--\n\n"
                "Low-level reader handle; use ipc_ring.RingReader."},
    {Py_tp_new, handle_new},
    {Py_tp_init, reader_init},
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_methods, reader_methods},
    {Py_tp_getset, reader_getset},
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
    PyObject *extra = Py_BuildValue("{sKsKsOsO}", "used_bytes", (unsigned long long)out.used_bytes,
                                    "free_bytes", (unsigned long long)(capacity - out.used_bytes),
                                    "writer_alive", out.writer_alive ? Py_True : Py_False,
                                    "reader_alive", out.reader_alive ? Py_True : Py_False);
    if (!extra || PyDict_Update(dict, extra) < 0) {
        Py_XDECREF(extra);
        Py_DECREF(dict);
        return NULL;
    }
    Py_DECREF(extra);
    return dict;
}

static PyMethodDef core_methods[] = {
    {"capacity_valid", core_capacity_valid, METH_O, capacity_valid_doc},
    {"check_timeout", core_check_timeout, METH_O, check_timeout_doc},
    {"inspect", core_inspect, METH_O, inspect_doc},
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
