"""Contracts that span every method, each one table over METHODS, the list of method
descriptors below: adding a method adds one row there, and every table takes it up.

- every C method has the text signature the documentation gives it (inspect.signature);
- a bad timeout is refused before the call touches the ring;
- a call on a closed writer or reader raises RingClosed;
- a second thread calling a handle while a call on it waits gets RuntimeError, and the
  waiting call goes on undisturbed;
- close() from another thread wakes a thread waiting in any blocking call, which then
  raises RingClosed.

The rest of the API surface closes the module: argument passing, the constructors'
signatures and the exported exceptions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import ipc_ring
from conftest import TIMEOUT, Worker, fill
from ipc_ring import (
    InvalidRing,
    MessageTooLarge,
    PeerDied,
    RingBusy,
    RingClosed,
    RingError,
    RingReader,
    RingTimeout,
    RingWriter,
)
from ipc_ring._core import Slot

# What every writer call below writes: 8 bytes, a 16-byte record, like each of fill()'s.
MESSAGE = b"message!"

OWNERS: dict[str, type] = {"writer": RingWriter, "reader": RingReader, "slot": Slot}


def reserve_and_fill(writer: RingWriter, timeout: float | None) -> None:
    with writer.reserve(len(MESSAGE), timeout=timeout) as view:
        view[:] = MESSAGE


def pop_into_a_buffer(reader: RingReader, timeout: float | None) -> list[bytes]:
    buffer = bytearray(64)
    length = reader.pop_into(buffer, timeout=timeout)
    return [bytes(buffer[:length])]


def peek_and_consume(reader: RingReader, timeout: float | None) -> list[bytes]:
    messages = reader.peek_many(10, timeout=timeout)
    reader.consume(len(messages))
    return messages


def pop_a_view(reader: RingReader, timeout: float | None) -> list[bytes]:
    with reader.pop_view(timeout=timeout) as view:
        message = bytes(view)
    return [message]


@dataclass(frozen=True)
class Method:
    """One method of RingWriter, RingReader or a slot (what reserve() and pop_view() return),
    and how the tables call it.

    `call(handle, timeout)` makes one complete call, a slot's block included: a writer's
    writes MESSAGE, a reader's returns the messages it took, as a list; a method without a
    timeout ignores it. `call` is None for close() and detach(), which end a handle rather
    than use it and may come at any time (test_lifecycle.py), and for the slot's methods
    (test_slots.py). `timed` methods take a timeout and wait on an empty ring (reader) or a
    full one (writer); next() waits too, but has no timeout, so no table makes it wait.
    """

    side: str  # "writer", "reader" or "slot"
    name: str
    signature: str  # the documented text signature, as inspect.signature and help() show it
    call: Callable[[Any, Any], object] | None = None
    timed: bool = False

    def __str__(self) -> str:
        return f"{self.side}.{self.name}"

    def timeouts(self) -> tuple[float | None, ...]:
        """The timeouts to call it with when it must not wait: 0 and a long one if it takes
        a timeout."""
        return (0, TIMEOUT) if self.timed else (None,)


METHODS = [
    Method(
        "writer",
        "push",
        "(self, data, /, timeout=None)",
        lambda w, t: w.push(MESSAGE, timeout=t),
        timed=True,
    ),
    Method("writer", "try_push", "(self, data, /)", lambda w, t: w.try_push(MESSAGE)),
    Method(
        "writer",
        "push_many",
        "(self, messages, /, timeout=None)",
        lambda w, t: w.push_many([MESSAGE], timeout=t),
        timed=True,
    ),
    Method("writer", "reserve", "(self, size, /, timeout=None)", reserve_and_fill, timed=True),
    Method("writer", "fileno", "(self, /)", lambda w, t: w.fileno()),
    Method("writer", "stats", "(self, /)", lambda w, t: w.stats()),
    Method("writer", "detach", "(self, /)"),
    Method("writer", "abort", "(self, /)"),
    Method("writer", "close", "(self, /)"),
    Method("reader", "pop", "(self, /, timeout=None)", lambda r, t: [r.pop(timeout=t)], timed=True),
    Method("reader", "try_pop", "(self, /)", lambda r, t: [r.try_pop()]),
    Method("reader", "pop_into", "(self, buffer, /, timeout=None)", pop_into_a_buffer, timed=True),
    Method(
        "reader",
        "pop_many",
        "(self, /, max_messages, timeout=None, max_bytes=None)",
        lambda r, t: r.pop_many(10, timeout=t),
        timed=True,
    ),
    Method(
        "reader",
        "peek_many",
        "(self, /, max_messages, timeout=None, max_bytes=None)",
        peek_and_consume,
        timed=True,
    ),
    Method("reader", "consume", "(self, count, /)"),
    Method("reader", "pop_view", "(self, /, timeout=None)", pop_a_view, timed=True),
    Method("reader", "__next__", "(self, /)", lambda r, t: [next(r)]),
    Method("reader", "fileno", "(self, /)", lambda r, t: r.fileno()),
    Method("reader", "stats", "(self, /)", lambda r, t: r.stats()),
    Method("reader", "detach", "(self, /)"),
    Method("reader", "close", "(self, /)"),
    Method("slot", "commit", "(self, size=None, /)"),
    Method("slot", "discard", "(self, /)"),
    Method("slot", "__enter__", "(self, /)"),
    Method("slot", "__exit__", "(self, exc_type, exc, tb, /)"),
]
CALLED = [m for m in METHODS if m.call is not None]
TIMED = [m for m in METHODS if m.timed]


def handle_of(method: Method, ring: tuple[RingWriter, RingReader]) -> RingWriter | RingReader:
    writer, reader = ring
    return writer if method.side == "writer" else reader


# ---- text signatures ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_every_c_method_has_its_documented_text_signature(method: Method) -> None:
    assert str(inspect.signature(getattr(OWNERS[method.side], method.name))) == method.signature


# ---- bad timeouts ------------------------------------------------------------------------


def call_with_a_bad_timeout(
    method: Method, ring: tuple[RingWriter, RingReader], timeout: object, error: type[Exception]
) -> None:
    """Calls `method` with `timeout` and expects `error`; a reader's call must leave the
    message in the ring, a writer's must write nothing."""
    writer, reader = ring
    call = method.call
    assert call is not None
    if method.side == "reader":
        writer.push(b"kept", timeout=0)
    with pytest.raises(error, match="timeout" if error is ValueError else None):
        call(handle_of(method, ring), timeout)
    if method.side == "reader":
        assert reader.pop(timeout=0) == b"kept"
    assert reader.try_pop() is None


