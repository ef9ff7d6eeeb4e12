"""Fixtures and helpers shared by the tests: ring file paths, a ring, its records, threads
and Python child processes."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import event

from ipc_ring import RingReader, RingWriter

TESTS_DIR = Path(__file__).resolve().parent
SHM_DIR = Path("/dev/shm")


def ring_parent_dir() -> str | None:
    """/dev/shm when it exists and is writable (where rings live in production), else None
    (the platform's temporary directory)."""
    if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK | os.X_OK):
        return str(SHM_DIR)
    return None


@pytest.fixture
def ring_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory of its own for this test's ring files, removed afterwards."""
    parent = ring_parent_dir()
    if parent is None:
        directory = tmp_path / "rings"
        directory.mkdir()
        yield directory
        return
    directory = Path(tempfile.mkdtemp(prefix="ipc_ring-test-", dir=parent))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def ring_path(ring_dir: Path) -> Path:
    """A path for a ring file that does not exist yet, unique to this test."""
    return ring_dir / "ring"


class Child:
    """A Python child process that runs `module.function(*args)` and exits with its return
    value. Its stdout and stderr are merged and read line by line in a thread, so that
    every wait on it has a timeout; on any failure it is killed and its output is shown.
    `send()` writes a command line to its stdin."""

    def __init__(self, module: str, function: str, args: tuple[object, ...]) -> None:
        code = f"import sys, {module}; sys.exit({module}.{function}(*sys.argv[1:]))"
        python_path = [str(TESTS_DIR)]
        if os.environ.get("PYTHONPATH"):
            python_path.append(os.environ["PYTHONPATH"])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path), PYTHONUNBUFFERED="1")
        self.name = f"{function}{args!r}"
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def fail(self, reason: str) -> NoReturn:
        """Kills the child and fails the test, showing what the child printed."""
        self.kill()
        shown = "\n".join(self.output) or "(nothing)"
        pytest.fail(f"child {self.name}: {reason}\n--- child output ---\n{shown}")

    def expect_line(self, prefix: str, timeout: float = 10.0) -> str:
        """Waits for the next output line that starts with `prefix` and returns it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                self.fail(f"printed no line starting with {prefix!r} within {timeout} s")
            if line is None:
                self.process.wait(timeout=5)
                self.fail(
                    f"exited with {self.process.returncode} before printing a line "
                    f"starting with {prefix!r}"
                )
            if line.startswith(prefix):
                return line

    def wait(self, timeout: float = 30.0) -> int:
        """Waits for the child to exit and returns its exit status (negative: killed by
        that signal)."""
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"did not exit within {timeout} s")
        self._reader.join(timeout=5)
        return returncode

    def finish(self, expected_returncode: int = 0, timeout: float = 30.0) -> None:
        """Waits for the child to exit and checks its exit status."""
        returncode = self.wait(timeout)
        if returncode != expected_returncode:
            self.fail(f"exited with {returncode}, expected {expected_returncode}")

    def send(self, command: str) -> None:
        """Writes one line to the child's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def send_signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=5)

    def close(self) -> None:
        self.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()


Spawn = Callable[..., Child]


@pytest.fixture
def spawn(request: pytest.FixtureRequest) -> Iterator[Spawn]:
    """Starts child processes that run a function in a fresh interpreter:
    `spawn(child_main, path, 256)` runs `child_main("<path>", "256")` (arguments arrive as
    strings); the function is named by itself, or by a string that names a function of
    the calling test module (`spawn("writer_main", path, 256)`). Every child is killed
    at teardown."""
    children: list[Child] = []

    def start(function: str | Callable[..., object], *args: object) -> Child:
        if isinstance(function, str):
            child = Child(request.module.__name__, function, args)
        else:
            child = Child(function.__module__, function.__name__, args)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


# ---- the ring and its records ------------------------------------------------------------

# Every blocking call in a test or in a child gives up after this long.
TIMEOUT = 10.0
# Exit status of a child that saw what the test expected.
EXPECTED_EXIT = 42

# docs/FORMAT.md "Header" and "Records".
DATA_OFFSET = 4096
WRITE_POS_AT = 128
READ_POS_AT = 256
RECORD_HEADER = 8


def record_size(length: int) -> int:
    """Bytes a message of `length` bytes takes in the data area: header + padded payload."""
    return RECORD_HEADER + (length + 7) // 8 * 8


def positions(path: Path | str) -> tuple[int, int]:
    """(write_pos, read_pos) as published in the ring file's header."""
    with open(path, "rb") as file:
        header = file.read(READ_POS_AT + 8)
    return (
        int.from_bytes(header[WRITE_POS_AT : WRITE_POS_AT + 8], "little"),
        int.from_bytes(header[READ_POS_AT : READ_POS_AT + 8], "little"),
    )


