"""open(wait=...) retries for a missing file and a taken role; handles pickle by path."""

from __future__ import annotations

import multiprocessing
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import _mp_children
from ipc_ring import InvalidRing, PeerDied, RingBusy, RingClosed, RingReader, RingWriter

if TYPE_CHECKING:
    from conftest import Child

Spawn = Callable[..., "Child"]

START_METHODS = [m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]


# ---- children run by the spawn fixture --------------------------------------------------


def create_after(path: str, delay: str) -> int:
    time.sleep(float(delay))
    with RingWriter.create(path, 4096) as writer:
        writer.push(b"hello", timeout=10)
    return 0


def open_reader_waiting(path: str, wait: str) -> int:
    with RingReader.open(path, wait=float(wait)) as reader:
        print("attached", flush=True)
        print(f"message {reader.pop(timeout=10).decode()}", flush=True)
    return 0


def hold_writer_then_die(path: str) -> int:
    writer = RingWriter.create(path, 4096)
    writer.push(b"before", timeout=10)
    print("pickled " + pickle.dumps(writer).hex(), flush=True)
    time.sleep(60)
    return 1


# ---- open(wait=) -----------------------------------------------------------------------


def test_reader_open_waits_for_a_writer_created_later_in_another_process(
    ring_path: Path, spawn: Spawn
) -> None:
    writer = spawn("create_after", ring_path, 0.5)
    start = time.monotonic()
    with RingReader.open(ring_path, wait=20) as reader:
        assert time.monotonic() - start >= 0.3
        assert reader.pop(timeout=10) == b"hello"
    writer.finish()


def test_reader_open_waits_until_the_reader_role_is_released(ring_path: Path, spawn: Spawn) -> None:
    with RingWriter.create(ring_path, 4096) as writer:
        first = RingReader.open(ring_path)
        child = spawn("open_reader_waiting", ring_path, 20)
        time.sleep(0.5)
        assert child.output == []  # still waiting for the role
        first.close()
        child.expect_line("attached")
        writer.push(b"x", timeout=10)
        assert child.expect_line("message") == "message x"
        child.finish()


