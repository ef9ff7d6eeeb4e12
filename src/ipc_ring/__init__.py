"""ipc_ring: a memory-mapped single-producer / single-consumer ring buffer for
passing byte messages between two processes on one Unix machine.

    from ipc_ring import RingWriter, RingReader

    with RingWriter.create("/dev/shm/events", 1 << 20) as w:
        w.push(b"hello")

    with RingReader.open("/dev/shm/events") as r:
        for msg in r:
            ...
"""

from typing import TYPE_CHECKING

from ._api import RingReader, RingStats, RingWriter, unlink
from ._core import (
    FORMAT_VERSION,
    InvalidRing,
    MessageTooLarge,
    PeerDied,
    PipePeerDied,
    PipePeerGone,
    RingBusy,
    RingClosed,
    RingError,
    RingTimeout,
)

if TYPE_CHECKING:
    from ._pipe import Connection, Pipe


def __getattr__(name: str) -> object:
    # ipc_ring.Pipe imports multiprocessing and pickle: only when it is used.
    if name in ("Pipe", "Connection"):
        from . import _pipe

        return getattr(_pipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "Connection",
    "InvalidRing",
    "MessageTooLarge",
    "PeerDied",
    "Pipe",
    "PipePeerDied",
    "PipePeerGone",
    "RingBusy",
    "RingClosed",
    "RingError",
    "RingReader",
    "RingStats",
    "RingTimeout",
    "RingWriter",
    "unlink",
]
__version__ = "0.1.0"
