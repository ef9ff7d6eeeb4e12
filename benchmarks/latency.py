"""Wake-up latency of ipc_ring against the other ways to block for a message, with the floors.

``python benchmarks/compare.py --section latency`` runs this (so does ``python
benchmarks/latency.py``, with the same options). What it measures:

- One way, to a receiver asleep in its receive call: this process (the near side) sends one
  message every --gap-us microseconds (1 ms: far longer than any transport's spin), carrying
  ``time.monotonic_ns()`` taken just before the send call; a "spawn" child (the far side),
  asleep in the transport's blocking receive since the last one, takes ``time.monotonic_ns()``
  when the receive returns. The near side only sleeps between sends: it waits for no reply,
  so nothing of its own runs on the other core while the far side is being woken.
- The writer woken by room: the far side blocks in a send on a full channel (an ipc_ring ring
  of 4 KiB messages, a pipe of 4 KiB writes, one page each); the near side takes the clock,
  stores it in shared memory and receives one message, which frees room; the far side's send
  returns and it takes the clock.
- Round trip: the near side sends and blocks in the receive of the reply; the far side, asleep,
  receives, sends it back and goes back to its receive; one every --gap-us. Spinning in either
  receive is allowed, as a user gets it. Here the cases take turns in runs of 11 round trips,
  of which the last is dropped: after it the far side goes on to another case's receive, and
  what it does there (which differs from case to case) can hold the CPU that the reply's
  wake-up lands on.
- Placement is left to the scheduler, as a user gets it (--pin NEAR,FAR pins the two sides).
  Unpinned, with one message a millisecond, nearly every receiver here woke on the CPU its
  sender ran on (sched_getcpu() on both sides: all but 1-27 of 1,990 samples, pipe and futex
  alike), after the sender went to sleep. Pinned, every wake-up crosses to a halted vCPU and
  costs ~40 us here; with many cases in one pinned run the per-case figures turned bimodal.
- Every case takes part in every run, one sample each per round; each round's order is drawn
  afresh (random.Random(run number), the same on both sides; --fixed-order for the old
  "sample i goes through case i mod N"). A fixed order biases the ratios: which case comes
  right after which changes what each one costs (in a scratch harness of one receiver
  process per case, a second os.read receiver was 0.88-0.95x the first in 5 of 5 fixed-order
  runs, and six identical receivers spread over 0.95-1.09x;
  taking turns in random order, same-kind receivers agreed within ~2%). The ratios to the
  floors are taken within a run and the table gives their medians over --runs runs, and the
  medians of p50, p99 and p99.9.
- The floors: Python ``os.read`` asleep on a pipe woken by ``os.write`` (the least a blocking
  receive costs in Python, the interpreter's return path included), ``os.write`` on a full
  pipe woken by ``os.read`` (for the writer woken by room), and an ``asyncio``
  ``loop.add_reader`` callback on a pipe resolving a future that a coroutine awaits (for
  ``pop_async``). In C (benchmarks/wake_latency.c, built here, run once per round after the
  Python cases): a bare FUTEX_WAIT/FUTEX_WAKE, a pipe, and the C core's own wait path.
- The rings use the default spin; IPC_RING_LATENCY_SPIN=SECONDS in the environment sets another
  (both sides, both rings: IPC_RING_LATENCY_SPIN=0 for the round trip without spinning).
- Messages are 64 bytes (the clock in the first 8), 4 KiB for the writer-woken cases. The first
  10 samples of each case in each phase are left out (its first wait sets things up). The
  transports: ipc_ring's ``pop`` (a RingReader, default spin) and ``pop_async``, ipc_ring.Pipe's
  ``recv_bytes``, multiprocessing.Pipe() ``recv_bytes``, multiprocessing.Queue ``get``, pyzmq
  PAIR over ipc:// ``recv``, posix_ipc ``MessageQueue.receive``, faster-fifo ``get``; those whose
  module is missing are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fcntl
import json
import mmap
import multiprocessing
import os
import random
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import ipc_ring

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZE = 64
ROOM_SIZE = 4096  # one pipe page: a pipe's writer waits for a whole free page
CAPACITY = 1 << 16
STAMP = struct.Struct("<Q")
TIMEOUT = 30.0
RT_BLOCK = 10  # round trips kept per turn of a case (one more is made and dropped)
WARMUP = 10  # samples of each case left out at the start of each phase
QUANTILES = {"p50": 0.50, "p99": 0.99, "p99.9": 0.999}


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)
    return {k: ordered[min(n - 1, int(q * n))] / 1000.0 for k, q in QUANTILES.items()}


def _message(size: int = SIZE) -> bytearray:
    return bytearray(size)


def _stamped(message: bytearray) -> bytearray:
    STAMP.pack_into(message, 0, time.monotonic_ns())
    return message


# ---- the transports: each gives the near side and the far side a pair of calls ------------


@dataclass
class Ends:
    """One side's calls: a blocking send, a blocking receive, and what closes them."""

    send: Callable[[Any], object]
    recv: Callable[[], Any]
    close: Callable[[], object] = lambda: None
    recv_async: Callable[[], Any] | None = None  # a coroutine function, for the async cases
    fill: Callable[[], object] | None = None  # make the channel full (the writer-woken cases)


