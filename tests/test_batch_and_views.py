"""Batches and zero-copy slots: push_many, pop_many, reserve and pop_view.

Most tests use one process and a tiny ring, where every position is predictable; the streaming
tests run the other side in a child process. The functions named `child_*` run in a child
started by the `spawn` fixture (see conftest.py): they get their arguments as strings and
return the child's exit status. Tests that use numpy are skipped where it is not installed.
"""

from __future__ import annotations

import array
import gc
import inspect
import mmap
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ipc_ring import (
    MessageTooLarge,
    PeerDied,
    RingClosed,
    RingError,
    RingReader,
    RingTimeout,
    RingWriter,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from conftest import Child

Spawn = Callable[..., "Child"]

# Every blocking call in a child or in a test gives up after this long.
TIMEOUT = 10.0
# Exit status of a child that saw what the test expected.
EXPECTED_EXIT = 42

# FORMAT.md "Header" and "Records".
DATA_OFFSET = 4096
WRITE_POS_AT = 128
READ_POS_AT = 256
RECORD_HEADER = 8

RING_PARENT_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


def record_size(length: int) -> int:
    """Bytes a message of `length` bytes takes in the data area: header + padded payload."""
    return RECORD_HEADER + (length + 7) // 8 * 8


def positions(path: Path | str) -> tuple[int, int]:
    """(write_pos, read_pos) as published in the ring file's header."""
    with open(path, "rb") as file:
        header = file.read(READ_POS_AT + 8)
    return (
        int.from_bytes(header[WRITE_POS_AT : WRITE_POS_AT + 8], "little"),
        int.from_bytes(header[READ_POS_AT : READ_POS_AT + 8], "little"),
    )


@pytest.fixture
def ring(ring_path: Path) -> Iterator[tuple[RingWriter, RingReader]]:
    """A writer and a reader on a fresh 64-byte ring (max_message_size 56)."""
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        yield writer, reader


def numbered(count: int, length: int = 8) -> list[bytes]:
    """`count` distinct messages of `length` bytes (length >= 2)."""
    return [i.to_bytes(2, "little") * (length // 2) + b"!" * (length % 2) for i in range(count)]


def fill(writer: RingWriter, length: int = 8) -> list[bytes]:
    """Pushes distinct messages of `length` bytes until the ring is full; returns them."""
    pushed: list[bytes] = []
    while True:
        message = bytes([len(pushed) % 256]) * length
        if not writer.try_push(message):
            return pushed
        pushed.append(message)


def drain(reader: RingReader) -> list[bytes]:
    """Every message available now, without waiting."""
    received = []
    while (message := reader.try_pop()) is not None:
        received.append(message)
    return received


class Worker(threading.Thread):
    """Runs `call()` in a thread and keeps its result or exception."""

    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.result: object = None
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as e:
            self.error = e
        finally:
            self.finished.set()


# ---- the stream the process tests send -----------------------------------------

_POOL = random.Random(20240612).randbytes(1 << 16)


def stream_message(seq: int, max_size: int) -> bytes:
    """The message with sequence number `seq`: its length (0..max_size) and every byte are a
    function of `seq`, and its first 8 bytes (when it has that many) are `seq` itself. Most
    are short, so that a batch holds many; 0..8 bytes and exactly max_size are mixed in."""
    mixed = (seq * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64
    if seq % 16 == 3:
        size = mixed % 9
    elif seq % 97 == 7:
        size = max_size
    else:
        size = (mixed >> 11) % (max_size // 8 + 1)
    start = (mixed >> 29) % (len(_POOL) - size + 1)
    return (seq.to_bytes(8, "little") + _POOL[start : start + max(size - 8, 0)])[:size]


def batch_sizes(count: int, seed: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges that split range(count) into batches of 1 to 200 messages."""
    rng = random.Random(seed)
    start = 0
    while start < count:
        stop = min(count, start + rng.choice([1, 2, 3, 7, 31, 64, 200]))
        yield start, stop
        start = stop


def check_message(seq: int, got: bytes, max_size: int) -> None:
    expected = stream_message(seq, max_size)
    if got != expected:
        raise AssertionError(
            f"message {seq}: got {len(got)} bytes starting {got[:16].hex()}, "
            f"expected {len(expected)} bytes starting {expected[:16].hex()}"
        )


def consume_with_pop_many(reader: RingReader, count: int) -> None:
    """Reads `count` messages with pop_many (varying max_messages and max_bytes), then the
    end of stream, checking every byte."""
    max_size = reader.max_message_size
    rng = random.Random(7)
    seq = 0
    while seq < count:
        max_bytes = rng.choice([None, None, 0, 100, 1000, max_size])
        batch = reader.pop_many(rng.choice([1, 5, 64, 1000]), TIMEOUT, max_bytes)
        assert batch, "pop_many returned an empty list"
        if max_bytes is not None and len(batch) > 1:
            assert sum(map(len, batch)) <= max_bytes
        for got in batch:
            check_message(seq, got, max_size)
            seq += 1
    assert seq == count, f"{seq - count} messages after the last one"
    with pytest.raises(RingClosed):
        reader.pop_many(10, timeout=TIMEOUT)


def consume_with_pop_view(reader: RingReader, count: int) -> None:
    """Reads `count` messages with pop_view, then the end of stream, checking every byte."""
    max_size = reader.max_message_size
    for seq in range(count):
        with reader.pop_view(timeout=TIMEOUT) as view:
            check_message(seq, bytes(view), max_size)
    with pytest.raises(RingClosed):
        reader.pop_view(timeout=TIMEOUT)


def produce_with_push_many(writer: RingWriter, count: int) -> None:
    """Writes `count` messages with push_many, in batches of 1 to 200, as lists and
    generators alternately."""
    max_size = writer.max_message_size
    for i, (start, stop) in enumerate(batch_sizes(count, seed=11)):
        batch: Iterable[bytes]
        if i % 2:
            batch = [stream_message(seq, max_size) for seq in range(start, stop)]
        else:
            batch = (stream_message(seq, max_size) for seq in range(start, stop))
        assert writer.push_many(batch, timeout=TIMEOUT) == stop - start


def produce_with_reserve(writer: RingWriter, count: int) -> None:
    """Writes `count` messages in place with reserve: most fill exactly the reserved size,
    every third reserves more and commits only the message's length."""
    max_size = writer.max_message_size
    for seq in range(count):
        message = stream_message(seq, max_size)
        if seq % 3 == 0:
            slot = writer.reserve(min(len(message) + 13, max_size), timeout=TIMEOUT)
            with slot as view:
                view[: len(message)] = message
                slot.commit(len(message))
        else:
            with writer.reserve(len(message), timeout=TIMEOUT) as view:
                view[:] = message


# ---- child processes -----------------------------------------------------------------


def child_writer(path: str, capacity: str, count: str, api: str) -> int:
    with RingWriter.create(path, int(capacity)) as writer:
        print("created", flush=True)
        if api == "push_many":
            produce_with_push_many(writer, int(count))
        else:
            produce_with_reserve(writer, int(count))
    return 0


def child_reader(path: str, count: str, api: str) -> int:
    with RingReader.open(path) as reader:
        print("attached", flush=True)
        if api == "pop_many":
            consume_with_pop_many(reader, int(count))
        else:
            consume_with_pop_view(reader, int(count))
    print("checked", count, flush=True)
    return 0


def child_reader_attaches_and_exits(path: str) -> int:
    with RingReader.open(path):
        print("attached", flush=True)
    return 0


def child_writer_interrupted_in_push_many(path: str) -> int:
    """Blocks in push_many on a full ring until SIGINT, reports `written`, then retries the
    rest of the batch from there."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    messages = numbered(1000, length=100)
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


def child_writer_dies_after_push_many(path: str) -> int:
    """Publishes three messages and dies without close()."""
    writer = RingWriter.create(path, 4096)
    writer.push_many([b"one", b"two", b"three"], timeout=TIMEOUT)
    print("pushed", flush=True)
    os._exit(0)


def child_enters_a_reservation_after_closing_the_writer(path: str) -> int:
    """Reserves, closes the writer, then enters the reservation's block: the view must not
    reach the released mapping (SIGSEGV); refusing with RingClosed or ValueError is right."""
    with RingWriter.create(path, 4096) as writer:
        slot = writer.reserve(64, timeout=TIMEOUT)
        writer.close()
        print("closed", flush=True)
        try:
            with slot as view:
                print("entered", flush=True)
                view[:] = b"x" * 64
        except (RingError, ValueError) as e:
            print("refused", type(e).__name__, e, flush=True)
            return EXPECTED_EXIT
    print("block exited without an error", flush=True)
    return 1


def child_enters_a_message_view_after_closing_the_reader(path: str) -> int:
    """Takes a view, closes the reader, then enters the view's block: it must not read the
    released mapping (SIGSEGV); either refusing or reading the intact message is right, and
    the message stays in the ring for the next reader."""
    with RingWriter.create(path, 4096) as writer, RingReader.open(path) as reader:
        writer.push(b"m" * 64, timeout=TIMEOUT)
        slot = reader.pop_view(timeout=TIMEOUT)
        reader.close()
        print("closed", flush=True)
        try:
            with slot as view:
                print("entered", flush=True)
                if bytes(view) != b"m" * 64:
                    print("read other bytes", flush=True)
                    return 1
        except (RingError, ValueError) as e:
            print("refused", type(e).__name__, e, flush=True)
        with RingReader.open(path) as again:
            if again.pop(timeout=TIMEOUT) != b"m" * 64:
                print("message lost", flush=True)
                return 1
    return EXPECTED_EXIT


# ---- signatures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "signature"),
    [
        (RingWriter.push_many, "(self, messages, /, timeout=None)"),
        (RingWriter.reserve, "(self, size, /, timeout=None)"),
        (RingReader.pop_many, "(self, /, max_messages, timeout=None, max_bytes=None)"),
        (RingReader.pop_view, "(self, /, timeout=None)"),
    ],
    ids=lambda v: getattr(v, "__qualname__", "sig"),
)
def test_batch_and_slot_methods_have_text_signatures(
    method: Callable[..., object], signature: str
) -> None:
    assert str(inspect.signature(method)) == signature


def test_slots_come_only_from_reserve_and_pop_view(ring: tuple[RingWriter, RingReader]) -> None:
    writer, _ = ring
    slot = writer.reserve(8, timeout=0)
    try:
        with pytest.raises(TypeError):
            type(slot)()
    finally:
        slot.discard()


# ---- exceptions -----------------------------------------------------------------------


def test_written_is_zero_on_timeouts_and_errors_that_are_not_from_push_many(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    with pytest.raises(RingTimeout) as popped:
        reader.pop(timeout=0)
    assert popped.value.written == 0
    with pytest.raises(RingTimeout) as pop_many_timed_out:
        reader.pop_many(5, timeout=0.01)
    assert pop_many_timed_out.value.written == 0
    with pytest.raises(MessageTooLarge) as too_large:
        writer.push(b"x" * 57, timeout=0)
    assert too_large.value.written == 0
    fill(writer)
    with pytest.raises(RingTimeout) as pushed:
        writer.push(b"x", timeout=0)
    assert pushed.value.written == 0
    with pytest.raises(RingTimeout) as reserved:
        writer.reserve(8, timeout=0)
    assert reserved.value.written == 0


# ---- push_many ---------------------------------------------------------------------------


def mixed_buffers() -> list[Buffer]:
    return [
        b"bytes",
        bytearray(b"bytearray"),
        memoryview(b"--memoryview--")[2:-2],
        array.array("i", [1, 2, 3]),
        b"",
        memoryview(bytearray(b"writable view")),
    ]


@pytest.mark.parametrize(
    "make",
    [
        list,
        tuple,
        lambda items: (item for item in items),
        iter,
        deque,
    ],
    ids=["list", "tuple", "generator", "iterator", "deque"],
)
def test_push_many_writes_any_iterable_of_buffers_in_order_and_returns_the_count(
    ring_path: Path, make: Callable[[list[Buffer]], Iterable[Buffer]]
) -> None:
    items = mixed_buffers()
    expected = [bytes(item) for item in items]
    with RingWriter.create(ring_path, 256) as writer, RingReader.open(ring_path) as reader:
        assert writer.push_many(make(items), timeout=TIMEOUT) == len(items)
        received = drain(reader)
    assert received == expected
    assert all(type(message) is bytes for message in received)


@pytest.mark.parametrize(
    "empty", [[], (), iter(()), (x for x in ())], ids=["list", "tuple", "iterator", "generator"]
)
def test_push_many_of_an_empty_iterable_returns_zero_and_writes_nothing(
    ring: tuple[RingWriter, RingReader], empty: Iterable[bytes]
) -> None:
    writer, reader = ring
    assert writer.push_many(empty, timeout=0) == 0
    assert positions(writer.path) == (0, 0)
    assert reader.try_pop() is None


def test_push_many_fills_the_ring_exactly_with_zero_length_messages(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    assert writer.push_many([b""] * 8, timeout=0) == 8
    assert positions(writer.path) == (64, 0)
    assert reader.pop_many(100, timeout=0) == [b""] * 8


def test_push_many_round_trips_zero_length_and_max_message_size_messages_with_a_reader(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    # A message of max_message_size takes the whole ring: each one needs the reader.
    batch = [b"", b"\xff" * 56, b"", b"", b"\x01" * 56, b"\x02" * 55, b"", b"\x03" * 56]
    worker = Worker(lambda: [reader.pop(timeout=TIMEOUT) for _ in batch])
    worker.start()
    assert writer.push_many(batch, timeout=TIMEOUT) == len(batch)
    worker.join(timeout=TIMEOUT)
    assert worker.error is None
    assert worker.result == batch


def test_push_many_of_a_batch_far_larger_than_the_ring_completes_with_a_reader_thread(
    ring_path: Path,
) -> None:
    rng = random.Random(3)
    batch = [rng.randbytes(rng.randrange(0, 249)) for _ in range(3000)]
    with RingWriter.create(ring_path, 256) as writer, RingReader.open(ring_path) as reader:
        worker = Worker(lambda: [reader.pop(timeout=TIMEOUT) for _ in batch])
        worker.start()
        assert writer.push_many(iter(batch), timeout=60) == len(batch)
        worker.join(timeout=TIMEOUT)
        assert worker.error is None
        assert worker.result == batch
        assert reader.try_pop() is None


@pytest.mark.parametrize("timeout", [0, 0.05])
def test_push_many_timeout_part_way_reports_exactly_what_was_written(
    ring: tuple[RingWriter, RingReader], timeout: float
) -> None:
    writer, reader = ring
    messages = numbered(20)  # 16-byte records: 4 fit in 64 bytes
    start = time.monotonic()
    with pytest.raises(RingTimeout) as timed_out:
        writer.push_many(messages, timeout=timeout)
    elapsed = time.monotonic() - start
    assert timed_out.value.written == 4
    assert timeout <= elapsed < timeout + 0.5
    assert drain(reader) == messages[:4]


def test_push_many_retried_from_written_after_timeouts_delivers_everything_exactly_once(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    rng = random.Random(5)
    messages = [rng.randbytes(rng.randrange(0, 57)) for _ in range(300)]
    remaining = messages
    received: list[bytes] = []
    timeouts = 0
    while remaining:
        try:
            assert writer.push_many(remaining, timeout=0) == len(remaining)
            remaining = []
        except RingTimeout as e:
            timeouts += 1
            remaining = remaining[e.written :]
        # Empty after a timeout is possible: the writer may have published only the padding
        # in front of a message that then did not fit (FORMAT.md "Wrap rule").
        with suppress(RingTimeout):
            received += reader.pop_many(rng.choice([1, 2, 100]), timeout=0)
    received += drain(reader)
    assert timeouts > 50
    assert received == messages


def test_push_many_timeout_bounds_the_whole_call_against_a_slow_reader(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    messages = numbered(400)
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


def test_push_many_stops_at_a_message_too_large_after_writing_the_ones_before(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    with pytest.raises(MessageTooLarge) as too_large:
        writer.push_many([b"one", b"two", b"x" * 57, b"four"], timeout=TIMEOUT)
    assert too_large.value.written == 2
    assert drain(reader) == [b"one", b"two"]
    assert writer.push_many([b"four"], timeout=0) == 1
    assert reader.pop(timeout=0) == b"four"


def test_push_many_raises_message_too_large_before_waiting_on_a_full_ring(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    start = time.monotonic()
    with pytest.raises(MessageTooLarge) as too_large:
        writer.push_many([b"x" * 57], timeout=TIMEOUT)
    assert time.monotonic() - start < 1
    assert too_large.value.written == 0
    assert drain(reader) == pushed


@pytest.mark.parametrize("item", ["text", 42, None, [1, 2]], ids=repr)
@pytest.mark.parametrize("container", ["list", "generator"])
def test_push_many_rejects_an_item_that_is_not_bytes_like_after_writing_the_ones_before(
    ring: tuple[RingWriter, RingReader], item: object, container: str
) -> None:
    writer, reader = ring
    items = [b"one", bytearray(b"two"), item, b"four"]
    source = items if container == "list" else (x for x in items)
    with pytest.raises(TypeError) as rejected:
        writer.push_many(source, timeout=TIMEOUT)  # type: ignore[arg-type]
    assert rejected.value.written == 2  # type: ignore[attr-defined]
    assert drain(reader) == [b"one", b"two"]
    writer.push(b"after", timeout=0)
    assert reader.pop(timeout=0) == b"after"


def test_push_many_rejects_a_non_contiguous_memoryview_after_writing_the_ones_before(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    strided = memoryview(b"abcdefgh")[::2]
    with pytest.raises((TypeError, BufferError)) as rejected:
        writer.push_many([b"one", b"two", strided], timeout=TIMEOUT)
    assert rejected.value.written == 2  # type: ignore[attr-defined]
    assert drain(reader) == [b"one", b"two"]


def test_push_many_of_something_not_iterable_raises_type_error(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    with pytest.raises(TypeError):
        writer.push_many(42, timeout=0)  # type: ignore[arg-type]
    assert reader.try_pop() is None


def test_push_many_passes_on_an_exception_raised_by_the_iterable(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring

    def messages() -> Iterator[bytes]:
        yield b"one"
        yield b"two"
        raise KeyError("from the generator")

    with pytest.raises(KeyError, match="from the generator") as raised:
        writer.push_many(messages(), timeout=TIMEOUT)
    assert raised.value.written == 2  # type: ignore[attr-defined]
    assert drain(reader) == [b"one", b"two"]


@pytest.mark.parametrize("call", ["push", "try_push", "push_many", "reserve"])
def test_a_generator_that_uses_the_same_writer_inside_push_many_gets_runtime_error(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring

    def messages() -> Iterator[bytes]:
        yield b"first"
        if call == "push":
            writer.push(b"inner", timeout=TIMEOUT)
        elif call == "try_push":
            writer.try_push(b"inner")
        elif call == "push_many":
            writer.push_many([b"inner"], timeout=TIMEOUT)
        else:
            writer.reserve(8, timeout=TIMEOUT)
        yield b"never reached"

    with pytest.raises(RuntimeError, match="already in progress") as refused:
        writer.push_many(messages(), timeout=TIMEOUT)
    assert refused.value.written == 1  # type: ignore[attr-defined]
    assert drain(reader) == [b"first"]
    writer.push(b"after", timeout=0)
    assert reader.pop(timeout=0) == b"after"


def test_a_generator_that_closes_the_writer_mid_batch_makes_push_many_raise_ring_closed(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring

    def messages() -> Iterator[bytes]:
        yield b"one"
        yield b"two"
        writer.close()
        yield b"three"
        yield b"four"

    with pytest.raises(RingClosed) as closed:
        writer.push_many(messages(), timeout=TIMEOUT)
    assert writer.closed
    # What was published before the close, and only that, reaches the reader.
    written = closed.value.written  # type: ignore[attr-defined]
    assert list(reader) == [b"one", b"two"][:written]
    with pytest.raises(RingClosed):
        writer.push_many([b"five"], timeout=0)


def test_a_generator_that_closes_the_writer_as_it_ends_still_delivers_what_it_yielded(
    ring: tuple[RingWriter, RingReader],
) -> None:
    """close() publishes the records a running push_many has staged before it ends the
    stream: nothing the iterable yielded is lost, and push_many reports it written."""
    writer, reader = ring

    def messages() -> Iterator[bytes]:
        yield b"one"
        yield b"two"
        writer.close()

    assert writer.push_many(messages(), timeout=TIMEOUT) == 2
    assert writer.closed
    assert list(reader) == [b"one", b"two"]


def test_push_many_raises_peer_died_with_written_when_the_reader_died_and_the_ring_is_full(
    ring_path: Path, spawn: Spawn
) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        child = spawn("child_reader_attaches_and_exits", ring_path)
        child.expect_line("attached", timeout=TIMEOUT)
        child.finish(0, timeout=TIMEOUT)
        messages = numbered(10)
        start = time.monotonic()
        with pytest.raises(PeerDied) as died:
            writer.push_many(messages, timeout=TIMEOUT)
        assert time.monotonic() - start < TIMEOUT / 2
        assert died.value.written == 4  # type: ignore[attr-defined]
        with pytest.raises(PeerDied):
            writer.reserve(8, timeout=TIMEOUT)
        with RingReader.open(ring_path) as reader:
            assert reader.pop_many(10, timeout=TIMEOUT) == messages[:4]
            assert writer.push_many(messages[4:8], timeout=TIMEOUT) == 4
            assert reader.pop_many(10, timeout=TIMEOUT) == messages[4:8]


@pytest.mark.parametrize("call", ["push_many", "reserve"])
def test_batch_and_slot_calls_on_a_closed_writer_raise_ring_closed(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, _ = ring
    writer.close()
    with pytest.raises(RingClosed):
        if call == "push_many":
            writer.push_many([b"x"], timeout=0)
        else:
            writer.reserve(8, timeout=0)


@pytest.mark.parametrize("call", ["pop_many", "pop_view"])
def test_batch_and_slot_calls_on_a_closed_reader_raise_ring_closed(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    writer.push(b"unread", timeout=0)
    reader.close()
    with pytest.raises(RingClosed):
        if call == "pop_many":
            reader.pop_many(5, timeout=0)
        else:
            reader.pop_view(timeout=0)


def test_commit_after_the_writer_closed_raises_ring_closed_and_publishes_nothing(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    slot = writer.reserve(8, timeout=0)
    writer.close()
    with pytest.raises(RingClosed):
        slot.commit()
    assert not slot.open
    assert list(reader) == []


def test_discard_after_the_writer_closed_is_allowed(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    slot = writer.reserve(8, timeout=0)
    writer.close()
    slot.discard()
    assert not slot.open
    assert list(reader) == []


@pytest.mark.parametrize("call", ["push_many", "reserve"])
def test_close_from_another_thread_wakes_a_thread_blocked_in_a_batch_or_reserve(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    if call == "push_many":
        worker = Worker(lambda: writer.push_many([b"blocked"] * 3, timeout=TIMEOUT))
    else:
        worker = Worker(lambda: writer.reserve(8, timeout=TIMEOUT))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    writer.close()
    worker.join(timeout=1)
    assert not worker.is_alive()
    assert isinstance(worker.error, RingClosed)
    assert list(reader) == pushed


@pytest.mark.parametrize("call", ["push_many", "reserve"])
def test_a_second_thread_using_a_writer_blocked_in_a_batch_or_reserve_gets_runtime_error(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    if call == "push_many":
        worker = Worker(lambda: writer.push_many([b"first"], timeout=TIMEOUT))
    else:
        worker = Worker(lambda: writer.reserve(5, timeout=TIMEOUT))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    with pytest.raises(RuntimeError, match="another thread"):
        writer.push(b"second", timeout=TIMEOUT)
    assert drain(reader) == pushed
    worker.join(timeout=TIMEOUT)
    assert worker.error is None
    if call == "reserve":
        slot = worker.result
        with slot as view:  # type: ignore[attr-defined]
            view[:] = b"first"
    assert reader.pop(timeout=TIMEOUT) == b"first"
    assert reader.try_pop() is None


@pytest.mark.parametrize("timeout", [-1, float("nan"), "soon"], ids=repr)
def test_push_many_rejects_a_bad_timeout_before_writing_anything(
    ring: tuple[RingWriter, RingReader], timeout: object
) -> None:
    writer, reader = ring
    with pytest.raises((ValueError, TypeError)):
        writer.push_many([b"x"], timeout=timeout)  # type: ignore[arg-type]
    assert reader.try_pop() is None


# ---- pop_many --------------------------------------------------------------------------------


def test_pop_many_returns_the_available_messages_up_to_max_messages(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    messages = numbered(4)
    writer.push_many(messages, timeout=0)
    first = reader.pop_many(3, timeout=0)
    assert first == messages[:3]
    assert all(type(message) is bytes for message in first)
    assert reader.pop_many(100, timeout=0) == messages[3:]
    assert reader.try_pop() is None


def test_pop_many_publishes_the_read_position_of_exactly_what_it_returned(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push_many([b"a" * 3, b"b" * 9, b"c" * 1], timeout=0)
    assert reader.pop_many(2, timeout=0) == [b"a" * 3, b"b" * 9]
    assert positions(writer.path)[1] == record_size(3) + record_size(9)
    # The space is handed back: the writer can use it at once.
    assert writer.try_push(b"d" * 24)


def test_pop_many_waits_for_the_first_message(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    worker = Worker(lambda: reader.pop_many(10, timeout=TIMEOUT))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    writer.push(b"late", timeout=TIMEOUT)
    worker.join(timeout=TIMEOUT)
    assert worker.error is None
    assert worker.result == [b"late"]


@pytest.mark.parametrize("timeout", [0, 0.05])
def test_pop_many_on_an_empty_ring_raises_ring_timeout(
    ring: tuple[RingWriter, RingReader], timeout: float
) -> None:
    _, reader = ring
    start = time.monotonic()
    with pytest.raises(RingTimeout):
        reader.pop_many(10, timeout=timeout)
    assert timeout <= time.monotonic() - start < timeout + 0.5


def test_pop_many_returns_the_rest_then_raises_ring_closed_at_end_of_stream(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push_many([b"last", b"words"], timeout=0)
    writer.close()
    assert reader.pop_many(10, timeout=TIMEOUT) == [b"last", b"words"]
    for timeout in (0, TIMEOUT):
        with pytest.raises(RingClosed):
            reader.pop_many(10, timeout=timeout)


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


@pytest.mark.parametrize(
    ("max_bytes", "count"),
    [(0, 1), (4, 1), (7, 1), (8, 2), (11, 2), (12, 3), (15, 3), (16, 4), (None, 4)],
)
def test_pop_many_stops_before_a_message_that_would_take_the_payload_over_max_bytes(
    ring: tuple[RingWriter, RingReader], max_bytes: int | None, count: int
) -> None:
    writer, reader = ring
    messages = numbered(4, length=4)
    writer.push_many(messages, timeout=0)
    assert reader.pop_many(10, timeout=0, max_bytes=max_bytes) == messages[:count]
    assert drain(reader) == messages[count:]


def test_pop_many_returns_the_first_message_even_when_it_is_larger_than_max_bytes(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push_many([b"x" * 40, b"y"], timeout=0)
    assert reader.pop_many(10, 0, 1) == [b"x" * 40]
    assert reader.pop_many(10, timeout=0, max_bytes=0) == [b"y"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_messages": 0},
        {"max_messages": -1},
        {"max_messages": 5, "max_bytes": -1},
        {"max_messages": 5, "timeout": -1},
    ],
    ids=repr,
)
def test_pop_many_rejects_bad_arguments_with_value_error_and_leaves_the_messages(
    ring: tuple[RingWriter, RingReader], kwargs: dict[str, int]
) -> None:
    writer, reader = ring
    writer.push(b"stays", timeout=0)
    with pytest.raises(ValueError):
        reader.pop_many(**kwargs)
    assert reader.pop(timeout=0) == b"stays"


def test_pop_many_interleaves_with_pop_try_pop_and_pop_into(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    messages = numbered(7, length=4)  # records of 16 bytes: 4 fill the ring
    writer.push_many(messages[:4], timeout=0)
    assert reader.pop(timeout=0) == messages[0]
    assert reader.pop_many(2, timeout=0) == messages[1:3]
    writer.push_many(messages[4:7], timeout=0)
    assert reader.try_pop() == messages[3]
    assert reader.pop_many(1, timeout=0) == [messages[4]]
    buffer = bytearray(8)
    assert reader.pop_into(buffer, timeout=0) == 4
    assert bytes(buffer[:4]) == messages[5]
    assert reader.pop_many(10, timeout=0) == [messages[6]]
    assert reader.try_pop() is None


@pytest.mark.parametrize("capacity", [64, 128, 256])
def test_pop_many_skips_padding_records_and_wraps_correctly_in_a_small_ring(
    ring_path: Path, capacity: int
) -> None:
    rng = random.Random(capacity)
    max_size = capacity - RECORD_HEADER
    expected: deque[bytes] = deque()
    seq = 0
    with RingWriter.create(ring_path, capacity) as writer, RingReader.open(ring_path) as reader:
        for _ in range(2000):
            while True:
                message = seq.to_bytes(4, "little") + rng.randbytes(rng.randrange(0, max_size - 3))
                if not writer.try_push(message):
                    break
                expected.append(message)
                seq += 1
            max_messages = rng.randrange(1, 6)
            max_bytes = rng.choice([None, 0, 20, max_size])
            if not expected:
                # The ring holds only the padding in front of a message that did not fit.
                with pytest.raises(RingTimeout):
                    reader.pop_many(max_messages, timeout=0, max_bytes=max_bytes)
                continue
            batch = reader.pop_many(max_messages, timeout=0, max_bytes=max_bytes)
            assert 1 <= len(batch) <= max_messages
            assert batch == [expected.popleft() for _ in batch]
            if max_bytes is not None and len(batch) > 1:
                assert sum(map(len, batch)) <= max_bytes
            if len(batch) < max_messages and expected:
                assert max_bytes is not None
                assert sum(map(len, batch)) + len(expected[0]) > max_bytes
        assert drain(reader) == list(expected)
        write_pos, read_pos = positions(ring_path)
    assert write_pos == read_pos
    assert write_pos // capacity > 500


# ---- reserve ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, 8, 9, 55, 56])
def test_reserve_gives_a_writable_view_of_exactly_the_size_published_when_the_block_exits(
    ring: tuple[RingWriter, RingReader], size: int
) -> None:
    writer, reader = ring
    message = bytes(range(100, 100 + size))
    slot = writer.reserve(size, timeout=TIMEOUT)
    assert slot.open
    assert slot.size == size
    with slot as view:
        assert isinstance(view, memoryview)
        assert len(view) == view.nbytes == size
        assert not view.readonly
        assert view.format == "B"
        view[:] = message
        assert reader.try_pop() is None  # nothing is visible before the block ends
    assert not slot.open
    assert reader.pop(timeout=0) == message
    assert positions(writer.path) == (record_size(size),) * 2


def test_reserve_fills_the_payload_in_place_inside_the_ring_file(ring_path: Path) -> None:
    with (
        RingWriter.create(ring_path, 256) as writer,
        RingReader.open(ring_path) as reader,
        open(ring_path, "r+b") as file,
        mmap.mmap(file.fileno(), 0) as shared,
    ):
        writer.push(b"x" * 20, timeout=0)  # the next record starts at index 32
        assert reader.pop(timeout=0) == b"x" * 20
        payload_at = DATA_OFFSET + record_size(20) + RECORD_HEADER
        with writer.reserve(16, timeout=TIMEOUT) as view:
            view[:8] = b"in place"
            assert shared[payload_at : payload_at + 8] == b"in place"
            shared[payload_at + 8 : payload_at + 16] = b"from map"
            assert bytes(view) == b"in placefrom map"
        assert reader.pop(timeout=0) == b"in placefrom map"


def test_reserved_views_are_eight_byte_aligned_for_numpy_at_every_offset(
    ring_path: Path,
) -> None:
    np = pytest.importorskip("numpy")
    with RingWriter.create(ring_path, 256) as writer, RingReader.open(ring_path) as reader:
        for seq in range(200):
            writer.push(b"p" * (seq % 23), timeout=0)  # moves the next record around
            assert reader.pop(timeout=0) == b"p" * (seq % 23)
            with writer.reserve(24, timeout=0) as view:
                values = np.frombuffer(view, dtype=np.uint64)
                assert values.ctypes.data % 8 == 0
                assert values.flags.writeable
                values[:] = [seq, seq * 3, 2**64 - 1 - seq]
                del values
            got = np.frombuffer(reader.pop(timeout=0), dtype=np.uint64)
            assert got.tolist() == [seq, seq * 3, 2**64 - 1 - seq]


def test_reserve_block_that_raises_discards_the_message_and_the_next_push_works(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    slot = writer.reserve(16, timeout=TIMEOUT)
    with pytest.raises(KeyError, match="abandon"), slot as view:
        view[:] = b"half-written msg"
        raise KeyError("abandon")
    assert not slot.open
    assert reader.try_pop() is None
    assert positions(writer.path) == (0, 0)
    writer.push(b"next", timeout=0)
    assert reader.pop(timeout=0) == b"next"
    assert reader.try_pop() is None


@pytest.mark.parametrize("k", [0, 1, 5, 8, 15, 16])
def test_slot_commit_publishes_only_the_first_k_bytes(
    ring: tuple[RingWriter, RingReader], k: int
) -> None:
    writer, reader = ring
    slot = writer.reserve(16, timeout=TIMEOUT)
    with slot as view:
        view[:] = b"0123456789abcdef"
        slot.commit(k)
        assert not slot.open
    assert reader.pop(timeout=0) == b"0123456789abcdef"[:k]
    assert positions(writer.path)[0] == record_size(k)
    assert reader.try_pop() is None


def test_slot_commit_without_a_size_publishes_everything_outside_a_block(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    slot = writer.reserve(3, timeout=TIMEOUT)
    memoryview(slot)[:] = b"abc"
    slot.commit()
    assert reader.pop(timeout=0) == b"abc"


@pytest.mark.parametrize("k", [-1, 17, 2**40])
def test_slot_commit_out_of_range_raises_value_error_and_leaves_the_slot_open(
    ring: tuple[RingWriter, RingReader], k: int
) -> None:
    writer, reader = ring
    slot = writer.reserve(16, timeout=TIMEOUT)
    with slot as view:
        view[:] = b"0123456789abcdef"
        with pytest.raises(ValueError):
            slot.commit(k)
        assert slot.open
    assert reader.pop(timeout=0) == b"0123456789abcdef"


def test_a_finished_slot_cannot_be_committed_or_discarded_again(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    slot = writer.reserve(4, timeout=TIMEOUT)
    slot.commit(0)
    with pytest.raises(ValueError):
        slot.commit(0)
    with pytest.raises(ValueError):
        slot.discard()
    assert reader.pop_many(10, timeout=0) == [b""]


def test_slot_discard_gives_the_reservation_back(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    slot = writer.reserve(48, timeout=TIMEOUT)
    with slot as view:
        view[:4] = b"gone"
        slot.discard()
        assert not slot.open
    assert positions(writer.path) == (0, 0)
    assert reader.try_pop() is None
    # All 64 bytes are free again.
    assert writer.push_many([b""] * 8, timeout=0) == 8


def test_reserve_larger_than_max_message_size_raises_message_too_large_before_waiting(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    start = time.monotonic()
    with pytest.raises(MessageTooLarge):
        writer.reserve(57, timeout=TIMEOUT)
    assert time.monotonic() - start < 1
    with pytest.raises(ValueError):
        writer.reserve(-1, timeout=0)
    assert drain(reader) == pushed
    with writer.reserve(56, timeout=0) as view:
        view[:] = b"m" * 56
    assert reader.pop(timeout=0) == b"m" * 56


@pytest.mark.parametrize("timeout", [0, 0.05])
def test_reserve_on_a_full_ring_raises_ring_timeout_and_leaves_the_writer_usable(
    ring: tuple[RingWriter, RingReader], timeout: float
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    start = time.monotonic()
    with pytest.raises(RingTimeout):
        writer.reserve(8, timeout=timeout)
    assert timeout <= time.monotonic() - start < timeout + 0.5
    assert drain(reader) == pushed
    with writer.reserve(8, timeout=0) as view:
        view[:] = b"12345678"
    assert reader.pop(timeout=0) == b"12345678"


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


@pytest.mark.parametrize("call", ["push", "try_push", "push_many", "reserve"])
def test_calls_on_a_writer_with_an_open_reservation_raise_runtime_error(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    calls: dict[str, Callable[[], object]] = {
        "push": lambda: writer.push(b"x", timeout=0),
        "try_push": lambda: writer.try_push(b"x"),
        "push_many": lambda: writer.push_many([b"x"], timeout=0),
        "reserve": lambda: writer.reserve(8, timeout=0),
    }
    with writer.reserve(8, timeout=TIMEOUT) as view:
        view[:] = b"reserved"
        with pytest.raises(RuntimeError, match="reserve"):
            calls[call]()
    assert reader.pop(timeout=0) == b"reserved"
    calls[call]()  # usable again once the block is done (a reservation dropped is discarded)
    assert reader.try_pop() == (None if call == "reserve" else b"x")


def test_numpy_array_made_from_a_reserved_view_stays_valid_after_the_block_and_close(
    ring_path: Path,
) -> None:
    np = pytest.importorskip("numpy")
    with RingWriter.create(ring_path, 4096) as writer, RingReader.open(ring_path) as reader:
        with writer.reserve(64, timeout=TIMEOUT) as view:
            array_ = np.frombuffer(view, dtype=np.uint64)
            array_[:] = np.arange(8, dtype=np.uint64)
        writer.close()
        assert writer.closed
        # The mapping must outlive the array: reading and writing it does not crash.
        assert array_.tolist() == list(range(8))
        array_ += 1
        assert array_.tolist() == list(range(1, 9))
        del array_
        message = reader.pop(timeout=TIMEOUT)
        assert len(message) == 64
        with pytest.raises(RingClosed):
            reader.pop(timeout=0)


def test_memoryview_of_a_reservation_used_after_the_block_raises_value_error(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    slot = writer.reserve(8, timeout=TIMEOUT)
    with slot as view:
        view[:] = b"12345678"
    with pytest.raises(ValueError):
        view[0] = 0
    with pytest.raises(ValueError):
        bytes(view)
    with pytest.raises(ValueError):
        memoryview(slot)
    assert reader.pop(timeout=0) == b"12345678"


def test_a_reservation_dropped_without_a_block_is_discarded_and_the_writer_is_usable_again(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    slot = writer.reserve(8, timeout=TIMEOUT)
    with pytest.raises(RuntimeError):
        writer.push(b"x", timeout=0)
    del slot
    gc.collect()
    writer.push(b"after", timeout=0)
    assert reader.pop(timeout=0) == b"after"
    assert reader.try_pop() is None


def test_a_reservation_entered_but_never_exited_is_discarded_once_dropped(
    ring: tuple[RingWriter, RingReader],
) -> None:
    """A slot and the memoryview its __enter__ returns refer to each other: dropping both
    must still discard the reservation (the cycle must be collectable)."""
    writer, reader = ring
    view = writer.reserve(8, timeout=TIMEOUT).__enter__()
    view[:] = b"entered!"
    del view
    gc.collect()
    writer.push(b"after", timeout=0)
    assert reader.pop(timeout=0) == b"after"
    assert reader.try_pop() is None


def test_reserve_zero_gives_an_empty_view_and_an_empty_message(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    with writer.reserve(0, timeout=0) as view:
        assert len(view) == 0
    assert reader.pop(timeout=0) == b""
    assert positions(writer.path) == (RECORD_HEADER, RECORD_HEADER)


def test_reserve_after_the_end_of_the_data_area_publishes_padding_and_starts_at_index_0(
    ring_path: Path,
) -> None:
    with (
        RingWriter.create(ring_path, 64) as writer,
        RingReader.open(ring_path) as reader,
        open(ring_path, "r+b") as file,
        mmap.mmap(file.fileno(), 0) as shared,
    ):
        writer.push(b"a" * 40, timeout=0)  # 48 bytes: 16 left before the end
        assert reader.pop(timeout=0) == b"a" * 40
        with writer.reserve(16, timeout=0) as view:
            assert positions(ring_path)[0] == 64  # the padding is published
            view[:] = b"wrapped around!!"
            assert shared[DATA_OFFSET + 8 : DATA_OFFSET + 24] == b"wrapped around!!"
        assert reader.pop(timeout=0) == b"wrapped around!!"
        assert positions(ring_path) == (88, 88)


def test_writer_close_inside_a_reserve_block_ends_the_stream_without_the_message(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"before", timeout=0)
    with pytest.raises(RingClosed), writer.reserve(8, timeout=0) as view:
        view[:] = b"unwanted"
        writer.close()
    assert list(reader) == [b"before"]


def test_entering_a_reservation_after_the_writer_closed_does_not_touch_released_memory(
    ring_path: Path, spawn: Spawn
) -> None:
    child = spawn("child_enters_a_reservation_after_closing_the_writer", ring_path)
    returncode = child.wait(timeout=TIMEOUT)
    if returncode != EXPECTED_EXIT:
        child.fail(f"exited with {returncode} (-11 is SIGSEGV), expected {EXPECTED_EXIT}")


# ---- pop_view ---------------------------------------------------------------------------------


def test_pop_view_gives_a_read_only_view_and_consumes_the_message_at_the_end_of_the_block(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push_many([b"first message", b"second"], timeout=0)
    slot = reader.pop_view(timeout=TIMEOUT)
    assert slot.open
    assert slot.size == len(b"first message")
    with slot as view:
        assert isinstance(view, memoryview)
        assert view.readonly
        assert bytes(view) == b"first message"
        with pytest.raises(TypeError):
            view[0] = 0
        assert positions(writer.path)[1] == 0  # not consumed yet
    assert not slot.open
    assert positions(writer.path)[1] == record_size(len(b"first message"))
    assert reader.pop(timeout=0) == b"second"


def test_pop_view_consumes_the_message_when_the_block_raises(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push_many([b"bad", b"good"], timeout=0)
    with pytest.raises(KeyError), reader.pop_view(timeout=TIMEOUT) as view:
        assert bytes(view) == b"bad"
        raise KeyError(bytes(view))
    assert reader.pop(timeout=0) == b"good"


def test_memoryview_of_a_message_used_after_the_block_raises_value_error(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"short-lived", timeout=0)
    slot = reader.pop_view(timeout=TIMEOUT)
    with slot as view:
        assert bytes(view) == b"short-lived"
    with pytest.raises(ValueError):
        bytes(view)
    with pytest.raises(ValueError):
        view.tobytes()
    with pytest.raises(ValueError):
        memoryview(slot)


def test_pop_view_is_the_ring_memory_itself_not_a_copy(ring_path: Path) -> None:
    with (
        RingWriter.create(ring_path, 256) as writer,
        RingReader.open(ring_path) as reader,
        open(ring_path, "r+b") as file,
        mmap.mmap(file.fileno(), 0) as shared,
    ):
        writer.push_many([b"x" * 20, b"original"], timeout=0)
        assert reader.pop(timeout=0) == b"x" * 20
        payload_at = DATA_OFFSET + record_size(20) + RECORD_HEADER
        with reader.pop_view(timeout=TIMEOUT) as view:
            assert bytes(view) == b"original"
            shared[payload_at : payload_at + 8] = b"modified"
            assert bytes(view) == b"modified"


def test_consecutive_pop_views_lie_one_record_apart_in_the_mapping(ring_path: Path) -> None:
    np = pytest.importorskip("numpy")
    lengths = [1, 8, 9, 16, 0, 23, 5]
    with RingWriter.create(ring_path, 4096) as writer, RingReader.open(ring_path) as reader:
        writer.push_many([bytes([n]) * n for n in lengths], timeout=0)
        addresses = []
        for n in lengths:
            with reader.pop_view(timeout=TIMEOUT) as view:
                array_ = np.frombuffer(view, dtype=np.uint8)
                assert array_.tobytes() == bytes([n]) * n
                addresses.append(array_.ctypes.data)
                del array_
        for i in range(len(lengths) - 1):
            if lengths[i] and lengths[i + 1]:
                assert addresses[i + 1] - addresses[i] == record_size(lengths[i])
        assert addresses[-1] - addresses[0] == sum(map(record_size, lengths[:-1]))
        assert all(address % 8 == 0 for address, n in zip(addresses, lengths, strict=True) if n)


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


@pytest.mark.parametrize("timeout", [0, 0.05])
def test_pop_view_on_an_empty_ring_raises_ring_timeout(
    ring: tuple[RingWriter, RingReader], timeout: float
) -> None:
    _, reader = ring
    start = time.monotonic()
    with pytest.raises(RingTimeout):
        reader.pop_view(timeout=timeout)
    assert timeout <= time.monotonic() - start < timeout + 0.5


def test_pop_view_raises_ring_closed_at_end_of_stream(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"last", timeout=0)
    writer.close()
    with reader.pop_view(timeout=TIMEOUT) as view:
        assert bytes(view) == b"last"
    for timeout in (0, TIMEOUT):
        with pytest.raises(RingClosed):
            reader.pop_view(timeout=timeout)


def test_pop_view_discard_leaves_the_message_for_the_next_pop(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push_many([b"keep me", b"then me"], timeout=0)
    slot = reader.pop_view(timeout=TIMEOUT)
    with slot as view:
        assert bytes(view) == b"keep me"
        slot.discard()
        assert not slot.open
    assert positions(writer.path)[1] == 0
    with reader.pop_view(timeout=0) as view:
        assert bytes(view) == b"keep me"
    assert reader.pop_many(5, timeout=0) == [b"then me"]


def test_a_message_view_dropped_without_a_block_leaves_the_message(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"still here", timeout=0)
    slot = reader.pop_view(timeout=TIMEOUT)
    with pytest.raises(RuntimeError):
        reader.try_pop()
    del slot
    gc.collect()
    assert reader.pop(timeout=0) == b"still here"


def test_commit_on_a_message_view_raises_type_error(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    writer.push(b"view", timeout=0)
    slot = reader.pop_view(timeout=TIMEOUT)
    with slot as view:
        assert bytes(view) == b"view"
        with pytest.raises(TypeError):
            slot.commit()
        assert slot.open
    assert reader.try_pop() is None


@pytest.mark.parametrize("call", ["pop_many", "pop_view"])
def test_close_from_another_thread_wakes_a_thread_blocked_in_pop_many_or_pop_view(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    _, reader = ring
    if call == "pop_many":
        worker = Worker(lambda: reader.pop_many(5, timeout=TIMEOUT))
    else:
        worker = Worker(lambda: reader.pop_view(timeout=TIMEOUT))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    reader.close()
    worker.join(timeout=1)
    assert not worker.is_alive()
    assert isinstance(worker.error, RingClosed)


@pytest.mark.parametrize("call", ["pop_many", "pop_view"])
def test_pop_many_and_pop_view_raise_peer_died_once_a_dead_writers_messages_are_read(
    ring_path: Path, spawn: Spawn, call: str
) -> None:
    child = spawn("child_writer_dies_after_push_many", ring_path)
    child.expect_line("pushed", timeout=TIMEOUT)
    child.finish(0, timeout=TIMEOUT)
    with RingReader.open(ring_path) as reader:
        assert not reader.writer_alive
        if call == "pop_many":
            assert reader.pop_many(10, timeout=TIMEOUT) == [b"one", b"two", b"three"]
            with pytest.raises(PeerDied):
                reader.pop_many(10, timeout=TIMEOUT)
        else:
            for expected in (b"one", b"two", b"three"):
                with reader.pop_view(timeout=TIMEOUT) as view:
                    assert bytes(view) == expected
            with pytest.raises(PeerDied):
                reader.pop_view(timeout=TIMEOUT)


def test_pop_view_of_a_zero_length_message_is_an_empty_view(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push_many([b"", b"after"], timeout=0)
    with reader.pop_view(timeout=0) as view:
        assert len(view) == 0
        assert bytes(view) == b""
    assert reader.pop(timeout=0) == b"after"


@pytest.mark.parametrize("call", ["pop", "try_pop", "pop_into", "pop_many", "pop_view", "next"])
def test_calls_on_a_reader_with_an_open_view_raise_runtime_error(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    writer.push_many([b"viewed", b"next"], timeout=0)
    calls: dict[str, Callable[[], object]] = {
        "pop": lambda: reader.pop(timeout=0),
        "try_pop": reader.try_pop,
        "pop_into": lambda: reader.pop_into(bytearray(8), timeout=0),
        "pop_many": lambda: reader.pop_many(5, timeout=0),
        "pop_view": lambda: reader.pop_view(timeout=0),
        "next": lambda: next(reader),
    }
    with reader.pop_view(timeout=TIMEOUT) as view:
        with pytest.raises(RuntimeError, match="pop_view"):
            calls[call]()
        assert bytes(view) == b"viewed"
    assert reader.pop(timeout=0) == b"next"


def test_reader_close_inside_a_pop_view_block_leaves_the_message_for_the_next_reader(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        writer.push_many([b"unfinished", b"second"], timeout=0)
        with RingReader.open(ring_path) as reader:
            with reader.pop_view(timeout=TIMEOUT) as view:
                reader.close()
                assert bytes(view) == b"unfinished"  # the mapping outlives the view
            assert reader.closed
        with RingReader.open(ring_path) as again:
            assert again.pop_many(5, timeout=TIMEOUT) == [b"unfinished", b"second"]


def test_entering_a_message_view_after_the_reader_closed_does_not_touch_released_memory(
    ring_path: Path, spawn: Spawn
) -> None:
    child = spawn("child_enters_a_message_view_after_closing_the_reader", ring_path)
    returncode = child.wait(timeout=TIMEOUT)
    if returncode != EXPECTED_EXIT:
        child.fail(f"exited with {returncode} (-11 is SIGSEGV), expected {EXPECTED_EXIT}")


# ---- two processes ---------------------------------------------------------------------------

STREAM_CAPACITY = 4096
STREAM_COUNT = 20_000


@pytest.mark.parametrize("writer_api", ["push_many", "reserve"])
@pytest.mark.parametrize("reader_api", ["pop_many", "pop_view"])
def test_child_writer_streams_every_message_intact_through_a_small_ring(
    ring_path: Path, spawn: Spawn, writer_api: str, reader_api: str
) -> None:
    child = spawn("child_writer", ring_path, STREAM_CAPACITY, STREAM_COUNT, writer_api)
    child.expect_line("created", timeout=TIMEOUT)
    with RingReader.open(ring_path) as reader:
        if reader_api == "pop_many":
            consume_with_pop_many(reader, STREAM_COUNT)
        else:
            consume_with_pop_view(reader, STREAM_COUNT)
        write_pos, _ = positions(ring_path)
    child.finish(0, timeout=TIMEOUT)
    assert write_pos // STREAM_CAPACITY > 100  # wrapped many times


@pytest.mark.parametrize("reader_api", ["pop_many", "pop_view"])
def test_one_push_many_far_larger_than_the_ring_reaches_a_child_reader_intact(
    ring_path: Path, spawn: Spawn, reader_api: str
) -> None:
    with RingWriter.create(ring_path, STREAM_CAPACITY) as writer:
        child = spawn("child_reader", ring_path, STREAM_COUNT, reader_api)
        child.expect_line("attached", timeout=TIMEOUT)
        max_size = writer.max_message_size
        messages = (stream_message(seq, max_size) for seq in range(STREAM_COUNT))
        assert writer.push_many(messages, timeout=60) == STREAM_COUNT
    child.expect_line(f"checked {STREAM_COUNT}", timeout=TIMEOUT)
    child.finish(0, timeout=TIMEOUT)


def test_sigint_interrupts_push_many_in_a_child_and_a_retry_from_written_loses_nothing(
    ring_path: Path, spawn: Spawn
) -> None:
    child = spawn("child_writer_interrupted_in_push_many", ring_path)
    child.expect_line("pushing", timeout=TIMEOUT)
    time.sleep(0.3)  # let it fill the ring and sleep in push_many
    child.send_signal(signal.SIGINT)
    written = int(child.expect_line("interrupted", timeout=3).split()[1])
    assert written == 4096 // record_size(100)  # what filled the ring
    with RingReader.open(ring_path) as reader:
        received = reader.pop_many(written, timeout=TIMEOUT)
        while len(received) < 1000:
            received += reader.pop_many(1000, timeout=TIMEOUT)
        assert received == numbered(1000, length=100)
        child.finish(EXPECTED_EXIT, timeout=TIMEOUT)
        with pytest.raises(RingClosed):
            reader.pop_many(10, timeout=TIMEOUT)


def test_stream_messages_cover_short_empty_and_max_sizes() -> None:
    max_size = STREAM_CAPACITY - RECORD_HEADER
    sizes = [len(stream_message(seq, max_size)) for seq in range(STREAM_COUNT)]
    assert {0, 1, 7, 8, 9, max_size} <= set(sizes)
    assert sum(map(record_size, sizes)) // STREAM_CAPACITY > 100


# ---- a state machine against a model -----------------------------------------------------------


class BatchRingMachine(RuleBasedStateMachine):
    """One writer and one reader in one process, mixing the single-message and the batch and
    slot APIs, against a deque of the records in the data area (padding included), as in
    test_statemachine.py. Every call uses timeout 0, so the model predicts each outcome."""

    def __init__(self) -> None:
        super().__init__()
        self.ring_dir = Path(tempfile.mkdtemp(prefix="ipc_ring-batch-sm-", dir=RING_PARENT_DIR))
        self.path = self.ring_dir / "ring"
        self.writer: RingWriter | None = None
        self.reader: RingReader | None = None
        self.capacity = 0
        # Records written and not yet consumed: (record size, payload or None for padding).
        self.records: deque[tuple[int, bytes | None]] = deque()
        self.write_pos = 0
        self.read_pos = 0

    # ---- the model ----------------------------------------------------------

    def model_reserve(self, length: int) -> bool:
        """The wrap rule: whether a record for `length` bytes fits now; the padding that comes
        first is written even if it then does not fit."""
        size = record_size(length)
        to_end = self.capacity - self.write_pos % self.capacity
        if size > to_end:
            if self.capacity - (self.write_pos - self.read_pos) < to_end:
                event("full before padding")
                return False
            event("padding")
            self.records.append((to_end, None))
            self.write_pos += to_end
        if self.capacity - (self.write_pos - self.read_pos) < size:
            event("full")
            return False
        return True

    def model_commit(self, data: bytes) -> None:
        self.records.append((record_size(len(data)), data))
        self.write_pos += record_size(len(data))

    def model_push(self, data: bytes) -> bool:
        if not self.model_reserve(len(data)):
            return False
        self.model_commit(data)
        return True

    def model_head(self) -> bytes | None:
        """The next message, after the reader skips any padding in front of it."""
        while self.records and self.records[0][1] is None:
            self.read_pos += self.records.popleft()[0]
        return self.records[0][1] if self.records else None

    def model_pop(self) -> bytes:
        size, data = self.records.popleft()
        self.read_pos += size
        assert data is not None
        return data

    @property
    def max_size(self) -> int:
        return self.capacity - RECORD_HEADER

    # ---- rules --------------------------------------------------------------

    @initialize(capacity=st.sampled_from([64, 128, 256]))
    def create_ring(self, capacity: int) -> None:
        self.capacity = capacity
        self.writer = RingWriter.create(self.path, capacity)
        self.reader = RingReader.open(self.path)

    def draw_message(self, data: st.DataObject) -> bytes:
        return data.draw(
            st.one_of(st.binary(max_size=24), st.binary(max_size=self.max_size)), label="message"
        )

    @rule(data=st.data())
    def try_push(self, data: st.DataObject) -> None:
        assert self.writer is not None
        message = self.draw_message(data)
        assert self.writer.try_push(message) is self.model_push(message)

    @rule(data=st.data(), too_large_at=st.none() | st.integers(min_value=0, max_value=6))
    def push_many(self, data: st.DataObject, too_large_at: int | None) -> None:
        assert self.writer is not None
        messages = data.draw(st.lists(st.binary(max_size=self.max_size // 2), max_size=6))
        if too_large_at is not None:
            messages.insert(min(too_large_at, len(messages)), b"x" * (self.max_size + 1))
        expected_error: type[Exception] | None = None
        written = 0
        for message in messages:
            if len(message) > self.max_size:
                expected_error = MessageTooLarge
                break
            if not self.model_push(message):
                expected_error = RingTimeout
                break
            written += 1
        as_generator = data.draw(st.booleans(), label="as a generator")
        source = (m for m in messages) if as_generator else messages
        if expected_error is None:
            assert self.writer.push_many(source, timeout=0) == len(messages)
            return
        event(f"push_many raised {expected_error.__name__}")
        with pytest.raises(expected_error) as raised:
            self.writer.push_many(source, timeout=0)
        assert raised.value.written == written  # type: ignore[attr-defined]

    @rule(data=st.data(), ending=st.sampled_from(["exit", "commit", "discard", "raise"]))
    def reserve(self, data: st.DataObject, ending: str) -> None:
        assert self.writer is not None
        message = self.draw_message(data)
        if not self.model_reserve(len(message)):
            with pytest.raises(RingTimeout):
                self.writer.reserve(len(message), timeout=0)
            return
        slot = self.writer.reserve(len(message), timeout=0)
        if ending == "raise":
            with pytest.raises(ZeroDivisionError), slot as view:
                view[:] = message
                raise ZeroDivisionError
            return
        with slot as view:
            view[:] = message
            if ending == "commit":
                k = data.draw(st.integers(min_value=0, max_value=len(message)), label="commit")
                slot.commit(k)
                self.model_commit(message[:k])
            elif ending == "discard":
                slot.discard()
        if ending == "exit":
            self.model_commit(message)

    @rule()
    def try_pop(self) -> None:
        assert self.reader is not None
        expected = self.model_head()
        assert self.reader.try_pop() == expected
        if expected is not None:
            self.model_pop()

    @rule(
        max_messages=st.integers(min_value=1, max_value=6),
        max_bytes=st.none() | st.integers(min_value=0, max_value=100),
    )
    def pop_many(self, max_messages: int, max_bytes: int | None) -> None:
        assert self.reader is not None
        if self.model_head() is None:
            with pytest.raises(RingTimeout):
                self.reader.pop_many(max_messages, timeout=0, max_bytes=max_bytes)
            return
        expected = [self.model_pop()]
        taken = len(expected[0])
        while len(expected) < max_messages:
            head = self.model_head()
            if head is None or (max_bytes is not None and taken + len(head) > max_bytes):
                break
            taken += len(head)
            expected.append(self.model_pop())
        event(f"pop_many returned {len(expected)}")
        assert self.reader.pop_many(max_messages, timeout=0, max_bytes=max_bytes) == expected

    @rule(ending=st.sampled_from(["exit", "discard", "raise"]))
    def pop_view(self, ending: str) -> None:
        assert self.reader is not None
        expected = self.model_head()
        if expected is None:
            with pytest.raises(RingTimeout):
                self.reader.pop_view(timeout=0)
            return
        slot = self.reader.pop_view(timeout=0)
        expectation = pytest.raises(ZeroDivisionError) if ending == "raise" else nullcontext()
        with expectation, slot as view:
            assert bytes(view) == expected
            if ending == "discard":
                slot.discard()
            elif ending == "raise":
                raise ZeroDivisionError
        if ending != "discard":
            self.model_pop()

    # ---- invariants ---------------------------------------------------------

    @invariant()
    def positions_in_the_header_match_the_model(self) -> None:
        if self.writer is not None:
            assert positions(self.path) == (self.write_pos, self.read_pos)

    def teardown(self) -> None:
        try:
            if self.writer is not None and self.reader is not None:
                self.writer.close()
                expected = [data for _, data in self.records if data is not None]
                assert list(self.reader) == expected
        finally:
            for handle in (self.writer, self.reader):
                if handle is not None:
                    handle.close()
            shutil.rmtree(self.ring_dir, ignore_errors=True)


BatchRingMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    database=None,
)
test_batch_and_slot_calls_match_a_deque_model = BatchRingMachine.TestCase
