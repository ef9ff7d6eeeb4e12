"""ipc_ring.Pipe: a drop-in for multiprocessing.Pipe over two rings.

Each direction is one ring in a memfd (no name in any file system); the ends
carry the memfds, an eventfd each for wake-ups and one end of a socket pair that
tells an end whose peer was closed in every process. An end attaches to its
rings on first use, in the process that uses it, so the standard pattern works
under every start method: create in the parent, pass one end to the child.
The records are framed as docs/FORMAT.md, "Pipe messages", describes: whole
messages go through the C fast path; messages larger than a record, and objects
with out-of-band buffers (protocol 5), go through here in parts.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import select
import socket
import struct
import threading
import weakref
from multiprocessing import BufferTooShort, reduction
from typing import Any, TypeVar

from . import _core

__all__ = ["Connection", "Pipe"]

_H = TypeVar("_H", _core.Writer, _core.Reader)

_WHOLE = 3
_HEAD = 4
_PART = 5
_FRAME = struct.Struct("<Q")
_PART_FRAME = _FRAME.pack(_PART)
_READONLY = 1 << 63  # in a segment's length: an out-of-band buffer that was read-only
_MAX_BUFFERS = (1 << 20) - 1  # out-of-band buffers in one message (and the pickle)
_LABEL = "ipc_ring.Pipe"
_ForkingPickler = reduction.ForkingPickler

_extra_reducers: dict[type, Any] = getattr(_ForkingPickler, "_extra_reducers", {})


class _Dumper:
    """multiprocessing's pickling (protocol 5, with the reducers it registered, such
    as those of its own connections) into a buffer kept from one send to the next:
    a ForkingPickler made for every send costs three times the pickling."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.sizes = (-1, -1)  # of the tables the pickler's dispatch table was made from
        self.buffers: list[pickle.PickleBuffer] = []
        self.pickler = pickle.Pickler(self.out, 5, buffer_callback=self.buffers.append)
        self.busy = False

    def refresh(self) -> None:
        """The pickler's dispatch table made again if copyreg's or multiprocessing's
        registrations changed since (compared by their sizes)."""
        sizes = (len(copyreg.dispatch_table), len(_extra_reducers))
        if sizes != self.sizes:
            table = copyreg.dispatch_table.copy()
            table.update(_extra_reducers)
            self.pickler.dispatch_table = table
            self.sizes = sizes


def _open_own(fd: int) -> int:
    """An open file description of its own for the ring behind fd: the role locks
    belong to open file descriptions, so every attach gets one."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(
            e.errno, f"{_LABEL} needs /proc/self/fd to attach to its ring ({e.strerror})"
        ) from None


def _send_large(writer: _core.Writer, obj: object, offset: int, size: int) -> None:
    """_send_bytes of a payload larger than a record (called by the C method)."""
    with memoryview(obj) as view:  # type: ignore[arg-type]
        flat = view.cast("B") if view.ndim != 1 or view.itemsize != 1 else view
        writer._send_parts([flat[offset : offset + size]])


def _raw(buffer: pickle.PickleBuffer) -> memoryview:
    """An out-of-band buffer's bytes, in place if they are contiguous."""
    try:
        return buffer.raw()
    except BufferError:
        return memoryview(memoryview(buffer).tobytes())


