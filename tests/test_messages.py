"""What goes in comes out: round trips, message sizes (zero-length, max_message_size, one
byte over), records and wraps as the API shows them, any buffer type, pop_into targets,
and batches: what push_many writes and reports `written`, what pop_many returns.

Most tests use one process and a tiny ring, where every position is predictable. A
Hypothesis state machine runs the single-message, batch and slot calls against a deque.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import random
import shutil
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conftest import (
    RECORD_HEADER,
    TIMEOUT,
    WRITE_POS_AT,
    RingModel,
    Worker,
    drain,
    fill,
    numbered,
    positions,
    record_size,
    ring_parent_dir,
)
from ipc_ring import MessageTooLarge, RingClosed, RingReader, RingTimeout, RingWriter

if TYPE_CHECKING:
    from typing_extensions import Buffer

# ---- round trips -------------------------------------------------------------------------


def test_messages_round_trip_in_fifo_order(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    for i in range(1000):
        message = str(i).encode()
        writer.push(message, timeout=5)
        assert reader.pop(timeout=5) == message


def test_pop_returns_bytes(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    writer.push(bytearray(b"abc"), timeout=5)
    message = reader.pop(timeout=5)
    assert type(message) is bytes
    assert message == b"abc"


def test_iteration_receives_messages_pushed_while_iterating(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"0", timeout=5)
    received = []
    for message in reader:
        received.append(message)
        if len(received) < 100:
            writer.push(str(len(received)).encode(), timeout=5)
        else:
            writer.close()
    assert received == [str(i).encode() for i in range(100)]


# ---- sizes, records and wraps ------------------------------------------------------------


def test_zero_length_message_round_trips_and_is_not_an_empty_ring(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    assert writer.try_push(b"")
    writer.push(b"", timeout=5)
    assert reader.try_pop() == b""
    assert reader.pop(timeout=5) == b""
    assert reader.try_pop() is None


def test_zero_length_messages_take_eight_bytes_each(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    assert fill(writer, length=0) == [b""] * (64 // RECORD_HEADER)
    assert [reader.try_pop() for _ in range(64 // RECORD_HEADER)] == [b""] * 8
    assert reader.try_pop() is None


@pytest.mark.parametrize("length", [1, 7, 8, 9, 16, 17, 24])
def test_a_record_is_an_eight_byte_header_plus_the_payload_padded_to_eight_bytes(
    ring: tuple[RingWriter, RingReader], length: int
) -> None:
    writer, _ = ring
    assert len(fill(writer, length)) == 64 // record_size(length)


def test_message_of_exactly_max_message_size_round_trips(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:
        message = random.Random(1).randbytes(writer.max_message_size)
        writer.push(message, timeout=5)
        assert writer.try_push(b"") is False
        assert reader.pop(timeout=5) == message
        assert writer.try_push(message)
        assert reader.try_pop() == message


@pytest.mark.parametrize("call", ["push", "try_push"])
def test_message_one_byte_over_max_message_size_raises_message_too_large(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    too_large = b"x" * (writer.max_message_size + 1)
    with pytest.raises(MessageTooLarge, match="max_message_size=56"):
        if call == "push":
            writer.push(too_large, timeout=5)
        else:
            writer.try_push(too_large)
    assert reader.try_pop() is None
    with pytest.raises(MessageTooLarge):
        writer.push(b"x" * 10_000, timeout=0)


def test_message_too_large_is_raised_before_waiting_on_a_full_ring(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, _ = ring
    fill(writer)
    worker = Worker(lambda: writer.push(b"x" * (writer.max_message_size + 1), timeout=None))
    worker.start()
    if not worker.finished.wait(timeout=2):
        writer.close()  # wakes the blocked push, which then raises RingClosed
        worker.join(timeout=5)
        pytest.fail("push of a too large message waited for space instead of raising")
    assert isinstance(worker.error, MessageTooLarge)


def test_try_push_false_changes_nothing_and_the_same_message_fits_once_the_ring_drains(
    ring: tuple[RingWriter, RingReader], ring_path: Path
) -> None:
    writer, reader = ring
    writer.push(b"a" * 40, timeout=5)  # a 48-byte record: the next one starts 16 bytes from the end
    writer.push(b"c" * 8, timeout=5)  # and this one fills it: index 0 again, 0 bytes free

    def shared_state() -> bytes:  # positions, wrap_pos and the data area; not the counters
        data = ring_path.read_bytes()
        return data[128:136] + data[152:160] + data[256:264] + data[4096:]

    before = shared_state()
    message = b"b" * 48  # a 56-byte record
    assert writer.try_push(message) is False  # full: nothing published, nothing recorded
    assert shared_state() == before
    assert reader.try_pop() == b"a" * 40
    assert reader.try_pop() == b"c" * 8
    assert writer.try_push(message) is True  # the ring is empty: any message fits at once
    assert reader.try_pop() == message
    assert reader.try_pop() is None


@pytest.mark.parametrize("capacity", [64, 128, 256])
def test_every_message_size_goes_into_an_empty_ring_at_once_at_every_offset(
    ring_path: Path, capacity: int
) -> None:
    rng = random.Random(capacity)
    with (
        RingWriter.create(ring_path, capacity) as writer,
        RingReader.open(ring_path) as reader,
        open(ring_path, "rb") as file,
        mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as shared,
    ):

        def write_index() -> int:
            return int(struct.unpack_from("<Q", shared, WRITE_POS_AT)[0]) % capacity

        index = 0
        for length in range(writer.max_message_size + 1):
            for offset in range(0, capacity, 8):
                # Move to `offset` with zero-length messages (8 bytes each, never wrapping).
                for _ in range((offset - index) % capacity // 8):
                    assert writer.try_push(b"")
                    assert reader.try_pop() == b""
                assert write_index() == offset

                message = rng.randbytes(length)
                size = record_size(length)
                wraps = size > capacity - offset
                assert writer.try_push(message), (length, offset)  # the ring is empty
                assert reader.try_pop() == message, (length, offset)
                assert reader.try_pop() is None
                index = size % capacity if wraps else (offset + size) % capacity
                assert write_index() == index


@settings(max_examples=300, deadline=None, database=None)
@given(
    capacity=st.sampled_from([64, 128, 256, 512, 1024, 2048, 4096]),
    data=st.data(),
)
def test_one_thread_alternating_push_and_pop_of_any_size_never_waits(
    capacity: int, data: st.DataObject
) -> None:
    """A single thread that pushes one message and then pops it, for any sequence of sizes from
    0 to max_message_size, is never blocked by its own ring: each push finds room at once."""
    max_size = capacity - RECORD_HEADER
    sizes = data.draw(
        st.lists(
            st.one_of(
                st.integers(0, max_size),
                st.integers(max(0, max_size - 64), max_size),
                st.integers(0, min(64, max_size)),
            ),
            min_size=1,
            max_size=60,
        ),
        label="sizes",
    )
    ring_dir = Path(tempfile.mkdtemp(prefix="ipc_ring-alternate-", dir=ring_parent_dir()))
    try:
        path = ring_dir / "ring"
        with RingWriter.create(path, capacity) as writer, RingReader.open(path) as reader:
            for seq, size in enumerate(sizes):
                message = numbered(seq, size)
                if seq % 2:
                    assert writer.try_push(message), (seq, size, positions(path))
                else:
                    writer.push(message, timeout=1.0)
                assert reader.pop(timeout=1.0) == message
                assert reader.try_pop() is None
    finally:
        shutil.rmtree(ring_dir, ignore_errors=True)


# ---- buffers -----------------------------------------------------------------------------


class BytesSubclass(bytes):
    pass


@pytest.mark.parametrize(
    "make",
    [
        bytes,
        BytesSubclass,
        bytearray,
        memoryview,
        lambda b: memoryview(b"--" + b + b"--")[2:-2],
        lambda b: array.array("B", b),
        lambda b: array.array("i", b),
        lambda b: (ctypes.c_ubyte * len(b)).from_buffer_copy(b),
        lambda b: memoryview(bytearray(b)).cast("i", [2, len(b) // 8]),
    ],
    ids=[
        "bytes",
        "bytes-subclass",
        "bytearray",
        "memoryview",
        "memoryview-slice",
        "array-B",
        "array-i",
        "ctypes",
        "memoryview-2d",
    ],
)
def test_push_accepts_any_c_contiguous_buffer(
    ring: tuple[RingWriter, RingReader], make: Callable[[bytes], object]
) -> None:
    writer, reader = ring
    data = make(bytes(range(16)))
    expected = memoryview(data).tobytes()  # type: ignore[arg-type]
    assert len(expected) == 16
    writer.push(data, timeout=5)  # type: ignore[arg-type]
    assert writer.try_push(data)  # type: ignore[arg-type]
    assert reader.pop(timeout=5) == expected
    assert reader.try_pop() == expected


@pytest.mark.parametrize("call", ["push", "try_push"])
def test_push_rejects_a_non_contiguous_memoryview(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    strided = memoryview(b"abcdefgh")[::2]
    with pytest.raises((TypeError, BufferError)):
        if call == "push":
            writer.push(strided, timeout=5)
        else:
            writer.try_push(strided)
    assert reader.try_pop() is None


@pytest.mark.parametrize("data", ["text", 42, None, [1, 2]], ids=repr)
@pytest.mark.parametrize("call", ["push", "try_push"])
def test_push_rejects_objects_that_are_not_bytes_like(
    ring: tuple[RingWriter, RingReader], call: str, data: object
) -> None:
    writer, reader = ring
    with pytest.raises(TypeError):
        if call == "push":
            writer.push(data, timeout=5)  # type: ignore[arg-type]
        else:
            writer.try_push(data)  # type: ignore[arg-type]
    assert reader.try_pop() is None


# ---- pop_into ----------------------------------------------------------------------------


def test_pop_into_copies_a_message_into_a_larger_buffer_and_returns_its_length(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"hello", timeout=5)
    buffer = bytearray(b"." * 10)
    assert reader.pop_into(buffer, timeout=5) == 5
    assert buffer == b"hello....."
    assert reader.try_pop() is None


def test_pop_into_accepts_a_buffer_of_exactly_the_message_length(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    message = bytes(range(writer.max_message_size))
    writer.push(message, timeout=5)
    buffer = bytearray(len(message))
    assert reader.pop_into(buffer, timeout=5) == len(message)
    assert buffer == message


def test_pop_into_takes_a_zero_length_message_into_an_empty_buffer(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"", timeout=5)
    assert reader.pop_into(bytearray(), timeout=5) == 0
    assert reader.try_pop() is None


@pytest.mark.parametrize(
    "make",
    [
        lambda n: memoryview(bytearray(n)),
        lambda n: array.array("B", bytes(n)),
        lambda n: (ctypes.c_char * n)(),
    ],
    ids=["memoryview", "array", "ctypes"],
)
def test_pop_into_accepts_any_writable_c_contiguous_buffer(
    ring: tuple[RingWriter, RingReader], make: Callable[[int], object]
) -> None:
    writer, reader = ring
    writer.push(b"abc", timeout=5)
    buffer = make(8)
    assert reader.pop_into(buffer, timeout=5) == 3  # type: ignore[arg-type]
    assert memoryview(buffer).tobytes()[:3] == b"abc"  # type: ignore[arg-type]


def test_pop_into_a_buffer_too_small_raises_value_error_and_leaves_the_message(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"0123456789", timeout=5)
    writer.push(b"next", timeout=5)
    buffer = bytearray(b"." * 9)
    with pytest.raises(ValueError, match="10 bytes"):
        reader.pop_into(buffer, timeout=5)
    assert buffer == b"." * 9
    with pytest.raises(ValueError):
        reader.pop_into(bytearray(), timeout=0)
    assert reader.pop(timeout=5) == b"0123456789"
    assert reader.pop(timeout=5) == b"next"


@pytest.mark.parametrize(
    "buffer",
    [b"12345678", memoryview(b"12345678"), memoryview(bytearray(16))[::2], "text"],
    ids=["bytes", "readonly-memoryview", "strided-memoryview", "str"],
)
def test_pop_into_rejects_a_buffer_that_is_not_writable_and_contiguous(
    ring: tuple[RingWriter, RingReader], buffer: object
) -> None:
    writer, reader = ring
    writer.push(b"kept", timeout=5)
    with pytest.raises((TypeError, BufferError)):
        reader.pop_into(buffer, timeout=5)  # type: ignore[arg-type]
    assert reader.pop(timeout=5) == b"kept"


# ---- push_many ---------------------------------------------------------------------------


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
    messages = [numbered(i, 8) for i in range(20)]  # 16-byte records: 4 fit in 64 bytes
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
        with suppress(RingTimeout):  # nothing left to read
            received += reader.pop_many(rng.choice([1, 2, 100]), timeout=0)
    received += drain(reader)
    assert timeouts > 50
    assert received == messages


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


# ---- pop_many ----------------------------------------------------------------------------


def test_pop_many_returns_the_available_messages_up_to_max_messages(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    messages = [numbered(i, 8) for i in range(4)]
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


@pytest.mark.parametrize(
    ("max_bytes", "count"),
    [(0, 1), (4, 1), (7, 1), (8, 2), (11, 2), (12, 3), (15, 3), (16, 4), (None, 4)],
)
def test_pop_many_stops_before_a_message_that_would_take_the_payload_over_max_bytes(
    ring: tuple[RingWriter, RingReader], max_bytes: int | None, count: int
) -> None:
    writer, reader = ring
    messages = [numbered(i, 4) for i in range(4)]
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
    messages = [numbered(i, 4) for i in range(7)]  # records of 16 bytes: 4 fill the ring
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
def test_pop_many_jumps_wrap_points_correctly_in_a_small_ring(
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
            assert expected, "a ring that takes no message holds some"
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


# ---- a state machine against a model -----------------------------------------------------


class BatchRingMachine(RuleBasedStateMachine):
    """One writer and one reader in one process, mixing the single-message and the batch and
    slot APIs, against a deque of the records in the data area (and the bytes skipped at each
    wrap point), as in test_statemachine.py. Every call uses timeout 0, so the model predicts
    each outcome."""

    def __init__(self) -> None:
        super().__init__()
        self.ring_dir = Path(tempfile.mkdtemp(prefix="ipc_ring-batch-sm-", dir=ring_parent_dir()))
        self.path = self.ring_dir / "ring"
        self.writer: RingWriter | None = None
        self.reader: RingReader | None = None
        self.capacity = 0
        self.model = RingModel(0)

    @property
    def max_size(self) -> int:
        return self.capacity - RECORD_HEADER

    # ---- rules --------------------------------------------------------------

    @initialize(capacity=st.sampled_from([64, 128, 256]))
    def create_ring(self, capacity: int) -> None:
        self.capacity = capacity
        self.model = RingModel(capacity)
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
        assert self.writer.try_push(message) is self.model.push(message)

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
            if not self.model.push(message):
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
        if not self.model.reserve(len(message)):
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
                self.model.commit(message[:k])
            elif ending == "discard":
                slot.discard()
        if ending == "exit":
            self.model.commit(message)

    @rule()
    def try_pop(self) -> None:
        assert self.reader is not None
        expected = self.model.head()
        assert self.reader.try_pop() == expected
        if expected is not None:
            self.model.pop()

    @rule(
        max_messages=st.integers(min_value=1, max_value=6),
        max_bytes=st.none() | st.integers(min_value=0, max_value=100),
    )
    def pop_many(self, max_messages: int, max_bytes: int | None) -> None:
        assert self.reader is not None
        if self.model.head() is None:
            assert self.reader.pop_many(max_messages, timeout=0, max_bytes=max_bytes) == []
            return
        expected = [self.model.pop()]
        taken = len(expected[0])
        while len(expected) < max_messages:
            head = self.model.head()
            if head is None or (max_bytes is not None and taken + len(head) > max_bytes):
                break
            taken += len(head)
            expected.append(self.model.pop())
        # The release publishes the reader's own position: after a look at a message that
        # did not fit max_bytes, that includes the jump over a wrap point in front of it.
        self.model.read_published = self.model.read_pos
        event(f"pop_many returned {len(expected)}")
        assert self.reader.pop_many(max_messages, timeout=0, max_bytes=max_bytes) == expected

    @rule(ending=st.sampled_from(["exit", "discard", "raise"]))
    def pop_view(self, ending: str) -> None:
        assert self.reader is not None
        expected = self.model.head()
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
            self.model.pop()

    # ---- invariants ---------------------------------------------------------

    @invariant()
    def positions_in_the_header_match_the_model(self) -> None:
        if self.writer is not None:
            assert positions(self.path) == (self.model.write_published, self.model.read_published)

    def teardown(self) -> None:
        try:
            if self.writer is not None and self.reader is not None:
                self.writer.close()
                assert list(self.reader) == self.model.messages()
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
