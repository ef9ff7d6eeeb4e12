"""The `ipc-ring` command line, run as real processes in real shell pipelines: write,
cat, inspect, rm, bench, and what a hostile user does to them (| head, > /dev/full,
>&-, kill -9, Ctrl-C, a file that is not a ring)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import ipc_ring
from ipc_ring import PeerDied, RingClosed, RingReader, RingWriter, _core, cli

if TYPE_CHECKING:
    from conftest import Spawn

# Every wait on a process in these tests gives up after this long.
PATIENCE = 30.0
IPC_RING = f"{shlex.quote(sys.executable)} -m ipc_ring"
PYTHON = shlex.quote(sys.executable)

# docs/FORMAT.md "Header": every field, by the name `inspect` prints it under.
HEADER_FIELDS = [
    "magic",
    "version",
    "ready",
    "capacity",
    "data_offset",
    "max_message_size",
    "reader_fifo_ino",
    "writer_fifo_ino",
    "write_pos",
    "messages_pushed",
    "bytes_pushed",
    "wrap_pos",
    "read_pos",
    "messages_popped",
    "bytes_popped",
    "reader_waiting",
    "data_seq",
    "reader_state",
    "reader_empty_waits",
    "writer_waiting",
    "space_seq",
    "writer_state",
    "writer_generation",
    "writer_full_waits",
    "high_water",
]
# docs/FORMAT.md "Roles and states".
ATTACHED, CLOSED, FAILED = 1, 3, 4

# A `head -3` that reads exactly what it prints, one byte at a time, so that what
# it took from the pipe is known to the byte.
EXACT_HEAD = """
import os
lines = 0
while lines < int(os.environ["HEAD_LINES"]):
    byte = os.read(0, 1)
    if not byte:
        break
    os.write(1, byte)
    lines += byte == b"\\n"
"""


# ---- processes -----------------------------------------------------------------------


def sh(
    script: str, *, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Runs `script` with bash, in a process group of its own that is killed if it
    does not finish within PATIENCE."""
    with subprocess.Popen(
        script,
        shell=True,
        executable="/bin/bash",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=None if env is None else {**os.environ, **env},
    ) as process:
        try:
            out, err = process.communicate(stdin, timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate(timeout=10)
            pytest.fail(f"{script!r} did not finish within {PATIENCE} s; stderr {err!r}")
    return subprocess.CompletedProcess(script, process.returncode, out, err)


def run(*args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`ipc-ring ARGS...`, to completion."""
    return sh(f"{IPC_RING} {shlex.join(map(str, args))}", stdin=stdin)


class Output:
    """A child's stdout, read by a thread so that every wait has a timeout. The
    thread reads only while fewer than `allowed` lines arrived, so a test can leave
    the pipe full, as a next process that stalls does."""

    def __init__(self, stream: object, allowed: float = float("inf")) -> None:
        self.fd: int = stream.fileno()  # type: ignore[attr-defined]
        self.chunks: list[bytes] = []
        self.newlines = 0
        self.tail = b""  # the last bytes
        self.eof = False
        self._allowed = allowed
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self.newlines < self._allowed)
                size = 1 << 16 if self._allowed == float("inf") else 4096
            try:
                chunk = os.read(self.fd, size)
            except OSError:  # closed at teardown
                chunk = b""
            with self._changed:
                if chunk:
                    self.chunks.append(chunk)
                    self.newlines += chunk.count(b"\n")
                    self.tail = (self.tail + chunk)[-4096:]
                else:
                    self.eof = True
                self._changed.notify_all()
            if not chunk:
                return

    @property
    def data(self) -> bytes:
        with self._changed:
            return b"".join(self.chunks)

    def allow(self, lines: float = float("inf")) -> None:
        with self._changed:
            self._allowed = lines
            self._changed.notify_all()

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(condition, timeout=PATIENCE):
                pytest.fail(f"{what} within {PATIENCE} s; the output ends {self.tail[-300:]!r}")

    def wait_lines(self, count: int) -> None:
        self.wait(lambda: self.newlines >= count, f"no {count} lines")

    def wait_eof(self) -> bytes:
        """Everything, once the child closed its end."""
        self.allow()
        self.wait(lambda: self.eof, "no end of output")
        return self.data

    def lines(self) -> list[bytes]:
        """Every complete line, without its newline, once the output ended."""
        return self.wait_eof().split(b"\n")[:-1]


class Processes:
    """Children started in process groups of their own, all killed at teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        script: str,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            script,
            shell=True,
            executable="/bin/bash",
            start_new_session=True,
            bufsize=0,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )
        self.started.append(process)
        return process

    def ipc_ring(
        self,
        *args: str | Path,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """`exec ipc-ring ARGS...`: the process is ipc-ring itself, so signals reach it."""
        script = f"exec {IPC_RING} {shlex.join(map(str, args))}"
        return self.start(script, stdin=stdin, stdout=stdout, stderr=stderr)

    def kill_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                with_group(process, signal.SIGKILL)
            process.wait(timeout=10)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


def with_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


@pytest.fixture
def procs() -> Iterator[Processes]:
    processes = Processes()
    try:
        yield processes
    finally:
        processes.kill_all()


def finish(process: subprocess.Popen[bytes]) -> int:
    """Waits for `process` to exit (within PATIENCE) and returns its status."""
    try:
        return process.wait(timeout=PATIENCE)
    except subprocess.TimeoutExpired:
        with_group(process, signal.SIGKILL)
        process.wait(timeout=10)
        pytest.fail(f"{process.args!r} did not exit within {PATIENCE} s")


def feed(process: subprocess.Popen[bytes], data: bytes, close: bool = False) -> None:
    """Writes `data` to the child's stdin (from a thread, so that a child that stops
    reading fails the test instead of hanging it)."""
    stdin = process.stdin
    assert stdin is not None

    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[stdin.write(view) or 0 :]
        if close:
            stdin.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(PATIENCE)
    if writer.is_alive():
        pytest.fail(f"{process.args!r} did not read {len(data)} bytes of stdin")


def unread(fd: int) -> int:
    """Bytes in the pipe `fd` is an end of that nobody has read yet."""
    count = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, count, True)
    return int.from_bytes(count, sys.byteorder)


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, 1032)  # F_GETPIPE_SZ


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def header(path: Path) -> dict[str, int | bool]:
    """The ring's header as the library reads it (not through the command line)."""
    return _core.inspect(str(path))


