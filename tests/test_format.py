"""Byte-level checks of docs/FORMAT.md: the documented offsets, read back with struct.

Every offset, size and value below is copied from FORMAT.md, not from the code, so a change to the
layout that is not also made in the document fails here.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ipc_ring
from conftest import record_size
from ipc_ring import InvalidRing, MessageTooLarge, RingClosed, RingReader, RingTimeout, RingWriter

# FORMAT.md "Header"
MAGIC = 0x474E495243504921
MAGIC_BYTES = b"!IPCRING"
VERSION = 2
READY = 1
HEADER_SIZE = 4096
DATA_OFFSET = 4096
MAGIC_AT = 0
VERSION_AT = 8
READY_AT = 12
CAPACITY_AT = 16
DATA_OFFSET_AT = 24
MAX_MESSAGE_SIZE_AT = 32
READER_FIFO_INO_AT = 40
WRITER_FIFO_INO_AT = 48
WRITE_POS_AT = 128
MESSAGES_PUSHED_AT = 136
BYTES_PUSHED_AT = 144
WRAP_POS_AT = 152
READ_POS_AT = 256
MESSAGES_POPPED_AT = 264
BYTES_POPPED_AT = 272
READER_WAITING_AT = 384
DATA_SEQ_AT = 388
WRITER_WAITING_AT = 512
SPACE_SEQ_AT = 516
WRITER_STATE_AT = 520
WRITER_GENERATION_AT = 524
WRITER_FULL_WAITS_AT = 528
HIGH_WATER_AT = 536
READER_STATE_AT = 392
READER_EMPTY_WAITS_AT = 400
# FORMAT.md "Roles and states"
STATE_NONE, STATE_ATTACHED, STATE_VACANT, STATE_CLOSED, STATE_FAILED = range(5)
COUNTERS_AT = {
    "messages_pushed": MESSAGES_PUSHED_AT,
    "bytes_pushed": BYTES_PUSHED_AT,
    "messages_popped": MESSAGES_POPPED_AT,
    "bytes_popped": BYTES_POPPED_AT,
    "reader_empty_waits": READER_EMPTY_WAITS_AT,
    "writer_full_waits": WRITER_FULL_WAITS_AT,
    "high_water": HIGH_WATER_AT,
}
# (start, end) of every reserved range of the header page: zero in version 2.
RESERVED = [
    (56, 128),
    (160, 256),
    (280, 384),
    (396, 400),
    (408, 512),
    (544, 4096),
]

# FORMAT.md "Records"
RECORD_HEADER = 8
KIND_MESSAGE = 1
KIND_V1_PADDING = 2  # gone in version 2: corruption

TIMEOUT = 5.0  # every blocking call is bounded, so a bug fails instead of hanging


def file_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def u32(path: Path, offset: int) -> int:
    value: int = struct.unpack_from("<I", file_bytes(path), offset)[0]
    return value


def u64(path: Path, offset: int) -> int:
    value: int = struct.unpack_from("<Q", file_bytes(path), offset)[0]
    return value


def record_at(path: Path, capacity: int, position: int) -> tuple[int, int]:
    """(length, kind) of the record header at `position` in the data area."""
    index = position & (capacity - 1)
    length, kind = struct.unpack_from("<II", file_bytes(path), DATA_OFFSET + index)
    return length, kind


def payload_at(path: Path, capacity: int, position: int, length: int) -> bytes:
    start = DATA_OFFSET + (position & (capacity - 1)) + RECORD_HEADER
    return file_bytes(path)[start : start + length]


def patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def patch_record(path: Path, capacity: int, position: int, length: int, kind: int) -> None:
    patch(path, DATA_OFFSET + (position & (capacity - 1)), "<II", length, kind)


@pytest.fixture
def ring_file(tmp_path: Path) -> Path:
    """A ring path in pytest's tmp_path: these tests read and patch the file directly."""
    return tmp_path / "ring"


@pytest.fixture
def writer64(ring_file: Path) -> Iterator[RingWriter]:
    with RingWriter.create(ring_file, 64) as w:
        yield w


# ---- File layout and header ------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [64, 4096, 1 << 16])
def test_file_size_is_header_page_plus_capacity(ring_file: Path, capacity: int) -> None:
    with RingWriter.create(ring_file, capacity):
        assert os.path.getsize(ring_file) == HEADER_SIZE + capacity


