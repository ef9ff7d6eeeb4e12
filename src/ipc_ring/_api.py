"""The public handles: file lifecycle in Python, the per-message path in C.

RingWriter and RingReader subclass the C types in ``_core``, so ``push``,
``pop`` and friends resolve straight to C methods with no Python frame in
between; this module only adds creating, opening and context management.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from types import TracebackType
from typing import Self, TypedDict, TypeVar

from . import _core
from ._core import InvalidRing

__all__ = ["RingReader", "RingStats", "RingWriter"]


class RingStats(TypedDict):
    """What ``stats()`` returns: docs/FORMAT.md "Counters", read from the header."""

    capacity: int
    used: int
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


def _fspath(path: StrPath) -> str:
    p = os.fspath(path)
    if not isinstance(p, str):
        raise TypeError(f"path must be str or os.PathLike[str], got {type(p).__name__}")
    return p


def _reserve_space(fd: int, size: int) -> None:
    """Allocate the file's blocks now, so a full file system (a 64 MiB /dev/shm
    in Docker) is ENOSPC here instead of SIGBUS on first touch later."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


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
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidRing(f"{target!r} is not a regular file")
        return cls(fd, target, spin=spin)
    except BaseException:
        os.close(fd)
        raise


class RingWriter(_core.Writer):
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
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if not _core.capacity_valid(capacity):
            raise ValueError(
                f"capacity must be a power of two between {_core.MIN_CAPACITY} and "
                f"{_core.MAX_CAPACITY} bytes, got {capacity}"
            )
        directory, name = os.path.split(os.path.abspath(target))
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        # The handle takes the writer's liveness lock on this descriptor before
        # the name exists, so no reader ever sees the ring without a writer.
        fd = os.open(tmp, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
            size = _core.DATA_OFFSET + capacity
            os.ftruncate(fd, size)
            _reserve_space(fd, size)
            self = cls(fd, target, capacity=capacity, spin=spin)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        try:
            os.link(tmp, target)
        except BaseException:
            self.close()
            raise
        finally:
            os.unlink(tmp)
        return self

    @classmethod
    def open(cls, path: StrPath, *, spin: float | None = None) -> Self:
        """Re-attach a writer to the existing ring at ``path`` whose writer died.

        The stream continues after the last message the dead writer
        published; a record it had reserved but not published is discarded.
        ``RingBusy`` if a live writer is attached, ``RingClosed`` if the
        previous writer ended the stream with ``close()``, ``InvalidRing`` as
        for ``RingReader.open``.
        """
        return _attach_existing(cls, path, spin)

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
        return f"<RingWriter path={self.path!r} {state}>"


class RingReader(_core.Reader):
    """The consuming end of a ring. Open one with :meth:`RingReader.open`."""

    __slots__ = ()

    @classmethod
    def open(cls, path: StrPath, *, spin: float | None = None) -> Self:
        """Attach to the ring file at ``path``.

        ``FileNotFoundError`` if it does not exist; ``InvalidRing`` at once if
        it is not a complete, valid ring (wrong magic or version, a capacity
        that is not a power of two, a file shorter than its header says,
        inconsistent positions, not a regular file).
        """
        return _attach_existing(cls, path, spin)

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
        return f"<RingReader path={self.path!r} {state}>"
