"""fileno(), selectors and asyncio: waiting on a ring next to sockets (FORMAT.md, "Waiting on a
file descriptor").

The functions named `child_*` run in a child process started by the `spawn` fixture (see
conftest.py); they get their arguments as strings and return the child's exit status.
"""

from __future__ import annotations

import asyncio
import multiprocessing.connection
import os
import random
import select
import selectors
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

import ipc_ring
from ipc_ring import PeerDied, RingClosed, RingError, RingReader, RingTimeout, RingWriter, _async

if TYPE_CHECKING:
    from conftest import Child

Spawn = Callable[..., "Child"]
T = TypeVar("T")

TIMEOUT = 10.0
EXPECTED_EXIT = 42


def run(coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
    """Runs `coro` in a fresh event loop, bounded by `timeout`."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def numbered(seq: int) -> bytes:
    return seq.to_bytes(8, "little") * (1 + seq % 5)


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


# ---- children ---------------------------------------------------------------------------


def child_create_and_push(path: str, count: str, pause: str, pause_odds: str) -> int:
    """Creates the ring, pushes `count` numbered messages, pausing before a message (with
    probability `pause_odds`) for up to `pause` seconds, then closes it (end of stream)."""
    rng = random.Random(7)
    with RingWriter.create(path, 1024) as writer:
        print("ready", flush=True)
        for seq in range(int(count)):
            if rng.random() < float(pause_odds):
                time.sleep(rng.uniform(0, float(pause)))
            writer.push(numbered(seq), timeout=TIMEOUT)
    return 0


def child_push_then_hang(path: str, count: str) -> int:
    """Creates the ring, pushes `count` messages and sleeps until it is killed."""
    writer = RingWriter.create(path, 1024)
    for seq in range(int(count)):
        writer.push(numbered(seq), timeout=TIMEOUT)
    print("ready", flush=True)
    time.sleep(60)
    return 1


def child_read(path: str, count: str) -> int:
    """Opens the ring and reads `count` numbered messages slowly at first, then the end."""
    with RingReader.open(path) as reader:
        print("attached", flush=True)
        time.sleep(0.2)  # let the writer fill the ring and wait on its FIFO
        for seq in range(int(count)):
            if reader.pop(timeout=TIMEOUT) != numbered(seq):
                return 1
        try:
            reader.pop(timeout=TIMEOUT)
        except RingClosed:
            return EXPECTED_EXIT
    return 2


# ---- files and fileno() -----------------------------------------------------------------


def test_create_makes_both_fifos_with_the_ring_mode_and_unlink_removes_all_three(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 1024, mode=0o640):
        for suffix in (".rd", ".wr"):
            st = os.lstat(f"{ring_path}{suffix}")
            assert stat.S_ISFIFO(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o640
    ipc_ring.unlink(ring_path)
    assert os.listdir(ring_path.parent) == []
    with pytest.raises(FileNotFoundError):
        ipc_ring.unlink(ring_path)


def test_create_reuses_a_stale_fifo_and_refuses_a_non_fifo_in_its_place(
    ring_path: Path,
) -> None:
    os.mkfifo(f"{ring_path}.rd", 0o600)
    with RingWriter.create(ring_path, 1024) as writer:
        assert writer.fileno() >= 0
    ipc_ring.unlink(ring_path)
    other = ring_path.parent / "other"
    Path(f"{other}.wr").write_bytes(b"")
    with pytest.raises(FileExistsError):
        RingWriter.create(other, 1024)
    assert not other.exists()
    assert not Path(f"{other}.rd").exists()


def test_ring_without_fifos_works_but_fileno_raises_a_clear_error(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 1024) as writer:
        os.unlink(f"{ring_path}.rd")
        os.unlink(f"{ring_path}.wr")
        with RingReader.open(ring_path) as reader:
            writer.push(b"still works")
            assert reader.pop(timeout=1) == b"still works"
            with pytest.raises(RingError, match="no notification FIFOs"):
                reader.fileno()
            with pytest.raises(RingError, match="no notification FIFOs"):
                run(reader.pop_async(timeout=1))


def test_fileno_stays_quiet_unless_armed_and_becomes_readable_when_a_message_arrives(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:
        fd = reader.fileno()
        writer.push(b"unarmed")
        assert not readable(fd, 0.05), "a publication to an unarmed reader must not signal"
        assert reader._arm() is False, "a message is there: nothing to wait for"
        assert reader.pop(timeout=1) == b"unarmed"
        assert reader._arm() is True
        assert not readable(fd, 0.05)
        writer.push(b"armed")
        assert readable(fd, 1.0)
        reader._disarm()
        assert not readable(fd, 0), "_disarm drains the FIFO"
        assert reader.pop(timeout=1) == b"armed"


def test_writer_fileno_becomes_readable_when_an_armed_writer_gets_space(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        while writer.try_push(b"x" * 8):
            pass
        assert writer._arm() is True
        assert not readable(writer.fileno(), 0.05)
        assert reader.pop(timeout=1) == b"x" * 8
        assert readable(writer.fileno(), 1.0)
        writer._disarm()
        assert writer.try_push(b"x" * 8)


def test_selectors_wait_on_a_ring_next_to_a_socketpair(ring_path: Path) -> None:
    left, right = socket.socketpair()
    with (
        left,
        right,
        RingWriter.create(ring_path, 1024) as writer,
        RingReader.open(ring_path) as reader,
        selectors.DefaultSelector() as sel,
    ):
        sel.register(reader, selectors.EVENT_READ, "ring")
        sel.register(left, selectors.EVENT_READ, "socket")
        right.send(b"s")
        assert [key.data for key, _ in sel.select(timeout=1)] == ["socket"]
        left.recv(1)
        assert reader._arm()
        writer.push(b"r")
        assert [key.data for key, _ in sel.select(timeout=1)] == ["ring"]
        reader._disarm()
        assert reader.pop(timeout=1) == b"r"
        assert sel.select(timeout=0.05) == []


def test_multiprocessing_connection_wait_accepts_the_fileno_of_a_reader(ring_path: Path) -> None:
    left, right = socket.socketpair()
    with (
        left,
        right,
        RingWriter.create(ring_path, 1024) as writer,
        RingReader.open(ring_path) as reader,
    ):
        fd = reader.fileno()
        assert reader._arm()
        assert multiprocessing.connection.wait([fd, left], timeout=0.05) == []
        writer.push(b"m")
        assert multiprocessing.connection.wait([fd, left], timeout=1) == [fd]
        reader._disarm()
        assert reader.pop(timeout=1) == b"m"


def test_writer_close_wakes_a_reader_armed_on_its_fifo(ring_path: Path) -> None:
    writer = RingWriter.create(ring_path, 1024)
    with RingReader.open(ring_path) as reader:
        assert reader._arm()
        writer.close()
        assert readable(reader.fileno(), 1.0)
        reader._disarm()
        with pytest.raises(RingClosed):
            reader.pop(timeout=0)


# ---- asyncio, one process ---------------------------------------------------------------


def test_pop_async_is_woken_through_the_fifo_not_by_the_liveness_poll(
    ring_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_async, "POLL_INTERVAL", 5.0)
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:

        async def main() -> float:
            asyncio.get_running_loop().call_later(0.05, writer.push, b"late")
            start = time.monotonic()
            assert await reader.pop_async(timeout=TIMEOUT) == b"late"
            return time.monotonic() - start

        assert run(main()) < 2.0


def test_push_async_is_woken_through_the_fifo_when_space_is_freed(
    ring_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_async, "POLL_INTERVAL", 5.0)
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        while writer.try_push(b"x" * 8):
            pass

        async def main() -> float:
            asyncio.get_running_loop().call_later(0.05, reader.pop)
            start = time.monotonic()
            await writer.push_async(b"y" * 8, timeout=TIMEOUT)
            return time.monotonic() - start

        assert run(main()) < 2.0


def test_async_for_ends_at_end_of_stream_after_every_message(
    ring_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_async, "POLL_INTERVAL", 5.0)
    writer = RingWriter.create(ring_path, 1024)
    with RingReader.open(ring_path) as reader:
        writer.push(b"a")
        writer.push(b"b")

        async def main() -> list[bytes]:
            asyncio.get_running_loop().call_later(0.05, writer.close)
            return [msg async for msg in reader]

        assert run(main()) == [b"a", b"b"]


def test_pop_async_and_push_async_time_out_with_ring_timeout(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        start = time.monotonic()
        with pytest.raises(RingTimeout, match=r"pop_async timed out after 0\.2 s"):
            run(reader.pop_async(timeout=0.2))
        assert 0.15 < time.monotonic() - start < 2.0
        while writer.try_push(b"x" * 8):
            pass
        with pytest.raises(RingTimeout, match="push_async timed out"):
            run(writer.push_async(b"y" * 8, timeout=0.2))
        with pytest.raises(ValueError, match="timeout"):
            run(reader.pop_async(timeout=-1))


def test_cancelled_pop_async_consumes_nothing_and_a_later_pop_gets_the_message(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:

        async def main() -> None:
            task = asyncio.create_task(reader.pop_async())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            writer.push(b"intact")

        run(main())
        assert reader.pop(timeout=1) == b"intact"
        assert reader.try_pop() is None


# ---- asyncio with a real peer process ---------------------------------------------------


def open_when_created(path: Path, child: Child) -> RingReader:
    child.expect_line("ready")
    return RingReader.open(path)


def test_async_reader_gets_every_message_of_a_writer_process_then_the_end(
    ring_path: Path, spawn: Spawn
) -> None:
    child = spawn("child_create_and_push", ring_path, 2000, 0.001, 0.3)
    with open_when_created(ring_path, child) as reader:

        async def main() -> list[bytes]:
            return [msg async for msg in reader]

        assert run(main()) == [numbered(seq) for seq in range(2000)]
    child.finish()


def test_async_writer_waits_for_space_freed_by_a_reader_process(
    ring_path: Path, spawn: Spawn
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        child = spawn("child_read", ring_path, 500)
        child.expect_line("attached")

        async def main() -> None:
            for seq in range(500):
                await writer.push_async(numbered(seq), timeout=TIMEOUT)

        run(main())
    child.finish(EXPECTED_EXIT)


def test_random_cancellations_lose_and_duplicate_no_message(ring_path: Path, spawn: Spawn) -> None:
    count = 1000
    child = spawn("child_create_and_push", ring_path, count, 0.005, 0.5)
    rng = random.Random(11)
    with open_when_created(ring_path, child) as reader:

        async def main() -> tuple[list[bytes], int]:
            got: list[bytes] = []
            cancelled = 0
            while True:
                task = asyncio.create_task(reader.pop_async(timeout=TIMEOUT))
                if rng.random() < 0.7:
                    await asyncio.sleep(rng.choice([0, 0.0002, 0.0005, 0.001]))
                    if task.cancel():
                        cancelled += 1
                try:
                    got.append(await task)
                except asyncio.CancelledError:
                    continue
                except RingClosed:
                    return got, cancelled

        got, cancelled = run(main(), timeout=60)
    assert got == [numbered(seq) for seq in range(count)]
    assert cancelled >= 100, f"only {cancelled} cancellations hit a waiting pop_async"
    child.finish()


def test_pop_async_raises_peer_died_when_the_writer_process_is_killed(
    ring_path: Path, spawn: Spawn
) -> None:
    child = spawn("child_push_then_hang", ring_path, 3)
    with open_when_created(ring_path, child) as reader:

        async def main() -> list[bytes]:
            got = [await reader.pop_async(timeout=TIMEOUT) for _ in range(3)]
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, child.send_signal, signal.SIGKILL)
            with pytest.raises(PeerDied):
                await reader.pop_async(timeout=TIMEOUT)
            return got

        assert run(main()) == [numbered(seq) for seq in range(3)]
    assert child.wait() == -signal.SIGKILL


def waiting_flags(path: Path) -> tuple[int, int]:
    """`reader_waiting` (offset 384) and `writer_waiting` (offset 512), read from the file."""
    data = path.read_bytes()[:4096]
    return struct.unpack_from("<I", data, 384)[0], struct.unpack_from("<I", data, 512)[0]


def test_arm_sets_the_waiting_flag_to_2_and_the_publisher_clears_it(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        assert reader._arm()
        assert waiting_flags(ring_path) == (2, 0)
        writer.push(b"m")
        assert waiting_flags(ring_path) == (0, 0)
        reader._disarm()
        while writer.try_push(b"x" * 8):
            pass
        assert writer._arm()
        assert waiting_flags(ring_path) == (0, 2)
        writer._disarm()
        assert waiting_flags(ring_path) == (0, 0)
