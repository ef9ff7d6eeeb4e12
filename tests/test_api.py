"""The public API in one process: RingWriter, RingReader and the exceptions."""

from __future__ import annotations

import array
import ctypes
import inspect
import math
import mmap
import os
import random
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ipc_ring
from ipc_ring import (
    InvalidRing,
    MessageTooLarge,
    RingClosed,
    RingError,
    RingReader,
    RingTimeout,
    RingWriter,
)

# FORMAT.md "Header": where the writer publishes write_pos.
WRITE_POS_OFFSET = 128
RECORD_HEADER = 8


def record_size(length: int) -> int:
    """Bytes a message of `length` bytes takes in the data area: header + padded payload."""
    return RECORD_HEADER + (length + 7) // 8 * 8


@pytest.fixture
def ring(ring_path: Path) -> Iterator[tuple[RingWriter, RingReader]]:
    """A writer and a reader on a fresh 64-byte ring (max_message_size 56)."""
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        yield writer, reader


def fill(writer: RingWriter, length: int = 8) -> list[bytes]:
    """Pushes distinct messages of `length` bytes until the ring is full; returns them."""
    pushed: list[bytes] = []
    while True:
        message = bytes([len(pushed) % 256]) * length
        if not writer.try_push(message):
            return pushed
        pushed.append(message)


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


# ---- exceptions ------------------------------------------------------------


def test_exceptions_are_exported_with_their_documented_bases() -> None:
    assert issubclass(RingError, Exception)
    assert issubclass(RingTimeout, RingError)
    assert issubclass(RingTimeout, TimeoutError)
    assert issubclass(MessageTooLarge, RingError)
    assert issubclass(MessageTooLarge, ValueError)
    assert issubclass(InvalidRing, RingError)
    assert issubclass(RingClosed, RingError)
    assert issubclass(RingClosed, EOFError)
    for name in ("RingError", "RingTimeout", "MessageTooLarge", "InvalidRing", "RingClosed"):
        assert name in ipc_ring.__all__
        assert getattr(ipc_ring, name).__module__ == "ipc_ring"


# ---- empty ring ------------------------------------------------------------


def test_try_pop_returns_none_on_an_empty_ring(ring: tuple[RingWriter, RingReader]) -> None:
    _, reader = ring
    assert reader.try_pop() is None