def _ring_pair(paths: tuple[str, str], near: bool) -> Ends:
    """Two rings, ping (near -> far) and pong (far -> near); each side creates the one it writes."""
    ping, pong = paths
    env = os.environ.get("IPC_RING_LATENCY_SPIN")
    spin = None if env is None else float(env)
    if near:
        writer = ipc_ring.RingWriter.create(ping, CAPACITY, spin=spin)
        reader = ipc_ring.RingReader.open(pong, wait=TIMEOUT, spin=spin)
    else:
        writer = ipc_ring.RingWriter.create(pong, CAPACITY, spin=spin)
        reader = ipc_ring.RingReader.open(ping, wait=TIMEOUT, spin=spin)
    pop, push = reader.pop, writer.push

    def close() -> None:
        writer.close()
        reader.close()

    async def recv_async() -> bytes:
        return await reader.pop_async(TIMEOUT)

    def fill() -> None:
        while writer.try_push(bytes(ROOM_SIZE)):
            pass

    return Ends(lambda m: push(m, TIMEOUT), lambda: pop(TIMEOUT), close, recv_async, fill)


@contextlib.contextmanager
def ring_channel(ctx: Any) -> Iterator[tuple[str, str]]:
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="ipc_ring_latency.", dir=shm) as directory:
        yield os.path.join(directory, "ping"), os.path.join(directory, "pong")


@contextlib.contextmanager
def pipes_channel(ctx: Any) -> Iterator[tuple[Connection, ...]]:
    """Two os.pipe()s, wrapped in Connections to travel to a spawned child."""
    ends: list[Connection] = []
    for _ in range(2):
        r, w = os.pipe()
        ends += [Connection(r, writable=False), Connection(w, readable=False)]
    try:
        yield tuple(ends)
    finally:
        for end in ends:
            end.close()


