"""`ipc-ring bench`: the seed crate's throughput benchmark, between two processes.

The writer puts a little-endian sequence number in the first 8 bytes of
every message and the reader checks each one. The reader times from the
arrival of the first message to the arrival of the last and prints the
seed's JSON line, then a line for people.

Roles: ``both`` (default) starts a writer process, which creates a ring
under a path that must not exist, and a reader process, lets the writer
start once the reader is attached, and removes the ring it created at the
end; ``writer`` and ``reader`` run one side alone. Bench never removes a
file it did not create.

APIs (``--api``): ``single`` (push / pop), ``into`` (push / pop_into a reused
buffer, as the seed's reader pops into a reused Vec), ``batch`` (push_many / pop_many of
``--batch`` messages), ``zero-copy`` (reserve / pop_view: the writer writes
the whole message into the reserved record, the reader reads it in place).

``--latency`` measures instead: the round trip of one message through two
rings (spinning), and the one-way wake-up latency of a reader asleep in pop,
taking turns with the floor (os.read asleep on a pipe) in the same run; the
sender sleeps between those messages, so no spin of its own competes with the
wake-up it measures.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from struct import Struct

from ._api import RingReader, RingWriter, unlink
from ._core import RingError

# A pop that waits longer than this means the writer is gone: fail, don't hang.
STALL_TIMEOUT = 30.0
APIS = ("single", "into", "batch", "zero-copy")
SEQUENCE = Struct("<Q")


def _ring_dir() -> str:
    if sys.platform.startswith("linux") and os.path.isdir("/dev/shm"):
        return "/dev/shm"
    return tempfile.gettempdir()


def default_ring_path() -> str:
    """The ring of a writer and a reader run by hand, one command each."""
    return os.path.join(_ring_dir(), "ipc_ring.bench")


def fresh_ring_path() -> str:
    """A name for the ring of one run, used by nothing else."""
    return os.path.join(_ring_dir(), f"ipc_ring.bench.{os.getpid()}.{secrets.token_hex(4)}")


def _refuse_existing(*paths: str) -> None:
    for path in paths:
        if os.path.lexists(path):
            raise FileExistsError(
                f"{path!r} exists: bench creates its ring (or, for --latency, the ring's "
                "pong ring and floor FIFO) there and removes it afterwards, "
                "so it needs a path that does not exist (it never removes a file it did "
                "not create)"
            )


@dataclass(frozen=True)
class BenchConfig:
    ring: str
    cap: int
    messages: int
    msg_size: int
    api: str = "single"
    batch: int = 256
    spin: float | None = None
    pin: tuple[int, int] | None = None  # writer's CPU, reader's CPU
    latency_samples: int = 2000
    json_only: bool = False  # print only the JSON lines
    progress: bool = False  # a \r progress line on stderr for runs longer than 2 s


def _remove(path: str) -> None:
    """Remove a ring this process (or its child) created, and its FIFOs."""
    with contextlib.suppress(FileNotFoundError):
        unlink(path)


class _Progress:
    """From PROGRESS_AFTER seconds on, a thread rewrites one stderr line every
    PROGRESS_EVERY seconds with the reader's progress, read from the ring
    file's header (read_pos) without touching the ring."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.shown = False

    def __enter__(self) -> _Progress:
        if self.cfg.progress:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    def _run(self) -> None:
        from ._inspect import inspect_ring

        record = (8 + self.cfg.msg_size + 7) & ~7
        total = record * self.cfg.messages
        start = time.monotonic()
        if self.done.wait(PROGRESS_AFTER):
            return
        while not self.done.wait(PROGRESS_EVERY):
            try:
                read_pos = int(inspect_ring(self.cfg.ring)["read_pos"])
            except (OSError, ValueError, RingError):
                continue
            percent = min(100.0 * read_pos / total, 100.0)
            elapsed = time.monotonic() - start
            sys.stderr.write(
                f"\r{percent:5.1f}% of {self.cfg.messages:,} messages, {elapsed:.0f} s"
            )
            sys.stderr.flush()
            self.shown = True


