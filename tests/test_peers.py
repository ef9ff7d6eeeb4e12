"""The other side, with real processes: what a reader sees when its writer dies or closes,
what a writer sees when its reader dies or is absent, one writer and one reader (RingBusy),
re-attaching writers and readers, the liveness properties, and streams through small rings
to and from child processes, checked byte by byte.

Each attached side holds a kernel lock on its role's byte range of the ring file (FORMAT.md
"Liveness and roles"); a waiting side checks the peer's lock before every sleep slice of at
most 50 ms. The functions named `child_*` run in a child process started by the `spawn`
fixture (see conftest.py); they get their arguments as strings and return the child's exit
status.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from conftest import (
    RECORD_HEADER,
    TIMEOUT,
    Spawn,
    child_numbered_writer,
    fill,
    numbered,
    positions,
    record_size,
    wait_for_command,
)
from ipc_ring import PeerDied, RingBusy, RingClosed, RingError, RingReader, RingTimeout, RingWriter

HEADER_SIZE = 4096
READER_ATTACHED_OFFSET = 392


# ---- the streams -------------------------------------------------------------------------

# The ring and the length of the streams sent in batches and slots.
STREAM_CAPACITY = 4096
STREAM_COUNT = 20_000

_POOL = random.Random(20240611).randbytes((1 << 21) + 8)


def stream_message(seq: int, max_size: int, typical_size: int, max_size_every: int) -> bytes:
    """The message with sequence number `seq`: its length (0..max_size) and every byte are a
    function of `seq`, and its first 8 bytes (when it has that many) are `seq` itself.
    Lengths are spread over 0..typical_size; every 16th is 0..8 bytes long and every
    `max_size_every`-th exactly max_size."""
    mixed = (seq * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64
    if seq % 16 == 3:
        size = mixed % 9
    elif seq % max_size_every == 7:
        size = max_size
    else:
        size = (mixed >> 11) % (typical_size + 1)
    start = (mixed >> 29) % (len(_POOL) - size + 1)
    return (seq.to_bytes(8, "little") + _POOL[start : start + max(size - 8, 0)])[:size]


def push_stream_message(seq: int, max_size: int, typical_size: int) -> bytes:
    """Message `seq` of the streams sent with push and read with pop or pop_into: sizes
    spread over 0..typical_size, max_size every 16th message where that is the typical
    size (small rings), every 1000th otherwise."""
    return stream_message(seq, max_size, typical_size, 16 if typical_size == max_size else 1000)


def batch_stream_message(seq: int, max_size: int) -> bytes:
    """Message `seq` of the streams sent in batches and slots: most are short (up to an
    eighth of max_size), so that a batch holds many; max_size every 97th message."""
    return stream_message(seq, max_size, max_size // 8, 97)


def check_message(seq: int, got: bytes, expected: bytes) -> None:
    if got != expected:
        raise AssertionError(
            f"message {seq}: got {len(got)} bytes starting {got[:16].hex()}, "
            f"expected {len(expected)} bytes starting {expected[:16].hex()}"
        )


def produce(writer: RingWriter, count: int, typical_size: int) -> None:
    for seq in range(count):
        writer.push(
            push_stream_message(seq, writer.max_message_size, typical_size), timeout=TIMEOUT
        )


def consume(reader: RingReader, count: int, typical_size: int, use_pop_into: bool) -> None:
    """Reads `count` messages and then the end of stream, checking every byte."""
    buffer = bytearray(reader.max_message_size)
    for seq in range(count):
        if use_pop_into:
            length = reader.pop_into(buffer, timeout=TIMEOUT)
            got = bytes(buffer[:length])
        else:
            got = reader.pop(timeout=TIMEOUT)
        check_message(seq, got, push_stream_message(seq, reader.max_message_size, typical_size))
    try:
        extra = reader.pop(timeout=TIMEOUT)
    except RingClosed:
        return
    raise AssertionError(f"a message of {len(extra)} bytes after the last one")


def batch_sizes(count: int, seed: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges that split range(count) into batches of 1 to 200 messages."""
    rng = random.Random(seed)
    start = 0
    while start < count:
        stop = min(count, start + rng.choice([1, 2, 3, 7, 31, 64, 200]))
        yield start, stop
        start = stop


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
            check_message(seq, got, batch_stream_message(seq, max_size))
            seq += 1
    assert seq == count, f"{seq - count} messages after the last one"
    with pytest.raises(RingClosed):
        reader.pop_many(10, timeout=TIMEOUT)


