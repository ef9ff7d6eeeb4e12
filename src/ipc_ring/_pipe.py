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
import weakref
from collections.abc import Callable
from multiprocessing import BufferTooShort, reduction
from typing import Any

from . import _core

__all__ = ["Connection", "Pipe"]

_WHOLE = 3
_HEAD = 4
_PART = 5
_FRAME = struct.Struct("<Q")
_PART_FRAME = _FRAME.pack(_PART)
_READONLY = 1 << 63  # in a segment's length: an out-of-band buffer that was read-only
_LABEL = "ipc_ring.Pipe"
_ForkingPickler = reduction.ForkingPickler

# What multiprocessing's pickler adds to plain pickle and plain pickle does the same
# for (or refuses: a socket raises TypeError, and the send is retried with it).
_PLAIN_ALIKE = frozenset(
    {
        type(_ForkingPickler.dumps),  # method
        type(list.append),  # method_descriptor
        type(int.__add__),  # wrapper_descriptor
        __import__("functools").partial,
        socket.socket,
    }
)
_extra_reducers: dict[type, Any] = getattr(_ForkingPickler, "_extra_reducers", {})
_plain_checked = -1
_plain_ok = False


def _plain_pickle_ok() -> bool:
    """Whether pickle.dumps pickles as multiprocessing's pickler does: while the
    reducers it registered are only those plain pickle matches."""
    global _plain_checked, _plain_ok
    if len(_extra_reducers) != _plain_checked:
        _plain_checked = len(_extra_reducers)
        _plain_ok = _extra_reducers.keys() <= _PLAIN_ALIKE
    return _plain_ok


class _Dumper:
    """multiprocessing's pickling (protocol 5, with the reducers it registered, such
    as those of its own connections) into a buffer kept from one send to the next:
    a ForkingPickler made for every send costs three times the pickling."""

    def __init__(self, callback: Callable[[pickle.PickleBuffer], object]) -> None:
        self.callback = callback
        self.out = io.BytesIO()
        self.key = (-1, -1)
        self.pickler = pickle.Pickler(self.out, 5, buffer_callback=callback)
        self.busy = False

    def dumps(self, obj: object) -> bytes:
        key = (len(copyreg.dispatch_table), len(_extra_reducers))
        if self.busy:  # a send from inside this pickling (a __reduce__): a pickler of its own
            out = io.BytesIO()
            _ForkingPickler(out, 5, True, self.callback).dump(obj)
            return out.getvalue()
        if key != self.key:
            table = copyreg.dispatch_table.copy()
            table.update(_extra_reducers)
            self.pickler.dispatch_table = table
            self.key = key
        self.busy = True
        try:
            out = self.out
            out.seek(0)
            out.truncate()
            self.pickler.clear_memo()
            self.pickler.dump(obj)
            return out.getvalue()
        finally:
            self.busy = False


def _open_own(fd: int) -> int:
    """An open file description of its own for the ring behind fd: the role locks
    belong to open file descriptions, so every attach gets one."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(
            e.errno, f"{_LABEL} needs /proc/self/fd to attach to its ring ({e.strerror})"
        ) from None


def _chunk(capacity: int) -> int:
    """The bytes of a message's stream one part record carries: a quarter of the
    ring, so that the receiver copies one part out while the sender copies the next
    in."""
    return max(8, capacity // 4 - 16)


def _send_parts(writer: _core.Writer, segments: list[memoryview]) -> None:
    """A message of several records: its stream is the segment lengths (u64 each)
    followed by the segments; the first record (HEAD, its frame giving the segment
    count) and every next one (PART) carry up to a chunk of it, copied straight into
    the ring."""
    chunk = _chunk(writer.capacity)
    lengths = (s.nbytes | (_READONLY if s.readonly else 0) for s in segments)
    views = [memoryview(struct.pack(f"<{len(segments)}Q", *lengths))]
    views += segments
    total = sum(v.nbytes for v in views)
    frame = _FRAME.pack(_HEAD | (len(segments) << 32))
    index = offset = sent = 0
    while sent < total:
        take = min(chunk, total - sent)
        with writer.reserve(8 + take) as slot:
            slot[:8] = frame
            pos = 8
            while pos < 8 + take:
                view = views[index]
                n = min(view.nbytes - offset, 8 + take - pos)
                slot[pos : pos + n] = view[offset : offset + n]
                pos += n
                offset += n
                if offset == view.nbytes:
                    index += 1
                    offset = 0
        sent += take
        frame = _PART_FRAME


def _send_large(writer: _core.Writer, obj: object, offset: int, size: int) -> None:
    """_send_bytes of a payload larger than a record (called by the C method)."""
    with memoryview(obj) as view:  # type: ignore[arg-type]
        flat = view.cast("B") if view.ndim != 1 or view.itemsize != 1 else view
        _send_parts(writer, [flat[offset : offset + size]])


def _raw(buffer: pickle.PickleBuffer) -> memoryview:
    """An out-of-band buffer's bytes, in place if they are contiguous."""
    try:
        return buffer.raw()
    except BufferError:
        return memoryview(memoryview(buffer).tobytes())