PROGRESS_AFTER = 2.0
PROGRESS_EVERY = 0.5


def _pin(cfg: BenchConfig, role: str) -> None:
    if cfg.pin is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cfg.pin[0] if role == "writer" else cfg.pin[1]})


# ---- throughput ------------------------------------------------------------


def _write_single(writer: RingWriter, cfg: BenchConfig) -> None:
    message = bytearray(cfg.msg_size)
    sequence = memoryview(message)[:8].cast("Q")
    push, timeout = writer.push, STALL_TIMEOUT
    for i in range(cfg.messages):
        sequence[0] = i
        push(message, timeout)


def _write_batch(writer: RingWriter, cfg: BenchConfig) -> None:
    # One buffer holds a whole batch; one pack_into sets every sequence number.
    size, batch = cfg.msg_size, cfg.batch
    block = memoryview(bytearray(size * batch))
    messages = [block[k * size : (k + 1) * size] for k in range(batch)]
    layout = Struct("<" + f"Q{size - 8}x" * batch)
    sequences = [m[:8].cast("Q") for m in messages]
    push_many = writer.push_many
    for start in range(0, cfg.messages, batch):
        count = min(batch, cfg.messages - start)
        if count == batch:
            layout.pack_into(block, 0, *range(start, start + batch))
            push_many(messages, STALL_TIMEOUT)
        else:
            for j in range(count):
                sequences[j][0] = start + j
            push_many(messages[:count], STALL_TIMEOUT)


def _write_zero_copy(writer: RingWriter, cfg: BenchConfig) -> None:
    # The whole message is written into the reservation, in place: the same
    # bytes land in the ring as with push, with one copy fewer on the way out
    # of the reader, which reads them where they are.
    message = bytearray(cfg.msg_size)
    sequence = memoryview(message)[:8].cast("Q")
    reserve = writer.reserve
    size = cfg.msg_size
    for i in range(cfg.messages):
        sequence[0] = i
        with reserve(size, STALL_TIMEOUT) as mv:
            mv[:] = message


WRITERS: dict[str, Callable[[RingWriter, BenchConfig], None]] = {
    "single": _write_single,
    "into": _write_single,
    "batch": _write_batch,
    "zero-copy": _write_zero_copy,
}


def _read_single(reader: RingReader, cfg: BenchConfig) -> tuple[float, int]:
    unpack = SEQUENCE.unpack_from
    pop, timeout, size = reader.pop, STALL_TIMEOUT, cfg.msg_size
    errors = 0
    first = pop(timeout)
    start = time.perf_counter()
    if len(first) != size or unpack(first)[0] != 0:
        errors += 1
    for expected in range(1, cfg.messages):
        msg = pop(timeout)
        if unpack(msg)[0] != expected or len(msg) != size:
            errors += 1
    return start, errors


def _count_errors(batch: list[bytes], following: range, size: int) -> int:
    """Messages of `batch` whose sequence number or length is wrong."""
    unpack = SEQUENCE.unpack_from
    pairs = zip(batch, following, strict=True)
    return sum(len(msg) != size or unpack(msg)[0] != want for msg, want in pairs)


def _read_into(reader: RingReader, cfg: BenchConfig) -> tuple[float, int]:
    # pop_into a reused buffer, as the seed's reader pops into a reused Vec.
    buffer = bytearray(cfg.msg_size)
    sequence = memoryview(buffer)[:8].cast("Q")
    pop_into, timeout, size = reader.pop_into, STALL_TIMEOUT, cfg.msg_size
    errors = 0
    if pop_into(buffer, timeout) != size or sequence[0] != 0:
        errors += 1
    start = time.perf_counter()
    for expected in range(1, cfg.messages):
        if pop_into(buffer, timeout) != size or sequence[0] != expected:
            errors += 1
    return start, errors


