"""Throughput of ipc_ring against the other ways a Python user passes messages between processes.

Three sections. "bytes" sends raw messages of a few sizes between two child processes, through
ipc_ring's RingWriter/RingReader and the alternatives below. "objects" sends Python objects from
this process to one child through ipc_ring.Pipe and the alternatives a multiprocessing.Pipe user
has. --section picks one (both run by default). "latency" (``--section latency``, run only when
asked) is benchmarks/latency.py: one-way wake-up latency to a sleeping receiver and round trips,
ipc_ring against the alternatives and the floors, with its own options (see its docstring).

Every transport of the bytes section runs through one protocol, so only the transport differs:

- Two fresh processes ("spawn"): a writer and a reader. The writer creates its end of the
  transport and says so; the reader attaches and says it is ready; only then does the writer
  start sending. When the reader has checked the last message it says so, and only then does
  the writer close its end. Every wait has a timeout: a run that does not finish within
  --timeout seconds is killed and reported as failed.
- The writer sends N messages of S bytes. Each is built the same way for every transport: one
  bytearray of S bytes, reused, with the sequence number (little-endian) in its first 8 bytes.
  Transports that keep a reference to the message after the call returns (multiprocessing.Queue
  pickles it later, in a feeder thread) get a ``bytes`` copy of it, and the batch APIs get lists
  of ``bytes`` copies, BATCH messages at a time.
- The reader checks the length and the sequence number of every message, and times from the
  arrival of the first message (or first batch) to the arrival of the last; the rate counts the
  messages that arrived after the clock started. A wrong length or sequence number fails the run.
- The per-message loops (``produce``, ``consume`` and their batch forms) are shared; each
  transport only supplies its send and receive calls.
- Where a transport takes a buffer size, it gets about as much as the ring: RING_CAPACITY bytes
  (faster-fifo, membridge), or RING_CAPACITY // S messages (pyzmq's high-water marks,
  multiprocessing.Queue's maxsize, iceoryx2's subscriber buffer). Pipes keep the kernel's
  default buffer and POSIX message queues posix_ipc's default depth, as a user gets them.
- Per-message calls that block by default are called without a timeout (a bound method, as a
  user would call it); the run's --timeout ends a run that hangs. iceoryx2 and membridge
  have non-blocking calls only here, so their waiting side spins (yielding the CPU).
- Runs alternate: each round runs every size and every transport once (in an order rotated by
  one each round), so noise on the machine hits all transports alike. The tables give medians
  over the rounds.

The objects section uses the same handshake, checks, timing and rounds, with the parent as the
writer, as a program that hands work to a multiprocessing.Process does:

- The parent makes the channel, starts one "spawn" child with the child's end as a Process
  argument, closes its own copy of that end (so the child's death reaches the sender), and
  sends; the child receives. A send that blocks past --timeout is interrupted by SIGALRM.
- Three cases, each with the transports that fit it:
  1. a small dict, {"id": i, "name": "sensor-7", "ts": 1733000000.25, "vals": [1, 2, 3],
     "ok": True}, built anew for each message, by send/recv (put/get, send_pyobj/recv_pyobj);
     the reader checks every "id" and the whole first dict.
  2. a 1 MiB float64 numpy array (np.arange(131072)), one array reused with the sequence
     number in element 0, by send/recv; the reader checks that each message is a numpy array
     of the right shape with the right first and last elements, and the whole first one.
  3. 256-byte payloads by send_bytes/recv_bytes (multiprocessing.Queue: put/get of bytes),
     built and checked as in the bytes section.
  multiprocessing.Queue pickles in a feeder thread after put() returns, so it gets a copy of
  a message the sender reuses (the array's .copy(), bytes of the bytearray).
- The transports: ipc_ring.Pipe() (duplex, the default; 1 MiB per direction, its default
  capacity), multiprocessing.Pipe() (duplex: a socket pair) and Pipe(duplex=False) (an
  os.pipe) -- the first is faster for large messages, the second for small ones -- then
  multiprocessing.Queue and pyzmq PUSH/PULL over ipc:// (skipped if zmq is not importable).
  The queues hold about as many messages as ipc_ring.Pipe's ring, and at least 4.
- Messages per run differ by transport (each run takes about 0.3-1.5 s on a 2-core VM; see
  CASES); the rate is per second, so the tables compare; --object-scale scales them all.
- The tables give objects/s and the ratio ipc_ring.Pipe / each transport, on medians.
- numpy's BLAS thread pool is one thread in every process of the benchmark
  (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS = 1 unless set): no transport
  uses BLAS, and the pool's threads spin for ~0.1 s after numpy is imported, which on two
  cores lands inside the first tenth of a second of a child's run.

Run from a checkout (``pip install -e .`` plus the optional libraries), for example::

    python benchmarks/compare.py --runs 5
    python benchmarks/compare.py --sizes 64 --messages 20000 --runs 1 --only ipc_ring,mp-pipe
    python benchmarks/compare.py --section objects --runs 5
    python benchmarks/compare.py --section objects --cases dict --object-scale 0.1 --runs 1
    python benchmarks/compare.py --section latency --runs 5

--only takes the transport names of either section (mp-pipe, mp-queue and zmq are in both);
in the objects section ipc_ring.Pipe is ipc_ring-pipe and multiprocessing.Pipe() is
mp-pipe-duplex.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import importlib
import importlib.metadata
import io
import json
import multiprocessing
import operator
import os
import pickle
import platform
import secrets
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from types import ModuleType
from typing import Any

# Before numpy is first imported, here and (inherited) in the children: see the docstring.
for _blas in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_blas, "1")

import ipc_ring  # noqa: E402
import latency  # noqa: E402  # benchmarks/latency.py, beside this file: the latency section
from ipc_ring import RingReader, RingWriter  # noqa: E402
from latency import _alarm  # noqa: E402

RING_CAPACITY = 64 << 20
BATCH = 256
PIPE_BUFFER = 1 << 16  # the user-space buffer of the os.pipe transport, as big as the kernel's
STALL_TIMEOUT = 30.0  # the longest wait of a handshake, a spin loop, or a call given a timeout
SEQUENCE = struct.Struct("<Q")
LENGTH = struct.Struct("<I")
_FIRST = operator.itemgetter(0)

# ---- messages: built and checked the same way for every transport ----------


@dataclass(frozen=True)
class Spec:
    size: int
    count: int


@dataclass
class Result:
    """What a reader reports: the timed span, how many messages it covers, what was wrong."""

    elapsed: float = 0.0
    timed: int = 0
    errors: int = 0
    first_error: str | None = None

    def record(self, index: int, message: Any, size: int) -> None:
        if self.first_error is None:
            got = SEQUENCE.unpack_from(message)[0] if len(message) >= 8 else None
            self.note(
                f"message {index}: sequence {got}, {len(message)} B "
                f"(expected sequence {index}, {size} B)"
            )
        else:
            self.errors += 1

    def note(self, error: str) -> None:
        """Count one wrong message; the first one's description is kept."""
        self.errors += 1
        if self.first_error is None:
            self.first_error = error