def consume_with_pop_view(reader: RingReader, count: int) -> None:
    """Reads `count` messages with pop_view, then the end of stream, checking every byte."""
    max_size = reader.max_message_size
    for seq in range(count):
        with reader.pop_view(timeout=TIMEOUT) as view:
            check_message(seq, bytes(view), batch_stream_message(seq, max_size))
    with pytest.raises(RingClosed):
        reader.pop_view(timeout=TIMEOUT)


def produce_with_push_many(writer: RingWriter, count: int) -> None:
    """Writes `count` messages with push_many, in batches of 1 to 200, as lists and
    generators alternately."""
    max_size = writer.max_message_size
    for i, (start, stop) in enumerate(batch_sizes(count, seed=11)):
        batch: Iterable[bytes]
        if i % 2:
            batch = [batch_stream_message(seq, max_size) for seq in range(start, stop)]
        else:
            batch = (batch_stream_message(seq, max_size) for seq in range(start, stop))
        assert writer.push_many(batch, timeout=TIMEOUT) == stop - start


def produce_with_reserve(writer: RingWriter, count: int) -> None:
    """Writes `count` messages in place with reserve: most fill exactly the reserved size,
    every third reserves more and commits only the message's length."""
    max_size = writer.max_message_size
    for seq in range(count):
        message = batch_stream_message(seq, max_size)
        if seq % 3 == 0:
            slot = writer.reserve(min(len(message) + 13, max_size), timeout=TIMEOUT)
            with slot as view:
                view[: len(message)] = message
                slot.commit(len(message))
        else:
            with writer.reserve(len(message), timeout=TIMEOUT) as view:
                view[:] = message


# ---- child processes ---------------------------------------------------------------------


def child_numbered_reader(path: str, count: str, ending: str) -> int:
    """Opens the ring as its reader, prints "attached", pops `count` messages (printing
    their numbers), prints "popped", then ends as `ending` says: "die" (os._exit at once),
    "hold" (waits for a command, then dies), "drain" (pops to the end of the stream and
    prints "end <exception name> <numbers>")."""
    reader = RingReader.open(path)
    print("attached", flush=True)
    got = [struct.unpack_from("<Q", reader.pop(timeout=10))[0] for _ in range(int(count))]
    print("popped", *got, flush=True)
    if ending == "hold":
        wait_for_command()
    elif ending == "drain":
        rest = []
        try:
            while True:
                rest.append(struct.unpack_from("<Q", reader.pop(timeout=10))[0])
        except RingError as e:
            print("end", type(e).__name__, *rest, flush=True)
        reader.close()
        return 0
    os._exit(0)


def child_reader_attaches_and_exits(path: str) -> int:
    with RingReader.open(path):
        print("attached", flush=True)
    return 0


def child_writer_dies_after_push_many(path: str) -> int:
    """Publishes three messages and dies without close()."""
    writer = RingWriter.create(path, 4096)
    writer.push_many([b"one", b"two", b"three"], timeout=TIMEOUT)
    print("pushed", flush=True)
    os._exit(0)


def child_stream_writer(path: str, capacity: str, count: str, typical_size: str) -> int:
    with RingWriter.create(path, int(capacity)) as writer:
        print("created", flush=True)
        produce(writer, int(count), int(typical_size))
    return 0


def child_stream_reader(path: str, count: str, typical_size: str, use_pop_into: str) -> int:
    with RingReader.open(path) as reader:
        consume(reader, int(count), int(typical_size), use_pop_into == "True")
    print("checked", count, flush=True)
    return 0


def child_batch_writer(path: str, capacity: str, count: str, api: str) -> int:
    with RingWriter.create(path, int(capacity)) as writer:
        print("created", flush=True)
        if api == "push_many":
            produce_with_push_many(writer, int(count))
        else:
            produce_with_reserve(writer, int(count))
    return 0


def child_batch_reader(path: str, count: str, api: str) -> int:
    with RingReader.open(path) as reader:
        print("attached", flush=True)
        if api == "pop_many":
            consume_with_pop_many(reader, int(count))
        else:
            consume_with_pop_view(reader, int(count))
    print("checked", count, flush=True)
    return 0


