"""Zero-copy slots: reserve() gives a writable view inside the ring, published when its
block ends; pop_view() gives a read-only view of the next message, consumed when its block
ends. What commit() and discard() do, alignment, views used after their block or after
close(), and the calls a handle refuses while a slot is open.

Tests that use numpy are skipped where it is not installed. The functions named `child_*`
run in a child process started by the `spawn` fixture (see conftest.py).
"""

from __future__ import annotations

import gc
import mmap
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import (
    DATA_OFFSET,
    EXPECTED_EXIT,
    RECORD_HEADER,
    TIMEOUT,
    Spawn,
    drain,
    fill,
    positions,
    record_size,
)
from ipc_ring import MessageTooLarge, RingClosed, RingError, RingReader, RingWriter

# ---- child processes ---------------------------------------------------------------------

WRAP_POS_AT = 152  # FORMAT.md "Header", block 1


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


# ---- where slots come from ---------------------------------------------------------------


def test_slots_come_only_from_reserve_and_pop_view(ring: tuple[RingWriter, RingReader]) -> None:
    writer, _ = ring
    slot = writer.reserve(8, timeout=0)
    try:
        with pytest.raises(TypeError):
            type(slot)()
    finally:
        slot.discard()


# ---- reserve -----------------------------------------------------------------------------


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


def test_reserve_zero_gives_an_empty_view_and_an_empty_message(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    with writer.reserve(0, timeout=0) as view:
        assert len(view) == 0
    assert reader.pop(timeout=0) == b""
    assert positions(writer.path) == (RECORD_HEADER, RECORD_HEADER)


def test_reserve_after_the_end_of_the_data_area_records_the_wrap_and_starts_at_index_0(
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
            assert positions(ring_path)[0] == 48  # nothing is published for the wrap ...
            assert struct.unpack_from("<Q", shared, WRAP_POS_AT)[0] == 48  # ... it is recorded
            view[:] = b"wrapped around!!"
            assert shared[DATA_OFFSET + 8 : DATA_OFFSET + 24] == b"wrapped around!!"
        assert reader.pop(timeout=0) == b"wrapped around!!"
        assert positions(ring_path) == (88, 88)


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
        # The array outlives the role: its memory stays valid (reading and writing it does
        # not crash) but is detached from the ring, which belongs to a successor now.
        assert array_.tolist() == [0] * 8
        array_ += 1
        assert array_.tolist() == [1] * 8
        del array_
        message = reader.pop(timeout=TIMEOUT)
        assert message == np.arange(8, dtype=np.uint64).tobytes()  # the committed message
        with pytest.raises(RingClosed):
            reader.pop(timeout=0)


def test_writer_close_inside_a_reserve_block_ends_the_stream_without_the_message(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"before", timeout=0)
    with pytest.raises(RingClosed), writer.reserve(8, timeout=0) as view:
        view[:] = b"unwanted"
        writer.close()
    assert list(reader) == [b"before"]


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


def test_entering_a_reservation_after_the_writer_closed_does_not_touch_released_memory(
    ring_path: Path, spawn: Spawn
) -> None:
    child = spawn(child_enters_a_reservation_after_closing_the_writer, ring_path)
    returncode = child.wait(timeout=TIMEOUT)
    if returncode != EXPECTED_EXIT:
        child.fail(f"exited with {returncode} (-11 is SIGSEGV), expected {EXPECTED_EXIT}")


# ---- pop_view ----------------------------------------------------------------------------


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


def test_pop_view_of_a_zero_length_message_is_an_empty_view(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push_many([b"", b"after"], timeout=0)
    with reader.pop_view(timeout=0) as view:
        assert len(view) == 0
        assert bytes(view) == b""
    assert reader.pop(timeout=0) == b"after"


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


def test_reader_close_inside_a_pop_view_block_leaves_the_message_for_the_next_reader(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        writer.push_many([b"unfinished", b"second"], timeout=0)
        with RingReader.open(ring_path) as reader:
            with pytest.raises(RingClosed, match="not consumed"):  # noqa: SIM117
                with reader.pop_view(timeout=TIMEOUT) as view:
                    reader.close()
                    with pytest.raises(ValueError):  # the block's view is released
                        bytes(view)
            assert reader.closed
        with RingReader.open(ring_path) as again:
            assert again.pop_many(5, timeout=TIMEOUT) == [b"unfinished", b"second"]


def test_entering_a_message_view_after_the_reader_closed_does_not_touch_released_memory(
    ring_path: Path, spawn: Spawn
) -> None:
    child = spawn(child_enters_a_message_view_after_closing_the_reader, ring_path)
    returncode = child.wait(timeout=TIMEOUT)
    if returncode != EXPECTED_EXIT:
        child.fail(f"exited with {returncode} (-11 is SIGSEGV), expected {EXPECTED_EXIT}")
