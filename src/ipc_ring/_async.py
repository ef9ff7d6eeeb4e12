"""asyncio on top of fileno(): wait for a ring next to sockets, no thread per ring.

The protocol is docs/FORMAT.md, "Waiting on a file descriptor": try the
operation; if it cannot proceed, arm (``_arm()`` sets this side's waiting
flag to 2 and re-checks), hand ``fileno()`` to the loop with
``loop.add_reader``, and when it is readable (or a liveness poll is due)
drain and disarm (``_disarm()``) and try again. A message is consumed only by
the synchronous ``pop`` that returns it, so a cancelled wait consumes
nothing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from . import _core
from ._core import RingTimeout

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["POLL_INTERVAL", "pop_async", "push_async"]

#: Seconds between liveness checks while a side waits on its FIFO: a dead peer
#: never writes to the FIFO, so the waiter looks at its lock this often (the
#: blocking calls' sleep slice).
POLL_INTERVAL = _core.SLEEP_SLICE


def _deadline(loop: asyncio.AbstractEventLoop, timeout: float | None) -> float | None:
    limit = _core.check_timeout(timeout)
    return None if limit is None else loop.time() + limit


async def _wait_readable(
    loop: asyncio.AbstractEventLoop, handle: _core.Writer | _core.Reader, deadline: float | None
) -> None:
    """Wait until the armed handle's fileno() is readable, the next liveness
    poll is due, or the deadline passes; then drain and disarm."""
    fd = handle.fileno()
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    delay = POLL_INTERVAL if deadline is None else min(POLL_INTERVAL, deadline - loop.time())
    loop.add_reader(fd, wake)
    timer = loop.call_later(max(delay, 0.0), wake)
    try:
        await done
    finally:
        timer.cancel()
        loop.remove_reader(fd)
        handle._disarm()


async def pop_async(reader: _core.Reader, timeout: float | None = None) -> bytes:
    """Await the next message (see RingReader.pop_async)."""
    loop = asyncio.get_running_loop()
    deadline = _deadline(loop, timeout)
    while True:
        try:
            # Takes the message if there is one; on an empty ring tests the
            # writer's lock once (PeerDied) and sees the end (RingClosed).
            return reader.pop(timeout=0)
        except RingTimeout:
            pass
        if deadline is not None and loop.time() >= deadline:
            raise RingTimeout(f"pop_async timed out after {timeout:.6g} s")
        if reader._arm():
            await _wait_readable(loop, reader, deadline)


async def push_async(writer: _core.Writer, data: Buffer, timeout: float | None = None) -> None:
    """Await room for ``data`` and push it (see RingWriter.push_async)."""
    loop = asyncio.get_running_loop()
    deadline = _deadline(loop, timeout)
    while True:
        try:
            # Pushes if there is room; on a full ring tests the reader's lock
            # once (PeerDied). MessageTooLarge and the rest propagate.
            writer.push(data, timeout=0)
            return
        except RingTimeout:
            pass
        if deadline is not None and loop.time() >= deadline:
            raise RingTimeout(f"push_async timed out after {timeout:.6g} s")
        if writer._arm():
            await _wait_readable(loop, writer, deadline)