# ---- only an explicit end ends a stream ---------------------------------------------------

# The endings of a writer process, and what its reader sees once it has every message.
ENDINGS = {
    "close": RingClosed,
    "with-block": RingClosed,
    "abort": PeerDied,
    "with-block-raises": PeerDied,
    "collected-without-close": PeerDied,
    "exits-holding-it": PeerDied,
    "uncaught-exception": PeerDied,
    "killed": PeerDied,
}
KEEP: list[RingWriter] = []


def child_writer_that_ends(path: str, count: str, ending: str) -> int:
    """Creates a ring, pushes numbered(0) .. numbered(count - 1), then ends as `ending` says."""
    import gc
    import signal
    import warnings

    writer = RingWriter.create(path, 4096)
    for i in range(int(count)):
        writer.push(numbered(i), timeout=10)
    if ending == "close":
        writer.close()
    elif ending == "with-block":
        with writer:
            pass
    elif ending == "abort":
        writer.abort()
    elif ending == "with-block-raises":
        with writer:
            raise RuntimeError("the producer failed")
    elif ending == "collected-without-close":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del writer
            gc.collect()
        print("warned", *sorted({w.category.__name__ for w in caught}), flush=True)
    elif ending == "exits-holding-it":
        KEEP.append(writer)  # alive until the interpreter exits
    elif ending == "uncaught-exception":
        raise RuntimeError("uncaught, with the writer in this frame")
    elif ending == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    return 0


@pytest.mark.parametrize("ending", ENDINGS)
def test_only_an_explicit_end_ends_the_stream_every_other_ending_is_peer_died(
    spawn: Spawn, ring_path: Path, ending: str
) -> None:
    child = spawn(child_writer_that_ends, ring_path, 50, ending)
    if ending == "collected-without-close":
        assert child.expect_line("warned") == "warned ResourceWarning"
    child.wait()
    with RingReader.open(ring_path) as reader:
        assert [reader.pop(timeout=TIMEOUT) for _ in range(50)] == [numbered(i) for i in range(50)]
        with pytest.raises(ENDINGS[ending]) as raised:
            reader.pop(timeout=TIMEOUT)
        assert type(raised.value) is ENDINGS[ending]
        if ENDINGS[ending] is PeerDied:
            # Not an end: a restarted producer continues the stream.
            with RingWriter.open(ring_path) as again:
                again.push(b"continued", timeout=TIMEOUT)
            assert reader.pop(timeout=TIMEOUT) == b"continued"
            with pytest.raises(RingClosed):
                reader.pop(timeout=TIMEOUT)


# ---- the reader's view of a dead writer --------------------------------------------------


def test_reader_drains_every_committed_message_then_raises_peer_died_after_writer_exits(
    spawn: Spawn, ring_path: Path
) -> None:
    writer = spawn(child_numbered_writer, ring_path, 4096, 20, "die")
    writer.expect_line("pushed")
    with RingReader.open(ring_path) as reader:
        assert reader.writer_alive
        writer.send("go")
        writer.finish()
        got = [struct.unpack_from("<Q", reader.pop(timeout=5))[0] for _ in range(20)]
        assert got == list(range(20))
        assert not reader.writer_alive
        with pytest.raises(PeerDied):
            reader.pop(timeout=10)
        # Reported once: now the reader waits for a new writer, within its timeout.
        with pytest.raises(RingTimeout, match="vacant"):
            reader.pop(timeout=0)
        with pytest.raises(RingTimeout, match="vacant"):
            reader.pop(timeout=0.2)
        assert reader.try_pop() is None
        # A restarted producer: the waiting pop gets its message, with no polling loop.
        restarted = threading.Timer(0.3, lambda: restart_and_push(ring_path, b"restarted"))
        restarted.start()
        try:
            assert reader.pop(timeout=10) == b"restarted"
        finally:
            restarted.join(timeout=10)
        with pytest.raises(RingClosed):
            reader.pop(timeout=10)


def child_reattaching_writer_that_dies(path: str, generation: str) -> NoReturn:
    """Continues the stream as its writer, pushes one message and dies holding the role."""
    writer = RingWriter.open(path, wait=10)
    writer.push(b"successor %d" % int(generation), timeout=10)
    os._exit(0)


