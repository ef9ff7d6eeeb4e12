"""The `ipc-ring` command line, run as real processes: write, cat, inspect, bench."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ipc_ring import RingClosed, RingReader, RingWriter

if TYPE_CHECKING:
    from conftest import Child

Spawn = Callable[..., "Child"]
CLI = [sys.executable, "-m", "ipc_ring"]
# Every wait on a process in these tests gives up after this long.
PATIENCE = 60.0

HEADER_FIELDS = [
    "magic",
    "version",
    "ready",
    "capacity",
    "data_offset",
    "max_message_size",
    "write_pos",
    "read_pos",
    "reader_waiting",
    "data_seq",
    "reader_attached",
    "writer_waiting",
    "space_seq",
    "writer_closed",
    "messages_pushed",
    "bytes_pushed",
    "messages_popped",
    "bytes_popped",
    "reader_empty_waits",
    "writer_full_waits",
    "high_water",
]


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, timeout=PATIENCE, check=False
    )


def start(*args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, *args], bufsize=0, **kwargs)  # type: ignore[call-overload, no-any-return]


def finish(process: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    if process.stdin is not None and process.stdin.closed:
        process.stdin = None
    try:
        out, err = process.communicate(timeout=PATIENCE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=10)
        pytest.fail(f"{process.args!r} did not exit within {PATIENCE} s")
    return process.returncode, out or b"", err or b""


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def inspect_json(path: Path) -> dict[str, object]:
    result = run("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    fields: dict[str, object] = json.loads(result.stdout)
    return fields


def one_error_line(stderr: bytes, command: str) -> str:
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ipc-ring {command}: ")
    return lines[0]


# ---- write | cat -----------------------------------------------------------------------

GENERATOR = (
    "import json, sys\n"
    "out = sys.stdout\n"
    "for i in range(1_000_000):\n"
    "    out.write(json.dumps({'seq': i, 'name': 'item-%d' % i, 'tags': ['x'] * (i % 5)}))\n"
    "    out.write('\\n')\n"
)


def test_a_million_json_lines_cross_two_shell_pipelines_byte_for_byte(ring_dir: Path) -> None:
    ring = ring_dir / "lines"
    python = sys.executable
    expected = hashlib.sha256(
        subprocess.run(
            [python, "-c", GENERATOR], capture_output=True, check=True, timeout=PATIENCE
        ).stdout
    ).hexdigest()
    producer = subprocess.Popen(
        f'"{python}" -c "$GENERATOR" | "{python}" -m ipc_ring write "{ring}" --capacity 4194304',
        shell=True,
        env=dict(os.environ, GENERATOR=GENERATOR),
        stderr=subprocess.PIPE,
    )
    consumer = subprocess.Popen(
        f'set -o pipefail; "{python}" -m ipc_ring cat "{ring}" --wait 30 | sha256sum',
        shell=True,
        executable="/bin/bash",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    consumer_status, digest, consumer_err = finish(consumer)
    producer_status, _, producer_err = finish(producer)
    assert producer_status == 0, producer_err
    assert consumer_status == 0, consumer_err
    assert digest.split()[0].decode() == expected


@pytest.mark.parametrize("fmt", ["raw", "length-prefixed"])
def test_cat_reproduces_what_write_read_in_each_format(ring_path: Path, fmt: str) -> None:
    data = bytes(range(256)) * 600
    if fmt == "length-prefixed":
        messages = [data[i : i + (i % 997)] for i in range(0, 20000, 997)]
        data = b"".join(len(m).to_bytes(4, "little") + m for m in messages)
    writer = start("write", str(ring_path), "--format", fmt, "--chunk", "1000",
                   stdin=subprocess.PIPE)  # fmt: skip
    reader = start("cat", str(ring_path), "--format", fmt, "--wait", "30",
                   stdout=subprocess.PIPE)  # fmt: skip
    assert writer.stdin is not None
    writer.stdin.write(data)
    writer.stdin.close()
    assert finish(writer)[0] == 0
    status, out, _ = finish(reader)
    assert status == 0
    assert out == data


def test_write_sends_one_message_per_line_without_its_newline(ring_path: Path) -> None:
    result = run("write", str(ring_path), stdin=b"first\n\nthird without newline")
    assert result.returncode == 0, result.stderr
    with RingReader.open(ring_path) as reader:
        assert [reader.pop(timeout=5) for _ in range(3)] == [
            b"first",
            b"",
            b"third without newline",
        ]
        with pytest.raises(RingClosed):
            reader.pop(timeout=5)


def test_write_rejects_a_line_longer_than_max_message_size_with_one_line(
    ring_path: Path,
) -> None:
    result = run("write", str(ring_path), "--capacity", "64", stdin=b"short\n" + b"x" * 100)
    assert result.returncode == 1
    assert "max_message_size=56" in one_error_line(result.stderr, "write")


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
    result = run("write", str(ring_path), "--attach", "--wait", "10", stdin=b"b\nc\n")
    assert result.returncode == 0, result.stderr
    with RingReader.open(ring_path) as reader:
        assert [reader.pop(timeout=5) for _ in range(3)] == [b"a", b"b", b"c"]
        with pytest.raises(RingClosed):
            reader.pop(timeout=5)


def test_write_exits_1_when_the_reader_died_and_the_ring_is_full(
    ring_path: Path, spawn: Spawn
) -> None:
    writer = start("write", str(ring_path), "--capacity", "4096", stdin=subprocess.PIPE,
                   stderr=subprocess.PIPE)  # fmt: skip
    reader = spawn("attach_reader_and_sleep", ring_path)
    reader.expect_line("attached")
    reader.kill()
    assert writer.stdin is not None
    writer.stdin.write(b"line of text\n" * 10_000)
    writer.stdin.close()
    status, _, err = finish(writer)
    assert status == 1
    assert "reader died" in one_error_line(err, "write")


def attach_reader_and_sleep(path: str) -> int:
    with RingReader.open(path, wait=20):
        print("attached", flush=True)
        time.sleep(60)
    return 1


def test_write_interrupted_closes_the_ring_and_keeps_what_it_pushed(ring_path: Path) -> None:
    writer = start("write", str(ring_path), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdin is not None
    writer.stdin.write(b"one\ntwo\n")
    writer.stdin.flush()
    wait_until(lambda: ring_path.exists() and inspect_json(ring_path)["write_pos"] == 32,
               "two messages pushed")  # fmt: skip
    writer.send_signal(signal.SIGINT)
    status, _, err = finish(writer)
    assert status == 130, err
    assert err == b""
    with RingReader.open(ring_path) as reader:
        assert [reader.pop(timeout=5), reader.pop(timeout=5)] == [b"one", b"two"]
        with pytest.raises(RingClosed):
            reader.pop(timeout=5)


# ---- cat -------------------------------------------------------------------------------


def test_cat_exits_1_with_one_line_when_the_writer_is_killed_mid_stream(
    ring_path: Path,
) -> None:
    writer = start("write", str(ring_path), stdin=subprocess.PIPE)
    reader = start("cat", str(ring_path), "--wait", "30", stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)  # fmt: skip
    assert writer.stdin is not None and reader.stdout is not None
    writer.stdin.write(b"".join(b"message %d\n" % i for i in range(1000)))
    writer.stdin.flush()
    assert reader.stdout.readline() == b"message 0\n"
    writer.kill()
    writer.wait(timeout=PATIENCE)
    writer.stdin.close()
    status, out, err = finish(reader)
    assert status == 1
    assert "writer died" in one_error_line(err, "cat")
    # every message the writer committed was printed before the error
    lines = out.splitlines()
    assert lines == [b"message %d" % i for i in range(1, len(lines) + 1)]


def test_cat_stops_quietly_on_a_closed_pipe_and_leaves_the_rest_in_the_ring(
    ring_path: Path,
) -> None:
    count, size = 3000, 1000
    with RingWriter.create(ring_path, 4 << 20) as writer:
        for i in range(count):
            writer.push(b"%08d" % i + b"x" * (size - 9), timeout=5)
    reader = start("cat", str(ring_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None
    first = reader.stdout.readline()
    assert first.startswith(b"00000000")
    reader.stdout.close()
    reader.stdout = None
    status, _, err = finish(reader)
    assert status == 141
    assert err == b""
    with RingReader.open(ring_path) as rest:
        remaining = []
        with pytest.raises(RingClosed):
            while (msg := rest.try_pop()) is not None:
                remaining.append(int(msg[:8]))
    assert remaining, "cat popped everything although nobody could read it"
    assert remaining == list(range(remaining[0], count))


def test_cat_interrupted_writes_every_message_it_popped(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 1 << 16) as writer:
        reader = start("cat", str(ring_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert reader.stdout is not None
        for i in range(500):
            writer.push(b"%d" % i, timeout=10)
        assert reader.stdout.readline() == b"0\n"
        wait_until(lambda: inspect_json(ring_path)["used_bytes"] == 0, "cat popped everything")
        reader.send_signal(signal.SIGINT)
        status, out, err = finish(reader)
    assert status == 130, err
    assert out.splitlines() == [b"%d" % i for i in range(1, 500)]


def test_cat_waits_for_the_ring_to_appear(ring_path: Path) -> None:
    reader = start("cat", str(ring_path), "--wait", "30", stdout=subprocess.PIPE)
    time.sleep(0.3)
    with RingWriter.create(ring_path, 4096) as writer:
        writer.push(b"late", timeout=5)
    status, out, _ = finish(reader)
    assert (status, out) == (0, b"late\n")


def test_cat_of_a_missing_ring_fails_with_one_line() -> None:
    result = run("cat", "/nonexistent/ring")
    assert result.returncode == 1
    one_error_line(result.stderr, "cat")


# ---- inspect ---------------------------------------------------------------------------


def test_inspect_json_is_consistent_while_a_writer_and_a_reader_run(ring_path: Path) -> None:
    writer = start("write", str(ring_path), "--capacity", "65536", stdin=subprocess.PIPE)
    reader = start("cat", str(ring_path), "--wait", "30", stdout=subprocess.PIPE)
    assert writer.stdin is not None and reader.stdout is not None
    wait_until(ring_path.exists, "the ring file")
    for i in range(200):
        writer.stdin.write(b"%05d\n" % i)
        writer.stdin.flush()
        if i % 50 == 0:
            fields = inspect_json(ring_path)
            assert set(HEADER_FIELDS) <= set(fields)
            assert fields["magic"] == 0x474E495243504921
            assert fields["capacity"] == 65536
            assert fields["max_message_size"] == 65536 - 8
            used = int(fields["used_bytes"])  # type: ignore[call-overload]
            assert used == int(fields["write_pos"]) - int(fields["read_pos"])  # type: ignore[call-overload]
            assert used + int(fields["free_bytes"]) == 65536  # type: ignore[call-overload]
            assert fields["writer_closed"] == 0
            assert fields["closed"] is False
            assert fields["writer_alive"] is True
    assert reader.stdout.readline() == b"00000\n"
    fields = inspect_json(ring_path)
    assert fields["reader_alive"] is True
    assert fields["reader_attached"] == 1
    writer.stdin.close()
    assert finish(writer)[0] == 0
    assert finish(reader)[0] == 0
    fields = inspect_json(ring_path)
    assert (fields["closed"], fields["writer_alive"], fields["reader_alive"]) == (
        True,
        False,
        False,
    )
    assert fields["used_bytes"] == 0


def test_inspect_prints_every_header_field_as_aligned_name_value_lines(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 4096) as writer:
        writer.push(b"abc", timeout=5)
        result = run("inspect", str(ring_path))
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    names = [line.split(":")[0].strip() for line in lines]
    assert set(HEADER_FIELDS) <= set(names)
    assert len({line.index(":") for line in lines}) == 1
    assert "used_bytes        : 16" in lines or any(
        line.split(":")[0].strip() == "used_bytes" and line.endswith(" 16") for line in lines
    )


def test_inspect_never_writes_the_file(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 4096) as writer:
        writer.push(b"abc", timeout=5)
    before = ring_path.read_bytes()
    ring_path.chmod(0o400)
    assert run("inspect", str(ring_path), "--json").returncode == 0
    assert ring_path.read_bytes() == before


def test_inspect_of_a_file_that_is_not_a_ring_exits_1_with_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world\n" * 1000)
    result = run("inspect", str(junk))
    assert result.returncode == 1
    assert "not an ipc_ring file" in one_error_line(result.stderr, "inspect")
    short = tmp_path / "short"
    short.write_bytes(b"x")
    assert run("inspect", str(short)).returncode == 1


# ---- bench -----------------------------------------------------------------------------


def test_bench_json_prints_only_the_json_line(ring_dir: Path) -> None:
    result = run("bench", "--ring", str(ring_dir / "bench"), "--cap", "65536",
                 "--messages", "2000", "--msg-size", "64", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["messages"] == 2000
    assert result.stderr == b""  # no progress line when stderr is not a terminal


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
            wait_until(lambda: "50.0%" in capsys.readouterr().err, "a progress line at 50%")


def test_write_splits_lines_that_span_several_reads_of_stdin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    from ipc_ring import cli

    monkeypatch.setattr(cli, "OUT_BUFFER", 3)
    data = b"abcdefgh\n\nij\nklmnopq"
    lines = [line for batch in cli._read_lines(io.BytesIO(data)) for line in batch]
    assert lines == [b"abcdefgh", b"", b"ij", b"klmnopq"]
