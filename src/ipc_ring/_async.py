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
import weakref
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from . import _core
from ._core import RingTimeout

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["POLL_INTERVAL", "pop_async", "push_async", "retire"]

#: Seconds between liveness checks while a side waits on its FIFO: a dead peer
#: never writes to the FIFO, so the waiter tries again this often (the blocking
#: calls' sleep slice).
POLL_INTERVAL = _core.SLEEP_SLICE

_T = TypeVar("_T")


class _Watch:
    """A handle's descriptor in one event loop, kept between awaits: asyncio's
    add_reader/remove_reader cost more than the rest of a wake-up together, so a wait
    reuses the registration, and its wake-up runs one short callback. The loop watches
    a descriptor of its own (a dup of fileno()): close() of the handle closes the
    handle's, whose number another file may take while the loop still lists it. The
    liveness slice is a timer descriptor in the loop too (where the system has one): a
    loop timer would cost every wake-up of the loop its bookkeeping. A wake-up byte
    that comes while nothing awaits is left where it is (it may be for a select() on
    fileno() elsewhere): the loop stops watching until the next await. Dropped when the
    handle is closed (close, abort, detach), collected, or used from another loop."""

    __slots__ = (
        "__weakref__", "bufs", "fd", "handle", "loop", "pid", "registered", "timer_at", "timer_fd",
        "waiters",
    )  # fmt: skip

    def __init__(self, handle: _core.Writer | _core.Reader, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pid = os.getpid()
        self.waiters: list[asyncio.Future[None]] = []
        self.timer_at: float | None = None  # loop.time() the timer descriptor is armed for
        self.registered = False  # the FIFO's dup is in the loop
        self.fd = self.timer_fd = -1
        self.bufs = [bytearray(256)]
        try:
            self.fd = os.dup(handle.fileno())
            self.timer_fd = _core._timer_fd()
            if self.timer_fd >= 0:
                loop.add_reader(self.timer_fd, self.tick)
        except BaseException:
            self.forget()
            raise
        # Weak: an unclosed handle is still collected (and warns); then this goes.
        self.handle = weakref.ref(handle, self._handle_gone)

    def ready(self) -> None:
        """The descriptor is readable. With waiters: take the bytes (left there, they
        would keep the loop calling) and wake them. Without: stop watching, and leave
        the bytes to whoever armed fileno(). (try/except, not contextlib.suppress: this
        runs in every wake-up; so do the buffer kept for the read and the waiters woken
        here rather than through _wake_all: one allocation and one call fewer. With
        try_pop tried first, these took pop_async's wake-up from 1.12x to 1.08-1.09x the
        add_reader floor, benchmarks/latency.py, before the size check after each await
        was added.)"""
        waiters = self.waiters
        if not waiters:
            self.loop.remove_reader(self.fd)
            self.registered = False
            return
        try:  # noqa: SIM105
            os.readv(self.fd, self.bufs)
        except OSError:
            pass
        self.waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def tick(self) -> None:
        """The liveness slice (or a deadline) is over: the waiters try again."""
        try:  # noqa: SIM105
            os.read(self.timer_fd, 8)
        except OSError:
            pass
        self.timer_at = None
        self._wake_all()

    def _wake_all(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def wait(self, until: float) -> tuple[asyncio.Future[None], asyncio.TimerHandle | None]:
        """A future that ready() or tick() resolves, no later than loop time `until`;
        and the loop timer it needs where there is no timer descriptor (else None)."""
        loop = self.loop
        waiter = loop.create_future()
        self.waiters.append(waiter)
        if not self.registered:
            loop.add_reader(self.fd, self.ready)
            self.registered = True
        if self.timer_fd < 0:
            return waiter, loop.call_at(until, _wake, waiter)
        if self.timer_at is None or self.timer_at > until:  # an earlier one serves too
            _core._timer_set(self.timer_fd, until - loop.time())
            self.timer_at = until
        return waiter, None

    def forget(self) -> None:
        """Unregister and close; in the loop's thread, or once the loop is closed.
        A waiter tries again at once (and finds the handle closed)."""
        _PENDING.discard(self)
        watched = [fd for fd in (self.fd if self.registered else -1, self.timer_fd) if fd >= 0]
        fds = [fd for fd in (self.fd, self.timer_fd) if fd >= 0]
        self.fd = self.timer_fd = -1
        self.registered = False
        self._wake_all()
        try:
            if self.pid == os.getpid() and not self.loop.is_closed():
                for fd in watched:
                    self.loop.remove_reader(fd)
        finally:
            for fd in fds:
                try:  # noqa: SIM105
                    os.close(fd)
                except OSError:  # closed behind our back: nothing of ours to close
                    pass

    def retire(self) -> None:
        """forget() from anywhere: a running loop does it itself, woken through its
        self-pipe (from another thread, or from a signal handler that runs while the
        loop sleeps in its selector, where a plain call would leave the loop asleep
        with nothing left to wake it)."""
        if self.fd < 0:
            return
        loop = self.loop
        if self.pid == os.getpid() and not loop.is_closed() and loop.is_running():
            _PENDING.add(self)  # if the loop stops before it runs forget(): _sweep()
            try:
                loop.call_soon_threadsafe(self.forget)
                return
            except RuntimeError:  # closed meanwhile
                pass
        self.forget()

    def _handle_gone(self, ref: object) -> None:
        self.retire()


#: Watches whose forget() was handed to their loop and has not run yet.
_PENDING: set[_Watch] = set()


def _sweep() -> None:
    """Close the watches whose loop stopped for good before it ran their forget()."""
    for watch in list(_PENDING):
        if watch.loop.is_closed():
            watch.forget()


#: handle -> its _Watch; the weak key goes with the handle.
_WATCHES: weakref.WeakKeyDictionary[_core.Writer | _core.Reader, _Watch] = (
    weakref.WeakKeyDictionary()
)


def retire(handle: _core.Writer | _core.Reader) -> None:
    """The handle was closed (close, abort, detach: the C methods call this for a
    handle whose fileno() was called): the loop stops watching it."""
    if _PENDING:
        _sweep()
    watch = _WATCHES.pop(handle, None)
    if watch is not None:
        watch.retire()


def _watch(handle: _core.Writer | _core.Reader, loop: asyncio.AbstractEventLoop) -> _Watch:
    watch = _WATCHES.get(handle)
    if watch is not None and watch.loop is loop and watch.fd >= 0:
        return watch
    if _PENDING:
        _sweep()
    if watch is not None:
        watch.retire()  # another loop's, or forgotten
    watch = _WATCHES[handle] = _Watch(handle, loop)
    return watch


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _until(
    handle: _core.Writer | _core.Reader,
    attempt: Callable[[], _T],
    timeout: float | None,
    name: str,
    quick: Callable[[], _T | None] | None = None,
) -> _T:
    """Run `attempt` (which raises RingTimeout when it would block) until it succeeds,
    awaiting fileno() between tries; RingTimeout once `timeout` has passed. `quick`, if
    given, is tried before each attempt: a C method that returns None where it would
    block (try_pop), called with no Python frame of its own. One coroutine, so that a
    wake-up resumes and returns through as few frames as can be."""
    limit = _core.check_timeout(timeout)
    if quick is not None:
        result = quick()
        if result is not None:
            return result
    try:
        return attempt()  # the common case in a busy stream: no descriptor, no loop
    except RingTimeout:
        pass
    loop = asyncio.get_running_loop()
    now = loop.time()
    deadline = None if limit is None else now + limit
    if deadline is not None and now >= deadline:
        raise RingTimeout(f"{name} timed out after {timeout:.6g} s")
    # A close during the await retires the watch (close/abort/detach through the C
    # hook, a collection through the weak reference) and wakes this waiter.
    watch = _watch(handle, loop)
    check_size = handle._check_size
    while True:
        until = now + POLL_INTERVAL
        if deadline is not None and deadline < until:
            until = deadline
        waiter, timer = watch.wait(until)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if watch.waiters and waiter in watch.waiters:  # cancelled, or the timer's
                watch.waiters.remove(waiter)
        # A wait is where a truncation is noticed (FORMAT.md "Truncation"): before the
        # next try touches the mapping, as a blocking call after each sleep.
        check_size()
        if quick is not None:
            result = quick()
            if result is not None:
                return result
        try:
            return attempt()
        except RingTimeout:
            pass
        now = loop.time()
        if deadline is not None and now >= deadline:
            raise RingTimeout(f"{name} timed out after {timeout:.6g} s")
        if watch.fd < 0:  # dropped meanwhile (an await from another loop): a new one
            watch = _watch(handle, loop)


def pop_async(reader: _core.Reader, timeout: float | None = None) -> Coroutine[Any, Any, bytes]:
    """Await the next message (see RingReader.pop_async). pop(timeout=0) takes the
    message if there is one; on an empty ring it tests the writer's liveness once
    (PeerDied), sees the end (RingClosed), and arms fileno(). try_pop first: after a
    wake-up, or in a busy stream, the message is there, and try_pop takes it without
    parsing a timeout (a message is never None: b"" is one)."""
    pop = reader.pop
    cls = type(reader)
    # A subclass's own pop (or try_pop) is what its pop_async goes through.
    plain = cls.pop is _core.Reader.pop and cls.try_pop is _core.Reader.try_pop
    return _until(reader, lambda: pop(0), timeout, "pop_async", reader.try_pop if plain else None)


def push_async(
    writer: _core.Writer, data: Buffer, timeout: float | None = None
) -> Coroutine[Any, Any, None]:
    """Await room for ``data`` and push it (see RingWriter.push_async). MessageTooLarge
    and PeerDied come from push(timeout=0) as in the blocking API."""
    push = writer.push
    return _until(writer, lambda: push(data, 0), timeout, "push_async")


_core._closed_hook(retire)