def restart_and_push(path: Path, message: bytes) -> None:
    with RingWriter.open(path) as writer:
        writer.push(message, timeout=10)


def test_each_writer_that_dies_is_reported_once_then_its_successor_is_read(
    spawn: Spawn, ring_path: Path
) -> None:
    first = spawn(child_numbered_writer, ring_path, 4096, 3, "die")
    first.expect_line("pushed")
    with RingReader.open(ring_path) as reader:
        first.send("go")
        first.finish()
        assert [reader.pop(timeout=5) for _ in range(3)] == [numbered(i) for i in range(3)]
        with pytest.raises(PeerDied, match="died"):
            reader.pop(timeout=10)
        for generation in range(2):
            # A successor attaches, pushes, dies: its end is reported too, once.
            successor = spawn(child_reattaching_writer_that_dies, ring_path, generation)
            successor.finish(timeout=30)
            assert reader.pop(timeout=10) == b"successor %d" % generation
            with pytest.raises(PeerDied):
                reader.pop(timeout=10)
            with pytest.raises(RingTimeout, match="vacant"):
                reader.pop(timeout=0)


def test_reader_opened_after_writer_died_still_gets_every_committed_message(
    spawn: Spawn, ring_path: Path
) -> None:
    writer = spawn(child_numbered_writer, ring_path, 4096, 5, "die")
    writer.expect_line("pushed")
    writer.send("go")
    writer.finish()
    with RingReader.open(ring_path) as reader:
        assert [struct.unpack_from("<Q", reader.pop(timeout=5))[0] for _ in range(5)] == [
            0,
            1,
            2,
            3,
            4,
        ]
        with pytest.raises(PeerDied):
            reader.pop(timeout=10)


def test_iteration_ends_with_peer_died_not_stop_iteration_when_writer_died(
    spawn: Spawn, ring_path: Path
) -> None:
    writer = spawn(child_numbered_writer, ring_path, 4096, 7, "die")
    writer.expect_line("pushed")
    writer.send("go")
    writer.finish()
    got = []
    with RingReader.open(ring_path) as reader, pytest.raises(PeerDied):
        for message in reader:
            got.append(struct.unpack_from("<Q", message)[0])
    assert got == list(range(7))


@pytest.mark.parametrize("call", ["pop_many", "pop_view"])
def test_pop_many_and_pop_view_raise_peer_died_once_a_dead_writers_messages_are_read(
    ring_path: Path, spawn: Spawn, call: str
) -> None:
    child = spawn(child_writer_dies_after_push_many, ring_path)
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


def test_reader_blocked_in_pop_raises_peer_died_within_a_second_of_writer_death(
    spawn: Spawn, ring_path: Path
) -> None:
    writer = spawn(child_numbered_writer, ring_path, 4096, 3, "die")
    writer.expect_line("pushed")
    with RingReader.open(ring_path) as reader:
        for _ in range(3):
            reader.pop(timeout=5)
        sent_at: list[float] = []

        def kill_writer() -> None:
            sent_at.append(time.monotonic())
            writer.send("go")

        timer = threading.Timer(0.3, kill_writer)
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(PeerDied):
                reader.pop(timeout=10)
        finally:
            timer.cancel()
        ended = time.monotonic()
        assert sent_at, "pop returned before the writer was told to die"
        assert ended - started >= 0.25, "pop did not block while the writer lived"
        assert ended - sent_at[0] < 1.0, f"PeerDied came {ended - sent_at[0]:.3f} s after death"
    writer.finish()


def test_reader_sees_ring_closed_not_peer_died_when_writer_closed_then_died(
    spawn: Spawn, ring_path: Path
) -> None:
    writer = spawn(child_numbered_writer, ring_path, 4096, 4, "close")
    writer.expect_line("pushed")
    with RingReader.open(ring_path) as reader:
        writer.send("go")
        writer.finish()
        assert not reader.writer_alive
        assert [struct.unpack_from("<Q", m)[0] for m in reader] == [0, 1, 2, 3]
        with pytest.raises(RingClosed):
            reader.pop(timeout=10)


# ---- the writer's view of a dead (or absent) reader --------------------------------------