def sequence_field(message: bytearray) -> memoryview:
    """The first 8 bytes of the writer's message, as one unsigned 64-bit number."""
    return memoryview(message)[:8].cast("Q")


def produce(
    send: Callable[[bytearray], object],
    spec: Spec,
    message: bytearray | None = None,
    start: int = 0,
) -> None:
    """Hand `spec.count` messages to `send`, one reused bytearray with the next sequence number.
    A transport that needs the buffer's address before the loop passes its own `message`; one
    that sends the first messages with another call continues from `start`."""
    if message is None:
        message = bytearray(spec.size)
    sequence = sequence_field(message)
    for i in range(start, spec.count):
        sequence[0] = i
        send(message)


def produce_batches(send_batch: Callable[[list[bytes]], object], spec: Spec) -> None:
    """Hand the messages to `send_batch` as lists of BATCH `bytes` copies, built as in produce."""
    message = bytearray(spec.size)
    sequence = sequence_field(message)
    for start in range(0, spec.count, BATCH):
        batch = []
        for i in range(start, min(start + BATCH, spec.count)):
            sequence[0] = i
            batch.append(bytes(message))
        send_batch(batch)


def consume(receive: Callable[[], Any], spec: Spec) -> Result:
    """Receive and check `spec.count` messages; time from the first arrival to the last."""
    unpack = SEQUENCE.unpack_from
    size = spec.size
    result = Result()
    first = receive()
    start = time.perf_counter()
    if len(first) != size or unpack(first)[0] != 0:
        result.record(0, first, size)
    for expected in range(1, spec.count):
        message = receive()
        if len(message) != size or unpack(message)[0] != expected:
            result.record(expected, message, size)
    result.elapsed = time.perf_counter() - start
    result.timed = spec.count - 1
    return result


def consume_batches(receive_batch: Callable[[], list[bytes]], spec: Spec) -> Result:
    """As consume, for a receive call that returns a list of messages. Each batch is checked
    with C-level loops (every length, then every sequence number); only a batch that fails is
    gone through message by message to count and describe the errors."""
    size = spec.size
    result = Result()
    expected = 0
    start = 0.0
    first_batch = 0
    while expected < spec.count:
        batch = receive_batch()
        if expected == 0:
            start = time.perf_counter()
            first_batch = len(batch)
        if not _batch_is_correct(batch, expected, size):
            for index, message in enumerate(batch, expected):
                if len(message) != size or SEQUENCE.unpack_from(message)[0] != index:
                    result.record(index, message, size)
        expected += len(batch)
    result.elapsed = time.perf_counter() - start
    result.timed = spec.count - first_batch
    return result


def _batch_is_correct(batch: list[bytes], first: int, size: int) -> bool:
    if not all(map(size.__eq__, map(len, batch))):
        return False
    sequences = list(map(_FIRST, map(SEQUENCE.unpack_from, batch)))
    return sequences == list(range(first, first + len(batch)))


