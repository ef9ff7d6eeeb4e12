"""stats(): the counters of docs/FORMAT.md "Counters", through the API and from another process."""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Child
from ipc_ring import PeerDied, RingReader, RingStats, RingTimeout, RingWriter

TIMEOUT = 5.0  # every blocking call is bounded, so a bug fails instead of hanging

# FORMAT.md "Header": offsets of the counters
COUNTERS_AT = {
    "messages_pushed": 136,
    "bytes_pushed": 144,
    "messages_popped": 264,
    "bytes_popped": 272,
    "reader_empty_waits": 400,
    "writer_full_waits": 528,
    "high_water": 536,
}


def counters(stats: RingStats) -> dict[str, int]:
    return {name: int(stats[name]) for name in COUNTERS_AT}  # type: ignore[literal-required]


def test_fresh_ring_stats_are_zero_with_capacity(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 4096) as w, RingReader.open(ring_path) as r:
        expected = {
            "capacity": 4096,
            "used_bytes": 0,
            **dict.fromkeys(COUNTERS_AT, 0),
        }
        assert w.stats() == expected
        assert r.stats() == expected


def test_stats_count_messages_and_payload_bytes_of_push_and_pop(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 4096) as w, RingReader.open(ring_path) as r:
        w.push(b"abc", timeout=TIMEOUT)
        assert w.try_push(b"")
        w.push(bytearray(b"x" * 20), timeout=TIMEOUT)
        for s in (w.stats(), r.stats()):
            assert s["messages_pushed"] == 3
            assert s["bytes_pushed"] == 23
            assert s["messages_popped"] == 0
            assert s["used_bytes"] == 16 + 8 + 32
        assert r.pop(timeout=TIMEOUT) == b"abc"
        assert r.try_pop() == b""
        for s in (w.stats(), r.stats()):
            assert s["messages_popped"] == 2
            assert s["bytes_popped"] == 3
            assert s["used_bytes"] == 32
        buf = bytearray(64)
        assert r.pop_into(buf, timeout=TIMEOUT) == 20
        s = r.stats()
        assert (s["messages_popped"], s["bytes_popped"], s["used_bytes"]) == (3, 23, 0)


def test_stats_count_each_message_of_batches(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 4096) as w, RingReader.open(ring_path) as r:
        assert w.push_many([b"a" * i for i in range(10)], timeout=TIMEOUT) == 10
        assert w.stats()["messages_pushed"] == 10
        assert w.stats()["bytes_pushed"] == 45
        assert len(r.pop_many(4, timeout=TIMEOUT)) == 4
        assert r.stats()["messages_popped"] == 4
        assert r.stats()["bytes_popped"] == 0 + 1 + 2 + 3
        assert len(r.pop_many(100, timeout=TIMEOUT)) == 6
        assert (r.stats()["messages_popped"], r.stats()["bytes_popped"]) == (10, 45)


def test_stats_count_committed_reservations_and_consumed_views_only(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 4096) as w, RingReader.open(ring_path) as r:
        with w.reserve(100, timeout=TIMEOUT) as view:
            view[:] = b"y" * 100
        slot = w.reserve(50, timeout=TIMEOUT)
        with slot as view:
            view[:5] = b"hello"
            slot.commit(5)
        w.reserve(30, timeout=TIMEOUT).discard()
        assert (w.stats()["messages_pushed"], w.stats()["bytes_pushed"]) == (2, 105)
        r.pop_view(timeout=TIMEOUT).discard()  # left in the ring, unread
        assert r.stats()["messages_popped"] == 0
        with r.pop_view(timeout=TIMEOUT) as view:
            assert len(view) == 100
        with r.pop_view(timeout=TIMEOUT) as view:
            assert bytes(view) == b"hello"
        assert (r.stats()["messages_popped"], r.stats()["bytes_popped"]) == (2, 105)