def test_writer_raises_peer_died_when_its_reader_process_died_and_ring_fills(
    spawn: Spawn, ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        assert not writer.reader_alive
        for i in range(3):
            writer.push(numbered(i))
        reader = spawn(child_numbered_reader, ring_path, 3, "die")
        assert reader.expect_line("popped") == "popped 0 1 2"
        reader.finish()
        assert not writer.reader_alive
        following = 3 + len(fill(writer, 16, start=3))
        assert not writer.try_push(numbered(following)), "try_push must not raise"
        started = time.monotonic()
        with pytest.raises(PeerDied):
            writer.push(numbered(following), timeout=10)
        assert time.monotonic() - started < 1.0
        with pytest.raises(PeerDied):
            writer.push(numbered(following), timeout=0)


def test_push_many_raises_peer_died_with_written_when_the_reader_died_and_the_ring_is_full(
    ring_path: Path, spawn: Spawn
) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        child = spawn(child_reader_attaches_and_exits, ring_path)
        child.expect_line("attached", timeout=TIMEOUT)
        child.finish(0, timeout=TIMEOUT)
        messages = [numbered(i, 8) for i in range(10)]
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


def test_writer_raises_peer_died_when_its_reader_closed_and_ring_fills(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        RingReader.open(ring_path).close()
        following = len(fill(writer, 16))
        with pytest.raises(PeerDied):
            writer.push(numbered(following), timeout=10)


def test_writer_times_out_instead_of_peer_died_when_no_reader_ever_attached(
    spawn: Spawn, ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        following = len(fill(writer, 16))
        started = time.monotonic()
        with pytest.raises(RingTimeout):
            writer.push(numbered(following), timeout=0.3)
        assert time.monotonic() - started >= 0.25
        with pytest.raises(RingTimeout):
            writer.push(numbered(following), timeout=0)
        # A reader that attaches now lets the blocked writer go on.
        reader = spawn(child_numbered_reader, ring_path, 0, "drain")
        reader.expect_line("attached")
        writer.push(numbered(following), timeout=10)
        writer.push(numbered(following + 1), timeout=10)
        total = following + 2
    line = reader.expect_line("end")
    assert line == "end RingClosed " + " ".join(map(str, range(total)))
    reader.finish()


def test_writer_continues_after_peer_died_once_a_new_reader_attaches(
    spawn: Spawn, ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        first = spawn(child_numbered_reader, ring_path, 2, "die")
        first.expect_line("attached")
        writer.push(numbered(0))
        writer.push(numbered(1))
        first.finish()
        following = 2 + len(fill(writer, 16, start=2))
        with pytest.raises(PeerDied):
            writer.push(numbered(following), timeout=5)
        second = spawn(child_numbered_reader, ring_path, 0, "drain")
        second.expect_line("attached")
        writer.push(numbered(following), timeout=10)
        assert writer.reader_alive
        total = following + 1
    line = second.expect_line("end")
    assert line == "end RingClosed " + " ".join(map(str, range(2, total)))
    second.finish()


# ---- one writer, one reader; re-attaching ------------------------------------------------


def test_second_reader_and_second_writer_in_one_process_raise_ring_busy(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 256), RingReader.open(ring_path):
        with pytest.raises(RingBusy):
            RingReader.open(ring_path)
        with pytest.raises(RingBusy):
            RingWriter.open(ring_path)
        assert issubclass(RingBusy, RingError)


def test_second_reader_raises_ring_busy_while_another_process_reads(
    spawn: Spawn, ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 256):
        reader = spawn(child_numbered_reader, ring_path, 0, "hold")
        reader.expect_line("popped")
        with pytest.raises(RingBusy):
            RingReader.open(ring_path)
        reader.send("go")
        reader.finish()
        RingReader.open(ring_path).close()


def test_second_writer_raises_ring_busy_while_another_process_writes(
    spawn: Spawn, ring_path: Path
) -> None:
    writer = spawn(child_numbered_writer, ring_path, 256, 0, "die")
    writer.expect_line("pushed")
    with pytest.raises(RingBusy):
        RingWriter.open(ring_path)
    with pytest.raises(FileExistsError):
        RingWriter.create(ring_path, 256)
    writer.send("go")
    writer.finish()
    RingWriter.open(ring_path).close()


def test_reader_whose_predecessor_died_continues_from_committed_read_position(
    spawn: Spawn, ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 4096) as writer:
        for i in range(10):
            writer.push(numbered(i))
        first = spawn(child_numbered_reader, ring_path, 4, "die")
        assert first.expect_line("popped") == "popped 0 1 2 3"
        first.finish()
        with RingReader.open(ring_path) as reader:
            got = [struct.unpack_from("<Q", reader.pop(timeout=5))[0] for _ in range(6)]
            assert got == [4, 5, 6, 7, 8, 9]
            assert reader.try_pop() is None


def test_reopened_writer_continues_the_stream_after_writer_process_died(
    spawn: Spawn, ring_path: Path
) -> None:
    old = spawn(child_numbered_writer, ring_path, 4096, 10, "die")
    old.expect_line("pushed")
    old.send("go")
    old.finish()
    with RingReader.open(ring_path) as reader:
        with RingWriter.open(ring_path) as writer:
            assert reader.writer_alive
            for i in range(10, 20):
                writer.push(numbered(i), timeout=5)
        # Every message of the dead writer, then its death, where it happened; then the
        # successor's messages and the end it made.
        assert [struct.unpack_from("<Q", reader.pop(timeout=5))[0] for _ in range(10)] == list(
            range(10)
        )
        with pytest.raises(PeerDied, match="stopped here without ending the stream"):
            reader.pop(timeout=5)
        assert [struct.unpack_from("<Q", m)[0] for m in reader] == list(range(10, 20))


def test_reopened_writer_after_death_mid_read_continues_without_gap(
    spawn: Spawn, ring_path: Path
) -> None:
    old = spawn(child_numbered_writer, ring_path, 256, 6, "die")
    old.expect_line("pushed")
    with RingReader.open(ring_path) as reader:
        assert struct.unpack_from("<Q", reader.pop(timeout=5))[0] == 0
        old.send("go")
        old.finish()
        with RingWriter.open(ring_path) as writer:
            following = 6 + len(fill(writer, 16, start=6))
        got = [struct.unpack_from("<Q", reader.pop(timeout=5))[0] for _ in range(1, 6)]
        with pytest.raises(PeerDied):
            reader.pop(timeout=5)
        got += [struct.unpack_from("<Q", m)[0] for m in reader]
    assert got == list(range(1, following))


def read_stream(reader: RingReader) -> list[bytes | str]:
    """Every message to the end of the stream, each break (PeerDied) as "PeerDied"."""
    got: list[bytes | str] = []
    while True:
        try:
            got.append(reader.pop(timeout=5))
        except PeerDied:
            got.append("PeerDied")
        except RingClosed:
            return got


def succeed_aborted_writers(path: Path, writers: int, capacity: int = 4096) -> list[bytes | str]:
    """`writers` writers in turn, each pushing three messages and aborting, the next one
    attaching before anybody read; then one that closes. What a reader must see."""
    expected: list[bytes | str] = []
    writer = RingWriter.create(path, capacity)
    for n in range(writers):
        messages = [b"%d-%d" % (n, i) for i in range(3)]
        for message in messages:
            writer.push(message, timeout=5)
        writer.abort()
        expected += [*messages, "PeerDied"]
        writer = RingWriter.open(path)
    writer.push(b"last", timeout=5)
    writer.close()
    return [*expected, b"last"]


@pytest.mark.parametrize("writers", [1, 3, 4])
def test_writers_that_stopped_before_anyone_read_are_each_reported_where_their_messages_end(
    ring_path: Path, writers: int
) -> None:
    expected = succeed_aborted_writers(ring_path, writers)
    with RingReader.open(ring_path) as reader:
        assert read_stream(reader) == expected


def test_more_unread_breaks_than_the_header_holds_merge_but_lose_no_message(
    ring_path: Path,
) -> None:
    expected = succeed_aborted_writers(ring_path, 6)
    with RingReader.open(ring_path) as reader:
        got = read_stream(reader)
    assert [m for m in got if m != "PeerDied"] == [m for m in expected if m != "PeerDied"]
    # Four entries: the fifth and sixth writers' stops merge into the fourth's, reported
    # once where the fourth writer's messages end.
    assert got == expected[: 4 * 4] + [m for m in expected[4 * 4 :] if m != "PeerDied"]


def test_a_break_is_reported_once_across_readers_and_at_a_wrap_point(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        for _ in range(5):  # five 8-byte records
            writer.push(b"", timeout=5)
        with RingReader.open(ring_path) as reader:
            assert [reader.pop(timeout=5) for _ in range(5)] == [b""] * 5
        writer.push(b"x", timeout=5)  # a 16-byte record at 40: 8 bytes left in the lap
        writer.abort()
    with RingWriter.open(ring_path) as writer:
        writer.push(b"y" * 20, timeout=5)  # 32 bytes: skips from 56 to the next lap
        with RingReader.open(ring_path) as reader:
            assert reader.pop(timeout=5) == b"x"
            with pytest.raises(PeerDied, match="a new writer continued"):
                reader.try_pop()
        with RingReader.open(ring_path) as reader:  # reported already: not again
            assert reader.pop(timeout=5) == b"y" * 20
            assert reader.try_pop() is None


def test_a_break_past_a_wrap_point_the_reader_has_not_reached_is_still_reported(
    ring_path: Path,
) -> None:
    writer = RingWriter.create(ring_path, 256)
    with RingReader.open(ring_path) as reader:
        writer.push(b"1" * 100, timeout=5)  # records at 0 and 112
        writer.push(b"2" * 100, timeout=5)
        assert reader.pop(timeout=5) == b"1" * 100  # it has seen write_pos 224
        writer.push(b"3" * 40, timeout=5)  # 48 bytes do not fit before 256: a wrap at 224
        writer.push(b"4" * 8, timeout=5)
        writer.abort()
        with RingWriter.open(ring_path) as successor:  # the break: in the next lap
            successor.push(b"5" * 8, timeout=5)
        assert read_stream(reader) == [b"2" * 100, b"3" * 40, b"4" * 8, "PeerDied", b"5" * 8]


def test_a_break_peeked_at_and_not_consumed_is_reported_to_the_next_reader(
    ring_path: Path,
) -> None:
    writer = RingWriter.create(ring_path, 4096)
    writer.push(b"a1", timeout=5)
    writer.push(b"a2", timeout=5)
    writer.abort()
    with RingWriter.open(ring_path) as successor:
        successor.push(b"b1", timeout=5)
    with RingReader.open(ring_path) as reader:
        assert reader.peek_many(8, timeout=5) == [b"a1", b"a2"]
        with pytest.raises(PeerDied):
            reader.peek_many(8, timeout=5)
        # It stops without consume(): the next reader gets all of it again, break included.
    with RingReader.open(ring_path) as reader:
        assert read_stream(reader) == [b"a1", b"a2", "PeerDied", b"b1"]


def test_a_writer_reported_dead_with_nothing_left_is_no_break_for_its_successor(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 4096) as writer, RingReader.open(ring_path) as reader:
        writer.push(b"a", timeout=5)
        writer.abort()
        assert reader.pop(timeout=5) == b"a"
        with pytest.raises(PeerDied):
            reader.pop(timeout=5)
        with RingWriter.open(ring_path) as successor:
            successor.push(b"b", timeout=5)
        assert read_stream(reader) == [b"b"]


def test_reopening_the_writer_of_a_closed_stream_raises_ring_closed(
    spawn: Spawn, ring_path: Path
) -> None:
    RingWriter.create(ring_path, 256).close()
    with pytest.raises(RingClosed):
        RingWriter.open(ring_path)
    other = ring_path.with_name("other")
    writer = spawn(child_numbered_writer, other, 256, 2, "close")
    writer.expect_line("pushed")
    writer.send("go")
    writer.finish()
    with pytest.raises(RingClosed):
        RingWriter.open(other)


def test_reader_attached_and_writer_alive_follow_the_peer_process(
    spawn: Spawn, ring_dir: Path
) -> None:
    path = ring_dir / "a"
    with RingWriter.create(path, 256) as writer:
        assert not writer.reader_alive
        reader = spawn(child_numbered_reader, path, 0, "hold")
        reader.expect_line("popped")
        assert writer.reader_alive
        with path.open("rb") as f:
            assert struct.unpack_from("<I", f.read(HEADER_SIZE), READER_ATTACHED_OFFSET)[0] == 1
        reader.send("go")
        reader.finish()
        assert not writer.reader_alive
        with path.open("rb") as f:  # reader_attached is never cleared
            assert struct.unpack_from("<I", f.read(HEADER_SIZE), READER_ATTACHED_OFFSET)[0] == 1

    path = ring_dir / "b"
    writer_child = spawn(child_numbered_writer, path, 256, 0, "die")
    writer_child.expect_line("pushed")
    with RingReader.open(path) as reader_handle:
        assert reader_handle.writer_alive
        writer_child.send("go")
        writer_child.finish()
        assert not reader_handle.writer_alive

    path = ring_dir / "c"
    writer_child = spawn(child_numbered_writer, path, 256, 0, "close")
    writer_child.expect_line("pushed")
    with RingReader.open(path) as reader_handle:
        assert reader_handle.writer_alive
        writer_child.send("go")
        writer_child.finish()
        assert not reader_handle.writer_alive


# ---- streaming ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "count"),
    [(256, 20_000), (4096, 20_000)],
)
@pytest.mark.parametrize("use_pop_into", [False, True], ids=["pop", "pop_into"])
def test_child_writer_streams_every_message_intact_through_a_small_ring(
    ring_path: Path, spawn: Spawn, capacity: int, count: int, use_pop_into: bool
) -> None:
    typical = capacity - 8
    writer = spawn(child_stream_writer, ring_path, capacity, count, typical)
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
        reader = spawn(child_stream_reader, ring_path, count, typical, False)
        produce(writer, count, typical)
    reader.expect_line(f"checked {count}", timeout=TIMEOUT)
    reader.finish(0, timeout=TIMEOUT)


@pytest.mark.slow
def test_child_writer_streams_100k_messages_through_a_1_mib_ring(
    ring_path: Path, spawn: Spawn
) -> None:
    capacity, count, typical = 1 << 20, 100_000, 1024
    writer = spawn(child_stream_writer, ring_path, capacity, count, typical)
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
        reader = spawn(child_stream_reader, ring_path, count, typical, True)
        produce(writer, count, typical)
    reader.expect_line(f"checked {count}", timeout=TIMEOUT)
    reader.finish(0, timeout=TIMEOUT)


def test_stream_messages_cover_every_size_and_wrap_small_rings_thousands_of_times() -> None:
    for capacity in (256, 4096):
        max_size = capacity - 8
        sizes = [len(push_stream_message(seq, max_size, max_size)) for seq in range(20_000)]
        assert set(sizes) == set(range(max_size + 1))
        assert sum(map(record_size, sizes)) // capacity > 5_000
    max_size = (1 << 20) - 8
    sizes = [len(push_stream_message(seq, max_size, 1024)) for seq in range(100_000)]
    assert sizes.count(max_size) == 100
    assert {0, 1, 8, 1023, 1024} <= set(sizes)
    assert sum(map(record_size, sizes)) // (1 << 20) > 100


@pytest.mark.parametrize("writer_api", ["push_many", "reserve"])
@pytest.mark.parametrize("reader_api", ["pop_many", "pop_view"])
def test_child_writer_streams_every_message_intact_through_a_small_ring_in_batches_and_slots(
    ring_path: Path, spawn: Spawn, writer_api: str, reader_api: str
) -> None:
    child = spawn(child_batch_writer, ring_path, STREAM_CAPACITY, STREAM_COUNT, writer_api)
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
        child = spawn(child_batch_reader, ring_path, STREAM_COUNT, reader_api)
        child.expect_line("attached", timeout=TIMEOUT)
        max_size = writer.max_message_size
        messages = (batch_stream_message(seq, max_size) for seq in range(STREAM_COUNT))
        assert writer.push_many(messages, timeout=60) == STREAM_COUNT
    child.expect_line(f"checked {STREAM_COUNT}", timeout=TIMEOUT)
    child.finish(0, timeout=TIMEOUT)


def test_stream_messages_cover_short_empty_and_max_sizes() -> None:
    max_size = STREAM_CAPACITY - RECORD_HEADER
    sizes = [len(batch_stream_message(seq, max_size)) for seq in range(STREAM_COUNT)]
    assert {0, 1, 7, 8, 9, max_size} <= set(sizes)
    assert sum(map(record_size, sizes)) // STREAM_CAPACITY > 100
