"""Crash tests: one side of a ring is SIGKILLed at every step of a push or a pop, and at
random moments, and the other side must see exactly what docs/FORMAT.md "Crash contract"
promises.

The killed side is tests/c/crash_peer.c, built from the C core with -DRB_CRASH_POINTS: it
kills itself at a named step (IPC_RING_CRASH_AT="name:N"), and it reports every sequence
number it pushed (or received) on stdout, unbuffered, so the test knows what it had done
before it died. The surviving side is the Python package.

Messages follow one deterministic pattern (message_length / expected_message, identical to
crash_peer.c), and so do the places of their records: in format version 2 a record goes at
the writer's position, or, if it does not fit before the end of the data area, at the start
of the next lap, with `wrap_pos` naming the position skipped from (FORMAT.md "Wrap rule").
That depends only on the sizes (layout()), so for a crash point the test knows exactly how
many messages were committed and where every position stands.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from conftest import DATA_OFFSET, record_size
from ipc_ring import PeerDied, RingClosed, RingReader, RingTimeout, RingWriter

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
CORE_DIR = REPO_DIR / "src" / "ipc_ring"
RECORD_HEADER = 8
KIND_MESSAGE = 1
MASK64 = (1 << 64) - 1

# FORMAT.md "Roles and states".
STATE_ATTACHED = 1
STATE_CLOSED = 3

# The steps of a push where the C core can kill the writer (FORMAT.md "Crash contract",
# "Writer dies"), in the order a push reaches them; writer_stream_ended is the close().
WRITER_STEP_POINTS = [
    "writer_wrap_recorded",
    "writer_payload_copied",
    "writer_header_written",
    "writer_published",
]
WRITER_POINTS = [*WRITER_STEP_POINTS, "writer_stream_ended"]
# reader_consumed is the core's; reader_copied and reader_jumped are crash_peer.c's own
# (between the copy and rb_consume, and right after an rb_peek that jumped a wrap point).
READER_POINTS = ["reader_jumped", "reader_copied", "reader_consumed"]
# crash_peer.c's reader in batch mode (as pop_many: rb_skip each, one rb_release) can also die
# at reader_batch_skipped, right before the release; a batch has at most READER_BATCH messages.
READER_BATCH = 8
BATCH_CRASH_COUNTS = [1, 7, 50]
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


# ---- where the records land (FORMAT.md "Wrap rule", rb_reserve_slow in _ring.c) -----------


@dataclass
class Layout:
    """Where the records of a run of messages land."""

    starts: list[int]  # position of each message's record
    ends: list[int]  # ends[k]: the writer's position after k records (ends[0]: the start)
    wraps: list[int]  # indexes (into starts) of the records that wrapped, in order
    wrap_points: list[int]  # for each of them, the position it skipped from (wrap_pos)

    @property
    def write_pos(self) -> int:
        return self.ends[-1]

    def wrap_pos(self) -> int:
        """wrap_pos once these records are written into a fresh ring (0: no wrap yet)."""
        return self.wrap_points[-1] if self.wrap_points else 0


def layout(capacity: int, lengths: Iterable[int], start: int = 0) -> Layout:
    """Records of these payload lengths written from position `start`: a record of size S
    at position P goes at P if S <= capacity - (P mod capacity), else at the start of the
    next lap, and wrap_pos = P. Independent of the reader: the writer only waits for it."""
    position = start
    result = Layout(starts=[], ends=[start], wraps=[], wrap_points=[])
    for length in lengths:
        size = record_size(length)
        to_end = capacity - (position & (capacity - 1))
        if size > to_end:
            result.wraps.append(len(result.starts))
            result.wrap_points.append(position)
            position += to_end
        result.starts.append(position)
        position += size
        result.ends.append(position)
    return result


def pattern_layout(capacity: int, n: int) -> Layout:
    """layout() of messages 0..n-1 of the pattern pushed into a fresh ring."""
    max_len = capacity - RECORD_HEADER
    return layout(capacity, (message_length(seq, max_len) for seq in range(n)))


def data_area_image(capacity: int, n: int) -> bytes:
    """The data area of a fresh ring (all zeros) after messages 0..n-1 of the pattern were
    pushed: each record's header and payload at its place, and nothing else written (the
    alignment padding and the bytes skipped at a wrap point keep what was there)."""
    data = bytearray(capacity)
    max_len = capacity - RECORD_HEADER
    for seq, start in enumerate(pattern_layout(capacity, n).starts):
        message = expected_message(seq, max_len)
        index = start & (capacity - 1)
        data[index : index + RECORD_HEADER] = struct.pack("<II", len(message), KIND_MESSAGE)
        data[index + RECORD_HEADER : index + RECORD_HEADER + len(message)] = message
    return bytes(data)


# FORMAT.md "Header": (offset, struct format) of the fields these tests look at.
HEADER_FIELDS = {
    "write_pos": (128, "<Q"),
    "messages_pushed": (136, "<Q"),
    "bytes_pushed": (144, "<Q"),
    "wrap_pos": (152, "<Q"),
    "read_pos": (256, "<Q"),
    "reader_state": (392, "<I"),
    "writer_state": (520, "<I"),
}


def read_header(path: Path) -> dict[str, int]:
    """The fields of HEADER_FIELDS as they are in the ring file now."""
    with open(path, "rb") as file:
        page = file.read(DATA_OFFSET)
    return {
        name: struct.unpack_from(fmt, page, offset)[0]
        for name, (offset, fmt) in HEADER_FIELDS.items()
    }


def read_data_area(path: Path, capacity: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(DATA_OFFSET)
        return file.read(capacity)


# ---- the crash model ----------------------------------------------------------------------

CRASH_N = 1500  # messages per crash-point run: enough for 333 wraps at these sizes
READER_N = 1500


def times_reached(point: str, capacity: int, n: int) -> int:
    """How often a peer reaches `point` while it pushes (or pops) messages 0..n-1 of the
    pattern and the stream is then closed."""
    if point in ("writer_wrap_recorded", "reader_jumped"):
        return len(pattern_layout(capacity, n).wraps)
    if point == "writer_stream_ended":
        return 1
    return n


def committed_before_crash(point: str, count: int, capacity: int, n: int) -> int | None:
    """How many messages are committed (visible to the reader) when the writer dies at the
    count-th time it reaches `point`, or None if it never reaches it that often
    (FORMAT.md "Writer dies")."""
    if count > times_reached(point, capacity, n):
        return None
    if point == "writer_wrap_recorded":
        return pattern_layout(capacity, n).wraps[count - 1]
    if point in ("writer_payload_copied", "writer_header_written"):
        return count - 1
    if point == "writer_published":
        return count
    if point == "writer_stream_ended":
        return n
    raise AssertionError(point)


def received_before_crash(point: str, count: int, capacity: int, n: int) -> tuple[int, int]:
    """(messages the dead reader reported, seq of the next reader's first message) when the
    reader dies at the count-th time it reaches `point` (FORMAT.md "Reader dies")."""
    assert count <= times_reached(point, capacity, n), (point, count)
    if point == "reader_copied":
        return count, count - 1  # reported, not consumed: delivered again
    if point == "reader_consumed":
        return count, count
    if point == "reader_jumped":
        seq = pattern_layout(capacity, n).wraps[count - 1]
        return seq, seq  # everything before the wrap was consumed; the jump was private
    raise AssertionError(point)


@pytest.mark.parametrize("capacity", [64, 256])
def test_crash_counts_reach_every_point_with_these_sizes(capacity: int) -> None:
    """Guards the other tests: with CRASH_N (READER_N) messages every crash point, the
    wrap's included, is reached at least max(CRASH_COUNTS) times, so no crash run silently
    turns into a clean run, and every count used has a defined outcome."""
    for point in WRITER_STEP_POINTS:
        assert times_reached(point, capacity, CRASH_N) >= max(CRASH_COUNTS), point
        for count in CRASH_COUNTS:
            assert committed_before_crash(point, count, capacity, CRASH_N) is not None
    assert committed_before_crash("writer_stream_ended", 1, capacity, CRASH_N) == CRASH_N
    for point in READER_POINTS:
        assert times_reached(point, capacity, READER_N) >= max(CRASH_COUNTS), point
        for count in CRASH_COUNTS:
            received_before_crash(point, count, capacity, READER_N)
    # At most READER_BATCH messages per release: reached at least READER_N / READER_BATCH times.
    assert max(BATCH_CRASH_COUNTS) <= READER_N // READER_BATCH
    # The wraps are spread over the run, not bunched at its start.
    wraps = pattern_layout(capacity, CRASH_N).wraps
    assert wraps[max(CRASH_COUNTS) - 1] > max(CRASH_COUNTS)


def test_layout_follows_the_wrap_rule_of_format_md() -> None:
    """The model on FORMAT.md's own example (capacity 64: "abc", b"", 20 bytes, then 16
    bytes wrap) and on the edges: a record that ends exactly at the end of the data area
    does not wrap, a full-size record wraps from every index but 0."""
    example = layout(64, [3, 0, 20, 16])
    assert example.starts == [0, 16, 24, 64]
    assert example.wraps == [3] and example.wrap_pos() == 56
    assert example.write_pos == 88
    exact = layout(64, [8, 40, 0])  # 16 + 48 bytes: ends at 64 exactly
    assert exact.starts == [0, 16, 64] and exact.wraps == []
    for index in range(8, 64, 8):
        full = layout(64, [56], start=index)
        assert full.starts == [64] and full.wrap_points == [index]
    assert layout(64, [56]).wraps == []


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

    def wait_for_line(self, prefix: bytes, timeout: float = 10.0) -> bytes:
        """The first complete stdout line that starts with `prefix` (a text-mode peer)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                lines = bytes(self.stdout).split(b"\n")[:-1]
            for line in lines:
                if line.startswith(prefix):
                    return line
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.kill()
                pytest.fail(f"peer printed no line starting with {prefix!r}: {self.describe()}")
            time.sleep(0.01)

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