class RingModel:
    """What the data area of a ring holds, for one writer and one reader in one process: the
    records written and not yet consumed, in order, as (record size, payload), with the bytes
    skipped at a wrap point as (size, None); the writer's and the reader's own positions and
    the published ones. `reserve` is the wrap rule of FORMAT.md, so the model predicts
    exactly when a push finds the ring full."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: deque[tuple[int, bytes | None]] = deque()
        self.write_pos = 0  # the writer's own position
        self.write_published = 0
        self.read_pos = 0  # the reader's own position (a jump over a wrap point included)
        self.read_published = 0
        self.wrap_from = self.wrap_to = 0  # the writer's last wrap point

    def messages(self) -> list[bytes]:
        """The messages written and not yet consumed, in order."""
        return [data for _, data in self.records if data is not None]

    def reserve(self, length: int) -> bool:
        """Whether a record for `length` bytes fits now, at the writer's position or, if it
        does not fit before the end, at the next lap; a wrap that fits is recorded at once,
        a record that does not fit changes nothing."""
        size = record_size(length)
        to_end = self.capacity - self.write_pos % self.capacity
        start = self.write_pos + (to_end if size > to_end else 0)
        # The reader's effective position: at the last wrap point it has the next lap.
        reader = self.read_published
        if reader == self.wrap_from:
            reader = self.wrap_to
        if reader == self.write_pos:  # an empty ring: a wrap has the whole next lap
            reader = start
        if start + size - reader > self.capacity:
            event("full")
            return False
        if start != self.write_pos:
            event("wrap")
            self.records.append((start - self.write_pos, None))
            self.wrap_from, self.wrap_to = self.write_pos, start
            self.write_pos = start
        return True

    def commit(self, data: bytes) -> None:
        self.records.append((record_size(len(data)), data))
        self.write_pos += record_size(len(data))
        self.write_published = self.write_pos

    def push(self, data: bytes) -> bool:
        if not self.reserve(len(data)):
            return False
        self.commit(data)
        return True

    def head(self) -> bytes | None:
        """The next published message, after the reader jumps a wrap point in front of it."""
        published = 0  # the records up to the published write position
        for size, _ in self.records:
            published += size
        unpublished = self.write_pos - self.write_published
        while self.records and self.records[0][1] is None:
            if published - self.records[0][0] <= unpublished:
                return None  # the wrap is not published yet
            skipped = self.records.popleft()[0]
            self.read_pos += skipped
            published -= skipped
        if not self.records or published <= unpublished:
            return None
        return self.records[0][1]

    def pop(self, release: bool = True) -> bytes:
        """Consumes the head (call head() first); `release` publishes the read position."""
        size, data = self.records.popleft()
        self.read_pos += size
        if release:
            self.read_published = self.read_pos
        assert data is not None
        return data

    def drain(self) -> list[bytes]:
        """Consumes every published message, as a reader reading to the end would."""
        drained = []
        while self.head() is not None:
            drained.append(self.pop())
        return drained


@pytest.fixture
def ring(ring_path: Path) -> Iterator[tuple[RingWriter, RingReader]]:
    """A writer and a reader on a fresh 64-byte ring (max_message_size 56)."""
    with RingWriter.create(ring_path, 64) as writer, RingReader.open(ring_path) as reader:
        yield writer, reader


def numbered(i: int, length: int = 16) -> bytes:
    """Message number i, `length` bytes: i as 8 little-endian bytes, then the byte i & 0xFF
    repeated, cut to `length` (so distinct for every i below 256 ** min(length, 8))."""
    return (i.to_bytes(8, "little") + bytes([i & 0xFF]) * max(length - 8, 0))[:length]


def fill(writer: RingWriter, length: int = 8, start: int = 0) -> list[bytes]:
    """Pushes numbered(start, length), numbered(start + 1, length), ... with try_push until
    the ring is full; returns what it pushed."""
    pushed: list[bytes] = []
    while writer.try_push(message := numbered(start + len(pushed), length)):
        pushed.append(message)
    return pushed


def drain(reader: RingReader) -> list[bytes]:
    """Every message available now, without waiting."""
    received = []
    while (message := reader.try_pop()) is not None:
        received.append(message)
    return received


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


# ---- children that several test modules start --------------------------------------------


def wait_for_command() -> str:
    """In a child: the next line on stdin ("" once the test closed it or went away)."""
    return sys.stdin.readline().strip()


def child_numbered_writer(path: str, capacity: str, count: str, ending: str) -> NoReturn:
    """Creates a ring, pushes numbered(0) .. numbered(count - 1), prints "pushed", stays
    attached until a command arrives, then ends as `ending` says: "die" (os._exit without
    close) or "close" (close, then os._exit)."""
    writer = RingWriter.create(path, int(capacity))
    for i in range(int(count)):
        writer.push(numbered(i), timeout=10)
    print("pushed", flush=True)
    wait_for_command()
    if ending == "close":
        writer.close()
    os._exit(0)