def pushed(path: Path, count: int) -> Callable[[], bool]:
    return lambda: path.exists() and header(path)["messages_pushed"] >= count


# ---- what a person reads ---------------------------------------------------------------

INTERNAL = re.compile(
    r"Traceback|\bseed\b|NoneType|positive_int|cpu_pair|\(default: (None|False)\)"
    r"|(?<![\w/.-])_[a-z]\w*"  # a private Python name such as _positive
)


def assert_for_people(text: str, *paths: Path) -> None:
    """No traceback, no private name of the code, no default that says nothing."""
    for path in sorted(map(str, paths), key=len, reverse=True):
        text = text.replace(path, "PATH")
    found = INTERNAL.search(text)
    assert found is None, f"{found.group()!r} in {text!r}"


def error_line(stderr: bytes, prog: str, *paths: Path) -> str:
    """The one line an error prints: `ipc-ring <command>: <message>`."""
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith(f"{prog}: "), lines[0]
    assert_for_people(lines[0], *paths)
    return lines[0]


# ---- messages and what readers got -----------------------------------------------------


def numbered(count: int, width: int = 7, start: int = 0) -> list[bytes]:
    return [b"%0*d" % (width, i) for i in range(start, start + count)]


def as_lines(messages: list[bytes]) -> bytes:
    return b"".join(m + b"\n" for m in messages)


def drain(reader: RingReader) -> list[bytes]:
    """Every message there now, up to the end of the stream if it ended."""
    got = []
    with contextlib.suppress(RingClosed):
        while (message := reader.try_pop()) is not None:
            got.append(message)
    return got


def assert_nothing_lost(
    sent: list[bytes], first: list[bytes], later: list[bytes], max_again: int
) -> None:
    """`first` is what one reader printed and `later` what the next one got: together
    they are everything sent, in order; the only duplicates are where they meet (what
    was in flight when the first one stopped), at most `max_again` of them."""
    assert first == sent[: len(first)], "the first reader printed something else"
    assert len(later) <= len(sent)
    resumed = len(sent) - len(later)
    assert later == sent[resumed:], "the next reader got something else than the rest"
    assert resumed <= len(first), f"messages {len(first)} to {resumed - 1} were lost"
    assert len(first) - resumed <= max_again, (
        f"{len(first) - resumed} messages came again, more than {max_again}"
    )


def in_flight_bound(fd: int, line_size: int) -> int:
    """Messages that may come again after cat stops: what its pipe holds, and one
    batch on its way into it."""
    return (pipe_size(fd) + cli.BATCH_BYTES) // line_size + 1


# ---- write | cat ---------------------------------------------------------------------

# 1,000,000 JSON lines of different lengths, made fast (awk, not Python).
JSON_LINES = r"""seq 0 999999 | awk '{
    n = $1 % 5
    printf "{\"seq\":%d,\"name\":\"item-%d\",\"tags\":[%s]}\n", $1, $1,
        substr("\"x\",\"x\",\"x\",\"x\"", 1, n ? 4 * n - 1 : 0)
}'
"""


def test_a_million_json_lines_cross_two_shell_pipelines_byte_for_byte(
    ring_path: Path, tmp_path: Path, procs: Processes
) -> None:
    generator = tmp_path / "json_lines.sh"
    generator.write_text(JSON_LINES)
    first = sh(f"bash {generator} | head -3").stdout.splitlines()
    assert [json.loads(line)["tags"] for line in first] == [[], ["x"], ["x", "x"]]
    expected = sh(f"bash {generator} | sha256sum")
    assert expected.returncode == 0 and len(expected.stdout.split()[0]) == 64
    producer = procs.start(
        f"set -o pipefail; bash {generator} | {IPC_RING} write {ring_path} --capacity 4194304",
    )
    consumer = sh(f"set -o pipefail; {IPC_RING} cat {ring_path} --wait 30 | sha256sum")
    assert finish(producer) == 0
    assert consumer.returncode == 0, consumer.stderr
    assert consumer.stdout == expected.stdout


FRAMED = [bytes(range(256)) * 3 + b"%d" % i for i in range(50)] + [b""]


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("raw", bytes(range(256)) * 600),
        ("length-prefixed", b"".join(len(m).to_bytes(4, "little") + m for m in FRAMED)),
    ],
)
def test_cat_reproduces_what_write_read_in_each_format(
    ring_path: Path, fmt: str, data: bytes
) -> None:
    writer = run("write", ring_path, "--format", fmt, "--chunk", "1000", stdin=data)
    assert writer.returncode == 0, writer.stderr
    reader = run("cat", ring_path, "--format", fmt)
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout == data


def test_write_sends_one_message_per_line_without_its_newline(ring_path: Path) -> None:
    result = run("write", ring_path, stdin=b"first\n\nthird without newline")
    assert result.returncode == 0, result.stderr
    with RingReader.open(ring_path) as reader:
        assert drain(reader) == [b"first", b"", b"third without newline"]
        with pytest.raises(RingClosed):
            reader.pop(timeout=5)


