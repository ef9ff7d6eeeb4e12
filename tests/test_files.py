"""The file system side: create never replaces or follows what is at its path, the modes
and files it leaves, a full file system (ENOSPC), open of files that are not complete
rings, a file truncated under a waiting side, and that neither success nor failure leaks a
file descriptor or a mapping.

The functions named `child_*` run in a child process started by the `spawn` fixture (see
conftest.py).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ipc_ring
from conftest import Spawn, child_numbered_writer, wait_for_command
from ipc_ring import InvalidRing, PeerDied, RingBusy, RingClosed, RingReader, RingWriter

HEADER_SIZE = 4096


def open_fds() -> int:
    """How many file descriptors this process has open (0 where /proc/self/fd is missing)."""
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def mappings_under(directory: Path) -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps if str(directory) in line]


# ---- child processes ---------------------------------------------------------------------


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


# ---- create: what is at the path ---------------------------------------------------------
# A plain file in the way: test_format.py, test_create_never_replaces_an_existing_file.


def test_create_refuses_an_existing_ring(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        writer.push(b"first writer", timeout=5)
        with pytest.raises(FileExistsError):
            RingWriter.create(ring_path, 64)
        with RingReader.open(ring_path) as reader:
            assert reader.pop(timeout=5) == b"first writer"


@pytest.fixture(params=["same-directory", "other-directory"])
def symlink_target(request: pytest.FixtureRequest, ring_path: Path, tmp_path: Path) -> Path:
    """Where a symlink at ring_path points: next to it, or in another directory."""
    directory = ring_path.parent if request.param == "same-directory" else tmp_path
    return directory / "target"


def test_create_never_follows_a_dangling_symlink(ring_path: Path, symlink_target: Path) -> None:
    ring_path.symlink_to(symlink_target)
    with pytest.raises(FileExistsError):
        RingWriter.create(ring_path, 64)
    assert not symlink_target.exists()
    assert ring_path.is_symlink()
    assert sorted(os.listdir(ring_path.parent)) == [ring_path.name]


def test_create_never_follows_a_symlink_to_an_existing_file(
    ring_path: Path, symlink_target: Path
) -> None:
    symlink_target.write_bytes(b"precious")
    ring_path.symlink_to(symlink_target)
    with pytest.raises(FileExistsError):
        RingWriter.create(ring_path, 64)
    assert symlink_target.read_bytes() == b"precious"
    assert ring_path.is_symlink()
    expected = [ring_path.name]
    if symlink_target.parent == ring_path.parent:
        expected.append(symlink_target.name)
    assert sorted(os.listdir(ring_path.parent)) == sorted(expected)


def test_create_refuses_an_existing_directory(ring_path: Path) -> None:
    ring_path.mkdir()
    with pytest.raises(FileExistsError):
        RingWriter.create(ring_path, 64)
    assert os.listdir(ring_path.parent) == [ring_path.name]


def test_create_in_a_missing_directory_raises_file_not_found(ring_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RingWriter.create(ring_path.parent / "missing" / "ring", 64)
    assert os.listdir(ring_path.parent) == []


# ---- create: what it leaves --------------------------------------------------------------


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


# ---- create: races, failures, continuing -------------------------------------------------


def child_create_on_command(path: str, rounds: str) -> int:
    """For each "go" on stdin: try to create the ring at `path`; print "won INO RD WR" (the
    inodes of the ring and its FIFOs as this process made them) and keep the writer until
    the next command, or "lost ERROR"."""
    writer = None
    for _ in range(int(rounds)):
        if wait_for_command() != "go":
            return 1
        if writer is not None:
            writer.detach()
            writer = None
        try:
            writer = RingWriter.create(path, 4096)
        except FileExistsError as e:
            print("lost", str(e).replace("\n", " "), flush=True)
            continue
        inodes = [os.lstat(f"{path}{suffix}").st_ino for suffix in ("", ".rd", ".wr")]
        print("won", *inodes, flush=True)
    return 0


def test_a_create_that_loses_a_race_never_touches_the_winners_files(
    ring_path: Path, spawn: Spawn
) -> None:
    rounds = 40
    children = [spawn(child_create_on_command, ring_path, rounds) for _ in range(2)]
    winners = 0
    messages: list[str] = []
    for round_ in range(rounds):
        for name in ("", ".rd", ".wr"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{ring_path}{name}")
        for child in children:
            child.send("go")
        lines = [child.expect_line("") for child in children]
        won = [line.split()[1:] for line in lines if line.startswith("won")]
        lost = [line for line in lines if line.startswith("lost")]
        assert len(won) == 1 and len(lost) == 1, (round_, lines)
        ring_ino, rd_ino, wr_ino = map(int, won[0])
        # The winner's ring and FIFOs are in place, the ones it made, and they work.
        assert [os.lstat(f"{ring_path}{suffix}").st_ino for suffix in ("", ".rd", ".wr")] == [
            ring_ino,
            rd_ino,
            wr_ino,
        ], round_
        assert sorted(os.listdir(ring_path.parent)) == ["ring", "ring.rd", "ring.wr"], round_
        with RingReader.open(ring_path) as reader:
            reader.fileno()
        if str(ring_path) not in lost[0] or ".tmp" in lost[0]:
            messages.append(lost[0])
        winners += 1
    assert winners == rounds
    assert messages == [], "the loser's error must name the path it was given"


def test_a_create_that_fails_after_linking_the_ring_removes_what_it_made(
    ring_path: Path,
) -> None:
    Path(f"{ring_path}.rd").mkdir()  # the FIFO's name is taken: found after the link
    with pytest.raises(FileExistsError, match=rf"'{ring_path}\.rd' exists and is not a FIFO"):
        RingWriter.create(ring_path, 4096)
    assert sorted(os.listdir(ring_path.parent)) == ["ring.rd"]
    assert os.listdir(f"{ring_path}.rd") == []


def test_create_errors_name_the_path_the_user_gave_never_a_temporary_name(
    ring_path: Path,
) -> None:
    missing = ring_path.parent / "missing" / "ring"
    with pytest.raises(FileNotFoundError) as raised:
        RingWriter.create(missing, 64)
    assert str(missing) in str(raised.value) and ".tmp" not in str(raised.value)
    RingWriter.create(ring_path, 64).close()
    with pytest.raises(FileExistsError) as exists:
        RingWriter.create(ring_path, 64)
    message = str(exists.value)
    assert str(ring_path) in message and ".tmp" not in message
    # It says how to continue the ring and how to remove a stale one.
    assert "RingWriter.open" in message and "exist_ok=True" in message
    assert "ipc_ring.unlink" in message


def test_create_exist_ok_continues_a_ring_whose_writer_stopped(ring_path: Path) -> None:
    first = RingWriter.create(ring_path, 4096, exist_ok=True)  # nothing there: a new ring
    first.push(b"first run")
    first.abort()
    with RingReader.open(ring_path) as reader:
        with RingWriter.create(ring_path, 4096, exist_ok=True) as second:
            second.push(b"second run")
        assert reader.pop(timeout=1) == b"first run"
        with pytest.raises(PeerDied):  # the first run stopped without ending its stream
            reader.pop(timeout=1)
        assert reader.pop(timeout=1) == b"second run"
        with pytest.raises(RingClosed):
            reader.pop(timeout=1)


def test_create_exist_ok_reports_a_fifo_name_taken_by_a_directory_not_a_missing_ring(
    ring_path: Path,
) -> None:
    Path(f"{ring_path}.rd").mkdir()
    with pytest.raises(FileExistsError, match=rf"'{ring_path}\.rd' exists and is not a FIFO"):
        RingWriter.create(ring_path, 4096, exist_ok=True)
    assert sorted(os.listdir(ring_path.parent)) == ["ring.rd"]


@pytest.mark.parametrize("length", [1, 200, 229, 252])
def test_create_takes_any_name_the_file_system_takes_with_room_for_the_fifos(
    ring_dir: Path, length: int
) -> None:
    path = ring_dir / ("n" * length)
    with RingWriter.create(path, 4096) as writer, RingReader.open(path) as reader:
        writer.push(b"m", timeout=5)
        assert reader.pop(timeout=5) == b"m"
    assert sorted(os.listdir(ring_dir)) == sorted(path.name + s for s in ("", ".rd", ".wr"))


def test_create_with_a_name_too_long_for_its_fifos_fails_and_leaves_nothing(
    ring_dir: Path,
) -> None:
    path = ring_dir / ("n" * 253)  # PATH.rd would exceed NAME_MAX (255)
    with pytest.raises(OSError, match=str(path)):
        RingWriter.create(path, 4096)
    assert os.listdir(ring_dir) == []


def test_create_exist_ok_refuses_a_live_writer_a_closed_stream_and_another_capacity(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 4096), pytest.raises(RingBusy):
        RingWriter.create(ring_path, 4096, exist_ok=True)
    with pytest.raises(RingClosed):
        RingWriter.create(ring_path, 4096, exist_ok=True)
    ipc_ring.unlink(ring_path)
    writer = RingWriter.create(ring_path, 4096)
    writer.push(b"m")
    writer.abort()
    with pytest.raises(ValueError, match="capacity 4096, not 8192"):
        RingWriter.create(ring_path, 8192, exist_ok=True)
    # The mismatch took nothing: the reader still learns that the writer failed.
    with RingReader.open(ring_path) as reader:
        assert reader.pop(timeout=1) == b"m"
        with pytest.raises(PeerDied):
            reader.pop(timeout=1)
    with pytest.raises(InvalidRing):
        Path(f"{ring_path}.other").write_bytes(b"not a ring")
        RingWriter.create(f"{ring_path}.other", 4096, exist_ok=True)
    assert Path(f"{ring_path}.other").read_bytes() == b"not a ring"


# ---- open: files that are not complete rings ---------------------------------------------


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
        lambda p: p.mkdir(),
    ],
    ids=[
        "empty",
        "magic-only",
        "random-bytes",
        "zeros",
        "shorter-than-header-says",
        "fifo",
        "directory",
    ],
)
def test_open_a_file_that_is_not_a_complete_ring_raises_invalid_ring(
    ring_path: Path, make: Callable[[Path], object]
) -> None:
    make(ring_path)
    before = open_fds()
    start = time.monotonic()
    with pytest.raises(InvalidRing):
        RingReader.open(ring_path)
    assert time.monotonic() - start < 0.5
    assert open_fds() == before


# ---- a file truncated under a waiting side -----------------------------------------------


@pytest.mark.parametrize("size", [HEADER_SIZE, 0])
def test_reader_waiting_in_pop_raises_invalid_ring_when_file_is_truncated(
    spawn: Spawn, ring_path: Path, size: int
) -> None:
    writer = spawn(child_numbered_writer, ring_path, 4096, 0, "die")  # alive: no PeerDied
    writer.expect_line("pushed")
    reader = spawn(child_reader_blocked_while_truncated, ring_path)
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
    spawn: Spawn, ring_path: Path, size: int
) -> None:
    writer = spawn(child_writer_blocked_while_truncated, ring_path)
    writer.expect_line("waiting")
    with RingReader.open(ring_path):  # a live reader: the writer waits, no PeerDied
        time.sleep(0.3)
        os.truncate(ring_path, size)
        returncode = writer.wait(timeout=10)
    assert returncode == 0, f"writer died with {returncode} (-7 is SIGBUS): {writer.output}"
    assert writer.output[-2:] == ["outcome InvalidRing", "closed"], writer.output


def test_writer_woken_by_room_freed_across_a_truncation_raises_invalid_ring(
    spawn: Spawn, ring_path: Path
) -> None:
    """The reader reads a record in place (pop_view), the file is truncated to its header,
    then the view's end frees the room and wakes the writer: the wake-up proves the header
    page was there, not the data pages, so the woken writer checks the size too (FORMAT.md
    "Truncation") instead of writing into the missing pages (SIGBUS)."""
    writer = spawn(child_writer_blocked_while_truncated, ring_path)
    writer.expect_line("waiting")
    with RingReader.open(ring_path) as reader:
        with reader.pop_view():
            time.sleep(0.3)  # the writer is asleep in push
            os.truncate(ring_path, HEADER_SIZE)
        returncode = writer.wait(timeout=10)
    assert returncode == 0, f"writer died with {returncode} (-7 is SIGBUS): {writer.output}"
    assert writer.output[-2:] == ["outcome InvalidRing", "closed"], writer.output


def test_reader_woken_by_a_reserved_record_committed_across_a_truncation_raises_invalid_ring(
    spawn: Spawn, ring_path: Path
) -> None:
    """A reserve() slot is filled, the file is cut after the record's first data page, then the
    commit (which writes only the record's header, in that page) wakes the sleeping reader:
    the wake-up proves the header page, not the record's (FORMAT.md "Truncation"), so the
    reader checks, and raises InvalidRing instead of touching the missing pages (SIGBUS)."""
    with RingWriter.create(ring_path, 65536) as writer:
        reader = spawn(child_reader_blocked_while_truncated, ring_path)
        reader.expect_line("waiting")
        with writer.reserve(20000) as view:
            view[:] = b"r" * 20000
            time.sleep(0.3)  # the reader is asleep in pop
            os.truncate(ring_path, HEADER_SIZE + 4096)
        returncode = reader.wait(timeout=10)
    assert returncode == 0, f"reader died with {returncode} (-7 is SIGBUS): {reader.output}"
    assert reader.output[-2:] == ["outcome InvalidRing", "closed"], reader.output


def child_reader_whose_signal_handler_truncates(path: str) -> int:
    """A reader asleep in pop; a thread of its own process sends it a signal (the handler,
    which runs after the sleep, truncates the file to its header), then pushes a message
    that spans pages the truncation removes. Prints the outcome."""
    with RingWriter.create(path, 65536) as writer, RingReader.open(path) as reader:

        def handler(signum: int, frame: object) -> None:
            os.truncate(path, HEADER_SIZE)

        signal.signal(signal.SIGUSR1, handler)

        def wake() -> None:
            deadline = time.monotonic() + 5
            while Path(path).read_bytes()[384:388] != b"\x01\0\0\0":  # reader_waiting
                if time.monotonic() > deadline:
                    return
                time.sleep(0.005)
            time.sleep(0.02)  # the reader is in its futex sleep
            # To this thread: the C-level handler only sets the flag, the reader sleeps on,
            # and its Python handler runs once the push has woken it.
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            writer.push(b"x" * 20000, timeout=5)

        thread = threading.Thread(target=wake, daemon=True)
        thread.start()
        try:
            reader.pop(timeout=5)
            print("outcome message", flush=True)
        except Exception as e:
            print("outcome", type(e).__name__, flush=True)
        thread.join(timeout=5)
    return 0


def test_a_truncation_by_the_readers_own_signal_handler_after_its_wake_up_raises_invalid_ring(
    spawn: Spawn, ring_path: Path
) -> None:
    """FORMAT.md "Waiting", step 4: the signal handlers run after the sleep and before the
    size check, so what a handler does to the file is seen before the record is touched,
    even when a push woke the reader (a review proved that skipping the check after such a
    wake-up gives SIGBUS here)."""
    reader = spawn(child_reader_whose_signal_handler_truncates, ring_path)
    returncode = reader.wait(timeout=20)
    assert returncode == 0, f"reader died with {returncode} (-7 is SIGBUS): {reader.output}"
    assert reader.output[-1:] == ["outcome InvalidRing"], reader.output


# ---- a file truncated while the application waits on fileno() ----------------------------

READER_CALLS: dict[str, Callable[[RingReader], object]] = {
    "pop(timeout=0)": lambda r: r.pop(timeout=0),
    "pop(timeout=0.01)": lambda r: r.pop(timeout=0.01),
    "try_pop()": lambda r: r.try_pop(),
    "pop_into(timeout=0)": lambda r: r.pop_into(bytearray(64), timeout=0),
    "pop_many(4, timeout=0)": lambda r: r.pop_many(4, timeout=0),
    "peek_many(4, timeout=0)": lambda r: r.peek_many(4, timeout=0),
    "pop_view(timeout=0)": lambda r: r.pop_view(timeout=0),
    "consume(1)": lambda r: r.consume(1),  # the size check comes before the count's
    "next(reader)": lambda r: next(r),
}
WRITER_CALLS: dict[str, Callable[[RingWriter], object]] = {
    "push(timeout=0)": lambda w: w.push(b"y" * 1000, timeout=0),
    "push(timeout=0.01)": lambda w: w.push(b"y" * 1000, timeout=0.01),
    "try_push()": lambda w: w.try_push(b"y" * 1000),
    "push_many(timeout=0)": lambda w: w.push_many([b"y" * 1000], timeout=0),
    "reserve(timeout=0)": lambda w: w.reserve(1000, timeout=0),
}


def child_calls_after_a_truncation_while_waiting_on_fileno(
    path: str, side: str, call: str, size: str, between: str = ""
) -> int:
    """Found nothing to do (an empty ring, a full one), arms fileno(), makes the call
    `between` if any, waits on the descriptor in select while the file is truncated to
    `size`, then makes `call`, as a selector loop does after its poll interval. Prints the
    outcome, and that of one more call."""
    with RingWriter.create(path, 65536) as writer, RingReader.open(path) as reader:
        if side == "writer":
            while writer.try_push(b"x" * 1000):
                pass
            fd = writer.fileno()
        elif between == "peek-consume":
            writer.push(b"a")
            fd = reader.fileno()
            assert reader.peek_many(4, timeout=0) == [b"a"]
            assert reader.peek_many(4, timeout=0) == []
        else:
            assert reader.try_pop() is None
            fd = reader.fileno()
        if between == "stats":
            (writer if side == "writer" else reader).stats()
        elif between == "bad-argument":
            with contextlib.suppress(ValueError):
                if side == "writer":
                    writer.push(b"", timeout=-1)
                else:
                    reader.pop(timeout=-1)
        elif between == "peek-consume":
            reader.consume(1)
        elif between == "discarded-slot":  # room (or a message), then a slot given back
            if side == "writer":
                reader.pop(timeout=5)
                with contextlib.suppress(KeyError), writer.reserve(10, timeout=5):
                    raise KeyError("nothing to write after all: the block discards")
            else:
                writer.push(b"a")
                slot = reader.pop_view(timeout=5)
                with slot:
                    slot.discard()  # the message stays
        os.truncate(path, int(size))
        select.select([fd], [], [], 0.02)
        try:
            if side == "writer":
                WRITER_CALLS[call](writer)
            else:
                READER_CALLS[call](reader)
            print("outcome returned", flush=True)
        except Exception as e:
            print("outcome", type(e).__name__, flush=True)
        try:  # and again: a handle that raised the truncation's InvalidRing keeps raising it
            reader.try_pop() if side == "reader" else writer.try_push(b"z")
            print("again returned", flush=True)
        except Exception as e:
            print("again", type(e).__name__, flush=True)
    return 0


@pytest.mark.parametrize("size", [0, HEADER_SIZE])
@pytest.mark.parametrize(
    ("side", "call"),
    [("reader", c) for c in READER_CALLS] + [("writer", c) for c in WRITER_CALLS],
)
def test_a_call_after_a_wait_on_fileno_across_a_truncation_raises_invalid_ring(
    spawn: Spawn, ring_path: Path, side: str, call: str, size: int
) -> None:
    """FORMAT.md "Polling for liveness and truncation": once fileno() is armed, the next
    call checks the file's size before it touches the mapping. Without that check, a call
    after a truncation to 0 read the missing header page (SIGBUS), whatever its timeout."""
    child = spawn(
        child_calls_after_a_truncation_while_waiting_on_fileno, ring_path, side, call, size
    )
    returncode = child.wait(timeout=20)
    assert returncode == 0, f"died with {returncode} (-7 is SIGBUS): {child.output}"
    assert child.output[-2:] == ["outcome InvalidRing", "again InvalidRing"], child.output


@pytest.mark.parametrize(
    ("side", "between"),
    [
        ("reader", "stats"),
        ("writer", "stats"),
        ("reader", "bad-argument"),
        ("writer", "bad-argument"),
        ("reader", "peek-consume"),
        ("reader", "discarded-slot"),
        ("writer", "discarded-slot"),
    ],
)
def test_a_call_between_the_arming_and_the_wait_leaves_the_check_armed(
    spawn: Spawn, ring_path: Path, side: str, between: str
) -> None:
    """A call after the arming that takes or publishes nothing (stats(), an argument that
    raises, consume() after an empty peek_many(), a slot given back) leaves the handle idle:
    the call after the wait still checks. Reviews proved each of these giving SIGBUS when any
    check cleared the flag, or a slot's opening disarmed it for good."""
    call = "try_pop()" if side == "reader" else "try_push()"
    child = spawn(
        child_calls_after_a_truncation_while_waiting_on_fileno, ring_path, side, call, 0, between
    )
    returncode = child.wait(timeout=20)
    assert returncode == 0, f"died with {returncode} (-7 is SIGBUS): {child.output}"
    assert child.output[-2:] == ["outcome InvalidRing", "again InvalidRing"], child.output


def child_finishes_a_slot_after_fileno_and_a_truncation(path: str, kind: str) -> int:
    """Opens a reserve() or pop_view() slot, arms fileno() inside it, truncates the file to
    0, waits on the descriptor, then leaves the block. Prints the outcome."""
    with RingWriter.create(path, 65536) as writer, RingReader.open(path) as reader:
        writer.push(b"m" * 100)
        try:
            if kind == "reserve":
                with writer.reserve(100) as view:
                    view[:] = b"r" * 100
                    fd = writer.fileno()
                    os.truncate(path, 0)
                    select.select([fd], [], [], 0.02)
            else:
                with reader.pop_view(timeout=5):
                    fd = reader.fileno()
                    os.truncate(path, 0)
                    select.select([fd], [], [], 0.02)
            print("outcome returned", flush=True)
        except Exception as e:
            print("outcome", type(e).__name__, flush=True)
    return 0


@pytest.mark.parametrize("kind", ["reserve", "pop_view"])
def test_a_slot_finished_after_fileno_across_a_truncation_raises_invalid_ring(
    spawn: Spawn, ring_path: Path, kind: str
) -> None:
    """fileno() may be armed while a slot is open; the commit (or the consume) at the end of
    the block then checks the size first and leaves the ring untouched."""
    child = spawn(child_finishes_a_slot_after_fileno_and_a_truncation, ring_path, kind)
    returncode = child.wait(timeout=20)
    assert returncode == 0, f"died with {returncode} (-7 is SIGBUS): {child.output}"
    assert child.output[-1:] == ["outcome InvalidRing"], child.output


def test_a_call_after_fileno_on_an_intact_file_goes_on_as_before(ring_path: Path) -> None:
    """The check after fileno() was armed costs one lseek and changes nothing else: the
    next call takes the message, and the handle is back on its fast path."""
    with RingWriter.create(ring_path, 4096) as writer, RingReader.open(ring_path) as reader:
        fd = reader.fileno()
        assert reader.try_pop() is None
        writer.push(b"a")
        writer.push(b"")
        assert select.select([fd], [], [], 5)[0] == [fd]
        assert reader.pop(timeout=0) == b"a"
        assert reader.try_pop() == b""
        assert reader.try_pop() is None
        while writer.try_push(b"w" * 1000):
            pass
        wfd = writer.fileno()
        assert reader.pop(timeout=0) == b"w" * 1000
        assert select.select([wfd], [], [], 5)[0] == [wfd]
        assert writer.try_push(b"w" * 1000)


# ---- no leaked descriptors or mappings ---------------------------------------------------


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
    with pytest.warns(ResourceWarning, match="collected without close"):
        del writer, reader
        gc.collect()
    no_leaks()
    # The collected writer did not end the stream (it stopped without close()); the
    # collected reader left the message.
    with RingReader.open(ring_path) as reader:
        assert reader.pop(timeout=1) == b"x"
        with pytest.raises(PeerDied, match="without ending the stream"):
            reader.pop(timeout=1)
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


# ---- unlink: only rings -------------------------------------------------------------------


def test_unlink_removes_only_a_ring_file_and_leaves_anything_else_alone(ring_dir: Path) -> None:
    precious = ring_dir / "precious.txt"
    precious.write_bytes(b"somebody's data")
    (ring_dir / "directory").mkdir()
    ring = ring_dir / "ring"
    RingWriter.create(ring, 64).close()
    (ring_dir / "link").symlink_to(ring)
    for name in ("precious.txt", "directory", "link"):
        with pytest.raises(InvalidRing, match=r"not a ring file|magic"):
            ipc_ring.unlink(ring_dir / name)
    assert precious.read_bytes() == b"somebody's data"
    assert sorted(os.listdir(ring_dir)) == [
        "directory",
        "link",
        "precious.txt",
        "ring",
        "ring.rd",
        "ring.wr",
    ]
    ipc_ring.unlink(ring)
    assert sorted(os.listdir(ring_dir)) == ["directory", "link", "precious.txt"]


def test_unlink_removes_a_ring_of_an_older_format_version(ring_path: Path) -> None:
    RingWriter.create(ring_path, 64).close()
    with open(ring_path, "r+b") as file:
        file.seek(8)  # FORMAT.md "Header": version, u32 at offset 8
        file.write((1).to_bytes(4, "little"))
    with pytest.raises(InvalidRing, match="version 1"):
        RingReader.open(ring_path)
    ipc_ring.unlink(ring_path)
    assert os.listdir(ring_path.parent) == []