@pytest.mark.parametrize("timeout", [-1, -0.001, -math.inf, math.nan], ids=repr)
@pytest.mark.parametrize("method", TIMED, ids=str)
def test_a_negative_or_nan_timeout_raises_value_error_before_the_call_touches_the_ring(
    ring: tuple[RingWriter, RingReader], method: Method, timeout: float
) -> None:
    call_with_a_bad_timeout(method, ring, timeout, ValueError)


@pytest.mark.parametrize("timeout", ["abc", b"1", [1]], ids=repr)
@pytest.mark.parametrize("method", TIMED, ids=str)
def test_a_timeout_that_is_not_a_number_raises_type_error_before_the_call_touches_the_ring(
    ring: tuple[RingWriter, RingReader], method: Method, timeout: object
) -> None:
    call_with_a_bad_timeout(method, ring, timeout, TypeError)


# ---- closed handles ----------------------------------------------------------------------


@pytest.mark.parametrize("method", CALLED, ids=str)
def test_calls_on_a_closed_handle_raise_ring_closed(
    ring: tuple[RingWriter, RingReader], method: Method
) -> None:
    writer, reader = ring
    call = method.call
    assert call is not None
    if method.side == "writer":
        writer.close()
        for timeout in method.timeouts():
            with pytest.raises(RingClosed):
                call(writer, timeout)
        with pytest.raises(RingClosed):  # nothing was written: the stream just ended
            reader.pop(timeout=TIMEOUT)
    else:
        writer.push(b"unread", timeout=0)
        reader.close()
        for timeout in method.timeouts():
            with pytest.raises(RingClosed):
                call(reader, timeout)
        with RingReader.open(reader.path) as successor:  # nothing was consumed
            assert successor.pop(timeout=0) == b"unread"


# ---- one call at a time ------------------------------------------------------------------

ONE_AT_A_TIME = [
    pytest.param(waiting, second, id=f"{second}-while-{waiting.name}-waits")
    for waiting in TIMED
    for second in CALLED
    if second.side == waiting.side
]