def _read_batch(reader: RingReader, cfg: BenchConfig) -> tuple[float, int]:
    pop_many = reader.pop_many
    size = cfg.msg_size
    errors = 0
    expected = 0
    start = 0.0
    while expected < cfg.messages:
        batch = pop_many(min(cfg.batch, cfg.messages - expected), STALL_TIMEOUT)
        if expected == 0:
            start = time.perf_counter()
        # Every sequence number, a batch at a time: in the joined batch each
        # one must sit at exactly k * size, and the total length must be
        # len(batch) * size, so a message of any other length shifts every
        # later one and fails the check.
        following = range(expected, expected + len(batch))
        if size % 8 == 0:
            joined = b"".join(batch)
            sequences = memoryview(joined).cast("Q")[:: size // 8].tolist()
            if len(joined) != size * len(batch) or sequences != list(following):
                errors += _count_errors(batch, following, size)
        else:
            errors += _count_errors(batch, following, size)
        expected += len(batch)
    return start, errors


def _read_zero_copy(reader: RingReader, cfg: BenchConfig) -> tuple[float, int]:
    unpack = SEQUENCE.unpack_from
    pop_view = reader.pop_view
    size = cfg.msg_size
    errors = 0
    start = 0.0
    for expected in range(cfg.messages):
        with pop_view(STALL_TIMEOUT) as mv:
            if unpack(mv)[0] != expected or len(mv) != size:
                errors += 1
        if expected == 0:
            start = time.perf_counter()
    return start, errors


READERS: dict[str, Callable[[RingReader, BenchConfig], tuple[float, int]]] = {
    "single": _read_single,
    "into": _read_into,
    "batch": _read_batch,
    "zero-copy": _read_zero_copy,
}


def run_writer(cfg: BenchConfig, wait_for_go: bool) -> int:
    """Create the ring, optionally wait for "go" on stdin, push every message, close."""
    _pin(cfg, "writer")
    with RingWriter.create(cfg.ring, cfg.cap, spin=cfg.spin) as writer:
        if wait_for_go:
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                return 1
        WRITERS[cfg.api](writer, cfg)
    if not wait_for_go:
        _remove(cfg.ring)
    return 0


def run_reader(cfg: BenchConfig, announce: bool) -> int:
    """Pop and check every message, then print the results."""
    _pin(cfg, "reader")
    with RingReader.open(cfg.ring, spin=cfg.spin, wait=STALL_TIMEOUT) as reader:
        if announce:
            print("ready", flush=True)
        with _Progress(cfg):
            start, errors = READERS[cfg.api](reader, cfg)
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
    print(line, flush=cfg.json_only)
    if cfg.json_only:
        return 1 if errors else 0
    api = cfg.api if cfg.api != "batch" else f"batch of {cfg.batch}"
    print(
        f"ipc_ring ({api}) {cfg.messages:,} messages of {cfg.msg_size} B through a "
        f"{cfg.cap:,} B ring at {cfg.ring}: {rate / 1e6:.2f} M msgs/s, {mib:,.0f} MiB/s, "
        f"{rate * cfg.msg_size / 1e9:.2f} GB/s, {errors} sequence errors "
        f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})",
        flush=True,
    )
    return 1 if errors else 0


# ---- orchestration ---------------------------------------------------------


def _child(role: str, cfg: BenchConfig) -> list[str]:
    args = [
        sys.executable, "-m", "ipc_ring", "bench", role,
        "--ring", cfg.ring, "--cap", str(cfg.cap),
        "--messages", str(cfg.messages), "--msg-size", str(cfg.msg_size),
        "--api", cfg.api, "--batch", str(cfg.batch),
        "--latency-samples", str(cfg.latency_samples), "--handshake",
    ]  # fmt: skip
    if cfg.spin is not None:
        args += ["--spin", str(cfg.spin)]
    if cfg.pin is not None:
        args += ["--pin", f"{cfg.pin[0]},{cfg.pin[1]}"]
    return args


class BenchError(Exception):
    """A side of the benchmark failed (its own error is on stderr already)."""