def test_open_without_wait_fails_at_once_when_the_file_is_missing(ring_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RingReader.open(ring_path)
    with pytest.raises(FileNotFoundError):
        RingWriter.open(ring_path, wait=0)


def test_open_wait_gives_up_after_the_given_seconds(ring_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        RingReader.open(ring_path, wait=0.2)
    assert 0.2 <= time.monotonic() - start < 5
    with RingWriter.create(ring_path, 4096), RingReader.open(ring_path):
        start = time.monotonic()
        with pytest.raises(RingBusy):
            RingReader.open(ring_path, wait=0.2)
        assert 0.2 <= time.monotonic() - start < 5


def test_open_wait_does_not_retry_an_invalid_ring(ring_path: Path) -> None:
    ring_path.write_bytes(b"not a ring" * 1000)
    start = time.monotonic()
    with pytest.raises(InvalidRing):
        RingReader.open(ring_path, wait=30)
    assert time.monotonic() - start < 5


def _pop_across_handover(reader: RingReader, patience: float = 30.0) -> bytes:
    """pop(), retried while the writer role is between its dead holder and the
    process that re-attaches (the reader sees PeerDied in that gap)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return reader.pop(timeout=patience)
        except PeerDied:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# ---- pickling --------------------------------------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_reader_handed_to_a_child_continues_from_the_committed_position(
    ring_path: Path, method: str
) -> None:
    ctx = multiprocessing.get_context(method)
    with RingWriter.create(ring_path, 4096) as writer:
        reader = RingReader.open(ring_path)
        writer.push(b"one", timeout=10)
        assert reader.pop(timeout=10) == b"one"
        writer.push(b"two", timeout=10)
        process = ctx.Process(target=_mp_children.read_and_check, args=(reader, [b"two", b"three"]))
        process.start()
        try:
            reader.close()  # the child's unpickle waits for this
            writer.push(b"three", timeout=10)
            process.join(timeout=60)
            assert process.exitcode == 0
        finally:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)


def test_pickled_writer_reattaches_once_the_sending_process_died(
    ring_path: Path, spawn: Spawn
) -> None:
    sender = spawn("hold_writer_then_die", ring_path)
    data = bytes.fromhex(sender.expect_line("pickled ").split()[1])
    with RingReader.open(ring_path) as reader:
        sender.kill()
        writer = pickle.loads(data)
        assert isinstance(writer, RingWriter)
        with writer:
            writer.push(b"after", timeout=10)
        assert reader.pop(timeout=10) == b"before"
        assert reader.pop(timeout=10) == b"after"
        with pytest.raises(RingClosed):
            reader.pop(timeout=10)


@pytest.mark.parametrize("method", START_METHODS)
def test_writer_handed_to_a_child_by_a_process_that_then_exits(
    ring_path: Path, method: str
) -> None:
    ctx = multiprocessing.get_context(method)
    writer_owner = ctx.Process(target=_mp_children.hand_over_writer, args=(str(ring_path), method))
    writer_owner.start()
    try:
        with RingReader.open(ring_path, wait=30) as reader:
            got = [_pop_across_handover(reader) for _ in range(3)]
            with pytest.raises(RingClosed):
                reader.pop(timeout=30)
        assert got == [b"parent", b"child 1", b"child 2"]
        writer_owner.join(timeout=30)
        assert writer_owner.exitcode == 0
    finally:
        if writer_owner.is_alive():
            writer_owner.kill()
            writer_owner.join(timeout=10)


@pytest.mark.parametrize("method", START_METHODS)
def test_writer_handed_to_a_child_with_detach_continues_the_stream(
    ring_path: Path, method: str
) -> None:
    ctx = multiprocessing.get_context(method)
    writer = RingWriter.create(ring_path, 4096)
    with RingReader.open(ring_path) as reader:
        writer.push(b"parent", timeout=10)
        child = ctx.Process(
            target=_mp_children.write_and_close, args=(writer, [b"child 1", b"child 2"])
        )
        child.start()
        try:
            writer.detach()  # the role goes to the child; the stream does not end
            assert writer.closed
            got = [_pop_across_handover(reader) for _ in range(3)]
            with pytest.raises(RingClosed):
                reader.pop(timeout=30)
            assert got == [b"parent", b"child 1", b"child 2"]
            child.join(timeout=60)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join(timeout=10)


def test_detach_releases_the_writer_role_without_ending_the_stream(ring_path: Path) -> None:
    writer = RingWriter.create(ring_path, 4096)
    with RingReader.open(ring_path) as reader:
        writer.push(b"before", timeout=10)
        writer.detach()
        writer.detach()  # idempotent
        assert not reader.writer_alive
        assert reader.pop(timeout=10) == b"before"
        with pytest.raises(PeerDied):  # drained, and no live writer: not the end of stream
            reader.pop(timeout=1)
        with RingWriter.open(ring_path) as again:
            again.push(b"after", timeout=10)
        assert reader.pop(timeout=10) == b"after"
        with pytest.raises(RingClosed):
            reader.pop(timeout=10)


def test_pickling_a_closed_handle_raises(ring_path: Path) -> None:
    writer = RingWriter.create(ring_path, 4096)
    reader = RingReader.open(ring_path)
    writer.close()
    reader.close()
    for handle in (writer, reader):
        with pytest.raises(RingClosed):
            pickle.dumps(handle)


def test_unpickled_writer_after_the_sender_closed_reports_the_ended_stream(
    ring_path: Path,
) -> None:
    writer = RingWriter.create(ring_path, 4096)
    data = pickle.dumps(writer)
    writer.close()
    with pytest.raises(RingClosed):
        pickle.loads(data)