class _Stream:
    """Collects the stream of a message of several records."""

    def __init__(self, nseg: int) -> None:
        if not 1 <= nseg <= _MAX_BUFFERS + 1:
            raise OSError(f"{_LABEL}: a message of {nseg} segments")
        self.nseg = nseg
        self.header = bytearray()
        self.lengths: tuple[int, ...] | None = None
        self.readonly: list[bool] = []
        self.segments: list[bytearray] = []
        self.views: list[memoryview] = []
        self.index = 0  # the segment being filled
        self.filled = 0

    def feed(self, data: memoryview) -> None:
        pos = 0
        end = data.nbytes
        while pos < end:
            if self.lengths is None:
                need = 8 * self.nseg - len(self.header)
                take = min(need, end - pos)
                self.header += data[pos : pos + take]
                pos += take
                if len(self.header) == 8 * self.nseg:
                    words = struct.unpack(f"<{self.nseg}Q", self.header)
                    self.readonly = [bool(w & _READONLY) for w in words]
                    self.lengths = tuple(w & ~_READONLY for w in words)
                    if sum(self.lengths) > 1 << 46:
                        raise OSError(f"{_LABEL}: a message of {sum(self.lengths)} bytes")
                    # Not zeroed: every byte is written below. Written through
                    # memoryviews: a bytearray's slice assignment copies its source
                    # first.
                    self.segments = [_core._empty_bytearray(n) for n in self.lengths]
                    self.views = [memoryview(b) for b in self.segments]
                    self._skip_empty()
                continue
            if self.index >= self.nseg:
                raise OSError(f"{_LABEL}: a message longer than its lengths say")
            segment = self.views[self.index]
            take = min(segment.nbytes - self.filled, end - pos)
            segment[self.filled : self.filled + take] = data[pos : pos + take]
            self.filled += take
            pos += take
            self._skip_empty()

    def _skip_empty(self) -> None:
        while self.index < self.nseg and self.filled == len(self.segments[self.index]):
            self.index += 1
            self.filled = 0

    @property
    def done(self) -> bool:
        return self.lengths is not None and self.index >= self.nseg