def test_bytes_skipped_at_wrap_points_are_not_counted(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as w, RingReader.open(ring_path) as r:
        for i in range(50):  # records of 24 bytes in 64: a wrap every few messages
            w.push(bytes([i]) * 16, timeout=TIMEOUT)
            assert r.pop(timeout=TIMEOUT) == bytes([i]) * 16
        s = w.stats()
        assert (s["messages_pushed"], s["bytes_pushed"]) == (50, 800)
        assert (s["messages_popped"], s["bytes_popped"]) == (50, 800)


def test_high_water_records_fill_seen_when_writer_finds_ring_full(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as w, RingReader.open(ring_path) as r:
        assert w.stats()["high_water"] == 0
        while w.try_push(b"z" * 8):  # records of 16 bytes
            pass
        assert w.stats()["used_bytes"] == 64
        assert w.stats()["high_water"] == 64
        assert r.stats()["high_water"] == 64
        while r.try_pop() is not None:
            pass
        w.push(b"z" * 8, timeout=TIMEOUT)
        assert w.stats()["high_water"] == 64  # a maximum: it does not come down


def test_try_calls_and_zero_timeouts_count_no_wait(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as w, RingReader.open(ring_path) as r:
        assert r.try_pop() is None
        with pytest.raises(RingTimeout):
            r.pop(timeout=0)
        while w.try_push(b"z" * 8):
            pass
        with pytest.raises(RingTimeout):
            w.push(b"z", timeout=0)
        s = r.stats()
        assert (s["reader_empty_waits"], s["writer_full_waits"]) == (0, 0)


def test_reader_empty_waits_counts_a_pop_that_had_to_sleep(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 4096) as w, RingReader.open(ring_path, spin=0) as r:
        timer = threading.Timer(0.2, w.push, (b"late",))
        timer.start()
        try:
            assert r.pop(timeout=TIMEOUT) == b"late"
        finally:
            timer.join(TIMEOUT)
        waits = r.stats()["reader_empty_waits"]
        assert waits >= 1
        assert w.stats()["reader_empty_waits"] == waits
        assert w.stats()["writer_full_waits"] == 0


def test_a_timed_out_pop_counts_its_sleep_slices(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 4096), RingReader.open(ring_path, spin=0) as r:
        started = time.monotonic()
        with pytest.raises(RingTimeout):
            r.pop(timeout=0.3)
        elapsed = time.monotonic() - started
        # Slices of at most 50 ms: 6 on an idle machine (fewer if the scheduler makes them
        # longer), never many more than the time asleep allows.
        assert 2 <= r.stats()["reader_empty_waits"] <= elapsed / 0.05 + 2


def test_writer_full_waits_counts_a_push_that_had_to_sleep(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64, spin=0) as w, RingReader.open(ring_path) as r:
        while w.try_push(b"z" * 8):
            pass
        timer = threading.Timer(0.2, r.pop_many, (100,))
        timer.start()
        try:
            w.push(b"w" * 8, timeout=TIMEOUT)
        finally:
            timer.join(TIMEOUT)
        waits = w.stats()["writer_full_waits"]
        assert waits >= 1
        assert r.stats()["writer_full_waits"] == waits
        assert r.stats()["reader_empty_waits"] == 0


def writer_dies_main(path: str, count: str) -> int:
    """Child: creates a ring, pushes `count` messages of 4 bytes and dies without close()."""
    w = RingWriter.create(path, 4096)
    w.push_many([b"abcd"] * int(count), timeout=TIMEOUT)
    print("pushed")
    sys.stdout.flush()
    os._exit(0)


def test_counters_survive_reattaching_writer_and_reader(
    ring_path: Path, spawn: Callable[..., Child]
) -> None:
    child = spawn("writer_dies_main", ring_path, 5)
    child.expect_line("pushed")
    child.finish()
    with RingReader.open(ring_path) as r:
        assert len(r.pop_many(3, timeout=TIMEOUT)) == 3
        before = counters(r.stats())
    assert (before["messages_pushed"], before["bytes_pushed"]) == (5, 20)
    assert (before["messages_popped"], before["bytes_popped"]) == (3, 12)
    with RingWriter.open(ring_path) as w:
        assert counters(w.stats()) == before
        with RingReader.open(ring_path, spin=0) as r:
            assert counters(r.stats()) == before
            w.push(b"efgh", timeout=TIMEOUT)
            assert len(r.pop_many(10, timeout=TIMEOUT)) == 2  # up to where the writer died
            with pytest.raises(PeerDied):
                r.pop_many(10, timeout=TIMEOUT)
            assert len(r.pop_many(10, timeout=TIMEOUT)) == 1
            with pytest.raises(RingTimeout):
                r.pop(timeout=0.06)
            middle = counters(r.stats())
        assert middle == {
            **before,
            "messages_pushed": 6,
            "bytes_pushed": 24,
            "messages_popped": 6,
            "bytes_popped": 24,
            "reader_empty_waits": middle["reader_empty_waits"],
        }
        assert middle["reader_empty_waits"] >= 1
        with RingReader.open(ring_path) as r:
            assert counters(r.stats()) == middle
            w.push(b"ijkl", timeout=TIMEOUT)
            assert r.pop(timeout=TIMEOUT) == b"ijkl"
            assert r.stats()["messages_popped"] == 7
            assert r.stats()["reader_empty_waits"] == middle["reader_empty_waits"]


def read_counters_main(path: str) -> int:
    """Child: reads the counters from the file, as `ipc-ring inspect` does, and prints them."""
    with open(path, "rb") as f:
        header = f.read(4096)
    values = {name: struct.unpack_from("<Q", header, at)[0] for name, at in COUNTERS_AT.items()}
    print("counters", " ".join(f"{k}={v}" for k, v in values.items()))
    sys.stdout.flush()
    return 0


def test_third_process_reading_the_file_sees_the_counters(
    ring_path: Path, spawn: Callable[..., Child]
) -> None:
    with RingWriter.create(ring_path, 64) as w, RingReader.open(ring_path) as r:
        w.push_many([b"q" * 8] * 4, timeout=TIMEOUT)  # fills the ring: 4 records of 16 bytes
        assert not w.try_push(b"q")
        r.pop(timeout=TIMEOUT)
        child = spawn("read_counters_main", ring_path)
        line = child.expect_line("counters ")
        child.finish()
        seen = dict(item.split("=") for item in line.split()[1:])
        assert {k: int(v) for k, v in seen.items()} == counters(w.stats())
        assert counters(w.stats())["messages_pushed"] == 4
        assert counters(w.stats())["messages_popped"] == 1
        assert counters(w.stats())["high_water"] == 64
