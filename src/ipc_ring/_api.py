"""The public handles: file lifecycle in Python, the per-message path in C.

RingWriter and RingReader subclass the C types in ``_core``, so ``push``,
``pop`` and friends resolve straight to C methods with no Python frame in
between; this module only adds creating, opening and context management.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypedDict, TypeVar

from . import _core
from ._core import InvalidRing, RingBusy, RingClosed

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["RingReader", "RingStats", "RingWriter", "unlink"]

#: Suffixes of the notification FIFOs next to a ring file (docs/FORMAT.md,
#: "Waiting on a file descriptor"): data for the reader, space for the writer.
READER_FIFO = ".rd"
WRITER_FIFO = ".wr"
_FIFO_FLAGS = os.O_RDWR | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | os.O_NOFOLLOW


class RingStats(TypedDict):
    """What ``stats()`` returns: docs/FORMAT.md "Counters", read from the header."""

    capacity: int
    used_bytes: int
    messages_pushed: int
    bytes_pushed: int
    messages_popped: int
    bytes_popped: int
    writer_full_waits: int
    reader_empty_waits: int
    high_water: int


StrPath = str | os.PathLike[str]

_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
_H = TypeVar("_H", bound=_core.Writer | _core.Reader)

# How often open(wait=...) retries while the file is missing or the role is taken.
_RETRY_INTERVAL = 0.005
# How long unpickling a handle waits for the sending process to release the role.
UNPICKLE_WAIT = 30.0


def _fspath(path: StrPath) -> str:
    p = os.fspath(path)
    if not isinstance(p, str):
        raise TypeError(f"path must be str or os.PathLike[str], got {type(p).__name__}")
    return p


def _open_fifo(path: str) -> int | None:
    """Open a notification FIFO O_RDWR | O_NONBLOCK (never blocks, never sees
    EOF); None if it does not exist (a ring made without FIFOs)."""
    try:
        fd = os.open(path, _FIFO_FLAGS)
    except FileNotFoundError:
        return None
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidRing(f"{path!r} is not a FIFO")
    return fd


def _attach_notify(handle: _core.Writer | _core.Reader, path: str, own: str, peer: str) -> None:
    """Give the handle its own FIFO (for fileno()) and the peer's (to wake it)."""
    rx = _open_fifo(path + own)
    if rx is None:
        return
    try:
        tx = _open_fifo(path + peer)
        if tx is None:
            os.close(rx)
            return
    except BaseException:
        os.close(rx)
        raise
    handle._attach_notify(rx, tx)


def _make_fifo(path: str, mode: int) -> bool:
    """Create a notification FIFO with exactly `mode`. True if created here;
    False if a FIFO of that name exists already (a stale one from a ring
    removed without ipc_ring.unlink: reused, at worst one spurious wake-up)."""
    try:
        os.mkfifo(path, mode)
    except FileExistsError:
        if stat.S_ISFIFO(os.lstat(path).st_mode):
            return False
        raise
    fd = os.open(path, _FIFO_FLAGS)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def unlink(path: StrPath) -> None:
    """Remove the ring file at ``path`` and its notification FIFOs
    (``path + ".rd"``, ``path + ".wr"``). ``FileNotFoundError`` if the ring
    file does not exist; missing FIFOs (an older ring) are fine. Handles that
    are open keep working; nobody new can open the ring."""
    target = _fspath(path)
    os.unlink(target)
    for suffix in (READER_FIFO, WRITER_FIFO):
        try:
            if stat.S_ISFIFO(os.lstat(target + suffix).st_mode):
                os.unlink(target + suffix)
        except FileNotFoundError:
            pass


