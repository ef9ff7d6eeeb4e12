"""Reliability: what each side sees when the other dies, closes, or is duplicated, with
real processes, real files and real signals.

Each attached side holds a kernel lock on its role's byte range of the ring file (FORMAT.md
"Liveness and roles"); a waiting side checks the peer's lock before every sleep slice of at
most 50 ms. These tests pin down the contract built on that: PeerDied, RingBusy,
RingWriter.open, fork safety, and that failures leave no file, descriptor or mapping behind.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

import ipc_ring
from ipc_ring import (
    InvalidRing,
    PeerDied,
    RingBusy,
    RingClosed,
    RingError,
    RingReader,
    RingTimeout,
    RingWriter,
)

if TYPE_CHECKING:
    from conftest import Child

TESTS_DIR = Path(__file__).resolve().parent
HEADER_SIZE = 4096
READER_ATTACHED_OFFSET = 392


def numbered(i: int, size: int = 16) -> bytes:
    """Message i: its number, then filler, `size` bytes in all (at least 8)."""
    return struct.pack("<Q", i) + bytes([i & 0xFF]) * (size - 8)


# ---- fixtures and child processes ---------------------------------------------------------


def wait_for_command() -> str:
    """In a child: the next line on stdin ("" once the test closed it or went away)."""
    return sys.stdin.readline().strip()


# ---- functions run in child processes ------------------------------------------------------


def child_writer(path: str, capacity: str, count: str, ending: str) -> NoReturn:
    """Creates a ring, pushes messages 0..count-1, prints "pushed", stays attached until
    a command arrives, then ends as `ending` says: "die" (os._exit without close) or
    "close" (close, then os._exit)."""
    writer = RingWriter.create(path, int(capacity))
    for i in range(int(count)):
        writer.push(numbered(i), timeout=10)
    print("pushed", flush=True)
    wait_for_command()
    if ending == "close":
        writer.close()
    os._exit(0)


def child_reader(path: str, count: str, ending: str) -> int:
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


def child_probe_writer_alive(path: str) -> int:
    """Opens the ring as a reader and reports whether it sees a live writer and what a short
    pop does: "probe <writer_alive> <outcome>"."""
    with RingReader.open(path) as reader:
        alive = reader.writer_alive
        try:
            outcome = f"message:{len(reader.pop(timeout=0.3))}"
        except RingError as e:
            outcome = type(e).__name__
        print("probe", alive, outcome, flush=True)
    return 0


def child_reader_blocked_while_truncated(path: str) -> int:
    """Opens the ring in a `with` block, prints "waiting", blocks in pop; prints what ended
    the wait, then leaves the block (which closes the reader)."""
    with RingReader.open(path) as reader:
        print("waiting", flush=True)
        try:
            reader.pop(timeout=5)
            print("outcome message", flush=True)
        except Exception as e:
            print("outcome", type(e).__name__, flush=True)
    print("closed", flush=True)
    return 0


def child_writer_blocked_while_truncated(path: str) -> int:
    """Creates a ring in a `with` block, fills it, prints "waiting", blocks in push; prints
    what ended the wait, then leaves the block (which closes the writer)."""
    with RingWriter.create(path, 256) as writer:
        while writer.try_push(b"x" * 24):
            pass
        print("waiting", flush=True)
        try:
            writer.push(b"y" * 24, timeout=5)
            print("outcome pushed", flush=True)
        except Exception as e:
            print("outcome", type(e).__name__, flush=True)
    print("closed", flush=True)
    return 0


def child_forks_sleeper_then_dies(path: str, role: str) -> NoReturn:
    """Attaches as `role` ("writer": creates the ring and pushes 3 messages; "reader"),
    forks a grandchild that sleeps for 30 s holding the inherited handle, prints
    "grandchild <pid>", and dies without closing."""
    handle: RingWriter | RingReader
    if role == "writer":
        handle = RingWriter.create(path, 256)
        for i in range(3):
            handle.push(numbered(i))
    else:
        handle = RingReader.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        time.sleep(30)
        os._exit(0)
    print("grandchild", pid, flush=True)
    assert not handle.closed  # attached until the very end: os._exit does not close it
    os._exit(0)


# ---- the reader's view of a dead writer ----------------------------------------------------


def test_reader_drains_every_committed_message_then_raises_peer_died_after_writer_exits(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    writer = spawn("child_writer", ring_path, 4096, 20, "die")
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
        with pytest.raises(PeerDied):
            reader.pop(timeout=0)
        with pytest.raises(PeerDied):
            reader.pop()
        assert reader.try_pop() is None


def test_reader_opened_after_writer_died_still_gets_every_committed_message(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    writer = spawn("child_writer", ring_path, 4096, 5, "die")
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
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    writer = spawn("child_writer", ring_path, 4096, 7, "die")
    writer.expect_line("pushed")
    writer.send("go")
    writer.finish()
    got = []
    with RingReader.open(ring_path) as reader, pytest.raises(PeerDied):
        for message in reader:
            got.append(struct.unpack_from("<Q", message)[0])
    assert got == list(range(7))


def test_reader_blocked_in_pop_raises_peer_died_within_a_second_of_writer_death(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    writer = spawn("child_writer", ring_path, 4096, 3, "die")
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
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    writer = spawn("child_writer", ring_path, 4096, 4, "close")
    writer.expect_line("pushed")
    with RingReader.open(ring_path) as reader:
        writer.send("go")
        writer.finish()
        assert not reader.writer_alive
        assert [struct.unpack_from("<Q", m)[0] for m in reader] == [0, 1, 2, 3]
        with pytest.raises(RingClosed):
            reader.pop(timeout=10)


# ---- the writer's view of a dead (or absent) reader ----------------------------------------


def fill(writer: RingWriter, start: int = 0) -> int:
    """Pushes numbered messages with try_push until the ring is full; returns the next
    number."""
    i = start
    while writer.try_push(numbered(i)):
        i += 1
    return i


def test_writer_raises_peer_died_when_its_reader_process_died_and_ring_fills(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        assert not writer.reader_alive
        for i in range(3):
            writer.push(numbered(i))
        reader = spawn("child_reader", ring_path, 3, "die")
        assert reader.expect_line("popped") == "popped 0 1 2"
        reader.finish()
        assert not writer.reader_alive
        following = fill(writer, 3)
        assert not writer.try_push(numbered(following)), "try_push must not raise"
        started = time.monotonic()
        with pytest.raises(PeerDied):
            writer.push(numbered(following), timeout=10)
        assert time.monotonic() - started < 1.0
        with pytest.raises(PeerDied):
            writer.push(numbered(following), timeout=0)


def test_writer_raises_peer_died_when_its_reader_closed_and_ring_fills(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        RingReader.open(ring_path).close()
        following = fill(writer)
        with pytest.raises(PeerDied):
            writer.push(numbered(following), timeout=10)


def test_writer_times_out_instead_of_peer_died_when_no_reader_ever_attached(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        following = fill(writer)
        started = time.monotonic()
        with pytest.raises(RingTimeout):
            writer.push(numbered(following), timeout=0.3)
        assert time.monotonic() - started >= 0.25
        with pytest.raises(RingTimeout):
            writer.push(numbered(following), timeout=0)
        # A reader that attaches now lets the blocked writer go on.
        reader = spawn("child_reader", ring_path, 0, "drain")
        reader.expect_line("attached")
        writer.push(numbered(following), timeout=10)
        writer.push(numbered(following + 1), timeout=10)
        total = following + 2
    line = reader.expect_line("end")
    assert line == "end RingClosed " + " ".join(map(str, range(total)))
    reader.finish()


def test_writer_continues_after_peer_died_once_a_new_reader_attaches(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        first = spawn("child_reader", ring_path, 2, "die")
        first.expect_line("attached")
        writer.push(numbered(0))
        writer.push(numbered(1))
        first.finish()
        following = fill(writer, 2)
        with pytest.raises(PeerDied):
            writer.push(numbered(following), timeout=5)
        second = spawn("child_reader", ring_path, 0, "drain")
        second.expect_line("attached")
        writer.push(numbered(following), timeout=10)
        assert writer.reader_alive
        total = following + 1
    line = second.expect_line("end")
    assert line == "end RingClosed " + " ".join(map(str, range(2, total)))
    second.finish()


# ---- one writer, one reader ---------------------------------------------------------------


def test_second_reader_and_second_writer_in_one_process_raise_ring_busy(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 256), RingReader.open(ring_path):
        with pytest.raises(RingBusy):
            RingReader.open(ring_path)
        with pytest.raises(RingBusy):
            RingWriter.open(ring_path)
        assert issubclass(RingBusy, RingError)


def test_second_reader_raises_ring_busy_while_another_process_reads(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 256):
        reader = spawn("child_reader", ring_path, 0, "hold")
        reader.expect_line("popped")
        with pytest.raises(RingBusy):
            RingReader.open(ring_path)
        reader.send("go")
        reader.finish()
        RingReader.open(ring_path).close()


def test_second_writer_raises_ring_busy_while_another_process_writes(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    writer = spawn("child_writer", ring_path, 256, 0, "die")
    writer.expect_line("pushed")
    with pytest.raises(RingBusy):
        RingWriter.open(ring_path)
    with pytest.raises(FileExistsError):
        RingWriter.create(ring_path, 256)
    writer.send("go")
    writer.finish()
    RingWriter.open(ring_path).close()


def test_reader_whose_predecessor_died_continues_from_committed_read_position(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 4096) as writer:
        for i in range(10):
            writer.push(numbered(i))
        first = spawn("child_reader", ring_path, 4, "die")
        assert first.expect_line("popped") == "popped 0 1 2 3"
        first.finish()
        with RingReader.open(ring_path) as reader:
            got = [struct.unpack_from("<Q", reader.pop(timeout=5))[0] for _ in range(6)]
            assert got == [4, 5, 6, 7, 8, 9]
            assert reader.try_pop() is None


def test_reopened_writer_continues_the_stream_after_writer_process_died(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    old = spawn("child_writer", ring_path, 4096, 10, "die")
    old.expect_line("pushed")
    old.send("go")
    old.finish()
    with RingReader.open(ring_path) as reader:
        with RingWriter.open(ring_path) as writer:
            assert reader.writer_alive
            for i in range(10, 20):
                writer.push(numbered(i), timeout=5)
        assert [struct.unpack_from("<Q", m)[0] for m in reader] == list(range(20))


def test_reopened_writer_after_death_mid_read_continues_without_gap(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    old = spawn("child_writer", ring_path, 256, 6, "die")
    old.expect_line("pushed")
    with RingReader.open(ring_path) as reader:
        assert struct.unpack_from("<Q", reader.pop(timeout=5))[0] == 0
        old.send("go")
        old.finish()
        with RingWriter.open(ring_path) as writer:
            following = fill(writer, 6)
        got = [struct.unpack_from("<Q", m)[0] for m in reader]
    assert got == list(range(1, following))


def test_reopening_the_writer_of_a_closed_stream_raises_ring_closed(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    RingWriter.create(ring_path, 256).close()
    with pytest.raises(RingClosed):
        RingWriter.open(ring_path)
    other = ring_path.with_name("other")
    writer = spawn("child_writer", other, 256, 2, "close")
    writer.expect_line("pushed")
    writer.send("go")
    writer.finish()
    with pytest.raises(RingClosed):
        RingWriter.open(other)


def test_reader_attached_and_writer_alive_follow_the_peer_process(
    spawn: Callable[..., Child], ring_dir: Path
) -> None:
    path = ring_dir / "a"
    with RingWriter.create(path, 256) as writer:
        assert not writer.reader_alive
        reader = spawn("child_reader", path, 0, "hold")
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
    writer_child = spawn("child_writer", path, 256, 0, "die")
    writer_child.expect_line("pushed")
    with RingReader.open(path) as reader_handle:
        assert reader_handle.writer_alive
        writer_child.send("go")
        writer_child.finish()
        assert not reader_handle.writer_alive

    path = ring_dir / "c"
    writer_child = spawn("child_writer", path, 256, 0, "close")
    writer_child.expect_line("pushed")
    with RingReader.open(path) as reader_handle:
        assert reader_handle.writer_alive
        writer_child.send("go")
        writer_child.finish()
        assert not reader_handle.writer_alive


# ---- fork ---------------------------------------------------------------------------------


def fork_and_report(child: Callable[[], list[str]], timeout: float = 20.0) -> list[str]:
    """Runs `child` in a fork()ed copy of this process; returns the lines it produced. The
    child always leaves through os._exit, never back into pytest."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, 3.12+
        pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(read_end)
            text = "\n".join(child()) + "\n"
            os.write(write_end, text.encode())
        except BaseException as e:
            os.write(write_end, f"child crashed: {e!r}\n".encode())
            status = 99
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"forked child produced no result within {timeout} s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        while time.monotonic() < deadline + 5:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("forked child did not exit")
    lines = b"".join(chunks).decode().splitlines()
    assert os.waitstatus_to_exitcode(status) == 0, lines
    return lines


