"""asyncio on top of fileno(): wait for a ring next to sockets, no thread per ring.

The protocol is docs/FORMAT.md, "Waiting on a file descriptor", used through the
public methods alone: try the operation with ``timeout=0``; when it cannot proceed
it raises ``RingTimeout`` and leaves ``fileno()`` armed, so the descriptor becomes
readable as soon as the peer publishes (or at once if it already has); wait for
that with ``loop.add_reader``, or for the next liveness poll, and try again. A
message is consumed only by the synchronous ``pop`` that returns it, so a cancelled
wait consumes nothing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from . import _core
from ._core import RingTimeout

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["POLL_INTERVAL", "pop_async", "push_async"]

#: Seconds between liveness checks while a side waits on its FIFO: a dead peer
#: never writes to the FIFO, so the waiter tries again this often (the blocking
#: calls' sleep slice).
POLL_INTERVAL = _core.SLEEP_SLICE

_T = TypeVar("_T")


async def _until(
    handle: _core.Writer | _core.Reader,
    attempt: Callable[[], _T],
    timeout: float | None,
    name: str,
) -> _T:
    """Run `attempt` (which raises RingTimeout when it would block) until it succeeds,
    awaiting fileno() between tries; RingTimeout once `timeout` has passed."""
    limit = _core.check_timeout(timeout)
    loop = asyncio.get_running_loop()
    deadline = None if limit is None else loop.time() + limit
    # The loop watches a descriptor of its own: close() of the handle during
    # the await closes the handle's, whose number another file may take.
    fd = os.dup(handle.fileno())
    try:
        return await _attempts(loop, fd, attempt, name, timeout, deadline)
    finally:
        os.close(fd)


async def _attempts(
    loop: asyncio.AbstractEventLoop,
    fd: int,
    attempt: Callable[[], _T],
    name: str,
    timeout: float | None,
    deadline: float | None,
) -> _T:
    while True:
        try:
            return attempt()
        except RingTimeout:
            pass
        now = loop.time()
        if deadline is not None and now >= deadline:
            raise RingTimeout(f"{name} timed out after {timeout:.6g} s")
        done = loop.create_future()

        def wake(done: asyncio.Future[None] = done) -> None:
            if not done.done():
                done.set_result(None)

        delay = POLL_INTERVAL if deadline is None else min(POLL_INTERVAL, deadline - now)
        loop.add_reader(fd, wake)
        timer = loop.call_later(max(delay, 0.0), wake)
        try:
            await done
        finally:
            timer.cancel()
            loop.remove_reader(fd)


async def pop_async(reader: _core.Reader, timeout: float | None = None) -> bytes:
    """Await the next message (see RingReader.pop_async). pop(timeout=0) takes the
    message if there is one; on an empty ring it tests the writer's liveness once
    (PeerDied), sees the end (RingClosed), and arms fileno()."""
    return await _until(reader, lambda: reader.pop(timeout=0), timeout, "pop_async")


async def push_async(writer: _core.Writer, data: Buffer, timeout: float | None = None) -> None:
    """Await room for ``data`` and push it (see RingWriter.push_async). MessageTooLarge
    and PeerDied come from push(timeout=0) as in the blocking API."""
    await _until(writer, lambda: writer.push(data, timeout=0), timeout, "push_async")