def test_fresh_ring_has_documented_static_header(ring_file: Path) -> None:
    capacity = 4096
    with RingWriter.create(ring_file, capacity) as w:
        data = file_bytes(ring_file)
        assert data[MAGIC_AT : MAGIC_AT + 8] == MAGIC_BYTES
        assert struct.unpack_from("<Q", data, MAGIC_AT)[0] == MAGIC
        assert struct.unpack_from("<I", data, VERSION_AT)[0] == VERSION == ipc_ring.FORMAT_VERSION
        assert struct.unpack_from("<I", data, READY_AT)[0] == READY
        assert struct.unpack_from("<Q", data, CAPACITY_AT)[0] == capacity == w.capacity
        assert struct.unpack_from("<Q", data, DATA_OFFSET_AT)[0] == DATA_OFFSET
        max_message_size = struct.unpack_from("<Q", data, MAX_MESSAGE_SIZE_AT)[0]
        assert max_message_size == capacity - RECORD_HEADER == w.max_message_size
        # The inodes of the FIFOs the creator made.
        reader_fifo = os.stat(f"{ring_file}.rd")
        writer_fifo = os.stat(f"{ring_file}.wr")
        assert stat.S_ISFIFO(reader_fifo.st_mode) and stat.S_ISFIFO(writer_fifo.st_mode)
        assert struct.unpack_from("<Q", data, READER_FIFO_INO_AT)[0] == reader_fifo.st_ino
        assert struct.unpack_from("<Q", data, WRITER_FIFO_INO_AT)[0] == writer_fifo.st_ino


def test_fresh_ring_has_zero_positions_flags_and_reserved_bytes(ring_file: Path) -> None:
    with RingWriter.create(ring_file, 4096):
        data = file_bytes(ring_file)
        for offset in (WRITE_POS_AT, READ_POS_AT, WRAP_POS_AT):
            assert struct.unpack_from("<Q", data, offset)[0] == 0
        for offset in (READER_WAITING_AT, DATA_SEQ_AT, WRITER_WAITING_AT, SPACE_SEQ_AT):
            assert struct.unpack_from("<I", data, offset)[0] == 0
        assert struct.unpack_from("<I", data, WRITER_STATE_AT)[0] == STATE_ATTACHED
        assert struct.unpack_from("<I", data, WRITER_GENERATION_AT)[0] == 1
        assert struct.unpack_from("<I", data, READER_STATE_AT)[0] == STATE_NONE
        for start, end in RESERVED:
            assert data[start:end] == bytes(end - start), f"reserved bytes {start}..{end}"


def test_fresh_ring_has_zero_counters(ring_file: Path) -> None:
    with RingWriter.create(ring_file, 4096):
        data = file_bytes(ring_file)
        for name, offset in COUNTERS_AT.items():
            assert struct.unpack_from("<Q", data, offset)[0] == 0, name


def test_counters_are_little_endian_u64_at_documented_offsets(ring_file: Path) -> None:
    with RingWriter.create(ring_file, 64) as w, RingReader.open(ring_file, spin=0) as r:
        w.push(b"abc", timeout=TIMEOUT)  # record of 16 bytes
        w.push_many([b"x" * 20, b""], timeout=TIMEOUT)  # 32 + 8 bytes: the ring holds 56
        assert u64(ring_file, MESSAGES_PUSHED_AT) == 3
        assert u64(ring_file, BYTES_PUSHED_AT) == 23
        assert u64(ring_file, MESSAGES_POPPED_AT) == 0
        # 16 bytes do not fit in the 8 before the end; at the next lap they need the reader
        # past 16: the reload of read_pos finds 56 bytes used, and the ring full.
        assert not w.try_push(b"y" * 8)
        assert u64(ring_file, HIGH_WATER_AT) == 56
        assert u64(ring_file, WRAP_POS_AT) == 0  # nothing recorded for a record that did not fit
        assert r.pop(timeout=TIMEOUT) == b"abc"
        assert r.pop(timeout=TIMEOUT) == b"x" * 20
        assert u64(ring_file, MESSAGES_POPPED_AT) == 2
        assert u64(ring_file, BYTES_POPPED_AT) == 23
        assert r.pop(timeout=TIMEOUT) == b""
        assert u64(ring_file, READER_EMPTY_WAITS_AT) == 0
        with pytest.raises(RingTimeout):
            r.pop(timeout=0.01)  # one sleep slice of 10 ms
        assert u64(ring_file, READER_EMPTY_WAITS_AT) == 1
        assert u64(ring_file, WRITER_FULL_WAITS_AT) == 0
        data = file_bytes(ring_file)
        assert {
            name: struct.unpack_from("<Q", data, at)[0] for name, at in COUNTERS_AT.items()
        } == {name: value for name, value in w.stats().items() if name in COUNTERS_AT}


def test_a_push_that_sleeps_on_a_full_ring_counts_writer_full_waits(ring_file: Path) -> None:
    with RingWriter.create(ring_file, 64, spin=0) as w:
        while w.try_push(b"z" * 8):
            pass
        with pytest.raises(RingTimeout):
            w.push(b"z" * 8, timeout=0.01)  # one sleep slice of 10 ms
        assert u64(ring_file, WRITER_FULL_WAITS_AT) == 1
        assert u64(ring_file, HIGH_WATER_AT) == 64


