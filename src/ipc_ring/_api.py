"""The public handles: lifecycle in Python, everything else in C.

RingWriter and RingReader subclass the C types in ``_core``, so ``push``,
``pop`` and friends resolve straight to C methods with no Python frame in
between. The C core creates, opens, validates and locks ring files; this
module adds the retrying ``open(wait=...)``, create-or-continue, pickling
and context management.
"""

from __future__ import annotations

import os
import time
from collections.abc import Coroutine
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Self, TypedDict, TypeVar

from . import _core
from ._core import RingBusy, RingClosed

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["RingReader", "RingStats", "RingWriter", "unlink"]


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


def unlink(path: StrPath) -> None:
    """Remove the ring file at ``path`` and its notification FIFOs
    (``path + ".rd"``, ``path + ".wr"``). ``FileNotFoundError`` if the ring
    file does not exist; missing FIFOs are fine. Only a ring file is removed
    (a regular file that starts with the ring magic, of any format version;
    a symlink is not followed): anything else is ``InvalidRing`` and stays.
    Handles that are open keep working; nobody new can open the ring."""
    _core.unlink(_fspath(path))


def _attach_waiting(cls: type[_H], path: StrPath, spin: float | None, wait: float | None) -> _H:
    """Attach to the existing ring at `path`, retried every few milliseconds for up to
    `wait` seconds while the file does not exist yet or the role is held by a live
    process. Anything else (InvalidRing, RingClosed, permissions) fails at once: create
    links a complete ring into place, so a file that exists is never a ring "not yet".
    The role's lock is taken before anything is mapped, so a retry costs two system
    calls, not a mapping."""
    target = _fspath(path)
    wait = _core.check_timeout(wait)  # ValueError for a negative or NaN wait
    if wait is None or wait <= 0:
        return cls(target, spin=spin)
    deadline = time.monotonic() + wait
    while True:
        try:
            return cls(target, spin=spin)
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


def _hand_over(handle: _core.Writer | _core.Reader) -> None:
    """Pickling hands the role to another process: from now on closing (or collecting)
    this handle leaves the role vacant for its successor instead of ending anything."""
    if handle.closed:
        raise RingClosed(f"cannot pickle a closed {type(handle).__name__} ({handle.path!r})")
    handle._hand_over()


_ASYNC: ModuleType | None = None


def _async_glue() -> ModuleType:
    """ipc_ring._async, imported on first use only (it imports asyncio); after that a
    global load, not an import statement per call."""
    global _ASYNC
    if _ASYNC is None:
        from . import _async

        _ASYNC = _async
    return _ASYNC


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

    def __copy__(self) -> None:
        raise TypeError(
            f"a {type(self).__name__} cannot be copied: one process holds a role at a time "
            "(to hand it to another process, pass it to multiprocessing, or detach() and open "
            "it there)"
        )

    def __deepcopy__(self, memo: object) -> None:
        self.__copy__()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"capacity={self.capacity}"
        return f"<{type(self).__name__} path={self.path!r} {state}>"