def _expect_line(proc: subprocess.Popen[str], want: str, who: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != want:
        proc.wait(timeout=STALL_TIMEOUT)
        raise BenchError(f"the {who} process failed to start (exit status {proc.returncode})")


def _run_pair(
    first: list[str],
    second: list[str],
    rings: tuple[str | None, str | None],
    cfg: BenchConfig | None = None,
) -> int:
    """Start `first` (it creates rings[0], if any, and waits for "go" on stdin),
    then `second` (it creates rings[1], if any, attaches and says "ready"), then
    let `first` go; relay `second`'s output. Removes the rings they created."""
    _refuse_existing(*(ring for ring in rings if ring))
    procs: list[subprocess.Popen[str]] = []
    created: list[str] = []
    try:
        one = subprocess.Popen(first, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(one)
        _expect_line(one, "ready", first[4])
        if rings[0]:
            created.append(rings[0])
        two = subprocess.Popen(second, stdout=subprocess.PIPE, text=True)
        procs.append(two)
        _expect_line(two, "ready", second[4])
        if rings[1]:
            created.append(rings[1])
        assert one.stdin is not None and two.stdout is not None
        one.stdin.write("go\n")
        one.stdin.flush()
        json_only = cfg is not None and cfg.json_only
        with _Progress(cfg) if cfg is not None else contextlib.nullcontext():
            for line in two.stdout:
                if not json_only or line.startswith("{"):
                    print(line, end="", flush=True)
        codes = [p.wait(timeout=STALL_TIMEOUT) for p in procs]
        return 0 if codes == [0, 0] else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ring in created:
            _remove(ring)


def run_both(cfg: BenchConfig) -> int:
    """Writer and reader in two fresh processes; the writer starts once the reader is attached."""
    return _run_pair(_child("writer", cfg), _child("reader", cfg), (cfg.ring, None), cfg)


# ---- latency ---------------------------------------------------------------


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0

    return {"p50": at(0.50), "p99": at(0.99), "p99.9": at(0.999), "max": ordered[-1] / 1000.0}


def _pong_path(cfg: BenchConfig) -> str:
    return cfg.ring + ".pong"


def _warmup(cfg: BenchConfig) -> int:
    return min(1000, cfg.messages)


def _floor_path(cfg: BenchConfig) -> str:
    return cfg.ring + ".floor"


def _read_exactly(fd: int, size: int) -> bytes:
    data = os.read(fd, size)
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            raise EOFError("the floor pipe closed inside a message")
        data += more
    return data


def run_latency_echo(cfg: BenchConfig) -> int:
    """Far side: create the pong ring and the floor FIFO, wait for go, echo the
    round-trip messages, then time the wake-ups: each message carries the monotonic
    clock at its push, and this side sleeps in pop (or, every other message, in
    os.read on the FIFO: the floor) between them. The wake-up samples go back to the
    client as a last message."""
    _pin(cfg, "writer")
    floor = _floor_path(cfg)
    os.mkfifo(floor, 0o600)
    try:
        # Read-only, so that the client's death reads as the end of the FIFO; opened
        # without blocking (there is no writer yet), then made blocking for the reads.
        floor_fd = os.open(floor, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.set_blocking(floor_fd, True)
            return _echo(cfg, floor_fd)
        finally:
            os.close(floor_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(floor)


def _echo(cfg: BenchConfig, floor_fd: int) -> int:
    with RingWriter.create(_pong_path(cfg), cfg.cap, spin=cfg.spin) as pong:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        with RingReader.open(cfg.ring, spin=cfg.spin, wait=STALL_TIMEOUT) as ping:
            for _ in range(cfg.messages + _warmup(cfg)):
                pong.push(ping.pop(STALL_TIMEOUT), STALL_TIMEOUT)
            wakes: list[int] = []
            floors: list[int] = []
            mono, unpack = time.monotonic_ns, SEQUENCE.unpack_from
            for i in range(2 * cfg.latency_samples):
                if i % 2 == 0:
                    msg = ping.pop(STALL_TIMEOUT)
                    wakes.append(mono() - unpack(msg)[0])
                else:
                    msg = _read_exactly(floor_fd, cfg.msg_size)
                    floors.append(mono() - unpack(msg)[0])
            pong.push(json.dumps({"pop": wakes, "os_read": floors}).encode(), STALL_TIMEOUT)
    return 0


def run_latency_client(cfg: BenchConfig) -> int:
    """Near side: round trips with both sides spinning, then one message every
    millisecond to the sleeping far side, which times its wake-up: alternately
    through the ring and through a pipe (the os.read floor, measured in the same
    run). This side only sleeps between those messages and waits for no reply, so
    nothing of its own spins on the other core while the far side is woken."""
    _pin(cfg, "reader")
    pong = RingReader.open(_pong_path(cfg), spin=cfg.spin, wait=STALL_TIMEOUT)
    with pong, RingWriter.create(cfg.ring, cfg.cap, spin=cfg.spin) as ping:
        print("ready", flush=True)
        message = bytearray(cfg.msg_size)
        sequence = memoryview(message)[:8].cast("Q")
        clock = time.perf_counter_ns
        rounds: list[int] = []
        warmup = _warmup(cfg)
        for i in range(cfg.messages + warmup):
            sequence[0] = i
            t0 = clock()
            ping.push(message, STALL_TIMEOUT)
            echoed = pong.pop(STALL_TIMEOUT)
            t1 = clock()
            if SEQUENCE.unpack_from(echoed)[0] != i:
                print(f"round trip {i}: wrong message", file=sys.stderr)
                return 1
            if i >= warmup:
                rounds.append(t1 - t0)
        # Non-blocking: ENXIO at once if the far side is gone (it holds the read end).
        floor_fd = os.open(_floor_path(cfg), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(floor_fd, True)
        try:
            # 1 ms apart: far longer than the far side's spin, so it is asleep.
            for i in range(2 * cfg.latency_samples):
                time.sleep(0.001)
                sequence[0] = time.monotonic_ns()
                if i % 2 == 0:
                    ping.push(message, STALL_TIMEOUT)
                else:
                    os.write(floor_fd, message)
        finally:
            os.close(floor_fd)
        wakes: dict[str, list[int]] = json.loads(pong.pop(STALL_TIMEOUT))
    rt = _percentiles(rounds)
    wk = _percentiles(wakes["pop"])
    fl = _percentiles(wakes["os_read"])
    ratio = {q: round(wk[q] / fl[q], 3) for q in ("p50", "p99", "p99.9")}
    print(json.dumps({"msg_size": cfg.msg_size, "round_trip_us": rt, "wakeup_us": wk,
                      "wakeup_floor_us": fl, "wakeup_vs_floor": ratio}))  # fmt: skip
    if cfg.json_only:
        return 0
    print(
        f"round trip, both sides spinning ({len(rounds):,} messages of {cfg.msg_size} B): "
        f"p50 {rt['p50']:.2f} us, p99 {rt['p99']:.2f} us, p99.9 {rt['p99.9']:.2f} us\n"
        f"one way to a reader asleep in pop ({len(wakes['pop']):,} samples, 1 ms apart, "
        f"the sender asleep between them): "
        f"p50 {wk['p50']:.1f} us, p99 {wk['p99']:.1f} us, p99.9 {wk['p99.9']:.1f} us\n"
        f"floor, os.read asleep on a pipe (the same run, taking turns with pop): "
        f"p50 {fl['p50']:.1f} us, p99 {fl['p99']:.1f} us, p99.9 {fl['p99.9']:.1f} us\n"
        f"pop / floor: p50 {ratio['p50']:.2f}x, p99 {ratio['p99']:.2f}x, "
        f"p99.9 {ratio['p99.9']:.2f}x",
        flush=True,
    )
    return 0


def run_latency(cfg: BenchConfig) -> int:
    floor = _floor_path(cfg)
    _refuse_existing(floor)
    try:
        return _run_latency_pair(cfg)
    finally:
        # The far side removes it; a far side that was killed cannot. Nothing else had
        # that name when the run began (refused above), and only a FIFO is removed.
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.lstat(floor).st_mode):
                os.unlink(floor)


def _run_latency_pair(cfg: BenchConfig) -> int:
    return _run_pair(
        _child("latency-echo", cfg),
        _child("latency-client", cfg),
        (_pong_path(cfg), cfg.ring),
        BenchConfig(cfg.ring, cfg.cap, 1, cfg.msg_size, json_only=cfg.json_only),
    )