@pytest.mark.parametrize("call", ["pop", "pop_into"])
def test_zero_timeout_on_an_empty_ring_raises_ring_timeout_at_once(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    _, reader = ring
    start = time.monotonic()
    with pytest.raises(RingTimeout):
        if call == "pop":
            reader.pop(timeout=0)
        else:
            reader.pop_into(bytearray(64), timeout=0)
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("call", ["pop", "pop_into"])
def test_pop_timeout_on_an_empty_ring_is_honoured(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    _, reader = ring
    start = time.monotonic()
    with pytest.raises(RingTimeout):
        if call == "pop":
            reader.pop(timeout=0.05)
        else:
            reader.pop_into(bytearray(64), timeout=0.05)
    elapsed = time.monotonic() - start
    assert 0.049 <= elapsed < 0.5


# ---- full ring -------------------------------------------------------------


def test_try_push_returns_false_when_the_ring_is_full(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    assert len(pushed) == 64 // record_size(8)
    assert writer.try_push(b"x") is False
    assert [reader.try_pop() for _ in pushed] == pushed
    assert reader.try_pop() is None


def test_push_with_zero_timeout_raises_ring_timeout_when_full(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    with pytest.raises(RingTimeout):
        writer.push(b"x", timeout=0)
    assert [reader.try_pop() for _ in pushed] == pushed
    assert reader.try_pop() is None


def test_push_timeout_on_a_full_ring_is_honoured(ring: tuple[RingWriter, RingReader]) -> None:
    writer, _ = ring
    fill(writer)
    start = time.monotonic()
    with pytest.raises(RingTimeout):
        writer.push(b"x", timeout=0.05)
    assert 0.049 <= time.monotonic() - start < 0.5


def test_full_ring_accepts_a_message_again_once_the_reader_pops_one(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    assert reader.pop(timeout=5) == pushed[0]
    writer.push(b"next", timeout=5)
    assert [reader.pop(timeout=5) for _ in pushed[1:]] == pushed[1:]
    assert reader.pop(timeout=5) == b"next"


# ---- messages and records --------------------------------------------------


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


def test_try_push_false_may_publish_padding_that_the_next_try_pop_skips(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"a" * 40, timeout=5)  # a 48-byte record: the next one starts 16 bytes from the end
    assert reader.pop(timeout=5) == b"a" * 40
    message = b"b" * 48  # a 56-byte record: needs the padding and 56 free bytes at index 0
    assert writer.try_push(message) is False  # published a 16-byte padding record
    assert reader.try_pop() is None  # skipped the padding: no message
    assert writer.try_push(message) is True
    assert reader.try_pop() == message
    assert reader.try_pop() is None


@pytest.mark.parametrize("capacity", [64, 128, 256])
def test_every_message_size_round_trips_at_every_offset_in_the_data_area(
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
            return int(struct.unpack_from("<Q", shared, WRITE_POS_OFFSET)[0]) % capacity

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
                fits_after_padding = size <= offset
                pushed = writer.try_push(message)
                assert pushed is (not wraps or fits_after_padding), (length, offset)
                if not pushed:
                    assert reader.try_pop() is None  # only the padding record was there
                    assert writer.try_push(message)
                assert reader.try_pop() == message, (length, offset)
                assert reader.try_pop() is None
                index = size % capacity if wraps else (offset + size) % capacity
                assert write_index() == index


# ---- buffers ---------------------------------------------------------------


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


# ---- timeouts --------------------------------------------------------------


def call_with_timeout(ring: tuple[RingWriter, RingReader], call: str, timeout: object) -> None:
    writer, reader = ring
    if call == "push":
        writer.push(b"x", timeout=timeout)  # type: ignore[arg-type]
    elif call == "pop":
        reader.pop(timeout=timeout)  # type: ignore[arg-type]
    else:
        reader.pop_into(bytearray(8), timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, -0.001, -math.inf, math.nan], ids=repr)
@pytest.mark.parametrize("call", ["push", "pop", "pop_into"])
def test_negative_or_nan_timeout_raises_value_error(
    ring: tuple[RingWriter, RingReader], call: str, timeout: float
) -> None:
    with pytest.raises(ValueError, match="timeout"):
        call_with_timeout(ring, call, timeout)
    assert ring[1].try_pop() is None


@pytest.mark.parametrize("timeout", ["abc", b"1", [1]], ids=repr)
@pytest.mark.parametrize("call", ["push", "pop", "pop_into"])
def test_timeout_that_is_not_a_number_raises_type_error(
    ring: tuple[RingWriter, RingReader], call: str, timeout: object
) -> None:
    with pytest.raises(TypeError):
        call_with_timeout(ring, call, timeout)
    assert ring[1].try_pop() is None


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


# ---- end of stream and closing ---------------------------------------------


def test_reader_drains_remaining_messages_after_the_writer_closes(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 256) as writer, RingReader.open(ring_path) as reader:
        for message in (b"one", b"", b"three"):
            writer.push(message, timeout=5)
        writer.close()
        assert reader.pop(timeout=5) == b"one"
        assert reader.try_pop() == b""
        buffer = bytearray(8)
        assert reader.pop_into(buffer, timeout=5) == 5
        assert buffer[:5] == b"three"


@pytest.mark.parametrize("timeout", [0, 5, None])
def test_pop_raises_ring_closed_after_writer_closes_and_ring_is_drained(
    ring: tuple[RingWriter, RingReader], timeout: float | None
) -> None:
    writer, reader = ring
    writer.push(b"last", timeout=5)
    writer.close()
    assert reader.pop(timeout=5) == b"last"
    with pytest.raises(RingClosed):
        reader.pop(timeout=timeout)
    with pytest.raises(RingClosed):
        reader.pop(timeout=timeout)


def test_try_pop_and_pop_into_raise_ring_closed_after_writer_closes_and_ring_is_drained(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.close()
    with pytest.raises(RingClosed):
        reader.try_pop()
    with pytest.raises(RingClosed):
        reader.pop_into(bytearray(8), timeout=5)


def test_ring_closed_at_end_of_stream_is_an_eof_error(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.close()
    with pytest.raises(EOFError):
        reader.pop(timeout=5)


def test_writer_close_wakes_a_reader_blocked_in_pop(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    worker = Worker(lambda: reader.pop(timeout=10))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    writer.close()
    worker.join(timeout=1)
    assert not worker.is_alive()
    assert isinstance(worker.error, RingClosed)


def test_iteration_yields_remaining_messages_and_stops_after_the_writer_closes(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    messages = [b"a", b"", b"ccc", b"d" * 16]  # 64 bytes of records: fills the ring
    for message in messages:
        writer.push(message, timeout=5)
    writer.close()
    assert iter(reader) is reader
    assert list(reader) == messages
    assert list(reader) == []
    with pytest.raises(StopIteration):
        next(reader)


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


@pytest.mark.parametrize("call", ["push", "try_push"])
def test_push_on_a_closed_writer_raises_ring_closed(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    writer.close()
    with pytest.raises(RingClosed):
        if call == "push":
            writer.push(b"x", timeout=5)
        else:
            writer.try_push(b"x")
    with pytest.raises(RingClosed):
        reader.pop(timeout=5)


@pytest.mark.parametrize("call", ["pop", "try_pop", "pop_into", "next"])
def test_calls_on_a_closed_reader_raise_ring_closed(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    writer.push(b"unread", timeout=5)
    reader.close()
    with pytest.raises(RingClosed):
        if call == "pop":
            reader.pop(timeout=5)
        elif call == "try_pop":
            reader.try_pop()
        elif call == "pop_into":
            reader.pop_into(bytearray(8), timeout=5)
        else:
            next(reader)


def test_messages_a_closed_reader_did_not_read_stay_for_the_next_reader(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        for i in range(5):
            writer.push(bytes([i]) * i, timeout=5)
        with RingReader.open(ring_path) as first:
            assert first.pop(timeout=5) == b""
            assert first.pop(timeout=5) == b"\x01"
        with RingReader.open(ring_path) as second:
            remaining = [second.pop(timeout=5) for _ in range(3)]
            assert remaining == [b"\x02" * 2, b"\x03" * 3, b"\x04" * 4]
            assert second.try_pop() is None


def test_close_is_idempotent(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    for handle in (writer, reader):
        assert handle.closed is False
        handle.close()
        assert handle.closed is True
        handle.close()
        assert handle.closed is True


def test_context_managers_close_their_handles(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        writer.push(b"x", timeout=5)
        with RingReader.open(ring_path) as reader:
            assert reader.pop(timeout=5) == b"x"
        assert reader.closed
    assert writer.closed
    with RingReader.open(ring_path) as reader, pytest.raises(RingClosed):
        reader.pop(timeout=5)


def test_context_managers_close_their_handles_when_the_body_raises(ring_path: Path) -> None:
    with pytest.raises(KeyError), RingWriter.create(ring_path, 64) as writer:
        raise KeyError("body failed")
    assert writer.closed
    with pytest.raises(KeyError), RingReader.open(ring_path) as reader:
        raise KeyError("body failed")
    assert reader.closed


def test_a_ring_whose_writer_closed_can_still_be_opened_and_drained(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        writer.push(b"left behind", timeout=5)
    with RingReader.open(ring_path) as reader:
        assert list(reader) == [b"left behind"]


# ---- pop_into --------------------------------------------------------------


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


# ---- create ----------------------------------------------------------------


def test_create_refuses_an_existing_file_and_leaves_it_unchanged(ring_path: Path) -> None:
    ring_path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        RingWriter.create(ring_path, 64)
    assert ring_path.read_bytes() == b"precious"
    assert os.listdir(ring_path.parent) == [ring_path.name]


def test_create_refuses_an_existing_ring(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        writer.push(b"first writer", timeout=5)
        with pytest.raises(FileExistsError):
            RingWriter.create(ring_path, 64)
        with RingReader.open(ring_path) as reader:
            assert reader.pop(timeout=5) == b"first writer"


def test_create_never_follows_a_dangling_symlink(ring_path: Path) -> None:
    target = ring_path.parent / "target"
    ring_path.symlink_to(target)
    with pytest.raises(FileExistsError):
        RingWriter.create(ring_path, 64)
    assert not target.exists()
    assert ring_path.is_symlink()
    assert sorted(os.listdir(ring_path.parent)) == [ring_path.name]


def test_create_never_follows_a_symlink_to_an_existing_file(ring_path: Path) -> None:
    target = ring_path.parent / "target"
    target.write_bytes(b"precious")
    ring_path.symlink_to(target)
    with pytest.raises(FileExistsError):
        RingWriter.create(ring_path, 64)
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(ring_path.parent)) == sorted([ring_path.name, "target"])


def test_create_refuses_an_existing_directory(ring_path: Path) -> None:
    ring_path.mkdir()
    with pytest.raises(FileExistsError):
        RingWriter.create(ring_path, 64)
    assert os.listdir(ring_path.parent) == [ring_path.name]


def test_create_in_a_missing_directory_raises_file_not_found(ring_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RingWriter.create(ring_path.parent / "missing" / "ring", 64)
    assert os.listdir(ring_path.parent) == []


@pytest.mark.parametrize("capacity", [0, 8, 63, 65, 100, 96, 2**32 + 1, 2**33, -64], ids=repr)
def test_create_rejects_a_capacity_that_is_not_a_power_of_two_in_range(
    ring_path: Path, capacity: int
) -> None:
    with pytest.raises(ValueError, match="capacity"):
        RingWriter.create(ring_path, capacity)
    assert os.listdir(ring_path.parent) == []


@pytest.mark.parametrize("capacity", [True, 64.0, "64", None], ids=repr)
def test_create_rejects_a_capacity_that_is_not_an_int(ring_path: Path, capacity: object) -> None:
    with pytest.raises(TypeError):
        RingWriter.create(ring_path, capacity)  # type: ignore[arg-type]
    assert os.listdir(ring_path.parent) == []


@pytest.mark.parametrize("capacity", [64, 128, 4096, 1 << 20])
def test_create_accepts_power_of_two_capacities(ring_path: Path, capacity: int) -> None:
    with RingWriter.create(ring_path, capacity) as writer:
        assert writer.capacity == capacity
        assert writer.max_message_size == capacity - 8


@pytest.mark.parametrize("spin", [-1, 10**9, "fast"], ids=repr)
def test_create_with_a_bad_spin_fails_and_leaves_no_file(ring_path: Path, spin: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        RingWriter.create(ring_path, 64, spin=spin)  # type: ignore[arg-type]
    assert os.listdir(ring_path.parent) == []


def test_create_leaves_only_the_ring_file_and_its_fifos_in_the_directory(ring_path: Path) -> None:
    expected = sorted([ring_path.name, f"{ring_path.name}.rd", f"{ring_path.name}.wr"])
    with RingWriter.create(ring_path, 64):
        assert sorted(os.listdir(ring_path.parent)) == expected
    assert sorted(os.listdir(ring_path.parent)) == expected
    assert ring_path.stat().st_size == 4096 + 64


def test_created_file_has_mode_0o600_by_default(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64):
        assert stat.S_IMODE(ring_path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o400, 0o640, 0o644, 0o660, 0o666])
def test_created_file_has_exactly_the_given_mode_whatever_the_umask(
    ring_path: Path, mode: int
) -> None:
    old_umask = os.umask(0o077)
    try:
        with RingWriter.create(ring_path, 64, mode=mode):
            assert stat.S_IMODE(ring_path.stat().st_mode) == mode
    finally:
        os.umask(old_umask)


def test_create_accepts_str_and_path_like_paths(ring_dir: Path) -> None:
    with (
        RingWriter.create(str(ring_dir / "a"), 64) as by_str,
        RingWriter.create(ring_dir / "b", 64) as by_path,
    ):
        assert by_str.path == str(ring_dir / "a")
        assert by_path.path == str(ring_dir / "b")


def test_create_rejects_a_bytes_path(ring_path: Path) -> None:
    with pytest.raises(TypeError):
        RingWriter.create(os.fsencode(ring_path), 64)  # type: ignore[arg-type]
    assert os.listdir(ring_path.parent) == []


# ---- open ------------------------------------------------------------------


def open_file_descriptors() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def test_open_a_missing_file_raises_file_not_found(ring_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RingReader.open(ring_path)


def test_open_a_directory_raises_invalid_ring(ring_path: Path) -> None:
    ring_path.mkdir()
    with pytest.raises(InvalidRing):
        RingReader.open(ring_path)


def write_truncated_ring(path: Path) -> None:
    """A real ring of 4096 bytes whose file lost its last 100 bytes."""
    with RingWriter.create(path, 4096):
        pass
    os.truncate(path, 4096 + 4096 - 100)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"!IPCRING"),
        lambda p: p.write_bytes(random.Random(0).randbytes(8192)),
        lambda p: p.write_bytes(bytes(4096 + 64)),
        write_truncated_ring,
        lambda p: os.mkfifo(p),
    ],
    ids=["empty", "magic-only", "random-bytes", "zeros", "shorter-than-header-says", "fifo"],
)
def test_open_a_file_that_is_not_a_complete_ring_raises_invalid_ring(
    ring_path: Path, make: Callable[[Path], object]
) -> None:
    make(ring_path)
    before = open_file_descriptors()
    start = time.monotonic()
    with pytest.raises(InvalidRing):
        RingReader.open(ring_path)
    assert time.monotonic() - start < 0.5
    assert open_file_descriptors() == before


def test_open_does_not_accept_a_ring_file_that_was_never_completed(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64):
        pass
    data = bytearray(ring_path.read_bytes())
    data[12:16] = bytes(4)  # FORMAT.md "Header": ready, stored last by the creator
    ring_path.write_bytes(data)
    with pytest.raises(InvalidRing):
        RingReader.open(ring_path)


# ---- properties and signatures ---------------------------------------------


@pytest.mark.parametrize("capacity", [64, 4096])
def test_handles_report_capacity_max_message_size_path_and_closed(
    ring_path: Path, capacity: int
) -> None:
    with RingWriter.create(ring_path, capacity) as writer, RingReader.open(ring_path) as reader:
        for handle in (writer, reader):
            assert handle.capacity == capacity
            assert handle.max_message_size == capacity - 8
            assert handle.path == str(ring_path)
            assert handle.closed is False
    assert writer.closed is True
    assert reader.closed is True
    assert writer.path == reader.path == str(ring_path)


@pytest.mark.parametrize(
    ("method", "signature"),
    [
        (RingWriter.push, "(self, data, /, timeout=None)"),
        (RingWriter.try_push, "(self, data, /)"),
        (RingWriter.close, "(self, /)"),
        (RingReader.pop, "(self, /, timeout=None)"),
        (RingReader.try_pop, "(self, /)"),
        (RingReader.pop_into, "(self, buffer, /, timeout=None)"),
        (RingReader.close, "(self, /)"),
    ],
    ids=lambda v: getattr(v, "__qualname__", "sig"),
)
def test_c_methods_have_text_signatures(method: Callable[..., object], signature: str) -> None:
    assert str(inspect.signature(method)) == signature


def test_constructors_have_keyword_only_options() -> None:
    create = inspect.signature(RingWriter.create).parameters
    assert list(create) == ["path", "capacity", "mode", "spin"]
    assert create["mode"].kind is inspect.Parameter.KEYWORD_ONLY
    assert create["mode"].default == 0o600
    assert create["spin"].kind is inspect.Parameter.KEYWORD_ONLY
    assert create["spin"].default is None
    for cls in (RingReader, RingWriter):
        open_ = inspect.signature(cls.open).parameters
        assert list(open_) == ["path", "spin", "wait"]
        assert open_["spin"].kind is inspect.Parameter.KEYWORD_ONLY
        assert open_["wait"].kind is inspect.Parameter.KEYWORD_ONLY
        assert open_["wait"].default is None


# ---- threads ---------------------------------------------------------------


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


def test_close_from_another_thread_wakes_a_thread_blocked_in_pop(
    ring: tuple[RingWriter, RingReader],
) -> None:
    _, reader = ring
    worker = Worker(lambda: reader.pop(timeout=10))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    reader.close()
    worker.join(timeout=1)
    assert not worker.is_alive()
    assert isinstance(worker.error, RingClosed)
    assert reader.closed


def test_close_from_another_thread_wakes_a_thread_blocked_in_push(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    worker = Worker(lambda: writer.push(b"blocked", timeout=10))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    writer.close()
    worker.join(timeout=1)
    assert not worker.is_alive()
    assert isinstance(worker.error, RingClosed)
    assert list(reader) == pushed  # the blocked message was never written


@pytest.mark.parametrize("call", ["pop", "try_pop", "pop_into"])
def test_a_second_thread_using_a_reader_blocked_in_pop_gets_runtime_error(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    worker = Worker(lambda: reader.pop(timeout=10))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    with pytest.raises(RuntimeError, match="another thread"):
        if call == "pop":
            reader.pop(timeout=5)
        elif call == "try_pop":
            reader.try_pop()
        else:
            reader.pop_into(bytearray(8), timeout=5)
    writer.push(b"for the first thread", timeout=5)
    worker.join(timeout=5)
    assert worker.result == b"for the first thread"
    assert reader.try_pop() is None


@pytest.mark.parametrize("call", ["push", "try_push"])
def test_a_second_thread_using_a_writer_blocked_in_push_gets_runtime_error(
    ring: tuple[RingWriter, RingReader], call: str
) -> None:
    writer, reader = ring
    pushed = fill(writer)
    worker = Worker(lambda: writer.push(b"first", timeout=10))
    worker.start()
    assert not worker.finished.wait(timeout=0.2)
    with pytest.raises(RuntimeError, match="another thread"):
        if call == "push":
            writer.push(b"second", timeout=5)
        else:
            writer.try_push(b"second")
    received = [reader.pop(timeout=5) for _ in pushed]
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert worker.error is None
    assert received == pushed
    assert reader.pop(timeout=5) == b"first"
    assert reader.try_pop() is None