def test_reserved_header_bytes_stay_zero_through_pushes_pops_and_close(ring_file: Path) -> None:
    with RingWriter.create(ring_file, 64) as w, RingReader.open(ring_file) as r:
        for i in range(20):
            w.push(bytes([i]) * (i % 25), timeout=TIMEOUT)
            assert r.pop(timeout=TIMEOUT) == bytes([i]) * (i % 25)
    data = file_bytes(ring_file)
    assert struct.unpack_from("<I", data, READER_STATE_AT)[0] == STATE_CLOSED
    assert struct.unpack_from("<I", data, WRITER_STATE_AT)[0] == STATE_CLOSED
    for start, end in RESERVED:
        assert data[start:end] == bytes(end - start), f"reserved bytes {start}..{end}"


# ---- Records, positions and the wrap rule ----------------------------------------------------


def test_push_writes_message_record_and_publishes_write_pos(
    ring_file: Path, writer64: RingWriter
) -> None:
    writer64.push(b"abc", timeout=TIMEOUT)
    assert record_at(ring_file, 64, 0) == (3, KIND_MESSAGE)
    assert payload_at(ring_file, 64, 0, 3) == b"abc"
    assert u64(ring_file, WRITE_POS_AT) == 16
    assert u64(ring_file, READ_POS_AT) == 0


def test_zero_length_message_is_an_8_byte_message_record(
    ring_file: Path, writer64: RingWriter
) -> None:
    writer64.push(b"abc", timeout=TIMEOUT)
    writer64.push(b"", timeout=TIMEOUT)
    assert record_at(ring_file, 64, 16) == (0, KIND_MESSAGE)
    assert u64(ring_file, WRITE_POS_AT) == 16 + 8
    with RingReader.open(ring_file) as r:
        assert r.pop(timeout=TIMEOUT) == b"abc"
        assert r.pop(timeout=TIMEOUT) == b""
        assert u64(ring_file, READ_POS_AT) == 24


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 15, 16, 17, 100])
def test_record_size_is_header_plus_payload_rounded_up_to_8(ring_file: Path, length: int) -> None:
    with RingWriter.create(ring_file, 1024) as w:
        w.push(b"\xaa" * length, timeout=TIMEOUT)
        w.push(b"z", timeout=TIMEOUT)
        assert record_at(ring_file, 1024, 0) == (length, KIND_MESSAGE)
        second = record_size(length)
        assert second % 8 == 0
        assert record_at(ring_file, 1024, second) == (1, KIND_MESSAGE)
        assert payload_at(ring_file, 1024, second, 1) == b"z"
        assert u64(ring_file, WRITE_POS_AT) == second + record_size(1)


def test_pop_publishes_read_pos_after_each_message(ring_file: Path, writer64: RingWriter) -> None:
    messages = [b"abc", b"", b"x" * 20]
    for m in messages:
        writer64.push(m, timeout=TIMEOUT)
    assert u64(ring_file, WRITE_POS_AT) == 56
    with RingReader.open(ring_file) as r:
        expected_read_pos = 0
        for m in messages:
            assert r.pop(timeout=TIMEOUT) == m
            expected_read_pos += record_size(len(m))
            assert u64(ring_file, READ_POS_AT) == expected_read_pos
    assert u64(ring_file, READ_POS_AT) == 56


def test_writer_records_the_wrap_point_when_a_message_does_not_fit_before_the_end(
    ring_file: Path, writer64: RingWriter
) -> None:
    # The worked example in FORMAT.md "Records".
    for m in (b"abc", b"", b"x" * 20):
        writer64.push(m, timeout=TIMEOUT)
    with RingReader.open(ring_file) as r:
        for _ in range(3):
            r.pop(timeout=TIMEOUT)
        writer64.push(b"y" * 16, timeout=TIMEOUT)  # a 24-byte record; 8 bytes left before the end
        assert u64(ring_file, WRAP_POS_AT) == 56
        assert record_at(ring_file, 64, 64) == (16, KIND_MESSAGE)
        assert payload_at(ring_file, 64, 64, 16) == b"y" * 16
        assert u64(ring_file, WRITE_POS_AT) == 64 + 24
        assert r.pop(timeout=TIMEOUT) == b"y" * 16  # jumps from 56 to 64
        assert u64(ring_file, READ_POS_AT) == 88


def test_a_message_that_wraps_into_an_empty_ring_goes_in_at_once(ring_file: Path) -> None:
    with RingWriter.create(ring_file, 128) as w, RingReader.open(ring_file) as r:
        w.push(b"a" * 40, timeout=TIMEOUT)  # record of 48 bytes: 80 bytes left before the end
        assert r.pop(timeout=TIMEOUT) == b"a" * 40
        # A record of 88 bytes does not fit in 80; the ring is empty, so it has all of the
        # next lap, at once (version 1 needed the reader to skip a padding record first).
        assert w.try_push(b"b" * 80) is True
        assert u64(ring_file, WRAP_POS_AT) == 48
        assert record_at(ring_file, 128, 128) == (80, KIND_MESSAGE)
        assert u64(ring_file, WRITE_POS_AT) == 128 + 88
        assert r.pop(timeout=TIMEOUT) == b"b" * 80
        assert u64(ring_file, READ_POS_AT) == 128 + 88