class RingWriter(_Handle, _core.Writer):
    """The producing end of a ring. Create one with :meth:`RingWriter.create`."""

    __slots__ = ()

    @classmethod
    def create(
        cls,
        path: StrPath,
        capacity: int,
        *,
        mode: int = 0o600,
        spin: float | None = None,
        exist_ok: bool = False,
    ) -> Self:
        """Create a new ring file at ``path`` with a data area of ``capacity`` bytes,
        and its two notification FIFOs, and attach as its writer.

        Everything is built under temporary names in the same directory and then
        linked into place, so no reader can ever map a half-built ring, and an
        existing ``path`` (a file, a symlink, anything) is never followed or
        replaced: ``FileExistsError``, whose message says how to continue or remove
        the ring there. With ``exist_ok=True`` an existing ring is continued instead
        (``RingWriter.open``), which is how a producer that restarts creates or
        continues its ring in one call; its capacity must be ``capacity``
        (``ValueError`` otherwise). ``capacity`` must be a power of two between 64
        bytes and 4 GiB. ``mode`` is applied exactly (the umask does not narrow it).
        """
        target = _fspath(path)
        try:
            return cls(target, capacity=capacity, mode=mode, spin=spin)
        except FileExistsError:
            # Continue only a ring that is there: a FileExistsError about a FIFO's
            # name (the ring path itself was free) stands.
            if not exist_ok or not os.path.lexists(target):
                raise
        # The capacity is fixed at creation: compare it before taking the role, so
        # that a mismatch leaves the ring (and a pending PeerDied) as it was.
        existing = _core.inspect(target)["capacity"]
        if existing != capacity:
            raise ValueError(
                f"{target!r} exists with capacity {existing}, not {capacity}: "
                "remove it with ipc_ring.unlink(path) to create it anew"
            )
        return cls.open(target, spin=spin)

    @classmethod
    def open(cls, path: StrPath, *, spin: float | None = None, wait: float | None = None) -> Self:
        """Attach as the writer of the existing ring at ``path`` whose writer died,
        stopped or was handed over, and continue its stream.

        The stream continues after the last message the previous writer
        published; a record it had reserved but not published is discarded.
        ``RingBusy`` if a live writer is attached, ``RingClosed`` if the
        previous writer ended the stream with ``close()``, ``InvalidRing`` as
        for ``RingReader.open``. ``wait``: seconds to keep retrying while the
        file does not exist yet or a live writer holds the role (None or 0:
        fail at once).
        """
        return _attach_waiting(cls, path, spin, wait)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leaving the block normally ends the stream (``close()``); leaving it with
        an exception does not (``abort()``): the reader drains what was written and
        then gets ``PeerDied``, never a clean end after a truncated stream."""
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __reduce__(self) -> tuple[object, tuple[str, float]]:
        """Pickle by path, handing the role over: the receiving process re-attaches
        with ``RingWriter.open(path, wait=30)``, and this handle's ``close()`` (or
        its collection, or its process's exit) leaves the role vacant for it
        instead of ending the stream."""
        _hand_over(self)
        return _reopen_writer, (self.path, self.spin)

    def push_async(
        self, data: Buffer, /, timeout: float | None = None
    ) -> Coroutine[Any, Any, None]:
        """Like :meth:`push`, but awaits free space in the running asyncio loop
        (on :meth:`fileno`, no thread). ``RingTimeout`` when ``timeout``
        expires, ``PeerDied`` as for ``push``. Cancelled while waiting, it has
        written nothing. One awaiting call per handle at a time. (A coroutine:
        ``await writer.push_async(data)``.)"""
        return _async_glue().push_async(self, data, timeout)  # type: ignore[no-any-return]


class RingReader(_Handle, _core.Reader):
    """The consuming end of a ring. Open one with :meth:`RingReader.open`."""

    __slots__ = ()

    @classmethod
    def open(cls, path: StrPath, *, spin: float | None = None, wait: float | None = None) -> Self:
        """Attach to the ring file at ``path`` as its reader.

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
        """Pickle by path, handing the role over: the receiving process attaches
        with ``RingReader.open(path, wait=30)`` once this handle is closed (or
        collected, or its process exits), and continues from the last committed
        read position; the writer waits for it meanwhile instead of raising
        ``PeerDied``."""
        _hand_over(self)
        return _reopen_reader, (self.path, self.spin)

    def pop_async(self, timeout: float | None = None) -> Coroutine[Any, Any, bytes]:
        """Like :meth:`pop`, but awaits the next message in the running asyncio
        loop (on :meth:`fileno`, no thread). ``RingTimeout`` when ``timeout``
        expires, ``RingClosed`` at the end of the stream, ``PeerDied`` as for
        ``pop``. Cancelled while waiting, it has consumed nothing: the message
        is taken only by the call that returns it. One awaiting call per
        handle at a time. (A coroutine: ``await reader.pop_async()``.)"""
        # A plain function returning the coroutine: no frame of its own to resume.
        return _async_glue().pop_async(self, timeout)  # type: ignore[no-any-return]

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        """``async for msg in reader``: ends at the end of stream, raises
        ``PeerDied`` like the blocking iteration."""
        try:
            return await _async_glue().pop_async(self)  # type: ignore[no-any-return]
        except RingClosed:
            raise StopAsyncIteration from None