def _attach_existing(cls: type[_H], path: StrPath, spin: float | None) -> _H:
    """Open an existing ring file and hand it to the C handle, which maps,
    validates and locks it; the descriptor is closed again on any failure."""
    target = _fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO or a device must not block before the check.
        fd = os.open(target, _OPEN_FLAGS | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError as e:
        raise InvalidRing(f"{target!r} is a directory, not a ring file") from e
    try:
        handle = cls(fd, target, spin=spin)
    except BaseException:
        os.close(fd)
        raise
    try:
        if isinstance(handle, _core.Writer):
            _attach_notify(handle, target, WRITER_FIFO, READER_FIFO)
        else:
            _attach_notify(handle, target, READER_FIFO, WRITER_FIFO)
    except BaseException:
        # A re-attaching writer that fails here must not end a stream it
        # never wrote to: give the role back as it found it.
        if isinstance(handle, _core.Writer):
            handle.detach()
        else:
            handle.close()
        raise
    return handle


def _attach_waiting(cls: type[_H], path: StrPath, spin: float | None, wait: float | None) -> _H:
    """`_attach_existing`, retried every few milliseconds for up to `wait` seconds while
    the file does not exist yet or the role is held by a live process. Anything else
    (InvalidRing, RingClosed, permissions) fails at once: create links a complete ring
    into place, so a file that exists is never a ring "not yet"."""
    if wait is None or wait <= 0:
        return _attach_existing(cls, path, spin)
    deadline = time.monotonic() + wait
    while True:
        try:
            return _attach_existing(cls, path, spin)
        except (FileNotFoundError, RingBusy):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            time.sleep(min(_RETRY_INTERVAL, remaining))


def _reopen_writer(path: str, spin: float) -> RingWriter:
    """Unpickle a RingWriter: re-attach by path once the sender released the role."""
    return RingWriter.open(path, spin=spin, wait=UNPICKLE_WAIT)


def _reopen_reader(path: str, spin: float) -> RingReader:
    """Unpickle a RingReader: attach by path once the sender released the role; reading
    continues from the last committed position."""
    return RingReader.open(path, spin=spin, wait=UNPICKLE_WAIT)


def _check_picklable(handle: _core.Writer | _core.Reader) -> None:
    if handle.closed:
        raise RingClosed(f"cannot pickle a closed {type(handle).__name__} ({handle.path!r})")


class _Handle:
    """What both handles add to their C type: a context manager and a repr."""

    __slots__ = ()
    if TYPE_CHECKING:  # provided by the C type that comes after this class in the MRO
        closed: bool
        capacity: int
        path: str

        def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"capacity={self.capacity}"
        return f"<{type(self).__name__} path={self.path!r} {state}>"


class RingWriter(_Handle, _core.Writer):
    """The producing end of a ring. Create one with :meth:`RingWriter.create`."""

    __slots__ = ()

    @classmethod
    def create(
        cls, path: StrPath, capacity: int, *, mode: int = 0o600, spin: float | None = None
    ) -> Self:
        """Create a new ring file at ``path`` with a data area of ``capacity`` bytes.

        The file is built and sized under a temporary name in the same
        directory and then linked into place, so no reader can ever map a
        half-built ring, and an existing ``path`` (a file, a symlink, anything)
        is never followed or replaced: ``FileExistsError``. ``capacity`` must be
        a power of two between 64 bytes and 4 GiB. ``mode`` is applied exactly
        (the umask does not narrow it).
        """
        target = _fspath(path)
        directory, name = os.path.split(os.path.abspath(target))
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        # The handle takes the writer's liveness lock on this descriptor before
        # the name exists, so no reader ever sees the ring without a writer.
        fd = os.open(tmp, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
            # Sizes the file, reserves its blocks, writes the header, locks.
            self = cls(fd, target, capacity=capacity, spin=spin)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        made: list[str] = []
        try:
            # The FIFOs exist before the ring's name, so every reader that
            # finds the ring finds them too.
            for suffix in (READER_FIFO, WRITER_FIFO):
                if _make_fifo(target + suffix, mode):
                    made.append(target + suffix)
            os.link(tmp, target)
        except BaseException:
            self.close()
            for fifo in made:
                os.unlink(fifo)
            raise
        finally:
            os.unlink(tmp)
        try:
            _attach_notify(self, target, WRITER_FIFO, READER_FIFO)
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def open(cls, path: StrPath, *, spin: float | None = None, wait: float | None = None) -> Self:
        """Re-attach a writer to the existing ring at ``path`` whose writer died.

        The stream continues after the last message the previous writer
        published; a record it had reserved but not published is discarded.
        ``RingBusy`` if a live writer is attached, ``RingClosed`` if the
        previous writer ended the stream with ``close()``, ``InvalidRing`` as
        for ``RingReader.open``. ``wait``: seconds to keep retrying while the
        file does not exist yet or a live writer holds the role (None or 0:
        fail at once).
        """
        return _attach_waiting(cls, path, spin, wait)

    def __reduce__(self) -> tuple[object, tuple[str, float]]:
        """Pickle by path: the receiving process re-attaches with
        ``RingWriter.open(path, wait=30)``, so the sender must let go of the role
        without ending the stream: ``detach()`` (or its process exits)."""
        _check_picklable(self)
        return _reopen_writer, (self.path, self.spin)

    async def push_async(self, data: Buffer, /, timeout: float | None = None) -> None:
        """Like :meth:`push`, but awaits free space in the running asyncio loop
        (on :meth:`fileno`, no thread). ``RingTimeout`` when ``timeout``
        expires, ``PeerDied`` as for ``push``. Cancelled while waiting, it has
        written nothing. One awaiting call per handle at a time."""
        from . import _async  # asyncio is imported on first use only

        await _async.push_async(self, data, timeout)


class RingReader(_Handle, _core.Reader):
    """The consuming end of a ring. Open one with :meth:`RingReader.open`."""

    __slots__ = ()

    @classmethod
    def open(cls, path: StrPath, *, spin: float | None = None, wait: float | None = None) -> Self:
        """Attach to the ring file at ``path``.

        ``FileNotFoundError`` if it does not exist; ``RingBusy`` if a live
        reader holds the role; ``InvalidRing`` at once if it is not a complete,
        valid ring (wrong magic or version, a capacity that is not a power of
        two, a file shorter than its header says, inconsistent positions, not
        a regular file). ``wait``: seconds to keep retrying while the file does
        not exist yet or the role is taken (None or 0: fail at once);
        ``InvalidRing`` is never retried.
        """
        return _attach_waiting(cls, path, spin, wait)

    def __reduce__(self) -> tuple[object, tuple[str, float]]:
        """Pickle by path: the receiving process attaches with
        ``RingReader.open(path, wait=30)`` once the sender closed its handle, and
        continues from the last committed read position."""
        _check_picklable(self)
        return _reopen_reader, (self.path, self.spin)

    async def pop_async(self, timeout: float | None = None) -> bytes:
        """Like :meth:`pop`, but awaits the next message in the running asyncio
        loop (on :meth:`fileno`, no thread). ``RingTimeout`` when ``timeout``
        expires, ``RingClosed`` at the end of the stream, ``PeerDied`` as for
        ``pop``. Cancelled while waiting, it has consumed nothing: the message
        is taken only by the call that returns it. One awaiting call per
        handle at a time."""
        from . import _async  # asyncio is imported on first use only

        return await _async.pop_async(self, timeout)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        """``async for msg in reader``: ends at the end of stream, raises
        ``PeerDied`` like the blocking iteration."""
        from . import _async

        try:
            return await _async.pop_async(self)
        except RingClosed:
            raise StopAsyncIteration from None