@pytest.mark.parametrize("first", [0, 1, 8, 24, 48])
def test_max_message_size_message_goes_into_an_empty_ring_at_once_from_any_position(
    ring_file: Path, writer64: RingWriter, first: int
) -> None:
    biggest = b"m" * writer64.max_message_size
    assert len(biggest) == 64 - RECORD_HEADER
    with RingReader.open(ring_file) as r:
        writer64.push(b"f" * first, timeout=TIMEOUT)
        assert r.pop(timeout=TIMEOUT) == b"f" * first
        assert writer64.try_push(biggest) is True  # one thread: nothing waits
        assert r.pop(timeout=0) == biggest
        # write_pos = the next lap + the 64-byte record, which fills the whole data area.
        assert record_at(ring_file, 64, 64) == (len(biggest), KIND_MESSAGE)
        assert u64(ring_file, WRITE_POS_AT) == 64 + 64
        assert u64(ring_file, READ_POS_AT) == 64 + 64


def test_message_larger_than_max_message_size_writes_nothing(
    ring_file: Path, writer64: RingWriter
) -> None:
    before = file_bytes(ring_file)
    with pytest.raises(MessageTooLarge):
        writer64.push(b"x" * (writer64.max_message_size + 1), timeout=TIMEOUT)
    assert file_bytes(ring_file) == before


def test_a_wrap_that_does_not_fit_yet_records_nothing_and_fits_once_the_reader_drains(
    ring_file: Path, writer64: RingWriter
) -> None:
    with RingReader.open(ring_file) as r:
        writer64.push(b"a" * 24, timeout=TIMEOUT)  # 32 bytes at index 0
        writer64.push(b"b" * 8, timeout=TIMEOUT)  # 16 bytes at index 32
        assert r.pop(timeout=TIMEOUT) == b"a" * 24  # read_pos = 32
        # A 40-byte record at index 48 does not fit in 16; at the next lap it needs the
        # reader past 40, and the reader's message at 32..48 is not consumed yet.
        assert writer64.try_push(b"c" * 32) is False
        assert u64(ring_file, WRAP_POS_AT) == 0
        assert u64(ring_file, WRITE_POS_AT) == 48
        assert r.pop(timeout=TIMEOUT) == b"b" * 8  # read_pos = 48: the ring is empty
        assert writer64.try_push(b"c" * 32) is True
        assert u64(ring_file, WRAP_POS_AT) == 48
        assert record_at(ring_file, 64, 64) == (32, KIND_MESSAGE)
        assert u64(ring_file, WRITE_POS_AT) == 64 + 40
        assert r.pop(timeout=TIMEOUT) == b"c" * 32


def test_positions_keep_increasing_past_capacity(ring_file: Path, writer64: RingWriter) -> None:
    with RingReader.open(ring_file) as r:
        for i in range(100):
            writer64.push(bytes([i]) * 9, timeout=TIMEOUT)  # 24-byte records: wraps every few
            assert r.pop(timeout=TIMEOUT) == bytes([i]) * 9
            w, rd = u64(ring_file, WRITE_POS_AT), u64(ring_file, READ_POS_AT)
            assert w == rd
            assert w % 8 == 0
        assert u64(ring_file, WRITE_POS_AT) > 64 * 30


# ---- Private positions -----------------------------------------------------------------------


def test_reader_never_rereads_its_own_position_from_the_file(
    ring_file: Path, writer64: RingWriter
) -> None:
    for m in (b"one", b"two", b"three"):
        writer64.push(m, timeout=TIMEOUT)
    with RingReader.open(ring_file) as r:
        assert r.pop(timeout=TIMEOUT) == b"one"
        patch(ring_file, READ_POS_AT, "<Q", 0)  # somebody rewinds the shared copy
        assert r.pop(timeout=TIMEOUT) == b"two"
        assert u64(ring_file, READ_POS_AT) == 32  # overwritten with the reader's own position


def test_writer_never_rereads_its_own_position_from_the_file(
    ring_file: Path, writer64: RingWriter
) -> None:
    writer64.push(b"one", timeout=TIMEOUT)
    patch(ring_file, WRITE_POS_AT, "<Q", 0)
    writer64.push(b"two", timeout=TIMEOUT)
    assert record_at(ring_file, 64, 16) == (3, KIND_MESSAGE)
    assert u64(ring_file, WRITE_POS_AT) == 32