class _Stream:
    """Collects the stream of a message of several records."""

    def __init__(self, nseg: int) -> None:
        if not 1 <= nseg <= 1 << 20:
            raise OSError(f"{_LABEL}: a message of {nseg} segments")
        self.nseg = nseg
        self.header = bytearray()
        self.lengths: tuple[int, ...] | None = None
        self.readonly: list[bool] = []
        self.segments: list[bytearray] = []
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
                    self.segments = [bytearray(n) for n in self.lengths]
                    self._skip_empty()
                continue
            if self.index >= self.nseg:
                raise OSError(f"{_LABEL}: a message longer than its lengths say")
            segment = self.segments[self.index]
            take = min(len(segment) - self.filled, end - pos)
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
    data, *parts = stream.segments
    # A read-only buffer comes back read-only, as pickle gives it in band.
    readonly = stream.readonly[1:]
    buffers = [bytes(b) if ro else b for b, ro in zip(parts, readonly, strict=True)]
    if not want_bytes:
        return data, buffers
    if buffers:
        # recv_bytes() of an object sent with out-of-band buffers: the same object
        # pickled in band, as multiprocessing.Pipe's send would have sent it.
        data = bytearray(pickle.dumps(pickle.loads(data, buffers=buffers), 5))
    if maxlength >= 0 and len(data) > maxlength:
        raise OSError("bad message length")
    return bytes(data)


_core._pipe_fallbacks(_send_large, _recv_large)

_connections: weakref.WeakSet[Connection] = weakref.WeakSet()


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
        self._oob: list[pickle.PickleBuffer] = []
        self._dumper = _Dumper(self._oob.append)
        self._closed = False
        _connections.add(self)

    # ---- attaching ------------------------------------------------------------------

    def _pipe_args(self, fd: int) -> tuple[int, int, int, int]:
        return (_open_own(fd), self._own_event, self._peer_event, self._alive)

    def _busy(self, role: str) -> _core.RingBusy:
        return _core.RingBusy(
            f"this end of an {_LABEL} is {role} by another process: an end is used by one "
            "process at a time (pass it to the process that uses it, and leave it alone in "
            "the others)"
        )

    def _attach_writer(self) -> _core.Writer:
        self._check_closed()
        if self._out_fd < 0:
            raise OSError("connection is read-only")
        try:
            writer = _core.Writer(_LABEL, _pipe=self._pipe_args(self._out_fd))
        except _core.RingBusy:
            raise self._busy("written") from None
        self._writer = writer
        self.send_bytes = writer._send_bytes  # type: ignore[method-assign]
        return writer

    def _attach_reader(self) -> _core.Reader:
        self._check_closed()
        if self._in_fd < 0:
            raise OSError("connection is write-only")
        try:
            reader = _core.Reader(_LABEL, _pipe=self._pipe_args(self._in_fd))
        except _core.RingBusy:
            raise self._busy("read") from None
        self._reader = reader
        self.recv_bytes = reader._recv_bytes  # type: ignore[method-assign]
        self.poll = reader._poll  # type: ignore[method-assign]
        self._recv_raw = reader._recv  # type: ignore[method-assign]
        return reader

    def _drop_handles(self, forked: bool = False) -> None:
        for name in ("send_bytes", "recv_bytes", "poll", "_recv_raw"):
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
        oob = self._oob
        if _plain_pickle_ok():
            try:
                data = pickle.dumps(obj, 5, buffer_callback=oob.append)
            except TypeError:
                if socket.socket not in _extra_reducers:
                    raise
                oob.clear()
                data = self._dumper.dumps(obj)  # a socket: multiprocessing's reducer
        else:
            data = self._dumper.dumps(obj)
        if not oob:
            (self._writer or self._attach_writer())._send_bytes(data)
            return
        try:
            buffers = [memoryview(data), *(_raw(b) for b in oob)]
        finally:
            oob.clear()
        writer = self._writer or self._attach_writer()
        writer._check_peer()
        _send_parts(writer, buffers)

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
        for name in ("send_bytes", "recv_bytes", "poll", "_recv_raw"):
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
        _core.Writer(_LABEL, capacity=capacity, _pipe=(_open_own(fd), -1, -1, -1)).detach()
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
