"""Waiting and timeouts: what the calls that never wait return on an empty or full ring,
that timeouts are honoured (zero, short and very long ones), that a thread waiting in a
call lets other threads run and is woken by another thread, and that signals interrupt
waits.

The functions named `child_*` run in a child process started by the `spawn` fixture (see
conftest.py); they get their arguments as strings and return the child's exit status.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import EXPECTED_EXIT, TIMEOUT, Spawn, Worker, drain, fill, numbered, record_size
from ipc_ring import RingClosed, RingReader, RingTimeout, RingWriter

# ---- child processes ---------------------------------------------------------------------


def child_reader_interrupted_in_pop(path: str) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with RingReader.open(path) as reader:
        print("waiting", flush=True)
        try:
            reader.pop(timeout=None)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        else:
            print("pop returned", flush=True)
            return 1
        print("received", reader.pop(timeout=TIMEOUT).decode(), flush=True)
    return EXPECTED_EXIT


def child_writer_interrupted_in_push(path: str) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with RingWriter.create(path, 4096) as writer:
        count = 0
        while writer.try_push(count.to_bytes(4, "little") * 25):
            count += 1
        zeros = 0
        while writer.try_push(b""):  # the gap at the end of the lap: now nothing fits
            zeros += 1
        print("full", count, zeros, flush=True)
        try:
            writer.push(b"never written", timeout=None)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        else:
            print("push returned", flush=True)
            return 1
        writer.push(b"after the interrupt", timeout=TIMEOUT)
    return EXPECTED_EXIT


def child_writer_interrupted_in_push_many(path: str) -> int:
    """Blocks in push_many on a full ring until SIGINT, reports `written`, then retries the
    rest of the batch from there."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    messages = [numbered(i, 100) for i in range(1000)]
    with RingWriter.create(path, 4096) as writer:
        print("pushing", flush=True)
        try:
            writer.push_many(messages, timeout=TIMEOUT)
        except KeyboardInterrupt as e:
            written = e.written  # type: ignore[attr-defined]
            print("interrupted", written, flush=True)
        else:
            print("push_many returned", flush=True)
            return 1
        writer.push_many(messages[written:], timeout=TIMEOUT)
    return EXPECTED_EXIT


def child_signal_handler_closes_blocked_handle(path: str, side: str) -> int:
    """Blocks in pop (or push on a full ring) while a SIGALRM handler closes that handle."""
    with RingWriter.create(path, 64) as writer, RingReader.open(path) as reader:
        handle: RingWriter | RingReader = reader if side == "reader" else writer
        signal.signal(signal.SIGALRM, lambda signum, frame: handle.close())
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        try:
            if side == "reader":
                reader.pop(timeout=5)
            else:
                while writer.try_push(b"filler"):
                    pass
                writer.push(b"blocked", timeout=5)
        except RingClosed:
            print("RingClosed", flush=True)
            return EXPECTED_EXIT
        except Exception as e:
            print("raised", type(e).__name__, e, flush=True)
            return 1
    print("returned", flush=True)
    return 1


# ---- calls that never wait ---------------------------------------------------------------


def test_try_pop_returns_none_on_an_empty_ring(ring: tuple[RingWriter, RingReader]) -> None:
    _, reader = ring
    assert reader.try_pop() is None