def crash_env(crash_at: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("IPC_RING_CRASH_AT", None)
    if crash_at:
        env["IPC_RING_CRASH_AT"] = crash_at
    return env


def start_writer_peer(
    crash_peer: Path, peers: list[Peer], path: Path, capacity: int, n: int, crash_at: str | None
) -> Peer:
    argv = [str(crash_peer), "writer", str(path), str(capacity), str(n)]
    peer = Peer(argv, crash_env(crash_at))
    peers.append(peer)
    peer.wait_ready()
    return peer


def start_reader_peer(
    crash_peer: Path,
    peers: list[Peer],
    path: Path,
    n: int,
    crash_at: str | None,
    batch: int = 1,
) -> Peer:
    argv = [str(crash_peer), "reader", str(path), str(n), str(batch)]
    peer = Peer(argv, crash_env(crash_at))
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


def check_dead_writer_left(path: Path, capacity: int, k: int, context: str) -> None:
    """The header a writer killed after committing k messages leaves, once its reader read
    them all: both positions where k records end, the role attached with its lock gone
    (FORMAT.md "Roles and states"), and wrap_pos either the last wrap before them or, if
    the writer died right after recording a wrap, the published write_pos itself."""
    model = pattern_layout(capacity, k)
    header = read_header(path)
    assert header["write_pos"] == model.write_pos, f"{context}: {header}, model {model.ends[-3:]}"
    assert header["read_pos"] == model.write_pos, f"{context}: {header}"
    assert header["writer_state"] == STATE_ATTACHED, f"{context}: {header}"
    assert header["wrap_pos"] in (model.wrap_pos(), model.write_pos), f"{context}: {header}"


def continue_with_reopened_writer(
    path: Path, reader: RingReader, first_seq: int, unread: int = 0
) -> None:
    """After a writer died, RingWriter.open continues the stream from the published
    write_pos. The reader first gets the `unread` messages the dead writer committed and it
    had not read yet (first_seq - unread .. first_seq - 1), then the new writer's messages
    first_seq.. (with PeerDied between the two, where the dead writer stopped, if the reader
    had not reached that point yet): intact and in order, every push into the drained ring
    accepted at once (FORMAT.md "Wrap rule": any message fits an empty ring), the records
    where the wrap rule puts them, and close() then ends the stream.

    wrap_pos (FORMAT.md "Crash contract of the wrap"): a wrap the dead writer recorded and
    never published (wrap_pos not below write_pos) is set to 0; a published one that the
    reader has not passed yet is kept, and the reader still jumps there. The new writer's
    first message is empty: its 8-byte record fits before the end from every index, so a
    kept unpublished wrap would make the reader jump over it."""
    before = read_header(path)
    more = 60
    with RingWriter.open(path) as writer:
        capacity, max_len = writer.capacity, writer.max_message_size
        wrap_now = read_header(path)["wrap_pos"]
        if before["wrap_pos"] >= before["write_pos"]:
            assert wrap_now == 0, f"unpublished wrap kept: {before}"
        elif before["read_pos"] <= before["wrap_pos"] and before["wrap_pos"] % capacity:
            assert wrap_now == before["wrap_pos"], f"published wrap dropped: {before}"
        backlog = [reader.pop(timeout=5) for _ in range(unread)]
        check_messages(backlog, first_seq - unread, max_len, "dead writer's unread messages")
        if unread:
            # The reader had not reached the end of the dead writer's stream: it learns of
            # the death there, before the new writer's first message (FORMAT.md "Breaks").
            with pytest.raises(PeerDied, match="stopped here"):
                reader.pop(timeout=5)
        messages = [
            b"",
            *(expected_message(seq, max_len) for seq in range(first_seq, first_seq + more)),
        ]
        for i, message in enumerate(messages):
            assert writer.try_push(message), (
                f"reopened writer: message {i} refused by a drained ring"
            )
            got = reader.pop(timeout=5)
            if got != message:
                pytest.fail(
                    f"reopened writer: message {i} ({len(message)} bytes) arrived as {got[:32]!r}"
                )
    with pytest.raises(RingClosed):
        reader.pop(timeout=5)
    model = layout(capacity, map(len, messages), start=before["write_pos"])
    after = read_header(path)
    assert after["write_pos"] == after["read_pos"] == model.write_pos, (after, before)
    assert after["writer_state"] == STATE_CLOSED


def writer_gone_is_reported_once(reader: RingReader) -> None:
    """After PeerDied, the same dead writer is not reported again: the role waits for a new
    writer (FORMAT.md "Roles and states", "Once per writer"), so pop(timeout=0) times out."""
    with pytest.raises(RingTimeout):
        reader.pop(timeout=0)
    assert reader.try_pop() is None


# ---- the writer dies ----------------------------------------------------------------------


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
        assert len(messages) == expected_k, context
        # Killed after publishing, before its push returned: committed, not reported.
        assert len(pushed) == expected_k - (point == "writer_published"), context
        assert not reader.writer_alive
        check_dead_writer_left(path, capacity, expected_k, context)
        # wrap_pos includes the wrap of the record the writer died placing, if it wrapped
        # (recorded in step 3, before the copy): not published, so the reader ignored it.
        reserved = expected_k + (point != "writer_published")
        wrap_pos = read_header(path)["wrap_pos"]
        assert wrap_pos == pattern_layout(capacity, reserved).wrap_pos(), context
        if point == "writer_wrap_recorded":
            assert wrap_pos == pattern_layout(capacity, expected_k).write_pos, context
        writer_gone_is_reported_once(reader)
        continue_with_reopened_writer(path, reader, len(messages))


@pytest.mark.parametrize("point", WRITER_POINTS)
def test_writer_killed_the_last_time_it_reaches_a_point_and_one_that_never_reaches_it(
    crash_peer: Path, peers: list[Peer], ring_dir: Path, point: str
) -> None:
    """The model counts the crash points exactly: killed at the last time a point is
    reached, the reader gets what the model says (all n messages and PeerDied, not
    RingClosed, for writer_published: the stream was never ended); one count more is never
    reached, and the run ends the stream cleanly."""
    capacity, n = 256, 40
    last = times_reached(point, capacity, n)
    assert last >= 1
    expected_k = committed_before_crash(point, last, capacity, n)
    assert committed_before_crash(point, last + 1, capacity, n) is None
    context = f"writer killed at {point}:{last} of {n} messages"
    killed = start_writer_peer(
        crash_peer, peers, ring_dir / "killed", capacity, n, f"{point}:{last}"
    )
    with RingReader.open(ring_dir / "killed") as reader:
        messages, end = read_until_end(reader, context)
    assert killed.wait() == -signal.SIGKILL, f"{context}: {killed.describe()}"
    assert len(messages) == expected_k, context
    check_messages(messages, 0, capacity - RECORD_HEADER, context)
    assert end is (RingClosed if point == "writer_stream_ended" else PeerDied), context

    context = f"{point}:{last + 1} not reached"
    clean = start_writer_peer(
        crash_peer, peers, ring_dir / "clean", capacity, n, f"{point}:{last + 1}"
    )
    with RingReader.open(ring_dir / "clean") as reader:
        messages, end = read_until_end(reader, context)
    assert clean.wait() == 0, clean.describe()
    assert end is RingClosed, context
    assert len(messages) == n, context
    check_messages(messages, 0, capacity - RECORD_HEADER, context)
    assert clean.reported() == list(range(n))


def test_reader_sees_ring_closed_when_writer_is_killed_after_ending_the_stream(
    crash_peer: Path, peers: list[Peer], ring_dir: Path
) -> None:
    """Killed right after storing writer_state = 3 (closed), before the wake: the reader
    gets every message and RingClosed, never PeerDied, and the stream cannot be continued
    (FORMAT.md "Crash contract", "End of stream")."""
    path = ring_dir / "ring"
    context = "writer killed at writer_stream_ended"
    writer = start_writer_peer(crash_peer, peers, path, 256, CRASH_N, "writer_stream_ended")
    with RingReader.open(path) as reader:
        messages, end = read_until_end(reader, context)
        assert writer.wait() == -signal.SIGKILL, writer.describe()
        assert end is RingClosed, context
        assert len(messages) == CRASH_N, context
        check_messages(messages, 0, 248, context)
        assert writer.reported() == list(range(CRASH_N))
        assert not reader.writer_alive
        with pytest.raises(RingClosed):
            reader.pop(timeout=0)
    header = read_header(path)
    assert header["writer_state"] == STATE_CLOSED
    assert header["write_pos"] == header["read_pos"] == pattern_layout(256, CRASH_N).write_pos
    with pytest.raises(RingClosed):
        RingWriter.open(path)


def wrap_with_room_for_one_unread_record(capacity: int, n: int) -> int:
    """The first message s > 0 of the pattern whose record wraps and still fits while the
    reader has record s - 1 left to read: the writer can record that wrap, and publish the
    record, with the reader behind the wrap point."""
    model = pattern_layout(capacity, n)
    max_len = capacity - RECORD_HEADER
    for s in model.wraps:
        end = model.starts[s] + record_size(message_length(s, max_len))
        if s > 0 and end - model.ends[s - 1] <= capacity:
            return s
    raise AssertionError("no such wrap in the pattern")


@pytest.mark.parametrize(
    ("point", "behind"),
    [("writer_wrap_recorded", 1), ("writer_published", 1), ("writer_published", 0)],
)
def test_writer_killed_at_a_wrap_while_the_reader_is_behind_it(
    crash_peer: Path, peers: list[Peer], ring_dir: Path, point: str, behind: int
) -> None:
    """The reader stops `behind` records before the wrap point W of message s, and the
    writer dies right after recording that wrap (not published), or right after publishing
    the record at the next lap. Unpublished: the reader reads up to W and then gets
    PeerDied, never jumping to the bytes the writer left at the next lap. Published: a new
    writer attaches while the reader is still at or before W, keeps wrap_pos, and the reader
    jumps at W, reads message s and goes on with the new writer's messages."""
    capacity = 256
    s = wrap_with_room_for_one_unread_record(capacity, CRASH_N)
    model = pattern_layout(capacity, s + 1)
    wrap_point = model.wrap_points[-1]
    count = len(model.wraps) if point == "writer_wrap_recorded" else s + 1
    committed = s if point == "writer_wrap_recorded" else s + 1
    read_first = s - behind
    path = ring_dir / "ring"
    context = f"writer killed at {point}:{count} (message {s}), reader {behind} behind"
    writer = start_writer_peer(crash_peer, peers, path, capacity, CRASH_N, f"{point}:{count}")
    with RingReader.open(path) as reader:
        first = [reader.pop(timeout=10) for _ in range(read_first)]
        check_messages(first, 0, capacity - RECORD_HEADER, context)
        assert writer.wait() == -signal.SIGKILL, f"{context}: {writer.describe()}"
        header = read_header(path)
        assert header["read_pos"] == model.ends[read_first], f"{context}: {header}"
        assert header["write_pos"] == model.ends[committed], f"{context}: {header}"
        assert header["wrap_pos"] == wrap_point, f"{context}: {header}"
        if point == "writer_wrap_recorded":
            rest, end = read_until_end(reader, context)
            assert end is PeerDied, context
            check_messages(rest, read_first, capacity - RECORD_HEADER, context)
            assert read_first + len(rest) == committed, context
            continue_with_reopened_writer(path, reader, committed)
        else:
            continue_with_reopened_writer(path, reader, committed, unread=committed - read_first)


def test_reader_gets_a_contiguous_prefix_then_peer_died_when_writer_is_killed_at_random_times(
    crash_peer: Path, peers: list[Peer], ring_dir: Path
) -> None:
    rng = random.Random(SEED)
    outcomes = {"killed": 0, "finished": 0}
    for run in range(RANDOM_KILLS):
        capacity = rng.choice([64, 256, 4096])
        n = 50_000  # longer than any delay: most runs are killed mid-stream
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
                # Finished, or killed after ending the stream: everything arrived.
                assert returncode in (0, -signal.SIGKILL), f"{context}: {writer.describe()}"
                assert k == n, context
                outcomes["finished"] += 1
                continue
            assert end is PeerDied, context
            assert returncode == -signal.SIGKILL, f"{context}: {writer.describe()}"
            # Every reported push was committed; at most one more (killed between publishing
            # and reporting).
            assert len(pushed) <= k <= len(pushed) + 1, f"{context}: k={k}, pushed={len(pushed)}"
            outcomes["killed"] += 1
            check_dead_writer_left(path, capacity, k, context)
            writer_gone_is_reported_once(reader)
            continue_with_reopened_writer(path, reader, k)
        path.unlink()
    assert outcomes["killed"] > 0, f"no run was killed mid-stream: {outcomes}"


# ---- the Python writer, and the pattern ---------------------------------------------------


def python_writer_main(path: str, capacity: str, n: str) -> int:
    """Child process: creates the ring, prints "ready", pushes messages 0..n-1, closes.
    While the reader is dead and the ring is full, push raises PeerDied (FORMAT.md "Reader
    dies": every such call, until a new reader attaches); the documented way to go on is to
    retry the same message. The first PeerDied of each message is printed as a line
    "PeerDied at seq N: <message>"."""
    with RingWriter.create(path, int(capacity)) as writer:
        print("ready", flush=True)
        max_len = writer.max_message_size
        for seq in range(int(n)):
            message = expected_message(seq, max_len)
            deadline = time.monotonic() + 30
            told = False
            while True:
                try:
                    writer.push(message, timeout=10)
                    break
                except PeerDied as error:
                    if time.monotonic() > deadline:
                        raise
                    if not told:
                        print(f"PeerDied at seq {seq}: {error}", flush=True)
                        told = True
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


def check_ring_file_matches_the_model(path: Path, capacity: int, n: int, who: str) -> None:
    """A ring into which messages 0..n-1 were pushed and then read: the header says where
    the wrap rule put the records, and the data area is data_area_image() byte for byte."""
    model = pattern_layout(capacity, n)
    max_len = capacity - RECORD_HEADER
    header = read_header(path)
    assert header["write_pos"] == header["read_pos"] == model.write_pos, f"{who}: {header}"
    assert header["wrap_pos"] == model.wrap_pos(), f"{who}: {header}"
    assert header["messages_pushed"] == n, f"{who}: {header}"
    assert header["bytes_pushed"] == sum(message_length(s, max_len) for s in range(n)), who
    assert header["writer_state"] == STATE_CLOSED, f"{who}: {header}"
    data = read_data_area(path, capacity)
    image = data_area_image(capacity, n)
    if data != image:
        first = next(i for i in range(capacity) if data[i] != image[i])
        pytest.fail(
            f"{who}: data area differs from the model at index {first}: "
            f"{data[first : first + 16].hex()} != {image[first : first + 16].hex()}"
        )


@pytest.mark.parametrize("capacity", [64, 4096])
def test_python_pattern_is_byte_for_byte_the_c_peers_pattern(
    crash_peer: Path, peers: list[Peer], ring_dir: Path, capacity: int
) -> None:
    """The Python writer pushes expected_message(); crash_peer's reader checks every byte
    against its own fill() and exits 4 on a difference. Then the C writer's messages are
    checked against expected_message() here. Both ring files end up as the model says,
    byte for byte: the records where layout() puts them, wrap_pos its last wrap point."""
    n = 500
    assert len(pattern_layout(capacity, n).wraps) > 10
    py_path = ring_dir / "python"
    writer = start_python_writer(peers, py_path, capacity, n)
    reader = start_reader_peer(crash_peer, peers, py_path, n, None)
    assert reader.wait() == 0, reader.describe()
    assert reader.reported() == list(range(n))
    assert writer.wait() == 0, writer.describe()
    check_ring_file_matches_the_model(py_path, capacity, n, "Python writer")

    c_path = ring_dir / "c"
    start_writer_peer(crash_peer, peers, c_path, capacity, n, None)
    with RingReader.open(c_path) as ring:
        messages, end = read_until_end(ring, "C writer")
    assert end is RingClosed
    assert len(messages) == n
    check_messages(messages, 0, capacity - RECORD_HEADER, "C writer")
    check_ring_file_matches_the_model(c_path, capacity, n, "C writer")
    assert read_data_area(py_path, capacity) == read_data_area(c_path, capacity)


# ---- the reader dies ----------------------------------------------------------------------


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
    # The published read_pos is where the first_seq record starts, or for a reader killed
    # right after its jump, the wrap point it jumped from (FORMAT.md "Reader dies").
    header = read_header(path)
    model = pattern_layout(capacity, first_seq + 1)
    assert header["read_pos"] == model.ends[first_seq], f"{context}: {header}"
    assert header["reader_state"] == STATE_ATTACHED, f"{context}: {header}"
    if point == "reader_jumped":
        assert header["wrap_pos"] == header["read_pos"] == model.wrap_points[-1], context
    # The writer fills the ring and gets PeerDied, "the reader died", until a new reader
    # attaches; only then does the test start one.
    line = writer.wait_for_line(b"PeerDied at seq ")
    assert b"the reader died" in line, line
    finish_with_new_reader(path, first_seq, READER_N, capacity - RECORD_HEADER, context)
    assert writer.wait() == 0, writer.describe()


@pytest.mark.parametrize("count", BATCH_CRASH_COUNTS)
def test_new_reader_gets_the_unreleased_batch_again_when_reader_is_killed_before_releasing_it(
    crash_peer: Path, peers: list[Peer], ring_dir: Path, count: int
) -> None:
    """FORMAT.md "Reader dies", the pop_many row: a reader that copied and skipped messages
    (rb_skip) and died before rb_release has published nothing of them, nor a jump over a
    wrap point among them. The published read_pos is where a record of the pattern starts
    (or a wrap point), and a new reader starts there: it gets again the dead reader's last
    batch, at least one message and at most READER_BATCH, and then the rest, without a gap."""
    path = ring_dir / "ring"
    capacity = 256
    writer = start_python_writer(peers, path, capacity, READER_N)
    crash_at = f"reader_batch_skipped:{count}"
    dead = start_reader_peer(crash_peer, peers, path, READER_N, crash_at, batch=READER_BATCH)
    context = f"batch reader killed at {crash_at}"
    assert dead.wait() == -signal.SIGKILL, f"{context}: {dead.describe()}"
    reported = dead.reported()
    assert reported == list(range(len(reported))), f"{context}: reported {reported[-5:]}"
    read_pos = read_header(path)["read_pos"]
    ends = pattern_layout(capacity, len(reported)).ends
    assert read_pos in ends, f"{context}: read_pos {read_pos} is not where a record ends"
    first_seq = ends.index(read_pos)
    assert 1 <= len(reported) - first_seq <= READER_BATCH, f"{context}: from {first_seq}"
    writer.wait_for_line(b"PeerDied at seq ")
    finish_with_new_reader(path, first_seq, READER_N, capacity - RECORD_HEADER, context)
    assert writer.wait() == 0, writer.describe()


def test_new_reader_continues_with_at_most_one_duplicate_when_reader_is_killed_at_random_times(
    crash_peer: Path, peers: list[Peer], ring_dir: Path
) -> None:
    rng = random.Random(SEED + 1)
    killed_mid_stream = 0
    for run in range(RANDOM_KILLS):
        capacity = rng.choice([64, 256, 4096])
        n = 10_000  # longer than any delay: most runs are killed mid-stream
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