def test_new_reader_resumes_at_read_pos_in_the_file(ring_file: Path, writer64: RingWriter) -> None:
    for m in (b"one", b"two"):
        writer64.push(m, timeout=TIMEOUT)
    with RingReader.open(ring_file) as r:
        assert r.pop(timeout=TIMEOUT) == b"one"
    with RingReader.open(ring_file) as r:
        assert r.pop(timeout=TIMEOUT) == b"two"


# ---- End of stream ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("end", "state"),
    [("close", STATE_CLOSED), ("abort", STATE_FAILED), ("detach", STATE_VACANT)],
)
def test_each_way_a_writer_leaves_stores_its_state_and_wakes_the_reader_through_data_seq(
    ring_file: Path, end: str, state: int
) -> None:
    w = RingWriter.create(ring_file, 64)
    w.push(b"last", timeout=TIMEOUT)
    assert u32(ring_file, WRITER_STATE_AT) == STATE_ATTACHED
    getattr(w, end)()
    assert u32(ring_file, WRITER_STATE_AT) == state
    assert u32(ring_file, DATA_SEQ_AT) == 1  # leaving increments it unconditionally
    assert u64(ring_file, WRITE_POS_AT) == 16  # and publishes nothing else
    with RingReader.open(ring_file) as r:
        assert r.pop(timeout=TIMEOUT) == b"last"  # messages before it are delivered
        if state == STATE_CLOSED:
            with pytest.raises(RingClosed):
                r.pop(timeout=TIMEOUT)
        elif state == STATE_FAILED:
            with pytest.raises(ipc_ring.PeerDied):
                r.pop(timeout=TIMEOUT)
        else:
            with pytest.raises(RingTimeout, match="vacant"):
                r.pop(timeout=0.1)


def test_a_reattached_writer_bumps_the_generation(ring_file: Path) -> None:
    RingWriter.create(ring_file, 64).detach()
    assert u32(ring_file, WRITER_GENERATION_AT) == 1
    with RingWriter.open(ring_file):
        assert u32(ring_file, WRITER_GENERATION_AT) == 2
        assert u32(ring_file, WRITER_STATE_AT) == STATE_ATTACHED


def test_close_sets_the_closed_state_and_wakes_reader_through_data_seq(ring_file: Path) -> None:
    w = RingWriter.create(ring_file, 64)
    w.push(b"last", timeout=TIMEOUT)
    w.close()
    assert u32(ring_file, WRITER_STATE_AT) == STATE_CLOSED
    assert u32(ring_file, DATA_SEQ_AT) == 1  # close increments it unconditionally
    assert u64(ring_file, WRITE_POS_AT) == 16  # close publishes nothing else
    with RingReader.open(ring_file) as r:
        assert r.pop(timeout=TIMEOUT) == b"last"  # messages before close() are delivered
        with pytest.raises(RingClosed):
            r.pop(timeout=TIMEOUT)


def test_reader_delivers_published_messages_before_reporting_end(ring_file: Path) -> None:
    with RingWriter.create(ring_file, 64) as w, RingReader.open(ring_file) as r:
        assert r.try_pop() is None  # caches write_pos == read_pos
        w.push(b"late", timeout=TIMEOUT)
        patch(ring_file, WRITER_STATE_AT, "<I", STATE_CLOSED)
        assert r.pop(timeout=TIMEOUT) == b"late"
        with pytest.raises(RingClosed):
            r.pop(timeout=TIMEOUT)


# ---- Waiting ---------------------------------------------------------------------------------


def test_publisher_leaves_waiting_flag_and_seq_alone_while_peer_is_awake(
    ring_file: Path, writer64: RingWriter
) -> None:
    with RingReader.open(ring_file) as r:
        for i in range(50):
            writer64.push(bytes([i]) * (i % 25), timeout=TIMEOUT)
            assert r.pop(timeout=TIMEOUT) == bytes([i]) * (i % 25)
        for offset in (READER_WAITING_AT, DATA_SEQ_AT, WRITER_WAITING_AT, SPACE_SEQ_AT):
            assert u32(ring_file, offset) == 0


def test_push_clears_reader_waiting_and_increments_data_seq(
    ring_file: Path, writer64: RingWriter
) -> None:
    patch(ring_file, READER_WAITING_AT, "<I", 1)  # as a reader about to sleep leaves it
    writer64.push(b"wake", timeout=TIMEOUT)
    assert u32(ring_file, READER_WAITING_AT) == 0
    assert u32(ring_file, DATA_SEQ_AT) == 1
    writer64.push(b"again", timeout=TIMEOUT)  # flag is clear: no second wake-up
    assert u32(ring_file, DATA_SEQ_AT) == 1