def outcome(call: Callable[[], object]) -> str:
    try:
        result = call()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return f"returned {result!r}"


def test_forked_child_cannot_use_inherited_handles_and_parent_keeps_working(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 4096) as writer, RingReader.open(ring_path) as reader:
        writer.push(b"before")

        def in_child() -> list[str]:
            calls: dict[str, Callable[[], object]] = {
                "push": lambda: writer.push(b"from child", timeout=0.1),
                "try_push": lambda: writer.try_push(b"from child"),
                "pop": lambda: reader.pop(timeout=0.1),
                "try_pop": reader.try_pop,
                "pop_into": lambda: reader.pop_into(bytearray(64), timeout=0.1),
                "next": lambda: next(reader),
                "reader_alive": lambda: writer.reader_alive,
                "writer_alive": lambda: reader.writer_alive,
            }
            lines = [f"{name} -> {outcome(call)}" for name, call in calls.items()]
            # Closing inherited handles must not end the parent's stream.
            writer.close()
            reader.close()
            return lines

        lines = fork_and_report(in_child)
        assert len(lines) == 8, lines
        for line in lines:
            assert " -> RingError: " in line and "fork" in line, line

        assert reader.pop(timeout=1) == b"before"
        writer.push(b"after")
        assert reader.pop(timeout=1) == b"after"
        assert reader.writer_alive
        assert writer.reader_alive
        with pytest.raises(RingTimeout):
            reader.pop(timeout=0.2)