def framed(*messages: bytes) -> bytes:
    return b"".join(len(m).to_bytes(4, "little") + m for m in messages)


FRAMES = framed(b"hello", b"", b"xyz")
# Pieces of stdin, each read by write before the next is sent, with the messages
# complete after each piece: messages that span reads, in every format.
SPLIT_READS = {
    "lines": (
        [b"ab", b"c\nd", b"e\n\nf", b"gh\n"],
        [[], [b"abc"], [b"de", b""], [b"fgh"]],
    ),
    "raw": (
        [b"ab", b"cdef", b"ghijkl", b"m"],
        [[], [b"abcd"], [b"efgh", b"ijkl"], []],
    ),
    "length-prefixed": (
        [FRAMES[:2], FRAMES[2:7], FRAMES[7:11], FRAMES[11:15], FRAMES[15:]],
        [[], [], [b"hello"], [b""], [b"xyz"]],
    ),
}
AT_THE_END = {"lines": [], "raw": [b"m"], "length-prefixed": []}


@pytest.mark.parametrize("fmt", SPLIT_READS)
def test_write_pushes_every_message_as_soon_as_it_is_complete_across_reads_of_stdin(
    ring_path: Path, procs: Processes, fmt: str
) -> None:
    writer = procs.ipc_ring(
        "write", ring_path, "--format", fmt, "--chunk", "4", stdin=subprocess.PIPE
    )
    assert writer.stdin is not None
    pieces, complete = SPLIT_READS[fmt]
    expected: list[bytes] = []
    for piece, messages in zip(pieces, complete, strict=True):
        feed(writer, piece)
        wait_until(lambda: unread(writer.stdin.fileno()) == 0, "write to read its stdin")  # type: ignore[union-attr]
        expected += messages
        # Pushed while stdin stays open: a message is not held back for more input.
        wait_until(pushed(ring_path, len(expected)), f"{len(expected)} messages pushed")
    writer.stdin.close()
    assert finish(writer) == 0
    with RingReader.open(ring_path) as reader:
        assert drain(reader) == expected + AT_THE_END[fmt]
        with pytest.raises(RingClosed):
            reader.pop(timeout=5)


CUT_INTO_READS = {
    "lines": (b"first\n\nthird\nlast", [b"first", b"", b"third", b"last"]),
    "raw": (b"0123456789abcdefghij", [b"01234567", b"89abcdef", b"ghij"]),
    "length-prefixed": (
        framed(b"first", b"", b"third", b"x" * 9),
        [b"first", b"", b"third", b"x" * 9],
    ),
}