def test_pop_clears_writer_waiting_and_increments_space_seq(
    ring_file: Path, writer64: RingWriter
) -> None:
    writer64.push(b"a", timeout=TIMEOUT)
    writer64.push(b"b", timeout=TIMEOUT)
    patch(ring_file, WRITER_WAITING_AT, "<I", 1)
    with RingReader.open(ring_file) as r:
        assert r.pop(timeout=TIMEOUT) == b"a"
        assert u32(ring_file, WRITER_WAITING_AT) == 0
        assert u32(ring_file, SPACE_SEQ_AT) == 1
        assert r.pop(timeout=TIMEOUT) == b"b"
        assert u32(ring_file, SPACE_SEQ_AT) == 1


def wait_for_flag(path: Path, offset: int, worker: threading.Thread) -> None:
    deadline = time.monotonic() + TIMEOUT
    while u32(path, offset) != 1:
        assert worker.is_alive(), "the blocking call returned before it slept"
        assert time.monotonic() < deadline, "the waiting flag was never set"
        time.sleep(0.001)


def test_sleeping_reader_sets_reader_waiting_until_a_message_arrives(ring_file: Path) -> None:
    with RingWriter.create(ring_file, 64) as w, RingReader.open(ring_file, spin=0) as r:
        got: list[bytes] = []
        worker = threading.Thread(target=lambda: got.append(r.pop(timeout=TIMEOUT)))
        worker.start()
        wait_for_flag(ring_file, READER_WAITING_AT, worker)
        w.push(b"wake up", timeout=TIMEOUT)
        worker.join(TIMEOUT)
        assert got == [b"wake up"]
        assert u32(ring_file, READER_WAITING_AT) == 0


def test_sleeping_writer_sets_writer_waiting_until_space_is_freed(ring_file: Path) -> None:
    with RingWriter.create(ring_file, 64, spin=0) as w, RingReader.open(ring_file) as r:
        w.push(b"f" * 56, timeout=TIMEOUT)  # the whole data area
        done: list[bool] = []

        def push_one() -> None:
            w.push(b"next", timeout=TIMEOUT)
            done.append(True)

        worker = threading.Thread(target=push_one)
        worker.start()
        wait_for_flag(ring_file, WRITER_WAITING_AT, worker)
        assert r.pop(timeout=TIMEOUT) == b"f" * 56
        worker.join(TIMEOUT)
        assert done == [True]
        assert u32(ring_file, WRITER_WAITING_AT) == 0
        assert r.pop(timeout=TIMEOUT) == b"next"


# ---- Creating a ring -------------------------------------------------------------------------


def test_create_leaves_only_the_ring_and_its_fifos_in_the_directory(tmp_path: Path) -> None:
    with RingWriter.create(tmp_path / "ring", 64):
        assert sorted(os.listdir(tmp_path)) == ["ring", "ring.rd", "ring.wr"]


def test_create_applies_mode_exactly(tmp_path: Path) -> None:
    with RingWriter.create(tmp_path / "default", 64):
        assert stat.S_IMODE(os.stat(tmp_path / "default").st_mode) == 0o600
    old = os.umask(0o077)
    try:
        with RingWriter.create(tmp_path / "shared", 64, mode=0o660):
            assert stat.S_IMODE(os.stat(tmp_path / "shared").st_mode) == 0o660
    finally:
        os.umask(old)


def test_create_never_replaces_an_existing_file(ring_file: Path) -> None:
    ring_file.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        RingWriter.create(ring_file, 64)
    assert ring_file.read_bytes() == b"precious"
    assert sorted(os.listdir(ring_file.parent)) == ["ring"]


def test_create_never_follows_a_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(FileExistsError):
        RingWriter.create(tmp_path / "link", 64)
    assert not (tmp_path / "target").exists()


# ---- Opening: header validation --------------------------------------------------------------

CAPACITY = 4096