def test_try_push_returns_false_when_the_ring_is_full(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    assert len(pushed) == 64 // record_size(8)
    assert writer.try_push(b"x") is False
    assert [reader.try_pop() for _ in pushed] == pushed
    assert reader.try_pop() is None


def test_full_ring_accepts_a_message_again_once_the_reader_pops_one(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    assert reader.pop(timeout=5) == pushed[0]
    writer.push(b"next", timeout=5)
    assert [reader.pop(timeout=5) for _ in pushed[1:]] == pushed[1:]
    assert reader.pop(timeout=5) == b"next"


# ---- timeouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0, 0.05])
@pytest.mark.parametrize("call", ["pop", "pop_into", "pop_many", "pop_view"])
def test_a_reader_call_on_an_empty_ring_raises_ring_timeout_once_its_timeout_expires(
    ring: tuple[RingWriter, RingReader], call: str, timeout: float
) -> None:
    _, reader = ring
    calls: dict[str, Callable[[], object]] = {
        "pop": lambda: reader.pop(timeout=timeout),
        "pop_into": lambda: reader.pop_into(bytearray(64), timeout=timeout),
        "pop_many": lambda: reader.pop_many(10, timeout=timeout),
        "pop_view": lambda: reader.pop_view(timeout=timeout),
    }
    start = time.monotonic()
    if call == "pop_many" and timeout == 0:
        assert calls[call]() == []  # a poll: nothing there, nothing to wait for
    else:
        with pytest.raises(RingTimeout):
            calls[call]()
    assert timeout <= time.monotonic() - start < 0.5


@pytest.mark.parametrize("timeout", [0, 0.05])
@pytest.mark.parametrize("call", ["push", "reserve"])
def test_a_writer_call_on_a_full_ring_raises_ring_timeout_once_its_timeout_expires(
    ring: tuple[RingWriter, RingReader], call: str, timeout: float
) -> None:
    writer, reader = ring

    def write(message: bytes, timeout: float) -> None:
        if call == "push":
            writer.push(message, timeout=timeout)
        else:
            with writer.reserve(len(message), timeout=timeout) as view:
                view[:] = message

    pushed = fill(writer)
    start = time.monotonic()
    with pytest.raises(RingTimeout):
        write(b"x", timeout)
    assert timeout <= time.monotonic() - start < 0.5
    assert drain(reader) == pushed  # nothing written, nothing lost
    write(b"12345678", 0)  # the writer is usable again
    assert reader.pop(timeout=0) == b"12345678"


def test_push_many_timeout_bounds_the_whole_call_against_a_slow_reader(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    messages = [numbered(i, 8) for i in range(400)]
    stop = threading.Event()

    def slow_reader() -> list[bytes]:
        received: list[bytes] = []
        while not stop.is_set():
            received += drain(reader)
            time.sleep(0.01)
        return received + drain(reader)

    worker = Worker(slow_reader)
    worker.start()
    start = time.monotonic()
    try:
        with pytest.raises(RingTimeout) as timed_out:
            # About 4 messages per 10 ms: 400 take about a second, well over the timeout.
            writer.push_many(messages, timeout=0.2)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        worker.join(timeout=TIMEOUT)
    assert worker.error is None
    assert 0.2 <= elapsed < 0.7
    written = timed_out.value.written
    assert 4 < written < 400
    assert worker.result == messages[:written]


@pytest.mark.parametrize("timeout", [math.inf, 1e12, float(sys.maxsize)], ids=repr)
def test_pop_with_a_very_long_timeout_waits_for_a_message(
    ring: tuple[RingWriter, RingReader], timeout: float
) -> None:
    writer, reader = ring
    worker = Worker(lambda: reader.pop(timeout=timeout))
    worker.start()
    returned_early = worker.finished.wait(timeout=0.3)
    writer.push(b"late", timeout=5)
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert not returned_early, f"pop(timeout={timeout!r}) returned early: {worker.error!r}"
    assert worker.result == b"late"


@pytest.mark.parametrize("timeout", [math.inf, 1e12, float(sys.maxsize)], ids=repr)
def test_push_with_a_very_long_timeout_waits_for_space(
    ring: tuple[RingWriter, RingReader], timeout: float
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    worker = Worker(lambda: writer.push(b"late", timeout=timeout))
    worker.start()
    returned_early = worker.finished.wait(timeout=0.3)
    received = [reader.pop(timeout=5) for _ in pushed]
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert not returned_early, f"push(timeout={timeout!r}) returned early: {worker.error!r}"
    assert received == pushed
    assert reader.pop(timeout=5) == b"late"


# ---- threads -----------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["reader", "writer"])
def test_a_thread_blocked_in_a_call_lets_other_threads_run(
    ring: tuple[RingWriter, RingReader], side: str
) -> None:
    writer, reader = ring
    if side == "writer":
        fill(writer)
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.005)

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    try:
        before = ticks
        with pytest.raises(RingTimeout):
            if side == "reader":
                reader.pop(timeout=0.5)
            else:
                writer.push(b"x", timeout=0.5)
        advanced = ticks - before
    finally:
        stop.set()
        counter.join(timeout=5)
    # About 100 ticks if the wait releases the GIL; at most a couple if it does not.
    assert advanced >= 10


def test_pop_in_one_thread_receives_a_push_from_another(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    received: list[bytes] = []

    def consume() -> None:
        for _ in range(200):
            received.append(reader.pop(timeout=5))

    worker = Worker(consume)
    worker.start()
    for i in range(200):
        writer.push(i.to_bytes(4, "little") * (i % 14), timeout=5)
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert worker.error is None
    assert received == [i.to_bytes(4, "little") * (i % 14) for i in range(200)]


def test_pop_many_waits_for_the_first_message(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    worker = Worker(lambda: reader.pop_many(10, timeout=TIMEOUT))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    writer.push(b"late", timeout=TIMEOUT)
    worker.join(timeout=TIMEOUT)
    assert worker.error is None
    assert worker.result == [b"late"]


def test_pop_view_waits_for_a_message_pushed_by_another_thread(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring

    def view_next() -> bytes:
        with reader.pop_view(timeout=TIMEOUT) as view:
            return bytes(view)

    worker = Worker(view_next)
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    writer.push(b"late", timeout=TIMEOUT)
    worker.join(timeout=TIMEOUT)
    assert worker.error is None
    assert worker.result == b"late"


def test_reserve_waits_for_space_a_reader_thread_frees(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    pushed = fill(writer)

    def read_later() -> list[bytes]:
        time.sleep(0.1)
        return drain(reader)

    worker = Worker(read_later)
    worker.start()
    with writer.reserve(40, timeout=TIMEOUT) as view:
        view[:] = b"w" * 40
    worker.join(timeout=TIMEOUT)
    assert worker.result == pushed
    assert reader.pop(timeout=0) == b"w" * 40


def test_writer_close_wakes_a_reader_blocked_in_pop(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    worker = Worker(lambda: reader.pop(timeout=10))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    writer.close()
    worker.join(timeout=1)
    assert not worker.is_alive()
    assert isinstance(worker.error, RingClosed)


def test_writer_close_wakes_a_reader_blocked_in_pop_many(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    worker = Worker(lambda: reader.pop_many(10, timeout=TIMEOUT))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    writer.close()
    worker.join(timeout=TIMEOUT)
    assert isinstance(worker.error, RingClosed)


# ---- signals -----------------------------------------------------------------------------


def test_sigint_interrupts_a_child_blocked_in_pop_and_the_ring_stays_usable(
    ring_path: Path, spawn: Spawn
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        child = spawn(child_reader_interrupted_in_pop, ring_path)
        child.expect_line("waiting", timeout=TIMEOUT)
        time.sleep(0.3)  # let it reach the sleep in pop
        child.send_signal(signal.SIGINT)
        child.expect_line("interrupted", timeout=3)
        writer.push(b"after the interrupt", timeout=TIMEOUT)
        child.expect_line("received after the interrupt", timeout=TIMEOUT)
        child.finish(EXPECTED_EXIT, timeout=TIMEOUT)
        # The child's reader consumed exactly one message: a new reader starts after it.
        writer.push(b"for a new reader", timeout=TIMEOUT)
        with RingReader.open(ring_path) as reader:
            assert reader.pop(timeout=TIMEOUT) == b"for a new reader"
            assert reader.try_pop() is None


def test_sigint_interrupts_a_child_blocked_in_push_without_writing_the_message(
    ring_path: Path, spawn: Spawn
) -> None:
    child = spawn(child_writer_interrupted_in_push, ring_path)
    count, zeros = map(int, child.expect_line("full", timeout=TIMEOUT).split()[1:])
    assert count > 0
    time.sleep(0.3)  # let it reach the sleep in push
    child.send_signal(signal.SIGINT)
    child.expect_line("interrupted", timeout=3)
    with RingReader.open(ring_path) as reader:
        for i in range(count):
            assert reader.pop(timeout=TIMEOUT) == i.to_bytes(4, "little") * 25
        assert [reader.pop(timeout=TIMEOUT) for _ in range(zeros)] == [b""] * zeros
        assert reader.pop(timeout=TIMEOUT) == b"after the interrupt"
        child.finish(EXPECTED_EXIT, timeout=TIMEOUT)
        with pytest.raises(RingClosed):
            reader.pop(timeout=TIMEOUT)


def test_sigint_interrupts_push_many_in_a_child_and_a_retry_from_written_loses_nothing(
    ring_path: Path, spawn: Spawn
) -> None:
    child = spawn(child_writer_interrupted_in_push_many, ring_path)
    child.expect_line("pushing", timeout=TIMEOUT)
    time.sleep(0.3)  # let it fill the ring and sleep in push_many
    child.send_signal(signal.SIGINT)
    written = int(child.expect_line("interrupted", timeout=3).split()[1])
    assert written == 4096 // record_size(100)  # what filled the ring
    with RingReader.open(ring_path) as reader:
        received = reader.pop_many(written, timeout=TIMEOUT)
        while len(received) < 1000:
            received += reader.pop_many(1000, timeout=TIMEOUT)
        assert received == [numbered(i, 100) for i in range(1000)]
        child.finish(EXPECTED_EXIT, timeout=TIMEOUT)
        with pytest.raises(RingClosed):
            reader.pop_many(10, timeout=TIMEOUT)


@pytest.mark.parametrize("side", ["reader", "writer"])
def test_a_signal_handler_that_closes_a_blocked_handle_makes_the_call_raise_ring_closed(
    ring_path: Path, spawn: Spawn, side: str
) -> None:
    child = spawn(child_signal_handler_closes_blocked_handle, ring_path, side)
    returncode = child.wait(timeout=TIMEOUT)
    if returncode != EXPECTED_EXIT:
        child.fail(f"exited with {returncode}, expected {EXPECTED_EXIT} after RingClosed")
    assert "RingClosed" in child.output


@pytest.mark.parametrize("spin", [0.3, 1.0])
def test_a_writer_with_a_long_spin_goes_on_as_soon_as_its_message_fits(
    ring_path: Path, spin: float
) -> None:
    # A writer's spin on a full ring waits a little (10 us) for more room than its message
    # needs; a long spin= must not make it wait longer than that once its message fits.
    import os

    writer = RingWriter.create(ring_path, 4096, spin=spin)
    try:
        while writer.try_push(bytes(100)):
            pass
        popped_r, popped_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the reader: frees one message, then waits for something else
            try:
                reader = RingReader.open(ring_path)
                os.write(ready_w, b"x")
                time.sleep(0.2)
                os.write(popped_w, repr(time.monotonic()).encode())
                reader.pop()
                time.sleep(5)
            finally:
                os._exit(0)
        try:
            os.read(ready_r, 1)
            writer.push(bytes(100), timeout=TIMEOUT)
            pushed = time.monotonic()
            popped = float(os.read(popped_r, 100))
            assert pushed - popped < 0.1, f"the push went on {pushed - popped:.3f} s after room"
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            for fd in (popped_r, popped_w, ready_r, ready_w):
                os.close(fd)
    finally:
        writer.close()