@pytest.mark.parametrize("fmt", CUT_INTO_READS)
def test_every_way_of_cutting_stdin_into_reads_gives_the_same_messages(fmt: str) -> None:
    data, messages = CUT_INTO_READS[fmt]

    def split(chunks: list[bytes]) -> list[bytes]:
        if fmt == "lines":
            batches = cli._split_lines(chunks, 56)
        elif fmt == "raw":
            batches = cli._split_chunks(chunks, 8)
        else:
            batches = cli._split_framed(chunks, 56)
        return [message for batch in batches for message in batch]

    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert split([data[:i], data[i:j], data[j:]]) == messages, (i, j)
    assert split([data[i : i + 1] for i in range(len(data))]) == messages


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("lines", b"short\n" + b"x" * 100),
        ("length-prefixed", framed(b"short") + (100).to_bytes(4, "little") + b"x" * 10),
    ],
)
def test_write_refuses_a_message_over_max_message_size_before_the_rest_arrives(
    ring_path: Path, procs: Processes, fmt: str, data: bytes
) -> None:
    writer = procs.ipc_ring(
        "write", ring_path, "--capacity", "64", "--format", fmt,
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    feed(writer, data)  # and stdin stays open: the message can never fit
    assert finish(writer) == 1
    assert writer.stderr is not None
    assert "max_message_size=56" in error_line(writer.stderr.read(), "ipc-ring write", ring_path)
    with RingReader.open(ring_path) as reader:
        assert reader.pop(timeout=5) == b"short"
        with pytest.raises(PeerDied):  # a failed stream, not an ended one
            reader.pop(timeout=5)


def create_ring_and_sleep(path: str) -> int:
    writer = RingWriter.create(path, 4096)
    writer.push(b"a", timeout=10)
    print("created", flush=True)
    time.sleep(60)
    return 1


def test_write_attach_continues_a_stream_whose_writer_died(ring_path: Path, spawn: Spawn) -> None:
    first = spawn("create_ring_and_sleep", ring_path)
    first.expect_line("created")
    first.kill()
    result = run("write", ring_path, "--attach", "--wait", "10", stdin=b"b\nc\n")
    assert result.returncode == 0, result.stderr
    with RingReader.open(ring_path) as reader:
        assert reader.pop(timeout=5) == b"a"
        with pytest.raises(PeerDied):  # where the killed writer stopped
            reader.pop(timeout=5)
        assert drain(reader) == [b"b", b"c"]
        with pytest.raises(RingClosed):
            reader.pop(timeout=5)


def test_cat_waits_for_the_ring_to_appear(ring_path: Path, procs: Processes) -> None:
    cat = procs.ipc_ring("cat", ring_path, "--wait", "30", stdout=subprocess.PIPE)
    out = Output(cat.stdout)
    # Once cat has loaded the library it is trying to open the ring, which is not there.
    wait_until(lambda: "_core" in Path(f"/proc/{cat.pid}/maps").read_text(), "cat to start")
    assert cat.poll() is None
    assert run("write", ring_path, stdin=b"late\n").returncode == 0
    assert (finish(cat), out.wait_eof()) == (0, b"late\n")


# ---- cat | head ------------------------------------------------------------------------


def test_cat_into_head_prints_three_lines_and_write_leaves_the_stream_open(
    ring_path: Path, procs: Processes
) -> None:
    sent = [b"%04d" % i for i in range(5000)]
    writer = procs.start(
        f"seq -w 0 4999 | {IPC_RING} write {ring_path} --capacity 4096", stderr=subprocess.PIPE
    )
    head = sh(f"set -o pipefail; {IPC_RING} cat {ring_path} --wait 10 | head -3")
    assert head.stdout == as_lines(sent[:3])
    assert head.returncode == 128 + signal.SIGPIPE, head.stderr
    assert head.stderr == b""
    # cat is gone and the ring is full: write stops, without ending the stream:
    # it gave up with input left, so the role is marked failed, not handed over.
    assert finish(writer) == 1
    fields = header(ring_path)
    assert (fields["closed"], fields["writer_state"], fields["writer_alive"]) == (
        False,
        FAILED,
        False,
    )
    assert writer.stderr is not None
    line = error_line(writer.stderr.read(), "ipc-ring write", ring_path)
    assert "not ended" in line and "--attach" in line
    # The next cat gets what head did not take, then hears that the writer
    # stopped early (exit 1), never a clean end.
    cat = run("cat", ring_path, "--wait", "10")
    assert cat.returncode == 1, cat.stderr
    later = cat.stdout.splitlines()
    total = int(fields["messages_pushed"])
    resumed = total - len(later)
    # What head read and did not print is gone with it; the rest is all there.
    assert later == sent[resumed:total]
    # The stream goes on with a writer that attaches: the next cat gets it and a clean end.
    assert run("write", ring_path, "--attach", stdin=b"next\n").returncode == 0
    cat = run("cat", ring_path, "--wait", "10")
    assert (cat.returncode, cat.stdout) == (0, b"next\n"), cat.stderr
    assert resumed >= 3 - 1, "more than the one in flight came again"


def test_cat_into_a_reader_that_stops_after_three_lines_keeps_every_other_line(
    ring_path: Path, procs: Processes
) -> None:
    sent = numbered(100)
    writer = procs.ipc_ring("write", ring_path, stdin=subprocess.PIPE)
    feed(writer, as_lines(sent))
    wait_until(pushed(ring_path, 100), "100 messages pushed")
    # The stream is open and quiet when head goes away: cat must notice by itself.
    head = sh(
        f'{IPC_RING} cat {ring_path} | {PYTHON} -c "$EXACT_HEAD"; echo "${{PIPESTATUS[@]}}" >&2',
        env={"EXACT_HEAD": EXACT_HEAD, "HEAD_LINES": "3"},
    )
    assert head.stdout == as_lines(sent[:3])
    assert head.stderr == b"141 0\n"
    feed(writer, b"", close=True)
    assert finish(writer) == 0
    rest = run("cat", ring_path)
    assert rest.returncode == 0, rest.stderr
    assert_nothing_lost(sent, sent[:3], rest.stdout.split(b"\n")[:-1], max_again=1)


# ---- cat into a full disk or a closed stdout -------------------------------------------


@pytest.mark.parametrize(
    "into",
    [
        "{cat} > /dev/full",
        # bash's ulimit -f counts 1024-byte blocks: a write past 4096 bytes succeeds in
        # part, the next one fails (EFBIG), as on a disk that fills up.
        "(ulimit -f 4; exec {cat} > {tmp}/out.txt)",
    ],
    ids=["dev-full", "file-size-limit"],
)
def test_cat_into_a_full_disk_fails_with_one_line_and_the_ring_keeps_the_rest(
    ring_path: Path, tmp_path: Path, into: str
) -> None:
    sent = numbered(2000, width=6)  # 7 bytes a line: 4096 bytes end inside line 585
    assert run("write", ring_path, "--capacity", "65536", stdin=as_lines(sent)).returncode == 0
    failed = sh(into.format(cat=f"{IPC_RING} cat {ring_path}", tmp=tmp_path))
    assert failed.returncode == 1
    line = error_line(failed.stderr, "ipc-ring cat", ring_path, tmp_path)
    assert "No space left on device" in line or "File too large" in line
    written = (tmp_path / "out.txt").read_bytes() if "ulimit" in into else b""
    assert as_lines(sent).startswith(written)
    rest = run("cat", ring_path)
    assert rest.returncode == 0, rest.stderr
    printed = written.split(b"\n")[:-1]
    # The line written in part is the one in flight: it comes again, whole.
    assert_nothing_lost(sent, printed, rest.stdout.split(b"\n")[:-1], max_again=0)


def test_cat_with_stdout_closed_fails_with_one_line_and_takes_nothing(ring_path: Path) -> None:
    sent = numbered(10)
    assert run("write", ring_path, stdin=as_lines(sent)).returncode == 0
    closed = sh(f"{IPC_RING} cat {ring_path} >&-")
    assert closed.returncode == 1
    assert "stdout" in error_line(closed.stderr, "ipc-ring cat", ring_path)
    rest = run("cat", ring_path)
    assert (rest.returncode, rest.stdout) == (0, as_lines(sent))


# ---- kill -9 and Ctrl-C of cat ---------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_cat_stopped_while_it_streams_loses_nothing(
    ring_path: Path, procs: Processes, signum: signal.Signals
) -> None:
    sent = [b"%07d" % i + b"." * 92 for i in range(3000)]  # 100 bytes a line
    writer = procs.ipc_ring("write", ring_path, "--capacity", "1048576", stdin=subprocess.PIPE)
    feed(writer, as_lines(sent))  # the stream stays open
    wait_until(pushed(ring_path, 3000), "3000 messages pushed")
    cat = procs.ipc_ring("cat", ring_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = Output(cat.stdout, allowed=1000)
    out.wait_lines(1000)  # and cat fills the pipe, in mid-stream
    cat.send_signal(signum)
    assert finish(cat) == (-signal.SIGKILL if signum == signal.SIGKILL else 130)
    printed = out.lines()
    assert cat.stderr is not None and cat.stderr.read() == b""
    after = procs.ipc_ring("cat", ring_path, stdout=subprocess.PIPE)
    later = Output(after.stdout)
    later.wait(lambda: later.tail.endswith(as_lines(sent[-1:])), "no last line")
    feed(writer, b"", close=True)
    assert finish(writer) == 0
    assert finish(after) == 0
    bound = in_flight_bound(out.fd, 100)
    assert_nothing_lost(sent, printed, later.lines(), max_again=bound)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_cat_stopped_between_two_messages_gives_at_most_the_one_in_flight_again(
    ring_path: Path, procs: Processes, signum: signal.Signals
) -> None:
    sent = numbered(20)
    writer = procs.ipc_ring("write", ring_path, stdin=subprocess.PIPE)
    cat = procs.ipc_ring("cat", ring_path, "--wait", "10", stdout=subprocess.PIPE)
    out = Output(cat.stdout)
    for i in range(10):  # one message at a time: each is printed before the next is sent
        feed(writer, as_lines(sent[i : i + 1]))
        out.wait_lines(i + 1)
    cat.send_signal(signum)
    assert finish(cat) == (-signal.SIGKILL if signum == signal.SIGKILL else 130)
    printed = out.lines()
    assert printed == sent[:10]
    feed(writer, as_lines(sent[10:]), close=True)
    assert finish(writer) == 0
    rest = run("cat", ring_path)
    assert rest.returncode == 0
    assert_nothing_lost(sent, printed, rest.stdout.split(b"\n")[:-1], max_again=1)


def test_cat_interrupted_while_nobody_reads_its_output_exits_at_once_and_loses_nothing(
    ring_path: Path, procs: Processes
) -> None:
    sent = [b"%07d" % i + b"." * 992 for i in range(500)]  # 1000 bytes a line
    assert run("write", ring_path, "--capacity", "1048576", stdin=as_lines(sent)).returncode == 0
    cat = procs.ipc_ring("cat", ring_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert cat.stdout is not None
    pipe = cat.stdout.fileno()
    # Full but for less than a line: cat is blocked writing, or about to be.
    wait_until(lambda: unread(pipe) > pipe_size(pipe) - 1000, "cat to fill its pipe")
    cat.send_signal(signal.SIGINT)
    assert finish(cat) == 130
    assert cat.stderr is not None and cat.stderr.read() == b""
    printed = Output(cat.stdout).lines()
    rest = run("cat", ring_path)
    assert rest.returncode == 0
    assert_nothing_lost(sent, printed, rest.stdout.split(b"\n")[:-1], max_again=len(printed))


# ---- kill -9 and Ctrl-C of write -------------------------------------------------------


def concatenated(messages: list[bytes]) -> bytes:
    return b"".join(messages)


def length_prefixed(messages: list[bytes]) -> bytes:
    return framed(*messages)


# Messages in each format (raw: of --chunk 8 bytes), and what they are on stdin and stdout.
WRITE_FORMATS: dict[str, tuple[list[bytes], Callable[[list[bytes]], bytes]]] = {
    "lines": ([b"line %d" % i for i in range(10)], as_lines),
    "raw": ([b"chunk%03d" % i for i in range(10)], concatenated),
    "length-prefixed": ([b"m" * i for i in range(10)], length_prefixed),
}


@pytest.mark.parametrize("fmt", WRITE_FORMATS)
@pytest.mark.parametrize(
    ("ending", "write_status", "cat_status"),
    [("end of input", 0, 0), ("SIGINT", 130, 1), ("SIGKILL", -signal.SIGKILL, 1)],
)
def test_cat_exits_0_only_when_write_reached_the_end_of_its_input(
    ring_path: Path,
    procs: Processes,
    fmt: str,
    ending: str,
    write_status: int,
    cat_status: int,
) -> None:
    messages, encode = WRITE_FORMATS[fmt]
    writer = procs.ipc_ring(
        "write", ring_path, "--format", fmt, "--chunk", "8",
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    cat = procs.ipc_ring(
        "cat", ring_path, "--format", fmt, "--wait", "10",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out = Output(cat.stdout)
    feed(writer, encode(messages))
    # Every message write read is pushed and printed while its stdin stays open.
    out.wait(lambda: out.data == encode(messages), "cat did not print every message")
    if ending == "end of input":
        feed(writer, b"", close=True)
    else:
        writer.send_signal(signal.Signals[ending])
    assert finish(writer) == write_status
    assert writer.stderr is not None and writer.stderr.read() == b""
    assert finish(cat) == cat_status
    assert out.wait_eof() == encode(messages)
    assert cat.stderr is not None
    errors = cat.stderr.read()
    if cat_status == 0:
        assert errors == b""
    else:
        assert "writer died" in error_line(errors, "ipc-ring cat", ring_path)
    fields = header(ring_path)
    assert fields["closed"] is (ending == "end of input")
    assert fields["writer_state"] == {"end of input": CLOSED, "SIGINT": FAILED}.get(
        ending,
        ATTACHED,  # SIGKILL: it died holding the role
    )


def test_write_whose_reader_is_killed_exits_1_and_a_new_reader_continues(
    ring_path: Path, procs: Processes
) -> None:
    sent = [b"%05d" % i for i in range(100000)]  # more than the ring and cat's pipe hold
    writer = procs.start(
        f"seq -w 0 99999 | {IPC_RING} write {ring_path} --capacity 4096", stderr=subprocess.PIPE
    )
    cat = procs.ipc_ring("cat", ring_path, "--wait", "10", stdout=subprocess.PIPE)
    out = Output(cat.stdout, allowed=10)
    out.wait_lines(10)
    cat.kill()
    printed = out.lines()
    # The ring fills up and nobody will empty it: write gives up, the stream open.
    assert finish(writer) == 1
    fields = header(ring_path)
    assert fields["closed"] is False
    assert fields["writer_state"] == FAILED  # it stopped with input left: not a hand-over
    assert (fields["writer_alive"], fields["reader_alive"]) == (False, False)
    assert writer.stderr is not None
    line = error_line(writer.stderr.read(), "ipc-ring write", ring_path)
    assert "reader died" in line and "not ended" in line
    with RingReader.open(ring_path) as reader:
        later = []
        with pytest.raises(PeerDied):  # never RingClosed: the stream was cut short
            while True:
                later.append(reader.pop(timeout=5))
        total = int(header(ring_path)["messages_pushed"])
        assert_nothing_lost(sent[:total], printed, later, in_flight_bound(out.fd, 6))
        assert run("write", ring_path, "--attach", stdin=b"more\n").returncode == 0
        assert reader.pop(timeout=5) == b"more"
        with pytest.raises(RingClosed):
            reader.pop(timeout=5)


# ---- inspect ---------------------------------------------------------------------------


def inspect_json(path: Path) -> dict[str, object]:
    result = run("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    fields: dict[str, object] = json.loads(result.stdout)
    return fields


def as_int(value: object) -> int:
    assert isinstance(value, int)
    return value


def test_inspect_json_is_consistent_while_a_writer_and_a_reader_run(
    ring_path: Path, procs: Processes
) -> None:
    writer = procs.ipc_ring("write", ring_path, "--capacity", "4096", stdin=subprocess.PIPE)
    cat = procs.ipc_ring("cat", ring_path, "--wait", "10", stdout=subprocess.PIPE)
    out = Output(cat.stdout)
    feed(writer, b"first\n")
    out.wait_lines(1)
    idle = header(ring_path)
    previous: dict[str, object] = {}
    bursts = 3
    for burst in range(bursts):  # inspect while 50,000 lines go through a 4 KiB ring
        feeder = threading.Thread(
            target=feed, args=(writer, as_lines(numbered(50000, start=burst * 50000)))
        )
        feeder.start()
        fields = inspect_json(ring_path)
        feeder.join(PATIENCE)
        assert set(HEADER_FIELDS) | set(idle) <= set(fields)
        assert fields["path"] == str(ring_path)
        for constant in HEADER_FIELDS[:8]:
            assert fields[constant] == idle[constant], constant
        assert fields["version"] == _core.FORMAT_VERSION
        used, free = as_int(fields["used_bytes"]), as_int(fields["free_bytes"])
        assert 0 <= used <= 4096 and used + free == 4096
        assert as_int(fields["read_pos"]) <= as_int(fields["write_pos"])
        assert (fields["writer_alive"], fields["reader_alive"], fields["closed"]) == (
            True,
            True,
            False,
        )
        assert (fields["writer_state"], fields["reader_state"]) == (ATTACHED, ATTACHED)
        for counter in ("write_pos", "read_pos", "messages_pushed", "messages_popped"):
            assert as_int(fields[counter]) >= as_int(previous.get(counter, 0)), counter
        previous = fields
    out.wait_lines(1 + bursts * 50000)
    fields = inspect_json(ring_path)  # at rest: everything agrees exactly
    assert fields["used_bytes"] == as_int(fields["write_pos"]) - as_int(fields["read_pos"]) == 0
    assert fields["messages_pushed"] == fields["messages_popped"] == 1 + bursts * 50000
    assert fields["fill_percent"] == 0
    feed(writer, b"", close=True)
    assert (finish(writer), finish(cat)) == (0, 0)
    fields = inspect_json(ring_path)
    assert (fields["closed"], fields["writer_alive"], fields["reader_alive"]) == (
        True,
        False,
        False,
    )
    assert (fields["writer_state"], fields["reader_state"]) == (CLOSED, CLOSED)


def test_inspect_prints_every_header_field_as_aligned_name_value_lines(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 4096) as writer:
        writer.push(b"abc", timeout=5)
        result = run("inspect", ring_path)
        as_json = inspect_json(ring_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert_for_people(result.stdout.decode(), ring_path)
    values = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines}
    assert list(values) == list(as_json), "the same fields as --json, in the same order"
    assert set(HEADER_FIELDS) | set(header(ring_path)) <= set(values)
    assert len({line.index(":") for line in lines}) == 1, "names padded to one width"
    assert values["path"] == str(ring_path)
    assert values["magic"] == f"{as_json['magic']:#018x}"
    assert (values["used_bytes"], values["writer_alive"], values["closed"]) == ("16", "yes", "no")
    for name in HEADER_FIELDS[1:]:
        assert values[name] == str(as_json[name]), name


def test_inspect_never_writes_the_file(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 4096) as writer, RingReader.open(ring_path) as reader:
        writer.push(b"abc", timeout=5)
        before = (ring_path.read_bytes(), ring_path.stat().st_mtime_ns)
        assert run("inspect", ring_path).returncode == 0
        assert run("inspect", ring_path, "--json").returncode == 0
        assert (ring_path.read_bytes(), ring_path.stat().st_mtime_ns) == before
        assert reader.pop(timeout=5) == b"abc"


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"hello world\n" * 1000, "not an ipc_ring file"), (b"x", "shorter than")],
)
def test_inspect_of_a_file_that_is_not_a_ring_exits_1_with_one_line(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(content)
    result = run("inspect", junk)
    assert result.returncode == 1
    assert reason in error_line(result.stderr, "ipc-ring inspect", junk)
    assert junk.read_bytes() == content


# ---- rm ----------------------------------------------------------------------------------


def test_rm_removes_a_ring_and_its_fifos_and_nothing_else(ring_dir: Path) -> None:
    ring, other = ring_dir / "ring", ring_dir / "ring.other"
    other.write_bytes(b"keep")
    assert run("write", ring, stdin=b"x\n").returncode == 0
    assert {p.name for p in ring_dir.iterdir()} == {"ring", "ring.rd", "ring.wr", "ring.other"}
    result = run("rm", ring)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert [p.name for p in ring_dir.iterdir()] == ["ring.other"]
    assert other.read_bytes() == b"keep"


@pytest.mark.parametrize("not_a_ring", ["precious.txt", "empty", "directory"])
def test_rm_refuses_anything_that_is_not_a_ring_and_removes_nothing(
    ring_dir: Path, not_a_ring: str
) -> None:
    ring, target = ring_dir / "ring", ring_dir / not_a_ring
    assert run("write", ring, stdin=b"x\n").returncode == 0
    if not_a_ring == "directory":
        target.mkdir()
    else:
        target.write_bytes(b"precious\n" * 1000 if not_a_ring == "precious.txt" else b"")
    before = {p.name: p.read_bytes() if p.is_file() else None for p in ring_dir.iterdir()}
    result = run("rm", ring, target)
    assert result.returncode == 1
    error_line(result.stderr, "ipc-ring rm", ring_dir)
    after = {p.name: p.read_bytes() if p.is_file() else None for p in ring_dir.iterdir()}
    assert after == before


# ---- bench -----------------------------------------------------------------------------

BENCH_SMALL = ["--cap", "4096", "--messages", "10", "--msg-size", "8", "--latency-samples", "3"]


def test_bench_json_prints_only_the_json_line_and_removes_its_ring(ring_dir: Path) -> None:
    ring = ring_dir / "bench"
    result = run("bench", "--ring", ring, "--cap", "65536", "--messages", "2000",
                 "--msg-size", "64", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["messages"] == 2000
    assert result.stderr == b""  # no progress line when stderr is not a terminal
    assert list(ring_dir.iterdir()) == []


def test_bench_latency_measures_pop_against_the_os_read_floor_and_leaves_nothing(
    ring_dir: Path,
) -> None:
    ring = ring_dir / "bench"
    result = run("bench", "--latency", "--ring", ring, *BENCH_SMALL, "--json")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.decode().splitlines()
    figures = json.loads(line)
    for key in ("round_trip_us", "wakeup_us", "wakeup_floor_us"):
        assert set(figures[key]) == {"p50", "p99", "p99.9", "max"}
    assert figures["wakeup_vs_floor"]["p50"] > 0
    assert list(ring_dir.iterdir()) == []  # the rings and the floor's FIFO


def test_bench_latency_refuses_a_floor_fifo_path_that_exists(ring_dir: Path) -> None:
    ring = ring_dir / "bench"
    floor = ring_dir / "bench.floor"
    floor.write_bytes(b"the only copy\n")
    result = run("bench", "--latency", "--ring", ring, *BENCH_SMALL)
    assert result.returncode == 1
    assert str(floor) in error_line(result.stderr, "ipc-ring bench", floor)
    assert floor.read_bytes() == b"the only copy\n"
    assert sorted(p.name for p in ring_dir.iterdir()) == ["bench.floor"]


@contextlib.contextmanager
def live_ring(path: Path) -> Iterator[None]:
    """An application's ring, with a writer and a reader attached and a message in it."""
    with RingWriter.create(path, 4096) as writer, RingReader.open(path) as reader:
        writer.push(b"before", timeout=5)
        yield
        # It still works, with its message.
        writer.push(b"after", timeout=5)
        assert [reader.pop(timeout=5), reader.pop(timeout=5)] == [b"before", b"after"]


def snapshot(directory: Path) -> list[tuple[str, int, int, bytes]]:
    return [
        (p.name, p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in sorted(directory.iterdir())
    ]


@pytest.mark.parametrize("role", ["both", "--latency", "writer", "latency-client", "reader"])
@pytest.mark.parametrize("existing", ["precious.txt", "a live ring"])
def test_bench_refuses_a_ring_path_that_exists_and_leaves_it_as_it_was(
    ring_dir: Path, role: str, existing: str
) -> None:
    if (existing, role) == ("a live ring", "reader"):
        pytest.skip("a reader run alone attaches to the ring of a writer run alone")
    path = ring_dir / existing
    with contextlib.ExitStack() as stack:
        if existing == "precious.txt":
            path.write_bytes(b"the only copy\n" * 100)
        else:
            stack.enter_context(live_ring(path))
        before = snapshot(ring_dir)
        result = run("bench", role, "--ring", path, *BENCH_SMALL)
        assert result.returncode == 1
        assert str(path) in error_line(result.stderr, "ipc-ring bench", path)
        assert snapshot(ring_dir) == before


def test_bench_progress_line_reports_the_readers_position(
    ring_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ipc_ring import _bench

    monkeypatch.setattr(_bench, "PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(_bench, "PROGRESS_EVERY", 0.02)
    cfg = _bench.BenchConfig(str(ring_path), 4096, messages=4, msg_size=8, progress=True)
    with RingWriter.create(ring_path, 4096) as writer, RingReader.open(ring_path) as reader:
        for _ in range(2):
            writer.push(b"12345678", timeout=5)
        with _bench._Progress(cfg):
            reader.pop(timeout=5)
            reader.pop(timeout=5)
            seen = ""

            def shows_half() -> bool:
                nonlocal seen
                seen += capsys.readouterr().err
                return "50.0%" in seen

            wait_until(shows_half, "a progress line at 50%")


# ---- --version, --help and errors ------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    result = run("--version")
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode() == f"ipc-ring {ipc_ring.__version__}\n"
    assert ipc_ring.__version__ == importlib.metadata.version("ipc-ring")


def help_entries(text: str) -> dict[str, str]:
    """Each option or positional argument of a --help text, with its help."""
    entries: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            spec, _, rest = line.strip().partition("  ")
            name = spec
            entries[name] = rest.strip()
        elif name is not None and line.startswith("   "):
            entries[name] += " " + line.strip()
        else:
            name = None
    return entries


@pytest.mark.parametrize("command", ["", "bench", "inspect", "cat", "write", "rm"])
def test_help_of_every_command_shows_its_defaults_in_words_for_people(command: str) -> None:
    result = run(*([command] if command else []), "--help")
    assert (result.returncode, result.stderr) == (0, b"")
    text = result.stdout.decode()
    assert_for_people(text)
    for spec, description in help_entries(text).items():
        if re.match(r"^--?[\w-]+ [A-Z{]", spec):  # an option that takes a value
            assert "default" in description, f"{spec}: {description!r} shows no default"
    if command == "bench":
        assert "(default: both)" in text  # the optional positional role
    if command in ("cat", "write"):
        assert "(default: lines)" in text
    if command == "write":
        assert "(default: 1048576)" in text and "create the ring (the default)" in text


BAD_COMMAND_LINES = [
    [],
    ["frobnicate"],
    ["bench", "--cap", "x"],
    ["bench", "--cap", "0"],
    ["bench", "--pin", "1"],
    ["bench", "--spin", "-1"],
    ["bench", "--api", "teleport"],
    ["cat"],
    ["cat", "R", "--format", "nope"],
    ["cat", "R", "--wait", "nan"],
    ["write", "R", "--capacity", "-4096"],
    ["write", "R", "--create", "--attach"],
    ["inspect", "R", "--bogus"],
    ["rm"],
]


@pytest.mark.parametrize("args", BAD_COMMAND_LINES, ids=" ".join)
def test_a_command_line_that_does_not_parse_is_one_line_on_stderr(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stdout == b""
    prog = " ".join(["ipc-ring", *args[:1]]) if args and args[0] != "frobnicate" else "ipc-ring"
    line = error_line(result.stderr, prog)
    assert "usage:" not in line and "error:" not in line


@pytest.fixture
def error_setup(ring_dir: Path) -> dict[str, Path]:
    paths = {
        "RING": ring_dir / "ring",
        "MISSING": ring_dir / "missing",
        "JUNK": ring_dir / "junk.txt",
        "DIR": ring_dir,
    }
    paths["JUNK"].write_bytes(b"not a ring\n" * 1000)
    assert run("write", paths["RING"], stdin=b"x\n").returncode == 0
    return paths


ERRORS = [
    ("cat MISSING", "cat", "No such file"),
    ("cat JUNK", "cat", "not an ipc_ring file"),
    ("cat DIR", "cat", "directory"),
    ("cat RING >&-", "cat", "stdout is not open"),
    ("cat RING > /dev/full", "cat", "No space left on device"),
    ("inspect MISSING", "inspect", "No such file"),
    ("inspect JUNK", "inspect", "not an ipc_ring file"),
    ("inspect RING >&-", "inspect", "stdout is not open"),
    ("inspect RING > /dev/full", "inspect", "No space left on device"),
    ("write RING < /dev/null", "write", "--attach"),
    ("write JUNK < /dev/null", "write", "exists"),
    ("write MISSING <&-", "write", "stdin is not open"),
    ("write MISSING --attach < /dev/null", "write", "No such file"),
    ("write MISSING --capacity 100 < /dev/null", "write", "power of two"),
    ("rm MISSING", "rm", "No such file"),
    ("rm JUNK", "rm", "not a ring"),
    ("bench --ring RING", "bench", "exists"),
    ("bench --cap 100", "bench", "power of two"),
    ("bench --msg-size 4", "bench", "--msg-size"),
    ("bench --pin 0,4096", "bench", "CPU 4096"),
    ("bench --spin 2", "bench", "spin"),
    ("bench --cap 64 --msg-size 100", "bench", "max_message_size"),
    ("--version > /dev/full", "", "No space left on device"),
    ("--help > /dev/full", "", "No space left on device"),
]


@pytest.mark.parametrize(("command", "prog", "reason"), ERRORS, ids=[e[0] for e in ERRORS])
def test_every_error_is_one_line_on_stderr_without_a_traceback(
    error_setup: dict[str, Path], command: str, prog: str, reason: str
) -> None:
    if command.startswith("bench"):  # a small run, unless the command says otherwise
        command = command.replace("bench", f"bench {shlex.join(BENCH_SMALL)}", 1)
    script = f"{IPC_RING} {command}"
    for name, path in error_setup.items():
        script = re.sub(rf"\b{name}\b", shlex.quote(str(path)), script)
    result = sh(script)
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr, f"ipc-ring {prog}".strip(), *error_setup.values())
    assert reason in line
    assert stat.S_ISREG(error_setup["JUNK"].stat().st_mode)
    assert error_setup["JUNK"].read_bytes() == b"not a ring\n" * 1000