# (id, [(offset, struct format, value), ...], words expected in the InvalidRing message)
HEADER_CORRUPTIONS: list[tuple[str, list[tuple[int, str, int]], str]] = [
    ("magic", [(MAGIC_AT, "<Q", MAGIC ^ 1)], "magic"),
    ("magic-zero", [(MAGIC_AT, "<Q", 0)], "magic"),
    ("version-0", [(VERSION_AT, "<I", 0)], "version 0 \\(this library reads version 2\\)"),
    ("version-1", [(VERSION_AT, "<I", 1)], "version 1 \\(this library reads version 2\\)"),
    ("version-3", [(VERSION_AT, "<I", 3)], "version 3 \\(this library reads version 2\\)"),
    ("not-ready", [(READY_AT, "<I", 0)], "initialised"),
    ("ready-2", [(READY_AT, "<I", 2)], "initialised"),
    ("capacity-not-power-of-two", [(CAPACITY_AT, "<Q", CAPACITY + 8)], "capacity"),
    ("capacity-zero", [(CAPACITY_AT, "<Q", 0)], "capacity"),
    ("capacity-below-64", [(CAPACITY_AT, "<Q", 32)], "capacity"),
    ("capacity-above-2**32", [(CAPACITY_AT, "<Q", 1 << 33)], "capacity"),
    ("data-offset-0", [(DATA_OFFSET_AT, "<Q", 0)], "data_offset"),
    ("data-offset-8192", [(DATA_OFFSET_AT, "<Q", 8192)], "data_offset"),
    ("max-message-size", [(MAX_MESSAGE_SIZE_AT, "<Q", CAPACITY)], "max_message_size"),
    ("max-message-size-small", [(MAX_MESSAGE_SIZE_AT, "<Q", CAPACITY - 16)], "max_message_size"),
    (
        "capacity-larger-than-file",
        [(CAPACITY_AT, "<Q", 2 * CAPACITY), (MAX_MESSAGE_SIZE_AT, "<Q", 2 * CAPACITY - 8)],
        "data_offset \\+ capacity",
    ),
    ("write-pos-misaligned", [(WRITE_POS_AT, "<Q", 20)], "write_pos/read_pos"),
    ("read-pos-misaligned", [(READ_POS_AT, "<Q", 4)], "write_pos/read_pos"),
    (
        "write-pos-more-than-capacity-ahead",
        [(WRITE_POS_AT, "<Q", CAPACITY + 8), (READ_POS_AT, "<Q", 0)],
        "write_pos/read_pos",
    ),
    ("read-pos-ahead-of-write-pos", [(READ_POS_AT, "<Q", 24)], "write_pos/read_pos"),
    ("wrap-pos-misaligned", [(WRAP_POS_AT, "<Q", 12)], "wrap_pos"),
]


@pytest.fixture
def valid_ring(ring_file: Path) -> Path:
    """A closed, valid ring with write_pos = 16 and read_pos = 0."""
    with RingWriter.create(ring_file, CAPACITY) as w:
        w.push(b"payload", timeout=TIMEOUT)
    return ring_file


@pytest.mark.parametrize(
    ("patches", "reason"),
    [pytest.param(p, r, id=i) for i, p, r in HEADER_CORRUPTIONS],
)
def test_open_refuses_corrupted_header_field(
    valid_ring: Path, patches: list[tuple[int, str, int]], reason: str
) -> None:
    for offset, fmt, value in patches:
        patch(valid_ring, offset, fmt, value)
    with pytest.raises(InvalidRing, match=reason):
        RingReader.open(valid_ring)


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        (0, "4096-byte header"),
        (HEADER_SIZE - 1, "4096-byte header"),
        (HEADER_SIZE, "data_offset \\+ capacity"),
        (HEADER_SIZE + CAPACITY - 1, "data_offset \\+ capacity"),
    ],
)
def test_open_refuses_truncated_file(valid_ring: Path, size: int, reason: str) -> None:
    os.truncate(valid_ring, size)
    with pytest.raises(InvalidRing, match=reason):
        RingReader.open(valid_ring)


def test_open_accepts_file_longer_than_data_area(valid_ring: Path) -> None:
    with open(valid_ring, "ab") as f:
        f.write(b"\xff" * 100)
    with RingReader.open(valid_ring) as r:
        assert r.pop(timeout=TIMEOUT) == b"payload"


def test_open_refuses_a_file_that_is_not_regular(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidRing, match="regular"):
        RingReader.open(fifo)


def test_open_accepts_nonzero_reserved_bytes_in_version_2(valid_ring: Path) -> None:
    # FORMAT.md "Versioning": version 2 readers do not check reserved bytes, which is why a format
    # that uses them must change the version number.
    patch(valid_ring, 64, "<Q", 0xDEADBEEF)
    with RingReader.open(valid_ring) as r:
        assert r.pop(timeout=TIMEOUT) == b"payload"


# ---- Records and peer positions checked on every use -----------------------------------------


def corrupt_first_record_and_pop(path: Path, length: int, kind: int) -> None:
    patch_record(path, CAPACITY, 0, length, kind)
    with RingReader.open(path) as r, pytest.raises(InvalidRing, match="corrupted record"):
        r.pop(timeout=TIMEOUT)


@pytest.mark.parametrize("kind", [0, KIND_V1_PADDING, 3, 0xFFFFFFFF])
def test_pop_refuses_record_with_unknown_kind(valid_ring: Path, kind: int) -> None:
    corrupt_first_record_and_pop(valid_ring, 7, kind)


@pytest.mark.parametrize("length", [9, 100, 0xFFFFFFFF])
def test_pop_refuses_message_longer_than_published_bytes(valid_ring: Path, length: int) -> None:
    corrupt_first_record_and_pop(valid_ring, length, KIND_MESSAGE)  # write_pos - read_pos = 16


