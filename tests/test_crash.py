"""Crash tests: one side of a ring is SIGKILLed at every step of a push or a pop, and at
random moments, and the other side must see exactly what the crash contract promises.

The killed side is tests/c/crash_peer.c, built from the C core with -DRB_CRASH_POINTS: it
kills itself at a named step (IPC_RING_CRASH_AT="name:N"), and it reports every sequence
number it pushed (or received) on stdout, unbuffered, so the test knows what it had done
before it died. The surviving side is the Python package.

Messages follow one deterministic pattern (message_length / expected_message, identical to
crash_peer.c), and record positions are deterministic too (the wrap rule depends only on the
sizes), so for a crash point the test knows exactly how many messages were committed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from conftest import record_size
from ipc_ring import PeerDied, RingClosed, RingReader, RingTimeout, RingWriter

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
CORE_DIR = REPO_DIR / "src" / "ipc_ring"
RECORD_HEADER = 8
MASK64 = (1 << 64) - 1

WRITER_STEP_POINTS = [
    "writer_padding_written",
    "writer_padding_published",
    "writer_payload_copied",
    "writer_header_written",
    "writer_published",
]
READER_POINTS = ["reader_consumed", "reader_padding_consumed", "reader_copied"]
CRASH_COUNTS = [1, 2, 7, 50, 333]
RANDOM_KILLS = 30

# Seed of the random choices (capacities, kill delays); set it to replay a run's choices.
SEED = int(os.environ.get("IPC_RING_CRASH_SEED", str(random.randrange(1 << 32))))


# ---- the message pattern, identical to crash_peer.c ---------------------------------------


def _mix(x: int) -> int:
    """xorshift64*, as mix() in crash_peer.c."""
    x ^= x >> 12
    x ^= (x << 25) & MASK64
    x ^= x >> 27
    return (x * 0x2545F4914F6CDD1D) & MASK64


def message_length(seq: int, max_len: int) -> int:
    r = _mix(seq + 1)
    kind = r & 7
    if kind == 0:
        return 0
    if kind == 1:
        return max_len
    if kind == 2:
        return r % (max_len + 1)
    return min(8 + (r >> 8) % 64, max_len)


_BYTE_CYCLE = bytes(range(256))


def expected_message(seq: int, max_len: int) -> bytes:
    """Byte i is (seq * 31 + i) mod 256; the first 8 bytes are seq, little-endian, when the
    message is long enough."""
    length = message_length(seq, max_len)
    start = (seq * 31) & 0xFF
    cycle = _BYTE_CYCLE * ((start + length) // 256 + 1)
    body = cycle[start : start + length]
    if length >= 8:
        body = seq.to_bytes(8, "little") + body[8:]
    return body


def padding_before(capacity: int, n: int) -> list[int]:
    """Sequence numbers of the messages that a padding record precedes, in order, when
    messages 0..n-1 are pushed into a fresh ring (FORMAT.md "Wrap rule")."""
    max_len = capacity - RECORD_HEADER
    position = 0
    result = []
    for seq in range(n):
        size = record_size(message_length(seq, max_len))
        to_end = capacity - (position & (capacity - 1))
        if size > to_end:
            result.append(seq)
            position += to_end
        position += size
    return result


# ---- fixtures and process helpers ----------------------------------------------------------


@pytest.fixture(scope="session")
def crash_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/c/crash_peer.c compiled with crash points. Fails (not skips) without a compiler:
    the crash tests are the proof of the crash contract."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.fail("no C compiler (cc) found: the crash tests need one to build crash_peer")
    binary = tmp_path_factory.mktemp("crash_peer") / "crash_peer"
    command = [
        compiler,
        "-std=c11",
        "-O1",
        "-g",
        "-Wall",
        "-Wextra",
        "-Wshadow",
        "-Wconversion",
        "-DRB_CRASH_POINTS",
        f"-I{CORE_DIR}",
        str(CORE_DIR / "_ring.c"),
        str(CORE_DIR / "_handle.c"),
        str(TESTS_DIR / "c" / "crash_peer.c"),
        "-pthread",
        "-o",
        str(binary),
    ]
    built = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if built.returncode != 0:
        pytest.fail(f"building crash_peer failed:\n{' '.join(command)}\n{built.stderr}")
    return binary


class Peer:
    """A child process whose stdout starts with "ready\\n" and then carries 8-byte
    little-endian sequence numbers (crash_peer), or text lines (the Python writer). Both
    streams are collected by threads, so every wait has a timeout; kill() is idempotent."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._threads = [
            threading.Thread(target=self._drain, args=(self.process.stdout, True), daemon=True),
            threading.Thread(target=self._drain, args=(self.process.stderr, False), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _drain(self, stream: IO[bytes], is_stdout: bool) -> None:
        while chunk := os.read(stream.fileno(), 65536):
            with self._lock:
                (self.stdout if is_stdout else self.stderr).extend(chunk)
                if is_stdout and self.stdout.startswith(b"ready\n"):
                    self._ready.set()
        if is_stdout:
            self._ready.set()  # EOF: wait_ready() tells the two apart

    def describe(self) -> str:
        with self._lock:
            err = bytes(self.stderr).decode(errors="replace")
        return f"{' '.join(self.argv)} (exit {self.process.returncode})\nstderr: {err or '-'}"

    def wait_ready(self, timeout: float = 10.0) -> None:
        if not self._ready.wait(timeout) or not self.stdout.startswith(b"ready\n"):
            self.kill()
            pytest.fail(f"peer did not print 'ready' within {timeout} s: {self.describe()}")

    def wait(self, timeout: float = 20.0) -> int:
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"peer did not exit within {timeout} s: {self.describe()}")
        self._join()
        return returncode

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None and not stream.closed:
                stream.close()

    def reported(self) -> list[int]:
        """The sequence numbers written after "ready\\n" (whole 8-byte records only)."""
        with self._lock:
            data = bytes(self.stdout[len(b"ready\n") :])
        usable = len(data) - len(data) % 8
        return [int.from_bytes(data[i : i + 8], "little") for i in range(0, usable, 8)]

    def kill(self) -> None:
        """Kills the process if it still runs (safe from a timer thread)."""
        if self.process.poll() is None:
            self.process.kill()

    def close(self) -> None:
        """Kills the process, reaps it and closes the pipes (fixture teardown)."""
        self.kill()
        self.process.wait(timeout=10)
        self._join()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Every Peer a test starts goes in this list and is killed at teardown."""
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.close()


def start_writer_peer(
    crash_peer: Path, peers: list[Peer], path: Path, capacity: int, n: int, crash_at: str | None
) -> Peer:
    env = dict(os.environ)
    env.pop("IPC_RING_CRASH_AT", None)
    if crash_at:
        env["IPC_RING_CRASH_AT"] = crash_at
    peer = Peer([str(crash_peer), "writer", str(path), str(capacity), str(n)], env)
    peers.append(peer)
    peer.wait_ready()
    return peer


def read_until_end(reader: RingReader, context: str) -> tuple[list[bytes], type[BaseException]]:
    """Pops with a finite timeout until the stream ends; returns the messages and the
    exception that ended it (PeerDied or RingClosed). A RingTimeout is a hang: fail."""
    messages = []
    while True:
        try:
            messages.append(reader.pop(timeout=10))
        except (PeerDied, RingClosed) as end:
            return messages, type(end)
        except RingTimeout:
            pytest.fail(f"{context}: pop hung for 10 s after {len(messages)} messages")


def check_messages(messages: list[bytes], first_seq: int, max_len: int, context: str) -> None:
    """Message i must be expected_message(first_seq + i), byte for byte."""
    for i, got in enumerate(messages):
        seq = first_seq + i
        want = expected_message(seq, max_len)
        if got != want:
            carried = int.from_bytes(got[:8], "little") if len(got) >= 8 else None
            pytest.fail(
                f"{context}: message #{i} should be seq {seq} ({len(want)} bytes), got "
                f"{len(got)} bytes (first 8 bytes as seq: {carried}): {got[:32]!r}"
            )


def continue_with_reopened_writer(path: Path, reader: RingReader, first_seq: int) -> None:
    """After a writer died, RingWriter.open continues the stream: messages first_seq.. reach
    the same reader, intact and in order, and close() then ends the stream."""
    more = 60
    with RingWriter.open(path) as writer:
        max_len = writer.max_message_size
        for seq in range(first_seq, first_seq + more):
            message = expected_message(seq, max_len)
            # One thread plays both sides: a message that needs a padding record first only
            # fits once the reader has skipped that padding (which try_pop does).
            for _ in range(3):
                if writer.try_push(message):
                    break
                assert reader.try_pop() is None
            else:
                pytest.fail(f"reopened writer: no room for seq {seq} in a drained ring")
            got = reader.pop(timeout=5)
            if got != expected_message(seq, max_len):
                pytest.fail(f"reopened writer: seq {seq} arrived as {got[:32]!r}")
    with pytest.raises(RingClosed):
        reader.pop(timeout=5)


# ---- the writer dies ----------------------------------------------------------------------

CRASH_N = 1500  # messages per crash-point run: enough for 333 padding records at these sizes


def committed_before_crash(point: str, count: int, capacity: int, n: int) -> int | None:
    """How many messages are committed (visible to the reader) when the writer dies at the
    count-th time it reaches `point`, or None if it never reaches it that often."""
    if point in ("writer_padding_written", "writer_padding_published"):
        paddings = padding_before(capacity, n)
        return paddings[count - 1] if count <= len(paddings) else None
    if point in ("writer_payload_copied", "writer_header_written"):
        return count - 1 if count <= n else None
    if point == "writer_published":
        return count if count <= n else None
    if point == "writer_closed_flag_set":
        return n if count == 1 else None
    raise AssertionError(point)


@pytest.mark.parametrize("capacity", [64, 256])
def test_crash_counts_reach_every_point_with_these_sizes(capacity: int) -> None:
    """Guards the other tests: with CRASH_N messages each step is reached at least
    max(CRASH_COUNTS) times, so no crash run silently turns into a clean run."""
    assert len(padding_before(capacity, CRASH_N)) >= max(CRASH_COUNTS)
    assert max(CRASH_COUNTS) <= CRASH_N


@pytest.mark.parametrize("count", CRASH_COUNTS)
@pytest.mark.parametrize("point", WRITER_STEP_POINTS)
@pytest.mark.parametrize("capacity", [64, 256])
def test_reader_gets_exactly_the_committed_messages_then_peer_died_when_writer_is_killed(
    crash_peer: Path, peers: list[Peer], ring_dir: Path, capacity: int, point: str, count: int
) -> None:
    path = ring_dir / "ring"
    expected_k = committed_before_crash(point, count, capacity, CRASH_N)
    assert expected_k is not None
    writer = start_writer_peer(crash_peer, peers, path, capacity, CRASH_N, f"{point}:{count}")
    context = f"writer killed at {point}:{count}, capacity {capacity}"
    with RingReader.open(path) as reader:
        messages, end = read_until_end(reader, context)
        returncode = writer.wait()
        assert returncode == -signal.SIGKILL, f"{context}: {writer.describe()}"
        assert end is PeerDied, f"{context}: stream ended with {end.__name__}"
        check_messages(messages, 0, capacity - RECORD_HEADER, context)
        pushed = writer.reported()
        assert pushed == list(range(len(pushed))), f"{context}: writer reported {pushed[:10]}"
        assert len(messages) >= len(pushed), context
        assert len(messages) == expected_k, context
        assert not reader.writer_alive
        continue_with_reopened_writer(path, reader, len(messages))


def test_reader_sees_ring_closed_when_writer_is_killed_after_setting_the_closed_flag(
    crash_peer: Path, peers: list[Peer], ring_dir: Path
) -> None:
    path = ring_dir / "ring"
    writer = start_writer_peer(crash_peer, peers, path, 256, CRASH_N, "writer_closed_flag_set")
    with RingReader.open(path) as reader:
        messages, end = read_until_end(reader, "writer killed after closed flag")
        assert writer.wait() == -signal.SIGKILL, writer.describe()
        assert end is RingClosed
        assert len(messages) == CRASH_N
        check_messages(messages, 0, 248, "writer killed after closed flag")
    with pytest.raises(RingClosed):
        RingWriter.open(path)


@pytest.mark.parametrize("point", [*WRITER_STEP_POINTS, "writer_closed_flag_set"])
def test_writer_that_never_reaches_its_crash_point_ends_the_stream_cleanly(
    crash_peer: Path, peers: list[Peer], ring_dir: Path, point: str
) -> None:
    path = ring_dir / "ring"
    n = 40
    count = 334 if point != "writer_closed_flag_set" else 2
    assert committed_before_crash(point, count, 256, n) is None
    writer = start_writer_peer(crash_peer, peers, path, 256, n, f"{point}:{count}")
    with RingReader.open(path) as reader:
        messages, end = read_until_end(reader, f"{point}:{count} not reached")
    assert writer.wait() == 0, writer.describe()
    assert end is RingClosed
    check_messages(messages, 0, 248, "clean run")
    assert len(messages) == n
    assert writer.reported() == list(range(n))


def test_reader_gets_a_contiguous_prefix_then_peer_died_when_writer_is_killed_at_random_times(
    crash_peer: Path, peers: list[Peer], ring_dir: Path
) -> None:
    rng = random.Random(SEED)
    outcomes = {"killed": 0, "finished": 0}
    for run in range(RANDOM_KILLS):
        capacity = rng.choice([64, 256, 4096])
        n = 100_000  # longer than any delay: most runs are killed mid-stream
        delay = rng.uniform(0.0, 0.03)
        path = ring_dir / f"ring{run}"
        context = f"run {run} (IPC_RING_CRASH_SEED={SEED}), capacity {capacity}, kill at {delay}"
        writer = start_writer_peer(crash_peer, peers, path, capacity, n, None)
        with RingReader.open(path) as reader:
            killer = threading.Timer(delay, writer.kill)
            killer.start()
            try:
                messages, end = read_until_end(reader, context)
            finally:
                killer.cancel()
            returncode = writer.wait()
            check_messages(messages, 0, capacity - RECORD_HEADER, context)
            pushed = writer.reported()
            assert pushed == list(range(len(pushed))), context
            k = len(messages)
            if end is RingClosed:
                # Finished, or killed after setting the closed flag: everything arrived.
                assert returncode in (0, -signal.SIGKILL), f"{context}: {writer.describe()}"
                assert k == n, context
                outcomes["finished"] += 1
                continue
            assert end is PeerDied
            assert returncode == -signal.SIGKILL, f"{context}: {writer.describe()}"
            # Every reported push was committed; at most one more (killed between publishing
            # and reporting).
            assert len(pushed) <= k <= len(pushed) + 1, f"{context}: k={k}, pushed={len(pushed)}"
            outcomes["killed"] += 1
            continue_with_reopened_writer(path, reader, k)
        path.unlink()
    assert outcomes["killed"] > 0, f"no run was killed mid-stream: {outcomes}"


# ---- the reader dies ----------------------------------------------------------------------

READER_N = 1500


def python_writer_main(path: str, capacity: str, n: str) -> int:
    """Child process: creates the ring, prints "ready", pushes messages 0..n-1, closes.
    While no live reader is attached and the ring is full, push raises PeerDied; the
    documented way to go on is to retry the same message until a new reader attaches."""
    with RingWriter.create(path, int(capacity)) as writer:
        print("ready", flush=True)
        max_len = writer.max_message_size
        for seq in range(int(n)):
            message = expected_message(seq, max_len)
            deadline = time.monotonic() + 30
            while True:
                try:
                    writer.push(message, timeout=10)
                    break
                except PeerDied:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
    print("done", flush=True)
    return 0


def start_python_writer(peers: list[Peer], path: Path, capacity: int, n: int) -> Peer:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_crash; "
        "sys.exit(test_crash.python_writer_main(*sys.argv[2:]))"
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-c", code, str(TESTS_DIR), str(path), str(capacity), str(n)]
    peer = Peer(argv, env)
    peers.append(peer)
    peer.wait_ready(timeout=30)
    return peer


def start_reader_peer(
    crash_peer: Path, peers: list[Peer], path: Path, n: int, crash_at: str | None
) -> Peer:
    env = dict(os.environ)
    env.pop("IPC_RING_CRASH_AT", None)
    if crash_at:
        env["IPC_RING_CRASH_AT"] = crash_at
    peer = Peer([str(crash_peer), "reader", str(path), str(n)], env)
    peers.append(peer)
    peer.wait_ready()
    return peer


@pytest.mark.parametrize("capacity", [64, 4096])
def test_python_pattern_is_byte_for_byte_the_c_peers_pattern(
    crash_peer: Path, peers: list[Peer], ring_dir: Path, capacity: int
) -> None:
    """The Python writer pushes expected_message(); crash_peer's reader checks every byte
    against its own fill() and exits 4 on a difference; then the C writer's messages are
    checked against expected_message() here."""
    path = ring_dir / "ring"
    writer = start_python_writer(peers, path, capacity, 500)
    reader = start_reader_peer(crash_peer, peers, path, 500, None)
    assert reader.wait() == 0, reader.describe()
    assert reader.reported() == list(range(500))
    assert writer.wait() == 0, writer.describe()
    path.unlink()
    start_writer_peer(crash_peer, peers, path, capacity, 500, None)
    with RingReader.open(path) as ring:
        messages, end = read_until_end(ring, "C writer")
    assert end is RingClosed
    assert len(messages) == 500
    check_messages(messages, 0, capacity - RECORD_HEADER, "C writer")


def received_before_crash(point: str, count: int, capacity: int, n: int) -> tuple[int, int]:
    """(messages the dead reader reported, seq of the next reader's first message) when the
    reader dies at the count-th time it reaches `point`."""
    if point == "reader_copied":
        return count, count - 1  # reported, not consumed: delivered again
    if point == "reader_consumed":
        return count, count
    if point == "reader_padding_consumed":
        seq = padding_before(capacity, n)[count - 1]
        return seq, seq
    raise AssertionError(point)


def finish_with_new_reader(path: Path, first_seq: int, n: int, max_len: int, context: str) -> None:
    with RingReader.open(path) as reader:
        messages, end = read_until_end(reader, context)
    assert end is RingClosed, context
    assert len(messages) == n - first_seq, f"{context}: new reader got {len(messages)} messages"
    check_messages(messages, first_seq, max_len, context)


@pytest.mark.parametrize("count", CRASH_COUNTS)
@pytest.mark.parametrize("point", READER_POINTS)
def test_new_reader_continues_without_gap_when_reader_is_killed_at_step(
    crash_peer: Path, peers: list[Peer], ring_dir: Path, point: str, count: int
) -> None:
    path = ring_dir / "ring"
    capacity = 256
    writer = start_python_writer(peers, path, capacity, READER_N)
    dead = start_reader_peer(crash_peer, peers, path, READER_N, f"{point}:{count}")
    context = f"reader killed at {point}:{count}"
    assert dead.wait() == -signal.SIGKILL, f"{context}: {dead.describe()}"
    reported = dead.reported()
    want_reported, first_seq = received_before_crash(point, count, capacity, READER_N)
    assert reported == list(range(want_reported)), f"{context}: reported {reported[-5:]}"
    finish_with_new_reader(path, first_seq, READER_N, capacity - RECORD_HEADER, context)
    assert writer.wait() == 0, writer.describe()


def test_new_reader_continues_with_at_most_one_duplicate_when_reader_is_killed_at_random_times(
    crash_peer: Path, peers: list[Peer], ring_dir: Path
) -> None:
    rng = random.Random(SEED + 1)
    killed_mid_stream = 0
    for run in range(RANDOM_KILLS):
        capacity = rng.choice([64, 256, 4096])
        n = 20_000  # longer than any delay: most runs are killed mid-stream
        delay = rng.uniform(0.0, 0.04)
        path = ring_dir / f"ring{run}"
        context = f"run {run} (IPC_RING_CRASH_SEED={SEED}), capacity {capacity}, kill at {delay}"
        writer = start_python_writer(peers, path, capacity, n)
        dead = start_reader_peer(crash_peer, peers, path, n, None)
        killer = threading.Timer(delay, dead.kill)
        killer.start()
        try:
            returncode = dead.wait()
        finally:
            killer.cancel()
        assert returncode in (0, -signal.SIGKILL), f"{context}: {dead.describe()}"
        reported = dead.reported()
        killed_mid_stream += returncode == -signal.SIGKILL and len(reported) < n
        assert reported == list(range(len(reported))), f"{context}: not contiguous"
        max_len = capacity - RECORD_HEADER
        with RingReader.open(path) as reader:
            messages, end = read_until_end(reader, context)
        assert end is RingClosed, context
        if not messages:
            assert reported == list(range(n)), context
        else:
            first = n - len(messages)
            assert first in (len(reported) - 1, len(reported)), (
                f"{context}: dead reader reported 0..{len(reported) - 1}, new reader starts "
                f"at {first}"
            )
            check_messages(messages, first, max_len, context)
        assert writer.wait() == 0, writer.describe()
        path.unlink()
    assert killed_mid_stream > 0, "no reader was killed mid-stream"
