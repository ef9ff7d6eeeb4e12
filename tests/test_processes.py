"""Two real processes on one ring: streaming in both directions, end of stream, and signals.

The functions named `child_*` run in a child process started by the `spawn` fixture (see
conftest.py); they get their arguments as strings and return the child's exit status.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ipc_ring import RingClosed, RingReader, RingWriter

if TYPE_CHECKING:
    from conftest import Child

Spawn = Callable[..., "Child"]

# Every blocking call in a child or in a test gives up after this long.
TIMEOUT = 10.0
# Exit status of a child that saw what the test expected.
EXPECTED_EXIT = 42

_POOL = random.Random(20240611).randbytes((1 << 21) + 8)


def message(seq: int, max_size: int, typical_size: int) -> bytes:
    """The message with sequence number `seq`: its length (0..max_size) and every byte are a
    function of `seq`, and its first 8 bytes (when it has that many) are `seq` itself.
    Lengths are spread over 0..typical_size, with 0, 1..8 and exactly max_size mixed in."""
    mixed = (seq * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64
    if seq % 16 == 3:
        size = mixed % 9
    elif seq % (16 if typical_size == max_size else 1000) == 7:
        size = max_size
    else:
        size = (mixed >> 11) % (typical_size + 1)
    start = (mixed >> 29) % (len(_POOL) - size + 1)
    return (seq.to_bytes(8, "little") + _POOL[start : start + max(size - 8, 0)])[:size]


def produce(writer: RingWriter, count: int, typical_size: int) -> None:
    for seq in range(count):
        writer.push(message(seq, writer.max_message_size, typical_size), timeout=TIMEOUT)


def consume(reader: RingReader, count: int, typical_size: int, use_pop_into: bool) -> None:
    """Reads `count` messages and then the end of stream, checking every byte."""
    buffer = bytearray(reader.max_message_size)
    for seq in range(count):
        if use_pop_into:
            length = reader.pop_into(buffer, timeout=TIMEOUT)
            got = bytes(buffer[:length])
        else:
            got = reader.pop(timeout=TIMEOUT)
        expected = message(seq, reader.max_message_size, typical_size)
        if got != expected:
            raise AssertionError(
                f"message {seq}: got {len(got)} bytes starting {got[:16].hex()}, "
                f"expected {len(expected)} bytes starting {expected[:16].hex()}"
            )
    try:
        extra = reader.pop(timeout=TIMEOUT)
    except RingClosed:
        return
    raise AssertionError(f"a message of {len(extra)} bytes after the last one")


# ---- child processes ---------------------------------------------------------


def child_writer(path: str, capacity: str, count: str, typical_size: str) -> int:
    with RingWriter.create(path, int(capacity)) as writer:
        print("created", flush=True)
        produce(writer, int(count), int(typical_size))
    return 0


def child_reader(path: str, count: str, typical_size: str, use_pop_into: str) -> int:
    with RingReader.open(path) as reader:
        consume(reader, int(count), int(typical_size), use_pop_into == "True")
    print("checked", count, flush=True)
    return 0


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
        print("full", count, flush=True)
        try:
            writer.push(b"never written", timeout=None)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        else:
            print("push returned", flush=True)
            return 1
        writer.push(b"after the interrupt", timeout=TIMEOUT)
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


# ---- streaming -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "count"),
    [(256, 20_000), (4096, 20_000)],
)
@pytest.mark.parametrize("use_pop_into", [False, True], ids=["pop", "pop_into"])
def test_child_writer_streams_every_message_intact_through_a_small_ring(
    ring_path: Path, spawn: Spawn, capacity: int, count: int, use_pop_into: bool
) -> None:
    typical = capacity - 8
    writer = spawn("child_writer", ring_path, capacity, count, typical)
    writer.expect_line("created", timeout=TIMEOUT)
    with RingReader.open(ring_path) as reader:
        consume(reader, count, typical, use_pop_into)
    writer.finish(0, timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("capacity", "count"),
    [(256, 20_000), (4096, 20_000)],
)
def test_child_reader_receives_every_message_intact_through_a_small_ring(
    ring_path: Path, spawn: Spawn, capacity: int, count: int
) -> None:
    typical = capacity - 8
    with RingWriter.create(ring_path, capacity) as writer:
        reader = spawn("child_reader", ring_path, count, typical, False)
        produce(writer, count, typical)
    reader.expect_line(f"checked {count}", timeout=TIMEOUT)
    reader.finish(0, timeout=TIMEOUT)


@pytest.mark.slow
def test_child_writer_streams_100k_messages_through_a_1_mib_ring(
    ring_path: Path, spawn: Spawn
) -> None:
    capacity, count, typical = 1 << 20, 100_000, 1024
    writer = spawn("child_writer", ring_path, capacity, count, typical)
    writer.expect_line("created", timeout=TIMEOUT)
    with RingReader.open(ring_path) as reader:
        consume(reader, count, typical, use_pop_into=False)
    writer.finish(0, timeout=TIMEOUT)


@pytest.mark.slow
def test_child_reader_receives_100k_messages_through_a_1_mib_ring(
    ring_path: Path, spawn: Spawn
) -> None:
    capacity, count, typical = 1 << 20, 100_000, 1024
    with RingWriter.create(ring_path, capacity) as writer:
        reader = spawn("child_reader", ring_path, count, typical, True)
        produce(writer, count, typical)
    reader.expect_line(f"checked {count}", timeout=TIMEOUT)
    reader.finish(0, timeout=TIMEOUT)


def test_stream_messages_cover_every_size_and_wrap_small_rings_thousands_of_times() -> None:
    for capacity in (256, 4096):
        max_size = capacity - 8
        sizes = [len(message(seq, max_size, max_size)) for seq in range(20_000)]
        assert set(sizes) == set(range(max_size + 1))
        # Each record is an 8-byte header plus the payload padded to 8 bytes.
        assert sum(8 + (size + 7) // 8 * 8 for size in sizes) // capacity > 5_000
    max_size = (1 << 20) - 8
    sizes = [len(message(seq, max_size, 1024)) for seq in range(100_000)]
    assert sizes.count(max_size) == 100
    assert {0, 1, 8, 1023, 1024} <= set(sizes)
    assert sum(8 + (size + 7) // 8 * 8 for size in sizes) // (1 << 20) > 100


# ---- signals -----------------------------------------------------------------


def test_sigint_interrupts_a_child_blocked_in_pop_and_the_ring_stays_usable(
    ring_path: Path, spawn: Spawn
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        child = spawn("child_reader_interrupted_in_pop", ring_path)
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
    child = spawn("child_writer_interrupted_in_push", ring_path)
    count = int(child.expect_line("full", timeout=TIMEOUT).split()[1])
    assert count > 0
    time.sleep(0.3)  # let it reach the sleep in push
    child.send_signal(signal.SIGINT)
    child.expect_line("interrupted", timeout=3)
    with RingReader.open(ring_path) as reader:
        for i in range(count):
            assert reader.pop(timeout=TIMEOUT) == i.to_bytes(4, "little") * 25
        assert reader.pop(timeout=TIMEOUT) == b"after the interrupt"
        child.finish(EXPECTED_EXIT, timeout=TIMEOUT)
        with pytest.raises(RingClosed):
            reader.pop(timeout=TIMEOUT)


@pytest.mark.parametrize("side", ["reader", "writer"])
def test_a_signal_handler_that_closes_a_blocked_handle_makes_the_call_raise_ring_closed(
    ring_path: Path, spawn: Spawn, side: str
) -> None:
    child = spawn("child_signal_handler_closes_blocked_handle", ring_path, side)
    returncode = child.wait(timeout=TIMEOUT)
    if returncode != EXPECTED_EXIT:
        child.fail(f"exited with {returncode}, expected {EXPECTED_EXIT} after RingClosed")
    assert "RingClosed" in child.output