def test_pop_refuses_a_wrap_point_with_write_pos_inside_the_skipped_bytes(
    ring_file: Path, writer64: RingWriter
) -> None:
    with RingReader.open(ring_file) as r:
        writer64.push(b"a" * 40, timeout=TIMEOUT)  # 48 bytes at index 0
        assert r.pop(timeout=TIMEOUT) == b"a" * 40
        # A hostile writer says it wrapped at 48 but publishes a write_pos before the lap.
        patch(ring_file, WRAP_POS_AT, "<Q", 48)
        patch(ring_file, WRITE_POS_AT, "<Q", 56)
        with pytest.raises(InvalidRing, match="corrupted record"):
            r.pop(timeout=TIMEOUT)
        with pytest.raises(InvalidRing):  # the reader did not move: it keeps refusing
            r.pop(timeout=TIMEOUT)
        assert u64(ring_file, READ_POS_AT) == 48


def test_a_record_may_not_cross_the_wrap_point(ring_file: Path, writer64: RingWriter) -> None:
    with RingReader.open(ring_file) as r:
        writer64.push(b"a" * 8, timeout=TIMEOUT)  # 16 bytes at 0
        writer64.push(b"b" * 8, timeout=TIMEOUT)  # 16 bytes at 16
        # wrap_pos = 8 claims a wrap inside the first record: it may not be read past.
        patch(ring_file, WRAP_POS_AT, "<Q", 8)
        with pytest.raises(InvalidRing, match="corrupted record"):
            r.pop(timeout=TIMEOUT)


def test_a_reattached_writer_forgets_a_wrap_its_predecessor_never_published(
    ring_file: Path,
) -> None:
    with RingWriter.create(ring_file, 64) as w, RingReader.open(ring_file) as r:
        w.push(b"a" * 40, timeout=TIMEOUT)  # write_pos = 48
        assert r.pop(timeout=TIMEOUT) == b"a" * 40
        w.detach()
        # As a writer killed after recording the wrap and before publishing leaves it.
        patch(ring_file, WRAP_POS_AT, "<Q", 48)
        with RingWriter.open(ring_file) as again:
            assert u64(ring_file, WRAP_POS_AT) == 0
            again.push(b"b" * 8, timeout=TIMEOUT)  # fits at 48: must not be skipped
            assert r.pop(timeout=TIMEOUT) == b"b" * 8


def test_pop_refuses_message_running_past_end_of_data_area(
    ring_file: Path, writer64: RingWriter
) -> None:
    with RingReader.open(ring_file) as r:
        writer64.push(b"a" * 40, timeout=TIMEOUT)  # 48 bytes at index 0
        assert r.pop(timeout=TIMEOUT) == b"a" * 40
        writer64.push(b"b" * 8, timeout=TIMEOUT)  # 16 bytes at index 48, ends at the end
        writer64.push(b"c" * 8, timeout=TIMEOUT)  # 16 bytes at index 0; 32 bytes published
        patch_record(ring_file, 64, 48, 16, KIND_MESSAGE)  # 24 bytes: fits in 32, not in 16
        with pytest.raises(InvalidRing, match="corrupted record"):
            r.pop(timeout=TIMEOUT)


@pytest.mark.parametrize(
    "bad_write_pos",
    [
        pytest.param(lambda rp: rp + 4, id="misaligned"),
        pytest.param(lambda rp: rp + 64 + 8, id="more-than-capacity-ahead"),
        pytest.param(lambda rp: rp - 8, id="behind-read-pos"),
    ],
)
def test_pop_checks_write_pos_every_time_it_is_loaded(
    ring_file: Path, writer64: RingWriter, bad_write_pos: Callable[[int], int]
) -> None:
    writer64.push(b"ok", timeout=TIMEOUT)
    with RingReader.open(ring_file) as r:
        assert r.pop(timeout=TIMEOUT) == b"ok"
        read_pos = u64(ring_file, READ_POS_AT)
        patch(ring_file, WRITE_POS_AT, "<Q", bad_write_pos(read_pos))
        with pytest.raises(InvalidRing, match="corrupted record"):
            r.pop(timeout=TIMEOUT)


@pytest.mark.parametrize(
    "bad_read_pos",
    [
        pytest.param(lambda wp: 4, id="misaligned"),
        pytest.param(lambda wp: wp + 8, id="ahead-of-write-pos"),
    ],
)
def test_push_checks_read_pos_every_time_it_is_loaded(
    ring_file: Path, writer64: RingWriter, bad_read_pos: Callable[[int], int]
) -> None:
    writer64.push(b"f" * 40, timeout=TIMEOUT)  # 48 bytes at index 0
    writer64.push(b"g" * 8, timeout=TIMEOUT)  # 16 bytes up to the end: full, next push reloads
    patch(ring_file, READ_POS_AT, "<Q", bad_read_pos(u64(ring_file, WRITE_POS_AT)))
    with pytest.raises(InvalidRing, match="corrupted record"):
        writer64.push(b"more", timeout=TIMEOUT)


def test_timeout_zero_pop_on_empty_ring_raises_without_waiting(
    ring_file: Path, writer64: RingWriter
) -> None:
    with RingReader.open(ring_file) as r, pytest.raises(RingTimeout):
        r.pop(timeout=0)
