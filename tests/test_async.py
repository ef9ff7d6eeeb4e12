"""fileno(), selectors and asyncio: waiting on a ring next to sockets (FORMAT.md, "Waiting on a
file descriptor").

The functions named `child_*` run in a child process started by the `spawn` fixture (see
conftest.py); they get their arguments as strings and return the child's exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing.connection
import os
import random
import select
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
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


# ---- the FIFOs: made by create, validated by every handle --------------------------------

READER_FIFO_INO_AT = 40
WRITER_FIFO_INO_AT = 48


def fifo_inodes(path: Path) -> tuple[int, int]:
    """`reader_fifo_ino` and `writer_fifo_ino` as the header holds them."""
    data = path.read_bytes()[:64]
    return (
        struct.unpack_from("<Q", data, READER_FIFO_INO_AT)[0],
        struct.unpack_from("<Q", data, WRITER_FIFO_INO_AT)[0],
    )


def test_create_makes_both_fifos_with_the_ring_mode_and_unlink_removes_all_three(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 1024, mode=0o640):
        for suffix in (".rd", ".wr"):
            st = os.lstat(f"{ring_path}{suffix}")
            assert stat.S_ISFIFO(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o640
        assert fifo_inodes(ring_path) == (
            os.lstat(f"{ring_path}.rd").st_ino,
            os.lstat(f"{ring_path}.wr").st_ino,
        )
    ipc_ring.unlink(ring_path)
    assert os.listdir(ring_path.parent) == []
    with pytest.raises(FileNotFoundError):
        ipc_ring.unlink(ring_path)


def test_create_replaces_a_stale_fifo_with_one_of_its_own(ring_path: Path) -> None:
    os.mkfifo(f"{ring_path}.rd", 0o666)
    stale = os.lstat(f"{ring_path}.rd").st_ino
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:
        st = os.lstat(f"{ring_path}.rd")
        assert st.st_ino != stale and stat.S_IMODE(st.st_mode) == 0o600
        fd = reader.fileno()
        assert reader.try_pop() is None
        writer.push(b"m")
        assert readable(fd, TIMEOUT)


def test_create_refuses_a_file_that_is_not_a_fifo_in_a_fifo_name_and_leaves_it_alone(
    ring_path: Path,
) -> None:
    Path(f"{ring_path}.wr").write_bytes(b"someone's data")
    with pytest.raises(FileExistsError, match=rf"'{ring_path}\.wr' exists and is not a FIFO"):
        RingWriter.create(ring_path, 1024)
    assert Path(f"{ring_path}.wr").read_bytes() == b"someone's data"
    assert sorted(os.listdir(ring_path.parent)) == ["ring.wr"]


def break_fifo(path: Path, how: str) -> None:
    """Makes `path`'s reader FIFO unusable in the way `how` names."""
    rd = f"{path}.rd"
    if how == "missing":
        os.unlink(rd)
    elif how == "replaced":
        os.unlink(rd)
        os.mkfifo(rd, 0o600)
    elif how == "not a FIFO":
        os.unlink(rd)
        Path(rd).write_bytes(b"")
        os.chmod(rd, 0o600)
    elif how == "wider mode":
        os.chmod(rd, 0o666)
    elif how == "another user":
        os.chown(rd, 65534, 65534)
    else:
        raise AssertionError(how)


FIFO_DAMAGE = {
    "missing": "a FIFO is missing",
    "replaced": "not the one its creator made",
    "not a FIFO": "taken by something that is not a FIFO",
    "wider mode": "mode is wider than the ring file's",
    "another user": "owned by another user",
}


@pytest.mark.parametrize("how", FIFO_DAMAGE)
def test_a_handle_refuses_fifos_its_creator_did_not_make_and_still_works_blocking(
    ring_path: Path, how: str
) -> None:
    if how == "another user" and os.geteuid() != 0:
        pytest.skip("making a file another user's needs root")
    with RingWriter.create(ring_path, 1024) as writer:
        break_fifo(ring_path, how)
        with RingReader.open(ring_path) as reader:
            writer.push(b"still works")
            assert reader.pop(timeout=TIMEOUT) == b"still works"
            with pytest.raises(RingError, match=FIFO_DAMAGE[how]) as raised:
                reader.fileno()
            assert str(ring_path) in str(raised.value)
            with pytest.raises(RingError, match=FIFO_DAMAGE[how]):
                run(reader.pop_async(timeout=1))
        # The writer created its FIFOs itself: it keeps them whatever happens to the names.
        assert writer.fileno() >= 0