@pytest.mark.parametrize(("waiting", "second"), ONE_AT_A_TIME)
def test_a_second_thread_calling_a_handle_while_a_call_on_it_waits_gets_runtime_error(
    ring: tuple[RingWriter, RingReader], waiting: Method, second: Method
) -> None:
    writer, reader = ring
    handle = handle_of(waiting, ring)
    wait, call = waiting.call, second.call
    assert wait is not None and call is not None
    pushed = fill(writer) if waiting.side == "writer" else []
    waiter = Worker(lambda: wait(handle, TIMEOUT))
    waiter.start()
    assert not waiter.finished.wait(timeout=0.2)
    # In a thread of its own: next() has no timeout, and must not wait here either.
    intruder = Worker(lambda: call(handle, TIMEOUT if second.timed else None))
    intruder.start()
    intruder.join(timeout=TIMEOUT)
    assert not intruder.is_alive(), f"{second} waited instead of raising RuntimeError"
    assert isinstance(intruder.error, RuntimeError), intruder.error or intruder.result
    assert "another thread" in str(intruder.error)
    # The waiting call goes on as if nothing had happened.
    if waiting.side == "writer":
        received = [reader.pop(timeout=TIMEOUT) for _ in pushed]
        waiter.join(timeout=TIMEOUT)
        assert not waiter.is_alive()
        assert waiter.error is None
        assert received == pushed
        assert reader.pop(timeout=TIMEOUT) == MESSAGE
    else:
        writer.push(MESSAGE, timeout=TIMEOUT)
        waiter.join(timeout=TIMEOUT)
        assert not waiter.is_alive()
        assert waiter.error is None
        assert waiter.result == [MESSAGE]
    assert reader.try_pop() is None


# ---- close() from another thread ---------------------------------------------------------


@pytest.mark.parametrize("method", TIMED, ids=str)
def test_close_from_another_thread_wakes_a_thread_waiting_in_any_blocking_call(
    ring: tuple[RingWriter, RingReader], method: Method
) -> None:
    writer, reader = ring
    handle = handle_of(method, ring)
    wait = method.call
    assert wait is not None
    pushed = fill(writer) if method.side == "writer" else []
    waiter = Worker(lambda: wait(handle, TIMEOUT))
    waiter.start()
    assert not waiter.finished.wait(timeout=0.2)
    handle.close()
    waiter.join(timeout=1)
    assert not waiter.is_alive()
    assert isinstance(waiter.error, RingClosed)
    assert handle.closed
    if method.side == "writer":
        assert list(reader) == pushed  # the waiting call wrote nothing


# ---- arguments, constructors, exceptions -------------------------------------------------


def test_timeout_may_be_passed_by_position_or_keyword(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"a", 0)
    writer.push(b"b", 0.5)
    writer.push(b"c", timeout=None)
    assert reader.pop(0) == b"a"
    assert reader.pop(0.5) == b"b"
    buffer = bytearray(1)
    assert reader.pop_into(buffer, 0) == 1
    assert buffer == b"c"
    with pytest.raises(RingTimeout):
        reader.pop(0)


def test_unknown_keyword_argument_raises_type_error(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    with pytest.raises(TypeError):
        writer.push(b"x", timout=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        reader.pop(block=False)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        reader.pop(1, timeout=1)  # type: ignore[misc]


def test_constructors_have_keyword_only_options() -> None:
    create = inspect.signature(RingWriter.create).parameters
    assert list(create) == ["path", "capacity", "mode", "spin", "exist_ok"]
    assert create["mode"].kind is inspect.Parameter.KEYWORD_ONLY
    assert create["mode"].default == 0o600
    assert create["spin"].kind is inspect.Parameter.KEYWORD_ONLY
    assert create["spin"].default is None
    assert create["exist_ok"].kind is inspect.Parameter.KEYWORD_ONLY
    assert create["exist_ok"].default is False
    for cls in (RingReader, RingWriter):
        open_ = inspect.signature(cls.open).parameters
        assert list(open_) == ["path", "spin", "wait"]
        assert open_["spin"].kind is inspect.Parameter.KEYWORD_ONLY
        assert open_["wait"].kind is inspect.Parameter.KEYWORD_ONLY
        assert open_["wait"].default is None


def test_exceptions_are_exported_with_their_documented_bases() -> None:
    assert issubclass(RingError, Exception)
    assert issubclass(RingTimeout, RingError)
    assert issubclass(RingTimeout, TimeoutError)
    assert issubclass(MessageTooLarge, RingError)
    assert issubclass(MessageTooLarge, ValueError)
    assert issubclass(InvalidRing, RingError)
    assert issubclass(RingClosed, RingError)
    assert issubclass(RingClosed, EOFError)
    assert issubclass(PeerDied, RingError)
    assert issubclass(RingBusy, RingError)
    for name in (
        "RingError",
        "RingTimeout",
        "MessageTooLarge",
        "InvalidRing",
        "RingClosed",
        "PeerDied",
        "RingBusy",
    ):
        assert name in ipc_ring.__all__
        assert getattr(ipc_ring, name).__module__ == "ipc_ring"