def test_forked_child_exiting_does_not_make_the_reader_think_the_writer_died(
    spawn: Callable[..., Child], ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 4096) as writer:
        writer.push(b"x")
        assert fork_and_report(lambda: ["exited"]) == ["exited"]
        probe = spawn("child_probe_writer_alive", ring_path)
        assert probe.expect_line("probe") == "probe True message:1"
        probe.finish()
        probe = spawn("child_probe_writer_alive", ring_path)
        assert probe.expect_line("probe") == "probe True RingTimeout"
        probe.finish()


def test_forked_child_exiting_does_not_make_the_writer_think_the_reader_died(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 256) as writer, RingReader.open(ring_path):
        assert fork_and_report(lambda: ["exited"]) == ["exited"]
        assert writer.reader_alive
        following = fill(writer)
        with pytest.raises(RingTimeout):
            writer.push(numbered(following), timeout=0.3)


@contextlib.contextmanager
def forked_idle_child() -> Iterator[int]:
    """A fork()ed copy of this process that touches nothing and waits (at most 20 s) until
    the block ends; yields its pid once the child runs (so its at-fork handlers, which drop
    its copies of the ring descriptors, have run: until then it shares them)."""
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, 3.12+
        pid = os.fork()
    if pid == 0:
        try:
            os.close(write_end)
            os.write(ready_write, b"r")
            select.select([read_end], [], [], 20)
        finally:
            os._exit(0)
    os.close(read_end)
    os.close(ready_write)
    try:
        assert select.select([ready_read], [], [], 10)[0], "forked child did not start"
        os.close(ready_read)
        yield pid
    finally:
        os.close(write_end)
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)


