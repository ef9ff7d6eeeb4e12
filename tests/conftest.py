"""Fixtures shared by the tests: ring file paths and Python child processes."""

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

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


@pytest.fixture
def spawn(request: pytest.FixtureRequest) -> Iterator[Callable[..., Child]]:
    """Starts child processes that run a function of the calling test module:
    `spawn("writer_main", path, 256)` runs `writer_main("<path>", "256")` in a fresh
    interpreter (arguments arrive as strings). Every child is killed at teardown."""
    module = request.module.__name__
    children: list[Child] = []

    def start(function: str, *args: object) -> Child:
        child = Child(module, function, args)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()
