"""`ipc-ring bench`: the seed crate's throughput benchmark, between two processes.

The writer puts a little-endian sequence number in the first 8 bytes of
every message and the reader checks each one. The reader times from the
arrival of the first message to the arrival of the last and prints the
seed's JSON line, then a line for people.

Roles: ``both`` (default) removes a stale ring, starts a writer process and
a reader process, lets the writer start once the reader is attached, and
removes the ring at the end; ``writer`` and ``reader`` run one side alone.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from struct import Struct

from ._api import RingReader, RingWriter

# A pop that waits longer than this means the writer is gone: fail, don't hang.
STALL_TIMEOUT = 30.0


def default_ring_path() -> str:
    if sys.platform.startswith("linux") and os.path.isdir("/dev/shm"):
        return "/dev/shm/ipc_ring.bench"
    return os.path.join(tempfile.gettempdir(), "ipc_ring.bench")


@dataclass(frozen=True)
class BenchConfig:
    ring: str
    cap: int
    messages: int
    msg_size: int


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def run_writer(cfg: BenchConfig, wait_for_go: bool) -> int:
    """Create the ring, optionally wait for "go" on stdin, push every message, close."""
    _remove(cfg.ring)
    with RingWriter.create(cfg.ring, cfg.cap) as writer:
        if wait_for_go:
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                return 1
        message = bytearray(cfg.msg_size)
        sequence = memoryview(message)[:8].cast("Q")
        push = writer.push
        for i in range(cfg.messages):
            sequence[0] = i
            push(message, STALL_TIMEOUT)
    if not wait_for_go:
        _remove(cfg.ring)
    return 0


def _open_when_created(path: str, patience: float) -> RingReader:
    deadline = time.monotonic() + patience
    while True:
        try:
            return RingReader.open(path)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def run_reader(cfg: BenchConfig, announce: bool) -> int:
    """Pop and check every message, then print the results."""
    unpack = Struct("<Q").unpack_from
    errors = 0
    with _open_when_created(cfg.ring, STALL_TIMEOUT) as reader:
        if announce:
            print("ready", flush=True)
        pop = reader.pop
        first = pop(STALL_TIMEOUT)
        start = time.perf_counter()
        if len(first) != cfg.msg_size or unpack(first)[0] != 0:
            errors += 1
        for expected in range(1, cfg.messages):
            msg = pop(STALL_TIMEOUT)
            if unpack(msg)[0] != expected or len(msg) != cfg.msg_size:
                errors += 1
        elapsed = time.perf_counter() - start
    # The clock starts when message 0 arrives, so it times messages 1..N-1.
    timed = max(cfg.messages - 1, 1)
    elapsed = max(elapsed, 1e-9)
    rate = timed / elapsed
    mib = rate * cfg.msg_size / (1 << 20)
    line = (
        f'{{"messages":{cfg.messages},"msg_size":{cfg.msg_size},'
        f'"elapsed_sec":{elapsed:.6f},"msgs_per_sec":{rate:.0f},"MiB_per_sec":{mib:.2f}}}'
    )
    print(line)
    print(
        f"ipc_ring {cfg.messages:,} messages of {cfg.msg_size} B through a {cfg.cap:,} B ring "
        f"at {cfg.ring}: {rate / 1e6:.2f} M msgs/s, {mib:,.0f} MiB/s, "
        f"{errors} sequence errors ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()})",
        flush=True,
    )
    return 1 if errors else 0


def _child(role: str, cfg: BenchConfig) -> list[str]:
    return [
        sys.executable, "-m", "ipc_ring", "bench", role,
        "--ring", cfg.ring, "--cap", str(cfg.cap),
        "--messages", str(cfg.messages), "--msg-size", str(cfg.msg_size),
        "--handshake",
    ]  # fmt: skip


def _expect_line(proc: subprocess.Popen[str], want: str, who: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != want:
        raise RuntimeError(f"bench {who} failed to start (said {line!r})")


def run_both(cfg: BenchConfig) -> int:
    """Writer and reader in two fresh processes; the writer starts once the reader is attached."""
    _remove(cfg.ring)
    procs: list[subprocess.Popen[str]] = []
    try:
        writer = subprocess.Popen(
            _child("writer", cfg), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        procs.append(writer)
        _expect_line(writer, "ready", "writer")
        reader = subprocess.Popen(_child("reader", cfg), stdout=subprocess.PIPE, text=True)
        procs.append(reader)
        _expect_line(reader, "ready", "reader")
        assert writer.stdin is not None and reader.stdout is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
        for line in reader.stdout:
            print(line, end="", flush=True)
        codes = [p.wait(timeout=STALL_TIMEOUT) for p in procs]
        return 0 if codes == [0, 0] else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        _remove(cfg.ring)