def test_reader_close_releases_the_reader_role_while_a_forked_child_lives(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        reader = RingReader.open(ring_path)
        with forked_idle_child():
            reader.close()
            assert not writer.reader_alive, "closed reader still counts as attached"
            RingReader.open(ring_path).close()  # not RingBusy
            following = fill(writer)
            with pytest.raises(PeerDied):
                writer.push(numbered(following), timeout=5)


@pytest.fixture
def grandchildren() -> Iterator[list[int]]:
    """Pids of orphaned grandchildren to SIGKILL at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_reader_sees_peer_died_when_writer_process_dies_while_its_forked_child_lives(
    spawn: Callable[..., Child], ring_path: Path, grandchildren: list[int]
) -> None:
    middle = spawn("child_forks_sleeper_then_dies", ring_path, "writer")
    grandchildren.append(int(middle.expect_line("grandchild").split()[1]))
    middle.finish()
    os.kill(grandchildren[0], 0)  # the grandchild, which inherited the handle, still lives
    with RingReader.open(ring_path) as reader:
        assert [struct.unpack_from("<Q", reader.pop(timeout=5))[0] for _ in range(3)] == [0, 1, 2]
        assert not reader.writer_alive, "the forked grandchild keeps the dead writer's lock"
        started = time.monotonic()
        with pytest.raises(PeerDied):
            reader.pop(timeout=10)
        assert time.monotonic() - started < 1.0


def test_writer_sees_peer_died_when_reader_process_dies_while_its_forked_child_lives(
    spawn: Callable[..., Child], ring_path: Path, grandchildren: list[int]
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        middle = spawn("child_forks_sleeper_then_dies", ring_path, "reader")
        grandchildren.append(int(middle.expect_line("grandchild").split()[1]))
        middle.finish()
        os.kill(grandchildren[0], 0)
        assert not writer.reader_alive, "the forked grandchild keeps the dead reader's lock"
        following = fill(writer)
        with pytest.raises(PeerDied):
            writer.push(numbered(following), timeout=10)


# ---- creating safely ------------------------------------------------------------------------


def test_create_refuses_a_dangling_symlink_and_creates_nothing_at_its_target(
    ring_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    link = ring_dir / "ring"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        RingWriter.create(link, 256)
    assert not target.exists()
    assert os.listdir(ring_dir) == ["ring"]
    assert link.is_symlink()


def test_create_refuses_a_symlink_to_a_file_and_leaves_the_file_unchanged(
    ring_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    link = ring_dir / "ring"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        RingWriter.create(link, 256)
    assert target.read_bytes() == b"precious"
    assert os.listdir(ring_dir) == ["ring"]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for this test; skipped where mounting is not allowed."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command: cannot make a small file system for ENOSPC")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root/CAP_SYS_ADMIN): {done.stderr}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], timeout=30, check=False)


def test_create_larger_than_free_space_raises_enospc_and_leaves_no_file(
    small_tmpfs: Path,
) -> None:
    with pytest.raises(OSError) as failure:
        RingWriter.create(small_tmpfs / "big", 1 << 21)
    assert failure.value.errno == errno.ENOSPC
    assert os.listdir(small_tmpfs) == []
    # The space came back: a ring that fits can be created there.
    with RingWriter.create(small_tmpfs / "fits", 1 << 19) as writer:
        writer.push(b"x" * 1000)
    assert sorted(os.listdir(small_tmpfs)) == ["fits", "fits.rd", "fits.wr"]


# ---- a file truncated under a waiting side --------------------------------------------------


@pytest.mark.parametrize("size", [HEADER_SIZE, 0])
def test_reader_waiting_in_pop_raises_invalid_ring_when_file_is_truncated(
    spawn: Callable[..., Child], ring_path: Path, size: int
) -> None:
    writer = spawn("child_writer", ring_path, 4096, 0, "die")  # alive: no PeerDied
    writer.expect_line("pushed")
    reader = spawn("child_reader_blocked_while_truncated", ring_path)
    reader.expect_line("waiting")
    time.sleep(0.3)  # the reader is asleep in a wait slice by now
    os.truncate(ring_path, size)
    returncode = reader.wait(timeout=10)
    writer.send("go")
    writer.finish()
    assert returncode == 0, f"reader died with {returncode} (-7 is SIGBUS): {reader.output}"
    assert reader.output[-2:] == ["outcome InvalidRing", "closed"], reader.output


@pytest.mark.parametrize("size", [HEADER_SIZE, 0])
def test_writer_waiting_in_push_raises_invalid_ring_when_file_is_truncated(
    spawn: Callable[..., Child], ring_path: Path, size: int
) -> None:
    writer = spawn("child_writer_blocked_while_truncated", ring_path)
    writer.expect_line("waiting")
    with RingReader.open(ring_path):  # a live reader: the writer waits, no PeerDied
        time.sleep(0.3)
        os.truncate(ring_path, size)
        returncode = writer.wait(timeout=10)
    assert returncode == 0, f"writer died with {returncode} (-7 is SIGBUS): {writer.output}"
    assert writer.output[-2:] == ["outcome InvalidRing", "closed"], writer.output


# ---- no leaked descriptors or mappings ------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings_under(directory: Path) -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps if str(directory) in line]


@pytest.fixture
def no_leaks(ring_dir: Path) -> Iterator[Callable[[], None]]:
    """check() asserts that the descriptor count is back to where the test started and no
    mapping of a file in ring_dir remains; it also runs at teardown."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd and /proc/self/maps (Linux)")
    gc.collect()
    baseline = open_fds()

    def check() -> None:
        gc.collect()
        assert open_fds() == baseline, "a file descriptor leaked"
        assert mappings_under(ring_dir) == [], "a mapping of the ring file leaked"

    yield check
    check()