def _in_band(data: bytearray, buffers: list[Any], readonly: list[bool]) -> bytearray:
    """recv_bytes() of an object sent with out-of-band buffers: its pickle with each
    buffer written in band, as a pickler without a buffer callback writes it
    (nothing is unpickled). Frames go: their lengths would change."""
    import pickletools

    out = bytearray()
    ops = list(pickletools.genops(bytes(data)))
    taken = iter(zip(buffers, readonly, strict=True))
    for i, (op, _arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name in ("FRAME", "READONLY_BUFFER"):
            continue
        if op.name == "NEXT_BUFFER":
            buffer, ro = next(taken)
            out += (b"\x8e" if ro else b"\x96") + len(buffer).to_bytes(
                8, "little"
            )  # BINBYTES8, BYTEARRAY8
            out += buffer
            continue
        out += data[pos:end]
    return out


def _recv_large(reader: _core.Reader, maxlength: int, want_bytes: bool) -> object:
    """The next message when it is not one whole record (called by the C methods):
    bytes, or (data, buffers) for an object with out-of-band buffers. What is left
    of a message whose sender stopped in the middle is dropped when the next
    message begins."""
    stream: _Stream | None = None
    while stream is None or not stream.done:
        with reader.pop_view() as view:
            frame = _FRAME.unpack_from(view)[0] if view.nbytes >= 8 else 0
            kind = frame & 0xFFFFFFFF
            if kind == _WHOLE:
                return bytes(view[8:])
            if kind == _HEAD:
                stream = _Stream(frame >> 32)
            elif kind != _PART:
                raise OSError(f"{_LABEL}: a record that is not part of a message")
            if stream is not None:  # else the rest of a message abandoned earlier
                stream.feed(view[8:])
    for view in stream.views:
        view.release()  # what the caller gets can be resized
    data, *parts = stream.segments
    # A read-only buffer comes back read-only, as pickle gives it in band.
    readonly = stream.readonly[1:]
    buffers = [bytes(b) if ro else b for b, ro in zip(parts, readonly, strict=True)]
    if not want_bytes:
        return data, buffers
    if buffers:
        data = _in_band(data, buffers, readonly)
    if maxlength >= 0 and len(data) > maxlength:
        raise OSError("bad message length")
    return bytes(data)


_core._pipe_fallbacks(_send_large, _recv_large, pickle.loads)

_connections: weakref.WeakSet[Connection] = weakref.WeakSet()
# The methods an attached end binds to its handles' C methods.
_BOUND = ("send_bytes", "recv_bytes", "poll", "recv", "_recv_raw")


def _forget_inherited() -> None:
    """In a fork() child: the ends' attachments belong to the parent (the C core
    disowned them); an end the child uses attaches again, its own."""
    for conn in list(_connections):
        conn._drop_handles(forked=True)


os.register_at_fork(after_in_child=_forget_inherited)


class Connection:
    """One end of an ipc_ring.Pipe, with the methods of
    multiprocessing.connection.Connection."""

    def __init__(
        self, out_fd: int, in_fd: int, own_event: int, peer_event: int, alive: int, capacity: int
    ) -> None:
        # Descriptors this object owns (-1: none): the rings' memfds, the eventfds
        # and the liveness socket.
        self._out_fd = out_fd
        self._in_fd = in_fd
        self._own_event = own_event
        self._peer_event = peer_event
        self._alive = alive
        self._capacity = capacity
        self._readable = in_fd >= 0
        self._writable = out_fd >= 0
        self._writer: _core.Writer | None = None
        self._reader: _core.Reader | None = None
        self._epoll: select.epoll | None = None
        self._epoll_pid = 0
        self._dumper = _Dumper()
        self._attaching = threading.Lock()
        self._closed = False
        _connections.add(self)

    # ---- attaching ------------------------------------------------------------------

    def _attach(self, cls: type[_H], fd: int, role: str) -> _H:
        own = _open_own(fd)
        try:
            return cls(_LABEL, _pipe=(own, self._own_event, self._peer_event, self._alive))
        except _core.RingBusy:
            raise self._busy(role) from None
        finally:
            os.close(own)  # the handle keeps a duplicate: the same open file description

    def _busy(self, role: str) -> _core.RingBusy:
        return _core.RingBusy(
            f"this end of an {_LABEL} is {role} by another process: an end is used by one "
            "process at a time (pass it to the process that uses it, and leave it alone in "
            "the others)"
        )

    def _attach_writer(self) -> _core.Writer:
        with self._attaching:  # two threads' first calls attach once
            if self._writer is not None:
                return self._writer
            self._check_closed()
            if self._out_fd < 0:
                raise OSError("connection is read-only")
            writer = self._attach(_core.Writer, self._out_fd, "written")
            self._writer = writer
        self.send_bytes = writer._send_bytes  # type: ignore[method-assign]
        return writer

    def _attach_reader(self) -> _core.Reader:
        with self._attaching:
            if self._reader is not None:
                return self._reader
            self._check_closed()
            if self._in_fd < 0:
                raise OSError("connection is write-only")
            reader = self._attach(_core.Reader, self._in_fd, "read")
            self._reader = reader
        self.recv_bytes = reader._recv_bytes  # type: ignore[method-assign]
        self.poll = reader._poll  # type: ignore[method-assign]
        self._recv_raw = reader._recv  # type: ignore[method-assign]
        self.recv = reader._recv_obj  # type: ignore[method-assign]
        return reader

    def _drop_handles(self, forked: bool = False) -> None:
        for name in _BOUND:
            self.__dict__.pop(name, None)
        for handle in (self._writer, self._reader):
            if handle is not None:
                if forked:
                    handle.close()  # inherited: only unmaps
                else:
                    handle.detach()  # handed over: the role is vacant for the next process
        self._writer = self._reader = None
        if forked:
            self._epoll = None  # the parent's; this process makes its own
            self._attaching = threading.Lock()  # another thread may have held it

    # ---- multiprocessing.connection.Connection --------------------------------------

    def _check_closed(self) -> None:
        if self._closed:
            raise OSError("handle is closed")

    @property
    def closed(self) -> bool:
        """True if the connection is closed."""
        return self._closed

    @property
    def readable(self) -> bool:
        """True if the connection is readable."""
        return self._readable

    @property
    def writable(self) -> bool:
        """True if the connection is writable."""
        return self._writable

    def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """Send the bytes data from a bytes-like object."""
        writer = self._writer or self._attach_writer()
        if offset == 0 and size is None:
            writer._send_bytes(buf)  # the C method's fast path
        else:
            writer._send_bytes(buf, offset, size)

    def send(self, obj: object) -> None:
        """Send a (picklable) object."""
        # As multiprocessing pickles (its reducers), with protocol 5, into the end's
        # kept pickler (inline: a method call is a tenth of a small object's send).
        dumper = self._dumper
        if dumper.busy:
            # A send from inside this pickling (a __reduce__), or another thread's
            # while this one's pickling runs Python code: a pickler of its own. (The
            # test and the store below run with no bytecode between them that lets
            # another thread in; a Lock would cost a quarter of the send.)
            oob: list[pickle.PickleBuffer] = []
            fresh = io.BytesIO()
            _ForkingPickler(fresh, 5, True, oob.append).dump(obj)
            data = fresh.getvalue()
        else:
            dumper.busy = True
            try:
                dumper.refresh()
                out, pickler = dumper.out, dumper.pickler
                out.seek(0)
                out.truncate()
                pickler.clear_memo()
                pickler.dump(obj)
                data = out.getvalue()
            finally:
                dumper.busy = False
                oob = dumper.buffers[:] if dumper.buffers else []
                dumper.buffers.clear()
        if not oob:
            (self._writer or self._attach_writer())._send_bytes(data)
            return
        if len(oob) >= _MAX_BUFFERS:  # more than a message may carry: all in band
            out = io.BytesIO()
            _ForkingPickler(out, 5).dump(obj)
            data = out.getvalue()
            (self._writer or self._attach_writer())._send_bytes(data)
            return
        segments = [memoryview(data), *(_raw(b) for b in oob)]
        (self._writer or self._attach_writer())._send_parts(segments)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive bytes data as a bytes object."""
        reader = self._reader or self._attach_reader()
        return reader._recv_bytes(maxlength)

    def recv_bytes_into(self, buf: Any, offset: int = 0) -> int:
        """Receive bytes data into a writeable bytes-like object. Return the number of
        bytes read."""
        reader = self._reader or self._attach_reader()
        with memoryview(buf) as m:
            itemsize = m.itemsize
            bytesize = itemsize * len(m)
            if offset < 0:
                raise ValueError("negative offset")
            elif offset > bytesize:
                raise ValueError("offset too large")
            data = reader._recv_bytes()
            size = len(data)
            if bytesize < offset + size:
                raise BufferTooShort(data)
            with m.cast("B") as flat:
                flat[offset : offset + size] = data
            return size

    def _recv_raw(self) -> bytes | tuple[bytearray, list[bytes | bytearray]]:
        return (self._reader or self._attach_reader())._recv()

    def recv(self) -> Any:
        """Receive a (picklable) object."""
        raw = self._recv_raw()
        if isinstance(raw, bytes):
            return pickle.loads(raw)
        data, buffers = raw
        return pickle.loads(data, buffers=buffers)

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether there is any input available to be read."""
        reader = self._reader or self._attach_reader()
        return reader._poll(timeout)

    def fileno(self) -> int:
        """File descriptor or handle of the connection: readable when a message is
        waiting, the other end closed, or its process died."""
        self._check_closed()
        pid = os.getpid()
        if self._epoll is None or self._epoll_pid != pid:
            epoll = select.epoll()
            epoll.register(self._own_event, select.EPOLLIN)
            epoll.register(self._alive, select.EPOLLIN | select.EPOLLRDHUP)
            self._epoll, self._epoll_pid = epoll, pid
        if self._in_fd >= 0:
            reader = self._reader or self._attach_reader()
            reader.fileno()  # arms: readable when the next message comes, or now
        else:
            writer = self._writer or self._attach_writer()
            writer.fileno()
        return self._epoll.fileno()

    def close(self) -> None:
        """Close the connection."""
        if self._closed:
            return
        self._closed = True
        for name in _BOUND:
            self.__dict__.pop(name, None)
        writer, reader, epoll = self._writer, self._reader, self._epoll
        self._writer = self._reader = self._epoll = None
        fds = (self._out_fd, self._in_fd, self._own_event, self._peer_event, self._alive)
        self._out_fd = self._in_fd = self._own_event = self._peer_event = self._alive = -1
        try:
            # The end of this direction's stream (EOFError for the other end), and of
            # its reading (BrokenPipeError for the other end's sends).
            for handle in (writer, reader):
                if handle is not None:
                    handle.close()
        finally:
            if epoll is not None and self._epoll_pid == os.getpid():
                epoll.close()
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:  # noqa: SIM105 - at interpreter exit contextlib may be gone already
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"capacity={self._capacity}"
        kind = (
            "duplex"
            if self.readable and self.writable
            else "receive end"
            if self.readable
            else "send end"
        )
        return f"<ipc_ring.Connection {kind} {state}>"

    # ---- passing an end to another process ------------------------------------------

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        self._check_closed()
        # Handed over: an attached role becomes vacant for the process that unpickles.
        self._drop_handles()
        fds = [self._out_fd, self._in_fd, self._own_event, self._peer_event, self._alive]
        return _rebuild, (
            tuple(reduction.DupFd(fd) if fd >= 0 else None for fd in fds),
            self._capacity,
        )


def _rebuild(dup_fds: tuple[Any, ...], capacity: int) -> Connection:
    out_fd, in_fd, own_event, peer_event, alive = (-1 if d is None else d.detach() for d in dup_fds)
    return Connection(out_fd, in_fd, own_event, peer_event, alive, capacity)


def _new_ring(capacity: int) -> int:
    """A memfd holding an initialised ring, its writer's role vacant."""
    fd = os.memfd_create("ipc_ring.pipe", os.MFD_CLOEXEC)
    try:
        own = _open_own(fd)
        try:
            _core.Writer(_LABEL, capacity=capacity, _pipe=(own, -1, -1, -1)).detach()
        finally:
            os.close(own)
    except BaseException:
        os.close(fd)
        raise
    return fd


def Pipe(duplex: bool = True, *, capacity: int = 1 << 20) -> tuple[Connection, Connection]:
    """Returns a pair of connected Connection objects, as multiprocessing.Pipe does:
    duplex (the default), or (receive end, send end) with duplex=False. Each
    direction is a ring of `capacity` bytes in a memfd: nothing is made in a file
    system, and nothing is left when both ends are closed or their processes died."""
    if not hasattr(os, "memfd_create") or not hasattr(os, "eventfd"):
        raise NotImplementedError(
            f"{_LABEL} needs Linux (memfd_create and eventfd); elsewhere, use a RingWriter "
            "and a RingReader on a path"
        )
    made: list[int] = []

    def new(fd: int) -> int:
        made.append(fd)
        return fd

    try:
        ab = new(_new_ring(capacity))
        ba = new(_new_ring(capacity)) if duplex else -1
        ev_a = new(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        ev_b = new(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        sock_a, sock_b = socket.socketpair()
        alive_a, alive_b = new(sock_a.detach()), new(sock_b.detach())

        # Each end owns its descriptors: the second gets copies.
        def dup(fd: int) -> int:
            return new(os.dup(fd))

        if duplex:
            # a writes ring ab and reads ring ba; b the other way round.
            ends = (
                Connection(ab, ba, ev_a, ev_b, alive_a, capacity),
                Connection(dup(ba), dup(ab), dup(ev_b), dup(ev_a), alive_b, capacity),
            )
        else:
            # multiprocessing.Pipe(False): (receive end, send end).
            ends = (
                Connection(-1, ab, ev_a, ev_b, alive_a, capacity),
                Connection(dup(ab), -1, dup(ev_b), dup(ev_a), alive_b, capacity),
            )
    except BaseException:
        for fd in made:
            os.close(fd)
        raise
    return ends