def _os_pipe(ends: tuple[Connection, ...], near: bool, size: int = SIZE) -> Ends:
    ping_r, ping_w, pong_r, pong_w = (e.fileno() for e in ends)
    out, back = (ping_w, pong_r) if near else (pong_w, ping_r)
    read, write = os.read, os.write

    def fill() -> None:
        flags = fcntl.fcntl(out, fcntl.F_GETFL)
        fcntl.fcntl(out, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        with contextlib.suppress(BlockingIOError):
            while True:
                write(out, bytes(size))
        fcntl.fcntl(out, fcntl.F_SETFL, flags)

    return Ends(lambda m: write(out, m), lambda: read(back, size), fill=fill)


def _os_pipe_room(ends: tuple[Connection, ...], near: bool) -> Ends:
    return _os_pipe(ends, near, ROOM_SIZE)


def _asyncio_pipe(ends: tuple[Connection, ...], near: bool) -> Ends:
    """The far side's receive: a reader callback registered once, resolving a future."""
    base = _os_pipe(ends, near)
    if near:
        return base
    fd = ends[0].fileno()
    arrived: collections.deque[bytes] = collections.deque()
    state: dict[str, Any] = {}

    def readable() -> None:
        arrived.append(os.read(fd, SIZE))
        waiter = state.pop("waiter", None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv_async() -> bytes:
        loop = asyncio.get_running_loop()
        if "loop" not in state:
            state["loop"] = loop
            loop.add_reader(fd, readable)
        if not arrived:
            state["waiter"] = loop.create_future()
            await state["waiter"]
        return arrived.popleft()

    def close() -> None:
        if "loop" in state:
            state["loop"].remove_reader(fd)

    base.recv_async, base.close = recv_async, close
    return base


@contextlib.contextmanager
def _connections(make: Callable[[], tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    a, b = make()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def ipc_pipe_channel(ctx: Any) -> contextlib.AbstractContextManager[tuple[Any, Any]]:
    return _connections(ipc_ring.Pipe)


def mp_pipe_channel(ctx: Any) -> contextlib.AbstractContextManager[tuple[Any, Any]]:
    return _connections(ctx.Pipe)


def _connection(ends: tuple[Any, Any], near: bool) -> Ends:
    """An end of ipc_ring.Pipe or multiprocessing.Pipe: send_bytes / recv_bytes."""
    end = ends[0] if near else ends[1]
    return Ends(end.send_bytes, end.recv_bytes, end.close)


@contextlib.contextmanager
def mp_queue_channel(ctx: Any) -> Iterator[tuple[Any, Any]]:
    yield ctx.Queue(), ctx.Queue()


def _mp_queue(queues: tuple[Any, Any], near: bool) -> Ends:
    out, back = queues if near else queues[::-1]
    # put() pickles later, in a feeder thread: it gets bytes, not the reused bytearray.
    return Ends(lambda m: out.put(bytes(m)), lambda: back.get(timeout=TIMEOUT))


@contextlib.contextmanager
def zmq_channel(ctx: Any) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ipc_ring_latency.") as directory:
        yield f"ipc://{directory}/zmq.sock"


def _zmq(address: str, near: bool) -> Ends:
    import zmq

    context = zmq.Context()
    socket = context.socket(zmq.PAIR)
    socket.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))
    socket.setsockopt(zmq.SNDTIMEO, int(TIMEOUT * 1000))
    if near:
        socket.bind(address)
    else:
        socket.connect(address)

    def close() -> None:
        socket.close(linger=0)
        context.term()

    return Ends(socket.send, socket.recv, close)


@contextlib.contextmanager
def posix_mq_channel(ctx: Any) -> Iterator[tuple[str, str]]:
    import posix_ipc

    names = tuple(f"/ipc_ring_latency.{os.getpid()}.{i}" for i in range(2))
    for name in names:
        posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_message_size=SIZE).close()
    try:
        yield names  # type: ignore[misc]
    finally:
        for name in names:
            posix_ipc.unlink_message_queue(name)


def _posix_mq(names: tuple[str, str], near: bool) -> Ends:
    import posix_ipc

    out, back = (posix_ipc.MessageQueue(n) for n in (names if near else names[::-1]))

    def close() -> None:
        out.close()
        back.close()

    return Ends(out.send, lambda: back.receive(TIMEOUT)[0], close)


@contextlib.contextmanager
def faster_fifo_channel(ctx: Any) -> Iterator[tuple[Any, Any]]:
    import faster_fifo

    yield faster_fifo.Queue(CAPACITY), faster_fifo.Queue(CAPACITY)


def _faster_fifo(queues: tuple[Any, Any], near: bool) -> Ends:
    out, back = queues if near else queues[::-1]
    return Ends(lambda m: out.put(bytes(m)), lambda: back.get(timeout=TIMEOUT))


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    channel: Callable[[Any], Any]  # a context manager of what both sides get
    ends: Callable[[Any, bool], Ends]
    kind: str = "data"  # data: the far side receives; async: it awaits; room: it sends
    floor: str | None = None  # the case it is measured against
    modules: tuple[str, ...] = ()


OS_PIPE, ROOM_PIPE, ASYNC_PIPE = "os.pipe", "os.pipe-room", "asyncio-pipe"
CASES = (
    Case(OS_PIPE, "os.read on a pipe (floor)", pipes_channel, _os_pipe),
    Case("ipc_ring", "ipc_ring RingReader.pop", ring_channel, _ring_pair, floor=OS_PIPE),
    Case("ipc_ring-pipe", "ipc_ring.Pipe recv_bytes", ipc_pipe_channel, _connection, floor=OS_PIPE),
    Case("mp-pipe", "multiprocessing.Pipe recv_bytes", mp_pipe_channel, _connection, floor=OS_PIPE),
    Case("mp-queue", "multiprocessing.Queue get", mp_queue_channel, _mp_queue, floor=OS_PIPE),
    Case("zmq", "pyzmq PAIR ipc:// recv", zmq_channel, _zmq, floor=OS_PIPE, modules=("zmq",)),
    Case(
        "posix-mq", "posix_ipc MessageQueue.receive", posix_mq_channel, _posix_mq,
        floor=OS_PIPE, modules=("posix_ipc",),
    ),
    Case(
        "faster-fifo", "faster_fifo Queue.get", faster_fifo_channel, _faster_fifo,
        floor=OS_PIPE, modules=("faster_fifo",),
    ),
    Case(ASYNC_PIPE, "asyncio add_reader on a pipe (floor)", pipes_channel, _asyncio_pipe,
         kind="async"),
    Case("ipc_ring-async", "ipc_ring await pop_async()", ring_channel, _ring_pair, kind="async",
         floor=ASYNC_PIPE),
    Case(ROOM_PIPE, "os.write on a full pipe (floor)", pipes_channel, _os_pipe_room, kind="room"),
    Case("ipc_ring-room", "ipc_ring push on a full ring", ring_channel, _ring_pair, kind="room",
         floor=ROOM_PIPE),
)  # fmt: skip
BY_NAME = {c.name: c for c in CASES}


# ---- the two sides ----------------------------------------------------------------------


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def far_side(
    names: list[str],
    channels: list[Any],
    samples: int,
    stamp_path: str,
    out: Connection,
    cpu: int | None = None,
    seed: int | None = 0,
) -> None:
    """The child: one-way samples, then echoes for the round trips; reports its samples."""
    _pin(cpu)
    try:
        result: Any = asyncio.run(_far(names, channels, samples, stamp_path, out, seed))
    except BaseException as e:
        result = f"far side: {type(e).__name__}: {e}"
    out.send(result)
    out.close()


async def _far(
    names: list[str],
    channels: list[Any],
    samples: int,
    stamp_path: str,
    out: Connection,
    seed: int | None,
) -> dict[str, list[int]]:
    cases = [BY_NAME[n] for n in names]
    ends = [c.ends(channel, False) for c, channel in zip(cases, channels, strict=True)]
    with open(stamp_path, "r+b") as f:
        stamps = mmap.mmap(f.fileno(), 8)
    try:
        for case, end in zip(cases, ends, strict=True):
            if case.kind == "room" and end.fill:
                end.fill()
        out.send("ready")
        wakes: dict[str, list[int]] = {n: [] for n in names}
        mono, unpack = time.monotonic_ns, STAMP.unpack_from
        room = _message(ROOM_SIZE)
        for k in _one_way_order(len(cases), samples, seed):
            case, end = cases[k], ends[k]
            if case.kind == "room":
                end.send(room)
                t1 = mono()
                wakes[case.name].append(t1 - unpack(stamps)[0])
                continue
            if case.kind == "async":
                assert end.recv_async is not None
                message = await end.recv_async()
            else:
                message = end.recv()
            t1 = mono()
            wakes[case.name].append(t1 - unpack(message)[0])
        for k, _ in _round_trips(cases, samples, seed):
            case, end = cases[k], ends[k]
            if case.kind == "async":
                assert end.recv_async is not None
                message = await end.recv_async()
            else:
                message = end.recv()
            end.send(message)
        return wakes
    finally:
        stamps.close()
        for end in ends:
            end.close()


def _rounds(indices: list[int], rounds: int, seed: int | None) -> Iterator[list[int]]:
    """`rounds` rounds of `indices`, each round in an order of its own drawn from `seed` (the
    same on both sides), or always in the given order if `seed` is None (--fixed-order)."""
    rng = random.Random(seed)
    order = list(indices)
    for _ in range(rounds):
        if seed is not None:
            rng.shuffle(order)
        yield order


def _one_way_order(n: int, samples: int, seed: int | None) -> Iterator[int]:
    """The one-way phase's order, the same on both sides: every case once per round."""
    for order in _rounds(list(range(n)), samples, seed):
        yield from order


def _round_trips(cases: list[Case], samples: int, seed: int | None) -> Iterator[tuple[int, bool]]:
    """The round-trip phase's order, the same on both sides: (case index, kept)."""
    data = [k for k, case in enumerate(cases) if case.kind != "room"]
    blocks = (samples + RT_BLOCK - 1) // RT_BLOCK
    for block, order in enumerate(_rounds(data, blocks, None if seed is None else seed + 1)):
        kept = min(RT_BLOCK, samples - block * RT_BLOCK)
        for k in order:
            for j in range(kept + 1):
                yield k, j < kept


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this (the main) thread after `seconds`: it ends a send or a wait
    that blocks, as the deadline ends a child that hangs (compare.py uses it too)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("not done before the deadline (--timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sleep_until(deadline_ns: int) -> None:
    left = deadline_ns - time.monotonic_ns()
    if left > 0:
        time.sleep(left / 1e9)


def run_once(
    cases: list[Case],
    samples: int,
    gap_us: int,
    timeout: float,
    pin: tuple[int, int] | None,
    seed: int | None = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """One run: every case, samples interleaved. {case: {"wakeup": {...}, "round_trip": {...}}}."""
    ctx = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as stack:
        if pin is not None and hasattr(os, "sched_getaffinity"):
            stack.callback(os.sched_setaffinity, 0, os.sched_getaffinity(0))
            _pin(pin[0])
        channels = [stack.enter_context(case.channel(ctx)) for case in cases]
        stamp_file = stack.enter_context(tempfile.NamedTemporaryFile(prefix="ipc_ring_latency."))
        stamp_file.write(bytes(8))
        stamp_file.flush()
        stamps = mmap.mmap(stamp_file.fileno(), 8)
        stack.callback(stamps.close)
        receiving, sending = ctx.Pipe(duplex=False)
        names = [c.name for c in cases]
        process = ctx.Process(
            target=far_side,
            args=(names, channels, samples, stamp_file.name, sending, pin and pin[1], seed),
            daemon=True,
        )
        process.start()
        sending.close()
        stack.callback(process.join, 5.0)
        stack.callback(lambda: process.kill() if process.is_alive() else None)
        with _alarm(timeout):
            ends = [c.ends(ch, True) for c, ch in zip(cases, channels, strict=True)]
            for end in ends:
                stack.callback(end.close)
            first = receiving.recv()
            if first != "ready":
                raise RuntimeError(str(first))
            gap = gap_us * 1000
            message = _message()
            mono, pack_into = time.monotonic_ns, STAMP.pack_into
            trips: dict[str, list[int]] = {n: [] for n in names}
            next_at = mono() + 20 * gap
            for k in _one_way_order(len(cases), samples, seed):
                _sleep_until(next_at)
                next_at += gap
                if cases[k].kind == "room":
                    pack_into(stamps, 0, mono())
                    ends[k].recv()
                else:
                    pack_into(message, 0, mono())
                    ends[k].send(message)
            for k, keep in _round_trips(cases, samples, seed):
                _sleep_until(next_at)
                next_at += gap
                t0 = time.perf_counter_ns()
                ends[k].send(message)
                ends[k].recv()
                if keep:
                    trips[names[k]].append(time.perf_counter_ns() - t0)
            wakes = receiving.recv()
            if not isinstance(wakes, dict):
                raise RuntimeError(str(wakes))
    result: dict[str, dict[str, dict[str, float]]] = {}
    for n in names:
        # The first samples of a case set it up (a first wait, a first registration).
        result[n] = {"wakeup": _percentiles(wakes[n][WARMUP:])}
        if trips[n]:
            result[n]["round_trip"] = _percentiles(trips[n][WARMUP:])
    return result


# ---- C floors ---------------------------------------------------------------------------


def build_c_driver() -> Path:
    out = HERE / "bin" / "wake_latency"
    out.parent.mkdir(exist_ok=True)
    src = ROOT / "src" / "ipc_ring"
    subprocess.run(
        ["cc", "-std=c11", "-O2", "-I", str(src), str(src / "_ring.c"), str(src / "_handle.c"),
         str(HERE / "wake_latency.c"), "-pthread", "-o", str(out)],
        check=True,
    )  # fmt: skip
    return out


def run_c(
    driver: Path, samples: int, gap_us: int, pin: tuple[int, int] | None, seed: int | None = 0
) -> dict[str, dict[str, float]]:
    """One run of the C driver; its modes take turns in an order drawn from `seed` (None:
    always the same order)."""
    order = 0 if seed is None else seed + 1  # the driver's --seed 0 is the fixed order
    argv = [str(driver), "--samples", str(samples), "--gap-us", str(gap_us), "--seed", str(order)]
    if pin is not None:
        argv += ["--pin", f"{pin[0]},{pin[1]}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return {row["mode"]: {k: row[k] for k in QUANTILES} for row in rows}


# ---- the report -------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="runs (each: every case)")
    parser.add_argument("--samples", type=int, default=1000, help="samples per case per run")
    parser.add_argument("--gap-us", type=int, default=1000, help="microseconds between messages")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BY_NAME)}")
    parser.add_argument("--no-c", action="store_true", help="skip the C floors")
    parser.add_argument(
        "--pin",
        default="none",
        help="CPUs of the near and the far side, NEAR,FAR (default none: placed by the scheduler)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run fails")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--fixed-order",
        action="store_true",
        help="cases take turns always in the same order (default: each round in a new random "
        "order, the same on both sides; run N draws from seed N)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.samples < 100 or args.gap_us < 500:
        parser.error("--runs >= 1, --samples >= 100, --gap-us >= 500")
    chosen = args.only.split(",") if args.only else list(BY_NAME)
    unknown = [n for n in chosen if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    if args.pin == "none":
        args.pin = None
    else:
        try:
            near_cpu, far_cpu = (int(c) for c in args.pin.split(","))
        except ValueError:
            parser.error("--pin takes two CPU numbers, NEAR,FAR, or none")
        args.pin = (near_cpu, far_cpu)
    # A case is measured with its floor.
    wanted = set(chosen) | {BY_NAME[n].floor for n in chosen if BY_NAME[n].floor}
    args.cases = [c for c in CASES if c.name in wanted]
    return args


def _missing(case: Case) -> str | None:
    import importlib.util

    for module in case.modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[bench]')"
    return None


def _ratio_text(values: list[float]) -> str:
    return f"{_median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main(argv: Sequence[str] | None = None, command: str | None = None) -> int:
    args = _parse_args(argv)
    command = command or shlex.join([sys.executable, *sys.argv])
    skipped = []
    cases = []
    for case in args.cases:
        reason = _missing(case)
        if reason:
            skipped.append(f"skipped {case.name}: {reason}")
        else:
            cases.append(case)
    header = [
        f"command: {command}",
        f"python: {sys.version.split()[0]}, ipc_ring {ipc_ring.__version__}, "
        f"cpus: {os.cpu_count()}, {args.runs} runs x {args.samples} samples per case, "
        f"one every {args.gap_us} us, cases interleaved "
        + ("in a fixed order, " if args.fixed_order else "in random order, ")
        + (
            f"near side on CPU {args.pin[0]}, far side on CPU {args.pin[1]}"
            if args.pin
            else "placed by the scheduler"
        ),
        *skipped,
    ]
    print("\n".join(header), file=sys.stderr if args.json else sys.stdout, flush=True)
    driver = None if args.no_c else build_c_driver()
    runs: list[dict[str, Any]] = []
    c_runs: list[dict[str, Any]] = []
    for number in range(args.runs):
        seed = None if args.fixed_order else number
        result = run_once(cases, args.samples, args.gap_us, args.timeout, args.pin, seed)
        runs.append(result)
        brief = ", ".join(f"{n} {r['wakeup']['p50']:.1f}" for n, r in result.items())
        print(f"[run {number + 1}/{args.runs}] wake-up p50 us: {brief}", file=sys.stderr)
        if driver is not None:
            c_runs.append(run_c(driver, args.samples, args.gap_us, args.pin, seed))
            brief = ", ".join(f"{m} {r['p50']:.1f}" for m, r in c_runs[-1].items())
            print(f"[run {number + 1}/{args.runs}] C p50 us: {brief}", file=sys.stderr, flush=True)

    summary: dict[str, Any] = {}
    for case in cases:
        entry: dict[str, Any] = {"label": case.label}
        for what in ("wakeup", "round_trip"):
            if what not in runs[0][case.name]:
                continue
            entry[what] = {q: _median([r[case.name][what][q] for r in runs]) for q in QUANTILES}
            if case.floor and case.floor in runs[0]:
                for q in ("p50", "p99"):
                    ratios = [r[case.name][what][q] / r[case.floor][what][q] for r in runs]
                    entry[what][f"{q}_vs_floor"] = ratios
        summary[case.name] = entry
    c_summary: dict[str, Any] = {}
    for mode in c_runs[0] if c_runs else ():
        c_summary[mode] = {q: _median([r[mode][q] for r in c_runs]) for q in QUANTILES}
        if mode != "futex":
            c_summary[mode]["p50_vs_futex"] = [r[mode]["p50"] / r["futex"]["p50"] for r in c_runs]
            c_summary[mode]["p99_vs_futex"] = [r[mode]["p99"] / r["futex"]["p99"] for r in c_runs]
    if args.json:
        print(
            json.dumps(
                {
                    "command": command,
                    "runs": args.runs,
                    "samples": args.samples,
                    "gap_us": args.gap_us,
                    "python": summary,
                    "c": c_summary,
                },
                indent=2,
            )
        )
        return 0
    print(_report(cases, summary, c_summary, args.runs))
    return 0


def _row(label: str, entry: dict[str, Any], against: str) -> str:
    ratios = [_ratio_text(entry[k]) if k in entry else "" for k in (f"p50_{against}",
              f"p99_{against}")]  # fmt: skip
    return (
        f"{label:38} {entry['p50']:7.1f} {entry['p99']:7.1f} {entry['p99.9']:7.1f}"
        f"  {ratios[0]:>20}  {ratios[1]:>20}"
    )


def _head(floor: str) -> str:
    return (
        f"{'':38} {'p50':>7} {'p99':>7} {'p99.9':>7}  {'p50 / ' + floor:>20}  "
        f"{'p99 / ' + floor:>20}"
    )


def _report(cases: list[Case], summary: dict[str, Any], c: dict[str, Any], runs: int) -> str:
    lines = ["", f"One way to a receiver asleep in its receive, us (medians of {runs} runs):", ""]
    lines.append(_head("floor"))
    lines += [_row(case.label, summary[case.name]["wakeup"], "vs_floor") for case in cases]
    lines += ["", f"Round trip, asleep between messages, us (medians of {runs} runs):", ""]
    lines.append(_head("floor"))
    lines += [
        _row(case.label, summary[case.name]["round_trip"], "vs_floor")
        for case in cases
        if "round_trip" in summary[case.name]
    ]
    if c:
        lines += ["", "In C (benchmarks/wake_latency.c), one way, us:", "", _head("futex")]
        labels = {"futex": "bare futex (floor)", "pipe": "pipe read/write",
                  "core": "ipc_ring C core (rb_wait)"}  # fmt: skip
        lines += [_row(labels.get(mode, mode), entry, "vs_futex") for mode, entry in c.items()]
    lines += [
        "",
        "x / floor: this case's figure divided by its floor's in the same run (cases take turns,"
        " sample by sample, each round in random order); median (min-max) over the runs. Floors:"
        " os.read on a pipe for the"
        " blocking receives, asyncio add_reader for pop_async, os.write on a full pipe for the"
        " writer woken by room.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