def test_close_releases_descriptor_and_mapping(
    ring_path: Path, no_leaks: Callable[[], None]
) -> None:
    writer = RingWriter.create(ring_path, 4096)
    reader = RingReader.open(ring_path)
    assert mappings_under(ring_path.parent)
    writer.push(b"x")
    reader.close()
    writer.close()
    no_leaks()


def test_garbage_collection_without_close_releases_descriptor_and_mapping(
    ring_path: Path, no_leaks: Callable[[], None]
) -> None:
    writer = RingWriter.create(ring_path, 4096)
    reader = RingReader.open(ring_path)
    writer.push(b"x")
    del writer, reader
    no_leaks()
    # The collected writer ended the stream; the collected reader left the message.
    reader = RingReader.open(ring_path)
    assert reader.pop(timeout=1) == b"x"
    with pytest.raises(RingClosed):
        reader.pop(timeout=1)
    del reader
    no_leaks()


def test_failed_create_and_open_release_descriptor_and_mapping(
    ring_dir: Path, no_leaks: Callable[[], None]
) -> None:
    path = ring_dir / "ring"
    for capacity in (0, 100, 32, 1 << 33):
        with pytest.raises(ValueError):
            RingWriter.create(path, capacity)
    with pytest.raises(FileNotFoundError):
        RingReader.open(path)
    with pytest.raises(FileNotFoundError):
        RingWriter.open(path)

    writer = RingWriter.create(path, 256)
    with pytest.raises(FileExistsError):
        RingWriter.create(path, 256)
    reader = RingReader.open(path)
    with pytest.raises(RingBusy):
        RingReader.open(path)
    with pytest.raises(RingBusy):
        RingWriter.open(path)
    reader.close()
    writer.close()
    with pytest.raises(RingClosed):
        RingWriter.open(path)

    garbage = ring_dir / "garbage"
    garbage.write_bytes(os.urandom(HEADER_SIZE + 256))
    short = ring_dir / "short"
    short.write_bytes(b"\0" * 100)
    empty = ring_dir / "empty"
    empty.write_bytes(b"")
    truncated = ring_dir / "truncated"
    RingWriter.create(truncated, 4096).close()
    os.truncate(truncated, HEADER_SIZE + 100)
    (ring_dir / "directory").mkdir()
    for bad in ("garbage", "short", "empty", "truncated", "directory"):
        with pytest.raises(InvalidRing):
            RingReader.open(ring_dir / bad)
        with pytest.raises(InvalidRing):
            RingWriter.open(ring_dir / bad)
    no_leaks()
    assert sorted(os.listdir(ring_dir)) == [
        "directory",
        "empty",
        "garbage",
        "ring",
        "ring.rd",
        "ring.wr",
        "short",
        "truncated",
        "truncated.rd",
        "truncated.wr",
    ], "a temporary file was left behind"


def test_package_exports_the_reliability_exceptions() -> None:
    for name in ("PeerDied", "RingBusy"):
        assert name in ipc_ring.__all__
        assert issubclass(getattr(ipc_ring, name), RingError)