def spin_until(attempt: Callable[[], Any], what: str) -> Any:
    """Call `attempt` until it returns something other than None; for non-blocking APIs."""
    deadline = time.monotonic() + STALL_TIMEOUT
    while (outcome := attempt()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: nothing for {STALL_TIMEOUT} s")
        os.sched_yield()
    return outcome


# ---- the handshake -----------------------------------------------------------


@dataclass(frozen=True)
class Handshake:
    """Writer created its end -> reader attached -> (messages) -> reader checked them all."""

    created: Event
    ready: Event
    done: Event

    @staticmethod
    def _wait(event: Event, what: str) -> None:
        if not event.wait(STALL_TIMEOUT):
            raise TimeoutError(f"waited {STALL_TIMEOUT} s for the {what}")

    def writer_created(self) -> None:
        self.created.set()

    def wait_for_writer(self) -> None:
        self._wait(self.created, "writer to create its end")

    def reader_ready(self) -> None:
        self.ready.set()

    def wait_for_reader(self) -> None:
        self._wait(self.ready, "reader to attach")

    def reader_done(self) -> None:
        self.done.set()

    def wait_for_reader_done(self) -> None:
        self._wait(self.done, "reader to check every message")


# ---- transports: one writer and one reader function each ---------------------


def _optional(module: str) -> ModuleType:
    return importlib.import_module(module)


def _shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def _unique_name(prefix: str = "ipc_ring_compare") -> str:
    return f"{prefix}.{os.getpid()}.{secrets.token_hex(4)}"


@contextlib.contextmanager
def ring_channel(ctx: SpawnContext, spec: Spec) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ipc_ring_compare.", dir=_shm_dir()) as directory:
        yield os.path.join(directory, "ring")


def write_ipc_ring(path: str, spec: Spec, handshake: Handshake) -> None:
    with RingWriter.create(path, RING_CAPACITY) as writer:
        handshake.writer_created()
        handshake.wait_for_reader()
        produce(writer.push, spec)
        handshake.wait_for_reader_done()


def read_ipc_ring(path: str, spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    with RingReader.open(path) as reader:
        handshake.reader_ready()
        return consume(reader.pop, spec)


def write_ipc_ring_batch(path: str, spec: Spec, handshake: Handshake) -> None:
    with RingWriter.create(path, RING_CAPACITY) as writer:
        handshake.writer_created()
        handshake.wait_for_reader()
        produce_batches(writer.push_many, spec)
        handshake.wait_for_reader_done()


def read_ipc_ring_batch(path: str, spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    with RingReader.open(path) as reader:
        handshake.reader_ready()
        return consume_batches(functools.partial(reader.pop_many, BATCH), spec)


@contextlib.contextmanager
def mp_queue_channel(ctx: SpawnContext, spec: Spec) -> Iterator[Any]:
    queue = ctx.Queue(maxsize=RING_CAPACITY // spec.size)
    try:
        yield queue
    finally:
        queue.close()


def write_mp_queue(queue: Any, spec: Spec, handshake: Handshake) -> None:
    handshake.writer_created()
    handshake.wait_for_reader()
    put = queue.put
    # put() only enqueues; a feeder thread pickles the object later, so it needs a snapshot.
    produce(lambda message: put(bytes(message)), spec)
    handshake.wait_for_reader_done()


def read_mp_queue(queue: Any, spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    handshake.reader_ready()
    return consume(queue.get, spec)


@contextlib.contextmanager
def mp_pipe_channel(ctx: SpawnContext, spec: Spec) -> Iterator[tuple[Connection, Connection]]:
    receiving, sending = ctx.Pipe(duplex=False)
    try:
        yield receiving, sending
    finally:
        receiving.close()
        sending.close()


def write_mp_pipe(ends: tuple[Connection, Connection], spec: Spec, handshake: Handshake) -> None:
    handshake.writer_created()
    handshake.wait_for_reader()
    produce(ends[1].send_bytes, spec)
    handshake.wait_for_reader_done()


def read_mp_pipe(ends: tuple[Connection, Connection], spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    handshake.reader_ready()
    return consume(ends[0].recv_bytes, spec)


@contextlib.contextmanager
def os_pipe_channel(ctx: SpawnContext, spec: Spec) -> Iterator[tuple[Connection, Connection]]:
    # The descriptors of os.pipe() travel to the spawned children wrapped in Connections (the
    # way multiprocessing passes a descriptor); each child uses its raw descriptor.
    read_fd, write_fd = os.pipe()
    ends = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        yield ends
    finally:
        for end in ends:
            end.close()


def _raw(end: Connection, mode: str) -> io.FileIO:
    return io.FileIO(end.fileno(), mode, closefd=False)  # the Connection closes it


def write_os_pipe(ends: tuple[Connection, Connection], spec: Spec, handshake: Handshake) -> None:
    with ends[1] as end, io.BufferedWriter(_raw(end, "wb"), PIPE_BUFFER) as pipe:
        handshake.writer_created()
        handshake.wait_for_reader()
        write, pack = pipe.write, LENGTH.pack

        def send(message: bytearray) -> None:
            write(pack(len(message)))
            write(message)

        produce(send, spec)
        pipe.flush()
        handshake.wait_for_reader_done()


def read_os_pipe(ends: tuple[Connection, Connection], spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    with ends[0] as end, io.BufferedReader(_raw(end, "rb"), PIPE_BUFFER) as pipe:
        readinto, unpack = pipe.readinto, LENGTH.unpack
        header = bytearray(LENGTH.size)
        body = memoryview(bytearray(spec.size))

        def receive() -> memoryview:
            if readinto(header) != LENGTH.size:
                raise EOFError("pipe closed inside a length")
            (length,) = unpack(header)
            view = body if length == spec.size else memoryview(bytearray(length))
            if readinto(view) != length:
                raise EOFError("pipe closed inside a message")
            return view

        handshake.reader_ready()
        return consume(receive, spec)


@contextlib.contextmanager
def zmq_channel(ctx: SpawnContext, spec: Spec) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ipc_ring_compare.") as directory:
        yield f"ipc://{directory}/zmq.sock"


def _zmq_socket(kind: str, depth: int) -> tuple[Any, Any]:
    zmq = _optional("zmq")
    context = zmq.Context()
    socket = context.socket(getattr(zmq, kind))
    # PUSH/PULL never drop: at the high-water mark send() blocks. The marks only size the queues.
    socket.setsockopt(zmq.SNDHWM, depth)
    socket.setsockopt(zmq.RCVHWM, depth)
    socket.setsockopt(zmq.SNDTIMEO, int(STALL_TIMEOUT * 1000))
    socket.setsockopt(zmq.RCVTIMEO, int(STALL_TIMEOUT * 1000))
    return context, socket


# send/recv copy (the default): pyzmq copies messages below zmq.COPY_THRESHOLD (64 KiB) even
# with copy=False, and recv(copy=False) builds a Frame, dearer than bytes at these sizes.
def write_zmq(address: str, spec: Spec, handshake: Handshake) -> None:
    context, socket = _zmq_socket("PUSH", RING_CAPACITY // spec.size)
    try:
        socket.bind(address)
        handshake.writer_created()
        handshake.wait_for_reader()
        produce(socket.send, spec)
        handshake.wait_for_reader_done()
    finally:
        socket.close(linger=0)
        context.term()


def read_zmq(address: str, spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    context, socket = _zmq_socket("PULL", RING_CAPACITY // spec.size)
    try:
        socket.connect(address)
        handshake.reader_ready()
        return consume(socket.recv, spec)
    finally:
        socket.close(linger=0)
        context.term()


@contextlib.contextmanager
def faster_fifo_channel(ctx: SpawnContext, spec: Spec) -> Iterator[Any]:
    yield _optional("faster_fifo").Queue(max_size_bytes=RING_CAPACITY)


def write_faster_fifo(queue: Any, spec: Spec, handshake: Handshake) -> None:
    handshake.writer_created()
    handshake.wait_for_reader()
    produce_batches(functools.partial(queue.put_many, block=True, timeout=STALL_TIMEOUT), spec)
    handshake.wait_for_reader_done()


def read_faster_fifo(queue: Any, spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    handshake.reader_ready()
    return consume_batches(functools.partial(queue.get_many, True, STALL_TIMEOUT, BATCH), spec)


def posix_mq_unfit(size: int) -> str | None:
    """Why a POSIX message queue for `size`-byte messages cannot be made here, or None."""
    posix_ipc = _optional("posix_ipc")
    try:
        queue = posix_ipc.MessageQueue(
            "/" + _unique_name(), posix_ipc.O_CREX, max_message_size=size
        )
    except (OSError, ValueError, posix_ipc.Error) as e:
        limit = "/proc/sys/fs/mqueue/msgsize_max"
        with contextlib.suppress(OSError), open(limit) as f:
            limit += f" = {f.read().strip()}"
        return f"cannot create a queue for {size} B messages ({e}; {limit})"
    queue.close()
    queue.unlink()
    return None


@contextlib.contextmanager
def posix_mq_channel(ctx: SpawnContext, spec: Spec) -> Iterator[str]:
    posix_ipc = _optional("posix_ipc")
    name = "/" + _unique_name()
    # posix_ipc's default depth, QUEUE_MESSAGES_MAX_DEFAULT (10 on Linux, the system default).
    posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_message_size=spec.size).close()
    try:
        yield name
    finally:
        posix_ipc.unlink_message_queue(name)


def write_posix_mq(name: str, spec: Spec, handshake: Handshake) -> None:
    queue = _optional("posix_ipc").MessageQueue(name)
    try:
        handshake.writer_created()
        handshake.wait_for_reader()
        produce(queue.send, spec)
        handshake.wait_for_reader_done()
    finally:
        queue.close()


def read_posix_mq(name: str, spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    queue = _optional("posix_ipc").MessageQueue(name)
    try:
        handshake.reader_ready()
        receive = queue.receive
        return consume(lambda: receive(STALL_TIMEOUT)[0], spec)
    finally:
        queue.close()


@contextlib.contextmanager
def iceoryx2_channel(ctx: SpawnContext, spec: Spec) -> Iterator[str]:
    try:
        yield _unique_name()
    finally:  # a killed run leaves its nodes behind
        iox2 = _optional("iceoryx2")
        iox2.set_log_level(iox2.LogLevel.Error)
        iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc).try_cleanup_dead_nodes()


def _iceoryx2_service(iox2: ModuleType, name: str, spec: Spec) -> tuple[Any, Any]:
    iox2.set_log_level(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    depth = RING_CAPACITY // spec.size
    service = (
        node.service_builder(iox2.ServiceName.new(name))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .enable_safe_overflow(False)  # a full subscriber buffer makes the publisher wait
        .subscriber_max_buffer_size(depth)
        .history_size(0)
        .open_or_create()
    )
    return node, service


def write_iceoryx2(name: str, spec: Spec, handshake: Handshake) -> None:
    iox2 = _optional("iceoryx2")
    node, service = _iceoryx2_service(iox2, name, spec)
    publisher = (
        service.publisher_builder()
        .initial_max_slice_len(spec.size)
        .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
        .create()
    )
    handshake.writer_created()
    handshake.wait_for_reader()
    publisher.update_connections()
    message = bytearray(spec.size)
    address = ctypes.addressof((ctypes.c_char * spec.size).from_buffer(message))
    loan, memmove = publisher.loan_slice_uninit, ctypes.memmove

    def send(filled: bytearray) -> None:  # `filled` is `message`, whose address we hold
        sample = loan(len(filled))
        memmove(sample.payload_ptr, address, len(filled))
        sample.assume_init().send()

    produce(send, spec, message)
    handshake.wait_for_reader_done()
    del publisher, service, node


def read_iceoryx2(name: str, spec: Spec, handshake: Handshake) -> Result:
    iox2 = _optional("iceoryx2")
    handshake.wait_for_writer()
    node, service = _iceoryx2_service(iox2, name, spec)
    subscriber = service.subscriber_builder().buffer_size(RING_CAPACITY // spec.size).create()
    poll, string_at = subscriber.receive, ctypes.string_at

    def receive() -> bytes:
        sample = poll()
        if sample is None:
            sample = spin_until(poll, "iceoryx2 receive")
        # Copied out, as ipc_ring's pop copies into bytes; the sample goes back to the writer.
        return string_at(sample.payload_ptr, sample.header.number_of_elements)

    handshake.reader_ready()
    result = consume(receive, spec)
    del subscriber, service, node
    return result


@contextlib.contextmanager
def membridge_channel(ctx: SpawnContext, spec: Spec) -> Iterator[str]:
    name = "/" + _unique_name()
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            _optional("membridge").SharedMemory.remove(name)


def write_membridge(name: str, spec: Spec, handshake: Handshake) -> None:
    memory = _optional("membridge").SharedMemory.create(name, RING_CAPACITY + 24)  # kept mapped
    push = memory.spsc().push
    handshake.writer_created()
    handshake.wait_for_reader()

    def send(message: bytearray) -> None:
        if not push(message):  # full: try again until it fits
            spin_until(lambda: push(message) or None, "membridge push")

    produce(send, spec)
    handshake.wait_for_reader_done()


def read_membridge(name: str, spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    memory = _optional("membridge").SharedMemory.open(name)  # keeps the mapping alive
    pop = memory.spsc().pop

    def receive() -> bytes:
        message: bytes | None = pop()
        if message is None:
            message = spin_until(pop, "membridge pop")
        return message

    handshake.reader_ready()
    return consume(receive, spec)


@dataclass(frozen=True)
class Transport:
    name: str  # for --only
    label: str  # for the tables
    channel: Callable[[SpawnContext, Spec], contextlib.AbstractContextManager[Any]]
    writer: Callable[[Any, Spec, Handshake], None]
    reader: Callable[[Any, Spec, Handshake], Result]
    modules: tuple[str, ...] = ()  # import name -> pip name in PIP_NAMES
    unfit: Callable[[int], str | None] | None = None  # why a message size cannot run here


IPC_RING = "ipc_ring"
TRANSPORTS = (
    Transport(IPC_RING, "ipc_ring push/pop", ring_channel, write_ipc_ring, read_ipc_ring),
    Transport(
        "ipc_ring-batch",
        f"ipc_ring push_many/pop_many, batches of {BATCH}",
        ring_channel,
        write_ipc_ring_batch,
        read_ipc_ring_batch,
    ),
    Transport(
        "mp-queue", "multiprocessing.Queue put/get", mp_queue_channel, write_mp_queue, read_mp_queue
    ),
    Transport(
        "mp-pipe",
        "multiprocessing.Pipe send_bytes/recv_bytes",
        mp_pipe_channel,
        write_mp_pipe,
        read_mp_pipe,
    ),
    Transport(
        "os-pipe",
        "os.pipe, 4-byte length + buffered I/O",
        os_pipe_channel,
        write_os_pipe,
        read_os_pipe,
    ),
    Transport("zmq", "pyzmq PUSH/PULL over ipc://", zmq_channel, write_zmq, read_zmq, ("zmq",)),
    Transport(
        "faster-fifo",
        f"faster-fifo put_many/get_many, batches of {BATCH}",
        faster_fifo_channel,
        write_faster_fifo,
        read_faster_fifo,
        ("faster_fifo",),
    ),
    Transport(
        "posix-mq",
        "posix_ipc MessageQueue send/receive",
        posix_mq_channel,
        write_posix_mq,
        read_posix_mq,
        ("posix_ipc",),
        posix_mq_unfit,
    ),
    Transport(
        "iceoryx2",
        "iceoryx2 publish/subscribe (spinning)",
        iceoryx2_channel,
        write_iceoryx2,
        read_iceoryx2,
        ("iceoryx2",),
    ),
    Transport(
        "membridge",
        "membridge SpscRingBuffer (spinning)",
        membridge_channel,
        write_membridge,
        read_membridge,
        ("membridge",),
    ),
)
BY_NAME = {t.name: t for t in TRANSPORTS}
PIP_NAMES = {
    "zmq": "pyzmq",
    "faster_fifo": "faster-fifo",
    "posix_ipc": "posix_ipc",
    "iceoryx2": "iceoryx2",
    "membridge": "membridge",
    "numpy": "numpy",
}


def missing_module(transport: Transport) -> str | None:
    return _missing(transport.modules)


def _missing(modules: Sequence[str]) -> str | None:
    for module in modules:
        try:
            _optional(module)
        except ImportError as e:
            return f"{e} (pip install {PIP_NAMES[module]})"
    return None


# ---- the objects section: the parent sends, one child receives -------------------
#
# Each case is one kind of message, sent and checked the same way through every transport
# that runs it; each transport supplies its send and receive calls, as above.

PIPE_CAPACITY = 1 << 20  # ipc_ring.Pipe's default ring (per direction), passed explicitly
ARRAY_LENGTH = 1 << 17  # float64 elements: 1 MiB
OBJECT_BYTES = 256  # the send_bytes case


@dataclass(frozen=True)
class ObjectSpec(Spec):
    """A run of the objects section: `count` messages of one case, each `size` bytes pickled."""

    case: str


def small_dict(sequence: int) -> dict[str, Any]:
    return {"id": sequence, "name": "sensor-7", "ts": 1733000000.25, "vals": [1, 2, 3], "ok": True}


def produce_dicts(send: Callable[[Any], object], spec: Spec) -> None:
    """Send `spec.count` small dicts, a new one each time (as a program builds its messages),
    with the sequence number as its "id"."""
    for i in range(spec.count):
        send({"id": i, "name": "sensor-7", "ts": 1733000000.25, "vals": [1, 2, 3], "ok": True})


def consume_dicts(receive: Callable[[], Any], spec: Spec) -> Result:
    """As consume: the "id" of every dict is checked, and the whole of the first one."""
    result = Result()
    first = receive()
    start = time.perf_counter()
    for expected in range(1, spec.count):
        message = receive()
        if message["id"] != expected:
            result.note(f"message {expected}: id {message['id']!r}")
    result.elapsed = time.perf_counter() - start
    result.timed = spec.count - 1
    if first != small_dict(0):
        result.note(f"message 0: {first!r:.200} (expected {small_dict(0)!r})")
    return result


def float_array(sequence: int = 0) -> Any:
    """np.arange(ARRAY_LENGTH) as float64 (1 MiB), with the sequence number in element 0."""
    array = _optional("numpy").arange(ARRAY_LENGTH, dtype="float64")
    array[0] = sequence
    return array


def produce_arrays(send: Callable[[Any], object], spec: Spec) -> None:
    """Send `spec.count` times one reused array, the sequence number in its element 0."""
    array = float_array()
    for i in range(spec.count):
        array[0] = i
        send(array)


def consume_arrays(receive: Callable[[], Any], spec: Spec) -> Result:
    """As consume: every message must be a numpy array of the shape sent, with the right
    sequence number in its first element and the right last element; the first one is
    compared whole."""
    np = _optional("numpy")
    ndarray, shape, last = np.ndarray, (ARRAY_LENGTH,), ARRAY_LENGTH - 1
    result = Result()

    def check(message: Any, expected: int) -> None:
        if type(message) is not ndarray:
            result.note(f"message {expected}: a {type(message).__name__}, not a numpy array")
        elif message.shape != shape or message[0] != expected or message[-1] != last:
            result.note(
                f"message {expected}: shape {message.shape}, first element {message[:1]}, "
                f"last {message[-1:]} (expected {shape}, {expected}, {last})"
            )

    first = receive()
    start = time.perf_counter()
    for expected in range(1, spec.count):
        message = receive()
        if (
            type(message) is not ndarray
            or message.shape != shape
            or message[0] != expected
            or message[-1] != last
        ):
            check(message, expected)
    result.elapsed = time.perf_counter() - start
    result.timed = spec.count - 1
    check(first, 0)
    if type(first) is ndarray and (first.dtype != np.float64 or not (first == float_array()).all()):
        result.note(f"message 0: {first!r:.200} (expected {float_array()!r:.200})")
    return result


@dataclass(frozen=True)
class ObjectCase:
    name: str  # in the progress lines and the JSON
    title: str  # above its table
    raw: bool  # send_bytes/recv_bytes, else send/recv (pickled)
    produce: Callable[[Callable[[Any], object], Spec], None]
    consume: Callable[[Callable[[], Any], Spec], Result]
    sample: Callable[[], Any]  # one message, for its size
    counts: dict[str, int]  # messages per run, for each transport that runs this case
    # What a transport that pickles after the call returns (multiprocessing.Queue) sends
    # instead of a message the sender reuses: a snapshot of it.
    snapshot: Callable[[Any], Any] | None = None
    modules: tuple[str, ...] = ()

    def size(self) -> int:
        """The bytes of one message: pickled (protocol 5, in band) unless sent as bytes."""
        sample = self.sample()
        return len(sample) if self.raw else len(pickle.dumps(sample, 5))


IPC_RING_PIPE = "ipc_ring-pipe"
# Messages per run: each run of each transport takes about 0.3-1.5 s on a 2-core x86 VM.
CASES = (
    ObjectCase(
        "dict",
        'small dict {"id": 1, "name": "sensor-7", "ts": 1733000000.25, "vals": [1, 2, 3], '
        '"ok": True}, send/recv',
        False,
        produce_dicts,
        consume_dicts,
        functools.partial(small_dict, 1),
        {
            IPC_RING_PIPE: 100_000,
            "mp-pipe-duplex": 60_000,
            "mp-pipe": 60_000,
            "mp-queue": 50_000,
            "zmq": 100_000,
        },
    ),
    ObjectCase(
        "array",
        f"numpy float64 array of {ARRAY_LENGTH:,} elements (1 MiB), send/recv",
        False,
        produce_arrays,
        consume_arrays,
        float_array,
        {IPC_RING_PIPE: 2_000, "mp-pipe-duplex": 400, "mp-pipe": 300, "mp-queue": 300, "zmq": 600},
        snapshot=operator.methodcaller("copy"),
        modules=("numpy",),
    ),
    ObjectCase(
        "bytes",
        f"{OBJECT_BYTES} B payloads, send_bytes/recv_bytes",
        True,
        produce,
        consume,
        functools.partial(bytes, OBJECT_BYTES),
        {
            IPC_RING_PIPE: 2_500_000,
            "mp-pipe-duplex": 150_000,
            "mp-pipe": 200_000,
            "mp-queue": 50_000,
        },
        snapshot=bytes,
    ),
)
CASE_BY_NAME = {c.name: c for c in CASES}


def _case(spec: Spec) -> ObjectCase:
    assert isinstance(spec, ObjectSpec)
    return CASE_BY_NAME[spec.case]


def _depth(spec: Spec) -> int:
    """A queue's depth in messages: about as much as ipc_ring.Pipe's ring holds, and at least
    4 (a depth of 1 slows multiprocessing.Queue's 1 MiB arrays by a quarter)."""
    return max(4, PIPE_CAPACITY // spec.size)


# An object channel yields (the parent's end, the child's end). When they differ, they are
# the two ends of a pipe: the parent closes its copy of the child's end once the child has it.


@contextlib.contextmanager
def ipc_ring_pipe_channel(ctx: SpawnContext, spec: Spec) -> Iterator[tuple[Any, Any]]:
    here, there = ipc_ring.Pipe(capacity=PIPE_CAPACITY)  # duplex, as Pipe() is by default
    with here, there:
        yield here, there


@contextlib.contextmanager
def mp_pipe_duplex_channel(
    ctx: SpawnContext, spec: Spec
) -> Iterator[tuple[Connection, Connection]]:
    here, there = ctx.Pipe()  # a socket pair
    with here, there:
        yield here, there


@contextlib.contextmanager
def mp_pipe_objects_channel(
    ctx: SpawnContext, spec: Spec
) -> Iterator[tuple[Connection, Connection]]:
    receiving, sending = ctx.Pipe(duplex=False)  # an os.pipe
    with sending, receiving:
        yield sending, receiving


# ipc_ring.Pipe's ends have the API of multiprocessing's Connection: one writer, one reader.
def write_connection(end: Any, spec: Spec, handshake: Handshake) -> None:
    case = _case(spec)
    handshake.writer_created()
    handshake.wait_for_reader()
    if case.raw:
        # A loop that calls end.send_bytes(...) gets ipc_ring.Pipe's C method from its second
        # message on (the end puts it in place when the first send attaches it); bound before
        # that, it would keep calling the Python method, about 170 ns dearer a call.
        message = bytearray(spec.size)
        produce(end.send_bytes, replace(spec, count=1), message)
        produce(end.send_bytes, spec, message, start=1)
    else:
        case.produce(end.send, spec)
    handshake.wait_for_reader_done()


def read_connection(end: Any, spec: Spec, handshake: Handshake) -> Result:
    case = _case(spec)
    handshake.wait_for_writer()
    end.poll(0)  # attaches (ipc_ring.Pipe does on first use), so receive is the attached call
    handshake.reader_ready()
    return case.consume(end.recv_bytes if case.raw else end.recv, spec)


@contextlib.contextmanager
def mp_queue_objects_channel(ctx: SpawnContext, spec: Spec) -> Iterator[tuple[Any, Any]]:
    queue = ctx.Queue(maxsize=_depth(spec))
    try:
        yield queue, queue
    finally:
        queue.close()
        queue.cancel_join_thread()  # after a failed run the feeder may be stuck: don't wait


def write_queue(queue: Any, spec: Spec, handshake: Handshake) -> None:
    case = _case(spec)
    handshake.writer_created()
    handshake.wait_for_reader()
    put, snapshot = queue.put, case.snapshot
    case.produce(put if snapshot is None else lambda message: put(snapshot(message)), spec)
    handshake.wait_for_reader_done()


def read_queue(queue: Any, spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    handshake.reader_ready()
    return _case(spec).consume(queue.get, spec)


@contextlib.contextmanager
def zmq_objects_channel(ctx: SpawnContext, spec: Spec) -> Iterator[tuple[str, str]]:
    with zmq_channel(ctx, spec) as address:
        yield address, address


def write_zmq_objects(address: str, spec: Spec, handshake: Handshake) -> None:
    context, socket = _zmq_socket("PUSH", _depth(spec))
    try:
        socket.bind(address)
        handshake.writer_created()
        handshake.wait_for_reader()
        _case(spec).produce(socket.send_pyobj, spec)
        handshake.wait_for_reader_done()
    finally:
        socket.close(linger=0)
        context.term()


def read_zmq_objects(address: str, spec: Spec, handshake: Handshake) -> Result:
    handshake.wait_for_writer()
    context, socket = _zmq_socket("PULL", _depth(spec))
    try:
        socket.connect(address)
        handshake.reader_ready()
        return _case(spec).consume(socket.recv_pyobj, spec)
    finally:
        socket.close(linger=0)
        context.term()


OBJECT_TRANSPORTS = (
    Transport(
        IPC_RING_PIPE,
        "ipc_ring.Pipe()",
        ipc_ring_pipe_channel,
        write_connection,
        read_connection,
    ),
    Transport(
        "mp-pipe-duplex",
        "multiprocessing.Pipe()",
        mp_pipe_duplex_channel,
        write_connection,
        read_connection,
    ),
    Transport(
        "mp-pipe",
        "multiprocessing.Pipe(duplex=False)",
        mp_pipe_objects_channel,
        write_connection,
        read_connection,
    ),
    Transport(
        "mp-queue",
        "multiprocessing.Queue put/get",
        mp_queue_objects_channel,
        write_queue,
        read_queue,
    ),
    Transport(
        "zmq",
        "pyzmq PUSH/PULL send_pyobj/recv_pyobj, ipc://",
        zmq_objects_channel,
        write_zmq_objects,
        read_zmq_objects,
        ("zmq",),
    ),
)
OBJECTS_BY_NAME = {t.name: t for t in OBJECT_TRANSPORTS}
BYTES, OBJECTS, LATENCY = "bytes", "objects", "latency"
REGISTRIES = {BYTES: BY_NAME, OBJECTS: OBJECTS_BY_NAME}


# ---- one run: two processes --------------------------------------------------


def _child(
    role: str,
    section: str,
    name: str,
    channel: Any,
    spec: Spec,
    handshake: Handshake,
    out: Connection,
) -> None:
    transport = REGISTRIES[section][name]
    try:
        if role == "writer":
            transport.writer(channel, spec, handshake)
            report: tuple[str, Any] = ("ok", None)
        else:
            result = transport.reader(channel, spec, handshake)
            report = ("ok", asdict(result))
    except BaseException as e:
        report = ("error", f"{role}: {type(e).__name__}: {e}")
    finally:
        if role == "reader":  # done, or failed: either way the writer need not wait
            handshake.reader_done()
    out.send(report)
    out.close()


@dataclass
class Run:
    ok: bool
    rate: float = 0.0
    elapsed: float = 0.0
    timed: int = 0
    errors: int = 0
    failure: str | None = None


def _collect(conn: Connection, deadline: float, role: str) -> tuple[str, Any]:
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        return "error", f"{role}: no result before the deadline (--timeout)"
    try:
        report: tuple[str, Any] = conn.recv()
    except EOFError:
        return "error", f"{role}: exited without a result"
    return report


def _run_pair(
    ctx: SpawnContext, transport: Transport, channel: Any, spec: Spec, timeout: float
) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """Start the writer and the reader, and return what each reported, or why it did not."""
    handshake = Handshake(ctx.Event(), ctx.Event(), ctx.Event())
    deadline = time.monotonic() + timeout
    processes: list[BaseProcess] = []
    read: tuple[str, Any] = ("error", "reader: not started")
    write: tuple[str, Any] = ("error", "writer: not awaited")
    try:
        results: list[Connection] = []
        for role in ("writer", "reader"):
            receiving, sending = ctx.Pipe(duplex=False)
            args = (role, BYTES, transport.name, channel, spec, handshake, sending)
            process = ctx.Process(target=_child, args=args, name=role, daemon=True)
            process.start()
            sending.close()  # now only the child holds it: its death reads as EOF
            processes.append(process)
            results.append(receiving)
        read = _collect(results[1], deadline, "reader")
        if read[0] == "ok":
            write = _collect(results[0], deadline, "writer")
    finally:
        _reap(processes, read)
    return read, write


def _reap(processes: list[BaseProcess], read: tuple[str, Any]) -> None:
    # After a good read a writer only has to close; after a failure, don't wait.
    grace = 5.0 if read[0] == "ok" else 0.0
    for started in processes:
        started.join(timeout=grace)
        if started.is_alive():
            started.kill()
            started.join()


def _run_from_parent(
    ctx: SpawnContext, transport: Transport, channel: tuple[Any, Any], spec: Spec, timeout: float
) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """Start the reader, write from this process, and return what each side reported."""
    here, there = channel
    handshake = Handshake(ctx.Event(), ctx.Event(), ctx.Event())
    deadline = time.monotonic() + timeout
    processes: list[BaseProcess] = []
    read: tuple[str, Any] = ("error", "reader: not started")
    write: tuple[str, Any] = ("error", "writer: not started")
    try:
        receiving, sending = ctx.Pipe(duplex=False)
        args = ("reader", OBJECTS, transport.name, there, spec, handshake, sending)
        process = ctx.Process(target=_child, args=args, name="reader", daemon=True)
        process.start()
        sending.close()  # now only the child holds it: its death reads as EOF
        processes.append(process)
        if there is not here:
            there.close()  # the child's end of the pipe: now only the child holds it
        try:
            with _alarm(deadline - time.monotonic()):
                transport.writer(here, spec, handshake)
            write = ("ok", None)
        except Exception as e:
            write = ("error", f"writer: {type(e).__name__}: {e}")
            deadline = min(deadline, time.monotonic() + 5.0)  # the reader may wait forever
        read = _collect(receiving, deadline, "reader")
        if read[0] != "ok" and write[0] != "ok":
            read = ("error", f"{write[1]}; {read[1]}")
    finally:
        _reap(processes, read)
    return read, write


def run_once(transport: Transport, spec: Spec, timeout: float, section: str = BYTES) -> Run:
    ctx = multiprocessing.get_context("spawn")
    run_pair = _run_pair if section == BYTES else _run_from_parent
    try:
        with transport.channel(ctx, spec) as channel:
            read, write = run_pair(ctx, transport, channel, spec, timeout)
    except Exception as e:  # making or removing what the two processes share
        return Run(ok=False, failure=f"setup: {type(e).__name__}: {e}")
    if read[0] != "ok":
        return Run(ok=False, failure=read[1])
    result = Result(**read[1])
    rate = result.timed / max(result.elapsed, 1e-9)
    run = Run(True, rate, result.elapsed, result.timed, result.errors)
    if result.errors:
        run.ok, run.failure = False, f"{result.errors} wrong messages, first: {result.first_error}"
    elif write[0] != "ok":
        run.ok, run.failure = False, write[1]
    elif result.timed < 1:
        run.ok, run.failure = False, "every message came in the first batch: send more"
    return run


# ---- the measurement and its report ------------------------------------------


@dataclass
class Row:
    transport: str
    label: str
    size: int
    messages: int
    runs: list[Run] = field(default_factory=list)
    case: str | None = None  # the objects section's case

    def rates(self) -> list[float]:
        return [r.rate for r in self.runs if r.ok]

    def median(self) -> float | None:
        rates = self.rates()
        return statistics.median(rates) if rates else None


def _versions() -> dict[str, str]:
    versions = {"python": f"{platform.python_implementation()} {platform.python_version()}"}
    dists = ("ipc-ring", "pyzmq", "faster-fifo", "posix_ipc", "iceoryx2", "membridge", "numpy")
    for dist in dists:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    with contextlib.suppress(ImportError):
        versions["libzmq"] = _optional("zmq").zmq_version()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        source = os.path.dirname(os.path.abspath(sys.modules[RingWriter.__module__].__file__ or ""))
        described = subprocess.run(
            ["git", "-C", source, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if described.returncode == 0:
            versions["ipc-ring"] += f" ({described.stdout.strip()})"
    return versions


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _ratio(reference: float | None, median: float | None) -> str:
    if reference is None or not median:
        return "-"
    ratio = reference / median
    return f"{ratio:.2f}x" if ratio < 1 else f"{ratio:.1f}x"


def _table(
    rows: list[Row],
    reference: float | None,
    unit: str = "msgs",
    reference_label: str = "ipc_ring push/pop",
    counts: bool = False,
) -> list[str]:
    """A Markdown table; `counts` adds a column of messages per run (when they differ)."""
    per_run = f" {unit} per run |" if counts else ""
    header = (
        f"| transport |{per_run} ok runs | median {unit}/s | min .. max {unit}/s | median MiB/s "
        f"| {reference_label} is N x faster |"
    )
    lines = [header, "|---|" + "---:|" * (5 + counts)]
    for row in rows:
        rates = row.rates()
        ok = f"{len(rates)}/{len(row.runs)}"
        label = f"{row.label} | {row.messages:,}" if counts else row.label
        if not rates:
            lines.append(f"| {label} | {ok} | failed | | | |")
            continue
        median = statistics.median(rates)
        mib = median * row.size / (1 << 20)
        spread = f"{min(rates):,.0f} .. {max(rates):,.0f}"
        ratio = _ratio(reference, median)
        lines.append(f"| {label} | {ok} | {median:,.0f} | {spread} | {mib:,.1f} | {ratio} |")
    return lines


def _summary(
    row: Row, reference: float | None, reference_key: str = "ipc_ring_single_is_x_faster"
) -> dict[str, Any]:
    rates = row.rates()
    median = row.median()
    case = {"case": row.case} if row.case else {}
    return {
        **case,
        "transport": row.transport,
        "label": row.label,
        "size": row.size,
        "messages": row.messages,
        "ok_runs": len(rates),
        "median_msgs_per_sec": median,
        "min_msgs_per_sec": min(rates) if rates else None,
        "max_msgs_per_sec": max(rates) if rates else None,
        "median_MiB_per_sec": median * row.size / (1 << 20) if median else None,
        reference_key: reference / median if reference and median else None,
        "runs": [asdict(r) for r in row.runs],
    }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--section",
        choices=("all", BYTES, OBJECTS, LATENCY),
        default="all",
        help="bytes: raw messages between two children; objects: ipc_ring.Pipe against "
        "multiprocessing and pyzmq, parent to child; all (the default): both; latency: "
        "wake-up latency and round trips against the floors (benchmarks/latency.py, its "
        "own options: --runs, --samples, --gap-us, --only, --no-c, --json)",
    )
    parser.add_argument("--sizes", default="64,256,4096", help="message sizes in bytes (>= 8)")
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages per run")
    parser.add_argument(
        "--bytes-budget",
        type=int,
        default=1 << 30,
        help="cap on messages * size per run, so large messages send fewer (default 1 GiB)",
    )
    parser.add_argument(
        "--object-scale",
        type=float,
        default=1.0,
        help="multiplies the objects section's messages per run (0.1 for a quick check)",
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASE_BY_NAME),
        help=f"the objects section's cases, comma-separated: {', '.join(CASE_BY_NAME)}",
    )
    parser.add_argument("--runs", type=int, default=5, help="rounds over all transports")
    names = list(dict.fromkeys([*BY_NAME, *OBJECTS_BY_NAME]))
    parser.add_argument(
        "--only",
        help=f"comma-separated subset of: {', '.join(BY_NAME)} (bytes); "
        f"{', '.join(OBJECTS_BY_NAME)} (objects)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a run fails")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if any(size < 8 for size in args.sizes):
        parser.error("every size must hold the 8-byte sequence number")
    if args.messages < 1 or args.runs < 1:
        parser.error("--messages and --runs must be at least 1")
    if args.object_scale <= 0:
        parser.error("--object-scale must be positive")
    args.cases = args.cases.split(",")
    unknown = [c for c in args.cases if c not in CASE_BY_NAME]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}; choose from {', '.join(CASE_BY_NAME)}")
    chosen = args.only.split(",") if args.only else None
    unknown = [n for n in chosen or () if n not in names]
    if unknown:
        parser.error(f"unknown transport {', '.join(unknown)}; choose from {', '.join(names)}")
    sections = (BYTES, OBJECTS) if args.section == "all" else (args.section,)
    args.transports = [BY_NAME[n] for n in chosen or BY_NAME if n in BY_NAME and BYTES in sections]
    args.object_transports = [
        OBJECTS_BY_NAME[n]
        for n in chosen or OBJECTS_BY_NAME
        if n in OBJECTS_BY_NAME and OBJECTS in sections
    ]
    return args


def _available(transports: list[Transport], skipped: list[str]) -> list[Transport]:
    available = []
    for transport in transports:
        reason = missing_module(transport)
        if reason is None:
            available.append(transport)
        else:
            skipped.append(f"skipped {transport.name}: {reason}")
    return available


def _progress(round_number: int, runs: int, what: str, run: Run, unit: str) -> None:
    outcome = f"{run.rate:,.0f} {unit}/s in {run.elapsed:.2f} s"
    if not run.ok:
        outcome = f"FAILED: {run.failure}"
    print(f"[round {round_number + 1}/{runs}] {what}: {outcome}", file=sys.stderr, flush=True)


def _rotated(transports: list[Transport], round_number: int) -> list[Transport]:
    shift = round_number % max(1, len(transports))
    return transports[shift:] + transports[:shift]


def _failures(rows: list[Row]) -> list[str]:
    failures = [f"  {row.label}: {r.failure}" for row in rows for r in row.runs if r.failure]
    return ["", "failed runs:", *failures] if failures else []


def _latency_argv(argv: Sequence[str]) -> list[str] | None:
    """The arguments for benchmarks/latency.py if they ask for the latency section."""
    rest = list(argv)
    for i, arg in enumerate(rest):
        if arg == "--section" and i + 1 < len(rest) and rest[i + 1] == LATENCY:
            return rest[:i] + rest[i + 2 :]
        if arg == f"--section={LATENCY}":
            return rest[:i] + rest[i + 1 :]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    latency_argv = _latency_argv(sys.argv[1:] if argv is None else argv)
    if latency_argv is not None:
        # Its own protocol and options (benchmarks/latency.py --help): one process pair,
        # every case taking turns sample by sample.
        return latency.main(latency_argv, shlex.join([sys.executable, *sys.argv]))
    args = _parse_args(argv)
    if sys.byteorder != "little":
        sys.exit("the messages carry a little-endian sequence number: run on a little-endian CPU")
    command = shlex.join([sys.executable, *sys.argv])
    machine, versions = _machine(), _versions()
    out: list[str] = [f"command: {command}"]
    out += [f"{key}: {value}" for key, value in machine.items()]
    out += [f"{key}: {value}" for key, value in versions.items()]

    skipped: list[str] = []
    transports = _available(args.transports, skipped)
    rows: dict[tuple[int, str], Row] = {}
    for size in args.sizes if transports else ():
        count = max(1, min(args.messages, args.bytes_budget // size))
        out.append(f"{size} B messages: {count:,} per run, {args.runs} runs")
        for transport in transports:
            reason = transport.unfit(size) if transport.unfit else None
            if reason is None:
                rows[size, transport.name] = Row(transport.name, transport.label, size, count)
            else:
                skipped.append(f"skipped {transport.name} at {size} B: {reason}")

    object_transports = _available(args.object_transports, skipped)
    cases: list[tuple[ObjectCase, list[Transport]]] = []
    object_rows: dict[tuple[str, str], Row] = {}
    for case in [CASE_BY_NAME[name] for name in args.cases] if object_transports else ():
        reason = _missing(case.modules)
        if reason is not None:
            skipped.append(f"skipped the {case.name} case: {reason}")
            continue
        size = case.size()
        case_transports = [t for t in object_transports if t.name in case.counts]
        for transport in case_transports:
            count = max(2, round(case.counts[transport.name] * args.object_scale))
            object_rows[case.name, transport.name] = Row(
                transport.name, transport.label, size, count, case=case.name
            )
        cases.append((case, case_transports))
        counts = ", ".join(
            f"{t.name} {object_rows[case.name, t.name].messages:,}" for t in case_transports
        )
        what = "payload" if case.raw else "pickled"
        out.append(f"{case.name} ({size:,} B {what}): per run {counts}; {args.runs} runs")
    out += skipped
    print("\n".join(out), file=sys.stderr if args.json else sys.stdout, flush=True)

    for round_number in range(args.runs):
        order = _rotated(transports, round_number)
        for size in args.sizes:
            for transport in order:
                row = rows.get((size, transport.name))
                if row is None:
                    continue
                run = run_once(transport, Spec(size, row.messages), args.timeout)
                row.runs.append(run)
                _progress(round_number, args.runs, f"{size} B {transport.name}", run, "msgs")
        for case, case_transports in cases:
            for transport in _rotated(case_transports, round_number):
                object_row = object_rows[case.name, transport.name]
                spec = ObjectSpec(object_row.size, object_row.messages, case.name)
                run = run_once(transport, spec, args.timeout, OBJECTS)
                object_row.runs.append(run)
                _progress(round_number, args.runs, f"{case.name} {transport.name}", run, "objects")

    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    summaries = []
    report: list[str] = [f"load average after: {machine['load_average_after']}"]
    for size in args.sizes:
        size_rows = [rows[size, t.name] for t in transports if (size, t.name) in rows]
        reference_row = rows.get((size, IPC_RING))
        reference = reference_row.median() if reference_row else None
        summaries += [_summary(row, reference) for row in size_rows]
        if not size_rows:
            continue
        report += ["", f"{size} B messages, {size_rows[0].messages:,} per run:", ""]
        report += _table(size_rows, reference)
        report += _failures(size_rows)
    if rows:
        report += [
            "",
            "ipc_ring push/pop is N x faster = (ipc_ring push/pop median msgs/s) / (this "
            "transport's median msgs/s); below 1x this transport is the faster one.",
        ]
    object_summaries = []
    for case, case_transports in cases:
        case_rows = [object_rows[case.name, t.name] for t in case_transports]
        reference_row = object_rows.get((case.name, IPC_RING_PIPE))
        reference = reference_row.median() if reference_row else None
        key = "ipc_ring_pipe_is_x_faster"
        object_summaries += [_summary(row, reference, key) for row in case_rows]
        report += ["", f"{case.title}; the parent sends, a child receives; {args.runs} runs:", ""]
        report += _table(case_rows, reference, "objects", "ipc_ring.Pipe", counts=True)
        report += _failures(case_rows)
    if cases:
        report += [
            "",
            "ipc_ring.Pipe is N x faster = (ipc_ring.Pipe median objects/s) / (this transport's"
            " median objects/s); below 1x this transport is the faster one. MiB/s counts the"
            " pickled bytes (the payload for send_bytes).",
        ]
    if args.json:
        document = {
            "command": command,
            "machine": machine,
            "versions": versions,
            "batch": BATCH,
            "ring_capacity": RING_CAPACITY,
            "pipe_capacity": PIPE_CAPACITY,
            "runs": args.runs,
            "skipped": skipped,
            "results": summaries,
            "objects": object_summaries,
        }
        print(json.dumps(document, indent=2))
    else:
        print("\n".join(report))
    every_row = [*rows.values(), *object_rows.values()]
    failed = any(r.failure for row in every_row for r in row.runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
