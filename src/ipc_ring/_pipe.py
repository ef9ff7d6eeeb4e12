"""ipc_ring.Pipe: a drop-in for multiprocessing.Pipe over two rings.

Each direction is one ring in a memfd (no name in any file system); the ends
carry the memfds, an eventfd each for wake-ups and one end of a socket pair that
tells an end whose peer was closed in every process. An end attaches to its
rings on first use, in the process that uses it, so the standard pattern works
under every start method: create in the parent, pass one end to the child.
The records are framed as docs/FORMAT.md, "Pipe messages", describes. The C core
sends and receives them (an end's send pickles into a _core._Sender); what is
here is the Python side of the uncommon cases: an object with out-of-band
buffers (protocol 5), a send from inside a send's pickling, recv_bytes of an
object sent with out-of-band buffers.
"""

from __future__ import annotations

import copyreg
import functools
import io
import os
import pickle
import select
import socket
import threading
import weakref
from multiprocessing import BufferTooShort, reduction
from typing import Any, TypeVar

from . import _core

__all__ = ["Connection", "Pipe"]

_H = TypeVar("_H", _core.Writer, _core.Reader)

_MAX_BUFFERS = (1 << 20) - 1  # out-of-band buffers in one message (and the pickle)
_LABEL = "ipc_ring.Pipe"
_ForkingPickler = reduction.ForkingPickler

_extra_reducers: dict[type, Any] = getattr(_ForkingPickler, "_extra_reducers", {})


_TABLES = (copyreg.dispatch_table, _extra_reducers)


def _new_pickler(sender: _core._Sender) -> pickle.Pickler:
    """The pickler an end's sender keeps from one send to the next: multiprocessing's
    pickling (protocol 5, with the reducers it registered, such as those of its own
    connections), writing into the sender. Made again when copyreg's or
    multiprocessing's registrations change (the sender compares the sizes of
    _TABLES): a ForkingPickler made for every send costs three times the pickling."""
    table = copyreg.dispatch_table.copy()
    table.update(_extra_reducers)
    pickler = pickle.Pickler(sender, 5, buffer_callback=sender._buffer)
    pickler.dispatch_table = table
    return pickler


def _send_slow(
    conn: weakref.ref[Connection],
    writer: _core.Writer,
    obj: object,
    chunks: list[Any] | None,
    oob: list[pickle.PickleBuffer] | None,
) -> None:
    """Connection.send past the C sender's own case (a pickle of one chunk without
    out-of-band buffers): `chunks` and `oob` are what the kept pickler wrote, or
    None for a send from inside this end's pickling (a __reduce__), or another
    thread's while it runs Python code: that one pickles afresh. A writer closed
    meanwhile was handed over by the pickling (the end sent over itself): the end
    attaches again, as it would for its next call."""
    if writer.closed:
        end = conn()
        if end is None:
            raise OSError("handle is closed")
        writer = end._writer or end._attach_writer()
    if chunks is None:
        oob = []
        fresh = io.BytesIO()
        _ForkingPickler(fresh, 5, True, oob.append).dump(obj)
        data: Any = fresh.getvalue()
    else:
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not oob:
        writer._send_bytes(data)
        return
    if len(oob) >= _MAX_BUFFERS:  # more than a message may carry: all in band
        out = io.BytesIO()
        _ForkingPickler(out, 5).dump(obj)
        writer._send_bytes(out.getvalue())
        return
    writer._send_parts([memoryview(data), *(_raw(b) for b in oob)])


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


def _in_band(data: bytearray, buffers: list[bytes | bytearray]) -> bytes:
    """recv_bytes() of an object sent with out-of-band buffers (called by the C
    method): its pickle with each buffer written in band, as a pickler without a
    buffer callback writes it (nothing is unpickled); a buffer that was read-only
    came as bytes. Frames go: their lengths would change."""
    import pickletools

    out = bytearray()
    ops = list(pickletools.genops(bytes(data)))
    taken = iter(buffers)
    for i, (op, _arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name in ("FRAME", "READONLY_BUFFER"):
            continue
        if op.name == "NEXT_BUFFER":
            buffer = next(taken)
            op_code = b"\x8e" if isinstance(buffer, bytes) else b"\x96"  # BINBYTES8, BYTEARRAY8
            out += op_code + len(buffer).to_bytes(8, "little")
            out += buffer
            continue
        out += data[pos:end]
    return bytes(out)


_core._pipe_fallbacks(_send_large, _in_band, pickle.loads)

_connections: weakref.WeakSet[Connection] = weakref.WeakSet()
# The methods an attached end binds to its handles' C methods.
_BOUND = ("send", "send_bytes", "recv_bytes", "poll", "recv", "_recv_raw")


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
        self._sender: _core._Sender | None = None
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
            # The end by a weak reference: an end dropped without close() still
            # closes when its last reference goes (no cycle through its sender).
            slow = functools.partial(_send_slow, weakref.ref(self))
            self._sender = _core._Sender(writer, _TABLES, _new_pickler, slow)
            self._writer = writer
        self.send_bytes = writer._send_bytes  # type: ignore[method-assign]
        self.send = self._sender.send  # type: ignore[method-assign,assignment]
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
        self._sender = None
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
        # Attaching binds this end's send to the C sender's.
        sender = self._sender if self._writer is not None else None
        if sender is None:
            self._attach_writer()
            sender = self._sender
        assert sender is not None
        sender.send(obj)

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
        self._writer = self._reader = self._epoll = self._sender = None
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