def test_a_writer_opened_later_refuses_a_replaced_fifo_too(ring_path: Path) -> None:
    RingWriter.create(ring_path, 1024).detach()
    break_fifo(ring_path, "replaced")
    with RingWriter.open(ring_path) as writer, RingReader.open(ring_path) as reader:
        writer.push(b"m")
        assert reader.pop(timeout=TIMEOUT) == b"m"
        with pytest.raises(RingError, match="not the one its creator made"):
            writer.fileno()


# ---- fileno(): the contract of README "Event loops", with each of the four waiters ----------


def wait_select(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def wait_selectors(fd: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(timeout))


def wait_epoll(fd: int, timeout: float) -> bool:
    with select.epoll() as ep:
        ep.register(fd, select.EPOLLIN)
        return bool(ep.poll(timeout))


def wait_connection(fd: int, timeout: float) -> bool:
    return bool(multiprocessing.connection.wait([fd], timeout))


WAITERS: dict[str, Callable[[int, float], bool]] = {
    "select": wait_select,
    "selectors": wait_selectors,
    "epoll": wait_epoll,
    "connection.wait": wait_connection,
}


def reader_try_pop(reader: RingReader) -> None:
    assert reader.try_pop() is None


def reader_pop_many(reader: RingReader) -> None:
    assert reader.pop_many(8, timeout=0) == []


def reader_pop_times_out(reader: RingReader) -> None:
    with pytest.raises(RingTimeout):
        reader.pop(timeout=0.01)


READER_IDLE = {"try_pop": reader_try_pop, "pop_many": reader_pop_many, "pop": reader_pop_times_out}


def writer_try_push(writer: RingWriter) -> None:
    assert writer.try_push(b"y" * 8) is False


def writer_push_times_out(writer: RingWriter) -> None:
    with pytest.raises(RingTimeout):
        writer.push(b"y" * 8, timeout=0.01)


WRITER_IDLE = {"try_push": writer_try_push, "push": writer_push_times_out}


@pytest.mark.parametrize("idle", READER_IDLE)
@pytest.mark.parametrize("waiter", WAITERS)
def test_a_drained_reader_waiting_on_fileno_is_woken_by_the_next_message(
    ring_path: Path, waiter: str, idle: str
) -> None:
    wait = WAITERS[waiter]
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:
        fd = reader.fileno()
        writer.push(b"first")
        assert reader.pop(timeout=TIMEOUT) == b"first"
        READER_IDLE[idle](reader)
        assert not wait(fd, 0.02), "nothing was published: fileno() must stay quiet"
        timer = threading.Timer(0.05, writer.push, (b"next",))
        timer.start()
        try:
            assert wait(fd, TIMEOUT), "the publication did not make fileno() readable"
        finally:
            timer.join(TIMEOUT)
        assert reader.try_pop() == b"next"


@pytest.mark.parametrize("idle", READER_IDLE)
@pytest.mark.parametrize("waiter", WAITERS)
def test_a_reader_that_waits_on_fileno_with_a_message_there_returns_at_once(
    ring_path: Path, waiter: str, idle: str
) -> None:
    wait = WAITERS[waiter]
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:
        fd = reader.fileno()
        READER_IDLE[idle](reader)
        writer.push(b"there already")
        assert wait(fd, 0)
        assert reader.try_pop() == b"there already"


@pytest.mark.parametrize("waiter", WAITERS)
def test_fileno_called_after_a_message_arrived_is_readable_at_once(
    ring_path: Path, waiter: str
) -> None:
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:
        writer.push(b"m")
        assert WAITERS[waiter](reader.fileno(), 0)


@pytest.mark.parametrize("idle", WRITER_IDLE)
@pytest.mark.parametrize("waiter", WAITERS)
def test_a_writer_on_a_full_ring_waiting_on_fileno_is_woken_when_room_frees(
    ring_path: Path, waiter: str, idle: str
) -> None:
    wait = WAITERS[waiter]
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        fd = writer.fileno()
        while writer.try_push(b"x" * 8):
            pass
        WRITER_IDLE[idle](writer)
        assert not wait(fd, 0.02), "no room was freed: fileno() must stay quiet"
        timer = threading.Timer(0.05, reader.pop)
        timer.start()
        try:
            assert wait(fd, TIMEOUT), "the freed room did not make fileno() readable"
        finally:
            timer.join(TIMEOUT)
        assert writer.try_push(b"y" * 8)


@pytest.mark.parametrize("waiter", WAITERS)
def test_a_writer_that_waits_on_fileno_with_room_there_returns_at_once(
    ring_path: Path, waiter: str
) -> None:
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        fd = writer.fileno()
        while writer.try_push(b"x" * 8):
            pass
        writer_try_push(writer)
        assert reader.pop(timeout=TIMEOUT) == b"x" * 8
        assert WAITERS[waiter](fd, 0)
        assert writer.try_push(b"y" * 8)


@pytest.mark.parametrize("waiter", WAITERS)
def test_a_reader_waiting_on_fileno_is_woken_by_a_writer_in_another_process(
    ring_path: Path, spawn: Spawn, waiter: str
) -> None:
    child = spawn("child_push_on_command", ring_path)
    child.expect_line("ready")
    with RingReader.open(ring_path) as reader:
        fd = reader.fileno()
        for round_ in range(3):
            reader_try_pop(reader)
            child.send("push")
            assert WAITERS[waiter](fd, TIMEOUT), f"round {round_}: not woken"
            assert reader.try_pop() == numbered(round_)
        reader_try_pop(reader)  # drained again: the byte of the last wake-up is gone
        child.send("close")
        assert WAITERS[waiter](fd, TIMEOUT)
        with pytest.raises(RingClosed):
            reader.try_pop()
    child.finish()


def child_push_on_command(path: str) -> int:
    """Creates a ring and pushes numbered(i) for each "push" on stdin; closes at "close"."""
    with RingWriter.create(path, 1024) as writer:
        print("ready", flush=True)
        for seq in itertools.count():
            command = sys.stdin.readline().strip()
            if command != "push":
                return 0 if command == "close" else 1
            writer.push(numbered(seq), timeout=TIMEOUT)
    return 0


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
        assert [key.data for key, _ in sel.select(timeout=TIMEOUT)] == ["socket"]
        left.recv(1)
        assert reader.try_pop() is None
        writer.push(b"r")
        assert [key.data for key, _ in sel.select(timeout=TIMEOUT)] == ["ring"]
        assert reader.try_pop() == b"r"
        assert reader.try_pop() is None
        assert sel.select(timeout=0.02) == []


def child_push_in_bursts_then(path: str, bursts: str, ending: str) -> int:
    """Creates a ring, pushes `bursts` bursts of 300 numbered messages with pauses between,
    then closes it ("close") or is killed by its own SIGKILL ("die")."""
    with RingWriter.create(path, 4096) as writer:
        print("ready", flush=True)
        seq = 0
        for _ in range(int(bursts)):
            for _ in range(300):
                writer.push(numbered(seq), timeout=TIMEOUT)
                seq += 1
            time.sleep(0.02)
        if ending == "die":
            os.kill(os.getpid(), signal.SIGKILL)
    return 0


@pytest.mark.parametrize("ending", ["close", "die"])
def test_the_readme_selectors_loop_gets_every_message_and_sees_how_the_writer_ended(
    ring_path: Path, spawn: Spawn, ending: str
) -> None:
    """The loop of README "Event loops", next to a socket, against a writer process."""
    child = spawn("child_push_in_bursts_then", ring_path, 10, ending)
    child.expect_line("ready")
    got: list[bytes] = []
    left, right = socket.socketpair()
    with left, right, RingReader.open(ring_path) as reader, selectors.DefaultSelector() as sel:
        sel.register(reader.fileno(), selectors.EVENT_READ)
        sel.register(left, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        with pytest.raises(RingClosed if ending == "close" else PeerDied):
            while time.monotonic() < deadline:
                while batch := reader.pop_many(256, timeout=0):
                    got.extend(batch)
                sel.select(timeout=1.0)
    assert got == [numbered(seq) for seq in range(3000)]
    child.wait()


@pytest.mark.parametrize("ending", ["close", "abort"])
def test_the_writer_leaving_wakes_a_reader_waiting_on_fileno(ring_path: Path, ending: str) -> None:
    writer = RingWriter.create(ring_path, 1024)
    with RingReader.open(ring_path) as reader:
        fd = reader.fileno()
        reader_try_pop(reader)
        getattr(writer, ending)()
        assert readable(fd, TIMEOUT)
        with pytest.raises(RingClosed if ending == "close" else PeerDied):
            reader.pop_many(8, timeout=0)


def test_a_successor_attaching_wakes_a_reader_waiting_on_fileno(ring_path: Path) -> None:
    writer = RingWriter.create(ring_path, 1024)
    with RingReader.open(ring_path) as reader:
        fd = reader.fileno()
        writer.detach()  # a hand-over: a change, then nothing to read until a successor
        for _ in range(5):
            assert reader.pop_many(8, timeout=0) == []
            if not readable(fd, 0.2):
                break
        else:
            pytest.fail("fileno() stays readable while the writer's role is vacant")
        with RingWriter.open(ring_path) as successor:
            assert readable(fd, TIMEOUT), "the successor's attach did not wake the reader"
            successor.push(b"m", timeout=5)
            assert reader.pop(timeout=5) == b"m"


def test_the_reader_leaving_wakes_a_writer_waiting_on_fileno(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        reader = RingReader.open(ring_path)
        fd = writer.fileno()
        while writer.try_push(b"x" * 8):
            pass
        reader.close()
        assert readable(fd, TIMEOUT)
        with pytest.raises(PeerDied):
            writer.push(b"y" * 8, timeout=0)


# ---- what fileno() costs: nothing unless called, and never per message -------------------


def waiting_flags(path: Path) -> tuple[int, int]:
    """`reader_waiting` (offset 384) and `writer_waiting` (offset 512), read from the file."""
    data = path.read_bytes()[:4096]
    return struct.unpack_from("<I", data, 384)[0], struct.unpack_from("<I", data, 512)[0]


def test_idle_calls_of_an_unwatched_handle_leave_the_flags_down_and_the_fifo_empty(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        rd = os.open(f"{ring_path}.rd", os.O_RDONLY | os.O_NONBLOCK)
        try:
            reader_try_pop(reader)
            reader_pop_many(reader)
            while writer.try_push(b"x" * 8):
                pass
            writer_try_push(writer)
            assert waiting_flags(ring_path) == (0, 0)
            with pytest.raises(BlockingIOError):
                os.read(rd, 1)
        finally:
            os.close(rd)


def test_a_watched_idle_handle_raises_its_flag_to_2_and_the_publisher_clears_it(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        reader.fileno()
        reader_try_pop(reader)
        assert waiting_flags(ring_path) == (2, 0)
        writer.push(b"m")
        assert waiting_flags(ring_path) == (0, 0)
        assert reader.try_pop() == b"m"
        writer.fileno()
        while writer.try_push(b"x" * 8):
            pass
        assert waiting_flags(ring_path) == (0, 2)
        reader.pop(timeout=TIMEOUT)
        assert waiting_flags(ring_path) == (0, 0)


def child_stream_between_markers(path: str, count: str, watched: str, kind: str = "plain") -> int:
    """Pushes and takes `count` messages in turn on one ring (push/pop and try_push/try_pop,
    or reserve/pop_view slots, or push/peek_many/consume), between two marker system calls
    (the strings "ipc_ring-start" / "ipc_ring-end" passed to os.stat) that the test finds
    in the strace output. If `watched` is "1", fileno() of both handles is called first, and
    both are armed again (the writer's fileno(), the reader's try_pop() on the empty ring)
    just before the first marker: the size check that arming sets up is paid once, not per
    message, whichever call takes the messages."""
    with RingWriter.create(path, 4096) as writer, RingReader.open(path) as reader:
        if watched == "1":
            writer.fileno()
            reader.fileno()
        payload = b"p" * 64
        writer.push(payload)
        reader.pop()
        if watched == "1":
            writer.fileno()
            assert reader.try_pop() is None
        with contextlib.suppress(OSError):
            os.stat("ipc_ring-start")
        for _ in range(int(count)):
            if kind == "zero-copy":
                with writer.reserve(64) as view:
                    view[:] = payload
                with reader.pop_view():
                    pass
            elif kind == "peek":
                writer.push(payload)
                reader.peek_many(1)
                reader.consume(1)
            else:
                writer.push(payload)
                reader.pop()
                writer.try_push(payload)
                reader.try_pop()
        with contextlib.suppress(OSError):
            os.stat("ipc_ring-end")
    return 0


def traced_between_markers(tmp_path: Path, child: str, *args: object) -> list[str]:
    """Runs test_async.<child>(*args) under `strace -f` and returns the system calls it made
    between its two markers (os.stat of "ipc_ring-start" / "ipc_ring-end"), one line each,
    without strace's "resumed" halves."""
    trace = tmp_path / "trace"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_async; "
        f"sys.exit(test_async.{child}(*sys.argv[2:]))"
    )
    tests = str(Path(__file__).resolve().parent)
    argv = [sys.executable, "-c", script, tests, *map(str, args)]
    done = subprocess.run(
        ["strace", "-f", "-o", str(trace), *argv], timeout=60, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "ipc_ring-start" in line)
    end = next(i for i, line in enumerate(lines) if "ipc_ring-end" in line)
    return [line for line in lines[start + 1 : end] if "resumed>" not in line]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("kind", ["plain", "zero-copy", "peek"])
@pytest.mark.parametrize("watched", ["0", "1"])
def test_push_and_pop_make_no_system_call_per_message_watched_or_not(
    ring_path: Path, tmp_path: Path, watched: str, kind: str
) -> None:
    count = 5000
    between = traced_between_markers(
        tmp_path, "child_stream_between_markers", ring_path, count, watched, kind
    )
    assert len(between) < 20, f"{len(between)} system calls for {count} rounds:\n" + (
        "\n".join(between[:40])
    )


def child_wake_an_armed_reader_between_markers(path: str) -> int:
    """Arms the reader's fileno() (try_pop() on an empty ring), then pushes one message
    between the two markers of child_stream_between_markers."""
    with RingWriter.create(path, 4096) as writer, RingReader.open(path) as reader:
        reader.fileno()
        assert reader.try_pop() is None  # reader_waiting = 2
        with contextlib.suppress(OSError):
            os.stat("ipc_ring-start")
        writer.push(b"wake")
        with contextlib.suppress(OSError):
            os.stat("ipc_ring-end")
        assert reader.try_pop() == b"wake"
    return 0


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_waking_a_reader_armed_on_fileno_costs_the_publisher_one_fifo_write_and_no_futex(
    ring_path: Path, tmp_path: Path
) -> None:
    """FORMAT.md "The publishing side": one system call per wake-up, the one the flag asks
    for; a side waiting on its FIFO has no futex sleeper behind it."""
    between = traced_between_markers(
        tmp_path, "child_wake_an_armed_reader_between_markers", ring_path
    )
    calls = [line.split(None, 1)[-1].split("(", 1)[0] for line in between]  # "PID call(...)"
    assert calls == ["write"], "\n".join(between)


# ---- the FIFO drain is bounded ------------------------------------------------------------


def child_flood_fifo(fifo: str) -> int:
    """Writes bytes into `fifo` as fast as it can until killed."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    chunk = b"f" * (1 << 20)  # each write fills whatever room the FIFO has
    print("flooding", flush=True)
    while True:
        with contextlib.suppress(BlockingIOError):
            os.write(fd, chunk)


def test_a_process_flooding_the_fifo_cannot_hold_a_watched_reader(
    ring_path: Path, spawn: Spawn
) -> None:
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:
        reader.fileno()
        child = spawn(child_flood_fifo, f"{ring_path}.rd")
        child.expect_line("flooding")
        longest = 0.0
        for seq in range(200):
            start = time.monotonic()
            assert reader.try_pop() is None
            longest = max(longest, time.monotonic() - start)
            writer.push(numbered(seq))
            assert reader.try_pop() == numbered(seq)
        child.kill()
    assert longest < 0.25, f"one try_pop took {longest:.3f} s draining the flooded FIFO"


def test_a_process_flooding_the_fifo_cannot_hold_an_event_loop_waiting_in_pop_async(
    ring_path: Path, spawn: Spawn
) -> None:
    with RingWriter.create(ring_path, 1024), RingReader.open(ring_path) as reader:
        child = spawn(child_flood_fifo, f"{ring_path}.rd")
        child.expect_line("flooding")

        async def main() -> float:
            longest = 0.0
            stop = False

            async def ticker() -> None:
                nonlocal longest
                last = time.monotonic()
                while not stop:
                    await asyncio.sleep(0.005)
                    now = time.monotonic()
                    longest = max(longest, now - last)
                    last = now

            task = asyncio.create_task(ticker())
            with pytest.raises(RingTimeout):
                await reader.pop_async(timeout=1.0)
            stop = True
            await task
            return longest

        longest = run(main())
        child.kill()
    assert longest < 0.25, f"the event loop was held for {longest:.3f} s"


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


def test_pop_async_returns_zero_length_messages_there_or_awaited_then_sees_the_end(
    ring_path: Path,
) -> None:
    """pop_async takes a message with try_pop first, whose None means "empty": b"" is a
    message, not an empty ring, whether it was there already or woke the await."""
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:

        async def main() -> list[bytes]:
            writer.push(b"")
            got = [await reader.pop_async(timeout=TIMEOUT)]  # there already
            loop = asyncio.get_running_loop()
            loop.call_later(0.02, writer.push, b"")
            got.append(await reader.pop_async(timeout=TIMEOUT))  # woke the await
            loop.call_later(0.02, writer.close)
            with pytest.raises(RingClosed):
                await reader.pop_async(timeout=TIMEOUT)
            return got

        assert run(main()) == [b"", b""]


def test_pop_async_of_a_subclass_goes_through_its_own_pop(ring_path: Path) -> None:
    """pop_async takes a message with the C try_pop only where pop is the C one: a subclass
    that overrides pop gets its own pop's result, there already or awaited."""

    class Decoding(RingReader):
        def pop(self, timeout: float | None = None) -> Any:
            return super().pop(timeout).decode()

    with RingWriter.create(ring_path, 1024) as writer, Decoding.open(ring_path) as reader:

        async def main() -> list[str]:
            writer.push(b"there")
            got = [await reader.pop_async(timeout=TIMEOUT)]
            asyncio.get_running_loop().call_later(0.02, writer.push, b"awaited")
            got.append(await reader.pop_async(timeout=TIMEOUT))
            return got

        assert run(main()) == ["there", "awaited"]


def child_pop_async_across_a_truncation(path: str, size: str) -> int:
    """Awaits pop_async on an empty ring while the file is truncated to `size` bytes
    during the await; prints the outcome."""
    with RingWriter.create(path, 65536), RingReader.open(path) as reader:

        async def main() -> str:
            asyncio.get_running_loop().call_later(0.05, os.truncate, path, int(size))
            try:
                await reader.pop_async(timeout=5)
            except Exception as e:
                return type(e).__name__
            return "message"

        print("outcome", asyncio.run(main()), flush=True)
    return 0


@pytest.mark.parametrize("size", [0, 4096])
def test_pop_async_across_a_truncation_raises_invalid_ring(
    spawn: Spawn, ring_path: Path, size: int
) -> None:
    """FORMAT.md "Truncation": an await is a wait, and the size is checked after it before
    the mapping is touched again (before, the try after the liveness tick read the header
    of a file truncated to 0: SIGBUS)."""
    child = spawn(child_pop_async_across_a_truncation, ring_path, size)
    returncode = child.wait(timeout=20)
    assert returncode == 0, f"died with {returncode} (-7 is SIGBUS): {child.output}"
    assert child.output[-1:] == ["outcome InvalidRing"], child.output


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


# ---- the event loop's watch of a handle (ipc_ring/_async.py, _Watch) ----------------------


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


@needs_proc
@pytest.mark.parametrize("ending", ["close", "detach", "collected"])
def test_a_handle_that_awaited_leaves_no_descriptor_in_the_loop_once_closed_or_collected(
    ring_path: Path, ending: str
) -> None:
    import gc

    writer = RingWriter.create(ring_path, 1024)
    held = [RingReader.open(ring_path)]  # the only reference, so that it can be collected
    held[0].fileno()  # the handle's own FIFO descriptor is not the watch's

    async def main() -> tuple[set[int], set[int]]:
        before = _open_fds()  # the loop's own are open by now
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, writer.push, b"one")
        assert await held[0].pop_async(timeout=TIMEOUT) == b"one"
        watching = _open_fds() - before  # the watch stays registered between awaits
        if ending == "close":
            held[0].close()
        elif ending == "detach":
            held[0].detach()
        else:
            with pytest.warns(ResourceWarning):
                held.clear()
                gc.collect()
        await asyncio.sleep(0)
        return watching, _open_fds() - before

    try:
        watching, left = run(main())
    finally:
        writer.close()
    assert watching, "a waiting pop_async keeps a descriptor of its own in the loop"
    assert not left


@needs_proc
def test_a_handle_awaited_from_two_event_loops_in_turn_works_and_leaks_nothing(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:
        reader.fileno()
        before = _open_fds()

        async def one(message: bytes) -> bytes:
            asyncio.get_running_loop().call_later(0.02, writer.push, message)
            return await reader.pop_async(timeout=TIMEOUT)

        assert run(one(b"first")) == b"first"
        # The watch (a FIFO and a timer descriptor) outlives its closed loop until the
        # handle is used again or closed: the next loop's replaces it, not adds to it.
        assert len(_open_fds() - before) == 2
        assert run(one(b"second")) == b"second"
        assert len(_open_fds() - before) == 2
    assert not _open_fds() - before


def test_closing_from_another_thread_ends_a_waiting_pop_async_at_once(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 1024):
        reader = RingReader.open(ring_path)

        async def main() -> float:
            closer = threading.Timer(0.1, reader.close)
            closer.start()
            start = time.monotonic()
            with pytest.raises(RingClosed):
                await reader.pop_async(timeout=TIMEOUT)
            closer.join()
            return time.monotonic() - start

        # Woken by the close (the watch wakes its waiters), not by a liveness slice of 50 ms
        # after it; generous bound.
        assert run(main()) < 0.1 + 0.045


def test_pop_async_timeouts_are_honoured_within_50_ms(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 1024), RingReader.open(ring_path) as reader:
        for timeout in (0.01, 0.08, 0.13):
            start = time.monotonic()
            with pytest.raises(RingTimeout):
                run(reader.pop_async(timeout=timeout))
            assert timeout <= time.monotonic() - start + 0.002 < timeout + 0.05


def test_a_waiting_pop_async_wakes_once_per_message_not_per_loop_turn(ring_path: Path) -> None:
    """A wake-up byte that nobody awaits is taken by the watch: an idle loop with the
    handle registered does not spin (it would, level-triggered, if the byte stayed)."""
    with RingWriter.create(ring_path, 1024) as writer, RingReader.open(ring_path) as reader:

        async def main() -> float:
            loop = asyncio.get_running_loop()
            loop.call_later(0.02, writer.push, b"x")
            assert await reader.pop_async(timeout=TIMEOUT) == b"x"
            writer.push(b"y")  # a publication while nothing awaits: the flag was armed
            writer.push(b"z")
            cpu = time.process_time()
            await asyncio.sleep(0.3)
            used = time.process_time() - cpu
            assert [reader.try_pop(), reader.try_pop()] == [b"y", b"z"]
            return used

        assert run(main()) < 0.15


def test_close_from_a_signal_handler_ends_a_waiting_pop_async_at_once(ring_path: Path) -> None:
    """The handler runs while the loop sleeps in its selector: the loop must be woken to
    drop the watch and let the await see the close (not left asleep with nothing to wake
    it)."""
    with RingWriter.create(ring_path, 1024):
        reader = RingReader.open(ring_path)

        async def main() -> float:
            previous = signal.signal(signal.SIGALRM, lambda *_: reader.close())
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.1)
                start = time.monotonic()
                with pytest.raises(RingClosed):
                    await reader.pop_async(timeout=3)
                return time.monotonic() - start
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

        assert run(main()) < 0.1 + 0.045


def test_a_watch_left_in_a_running_loop_does_not_take_fileno_wake_ups(ring_path: Path) -> None:
    """After a pop_async in a loop that keeps running in another thread, the handle is used
    through fileno() and select: each wake-up byte is the select's, not the idle loop's."""
    with RingWriter.create(ring_path, 1 << 16) as writer, RingReader.open(ring_path) as reader:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:

            async def once() -> None:
                with contextlib.suppress(RingTimeout):
                    await reader.pop_async(timeout=0.01)

            asyncio.run_coroutine_threadsafe(once(), loop).result(TIMEOUT)
            fd = reader.fileno()
            missed = 0
            for i in range(10):
                assert reader.try_pop() is None  # arms fileno()
                writer.push(numbered(i))
                time.sleep(0.01)  # the idle loop sees the byte first, if it looks
                if not readable(fd, 0.5):
                    missed += 1
                assert reader.try_pop() == numbered(i)
            assert missed == 0
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(TIMEOUT)
            loop.close()
