"""Throughput of ipc_ring against the other ways a Python user passes messages between processes.

Every transport runs through one protocol, so only the transport differs:

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

Run from a checkout (``pip install -e .`` plus the optional libraries), for example::

    python benchmarks/compare.py --runs 5
    python benchmarks/compare.py --sizes 64 --messages 20000 --runs 1 --only ipc_ring,mp-pipe
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
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from types import ModuleType
from typing import Any

from ipc_ring import RingReader, RingWriter

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
        self.errors += 1
        if self.first_error is None:
            got = SEQUENCE.unpack_from(message)[0] if len(message) >= 8 else None
            self.first_error = (
                f"message {index}: sequence {got}, {len(message)} B "
                f"(expected sequence {index}, {size} B)"
            )


def sequence_field(message: bytearray) -> memoryview:
    """The first 8 bytes of the writer's message, as one unsigned 64-bit number."""
    return memoryview(message)[:8].cast("Q")


def produce(
    send: Callable[[bytearray], object], spec: Spec, message: bytearray | None = None
) -> None:
    """Hand `spec.count` messages to `send`, one reused bytearray with the next sequence number.
    A transport that needs the buffer's address before the loop passes its own `message`."""
    if message is None:
        message = bytearray(spec.size)
    sequence = sequence_field(message)
    for i in range(spec.count):
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


def _zmq_socket(kind: str, spec: Spec) -> tuple[Any, Any]:
    zmq = _optional("zmq")
    context = zmq.Context()
    socket = context.socket(getattr(zmq, kind))
    # PUSH/PULL never drop: at the high-water mark send() blocks. The marks only size the queues.
    socket.setsockopt(zmq.SNDHWM, RING_CAPACITY // spec.size)
    socket.setsockopt(zmq.RCVHWM, RING_CAPACITY // spec.size)
    socket.setsockopt(zmq.SNDTIMEO, int(STALL_TIMEOUT * 1000))
    socket.setsockopt(zmq.RCVTIMEO, int(STALL_TIMEOUT * 1000))
    return context, socket


# send/recv copy (the default): pyzmq copies messages below zmq.COPY_THRESHOLD (64 KiB) even
# with copy=False, and recv(copy=False) builds a Frame, dearer than bytes at these sizes.
def write_zmq(address: str, spec: Spec, handshake: Handshake) -> None:
    context, socket = _zmq_socket("PUSH", spec)
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
    context, socket = _zmq_socket("PULL", spec)
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
}


def missing_module(transport: Transport) -> str | None:
    for module in transport.modules:
        try:
            _optional(module)
        except ImportError as e:
            return f"{e} (pip install {PIP_NAMES[module]})"
    return None


# ---- one run: two processes --------------------------------------------------


def _child(
    role: str, name: str, channel: Any, spec: Spec, handshake: Handshake, out: Connection
) -> None:
    transport = BY_NAME[name]
    try:
        if role == "writer":
            transport.writer(channel, spec, handshake)
            report: tuple[str, Any] = ("ok", None)
        else:
            result = transport.reader(channel, spec, handshake)
            handshake.reader_done()
            report = ("ok", asdict(result))
    except BaseException as e:
        report = ("error", f"{role}: {type(e).__name__}: {e}")
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
            args = (role, transport.name, channel, spec, handshake, sending)
            process = ctx.Process(target=_child, args=args, name=role, daemon=True)
            process.start()
            sending.close()  # now only the child holds it: its death reads as EOF
            processes.append(process)
            results.append(receiving)
        read = _collect(results[1], deadline, "reader")
        if read[0] == "ok":
            write = _collect(results[0], deadline, "writer")
    finally:
        # After a good read the writer only has to close; after a failure, don't wait.
        grace = 5.0 if read[0] == "ok" else 0.0
        for started in processes:
            started.join(timeout=grace)
            if started.is_alive():
                started.kill()
                started.join()
    return read, write


def run_once(transport: Transport, spec: Spec, timeout: float) -> Run:
    ctx = multiprocessing.get_context("spawn")
    try:
        with transport.channel(ctx, spec) as channel:
            read, write = _run_pair(ctx, transport, channel, spec, timeout)
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

    def rates(self) -> list[float]:
        return [r.rate for r in self.runs if r.ok]

    def median(self) -> float | None:
        rates = self.rates()
        return statistics.median(rates) if rates else None


def _versions() -> dict[str, str]:
    versions = {"python": f"{platform.python_implementation()} {platform.python_version()}"}
    for dist in ("ipc-ring", "pyzmq", "faster-fifo", "posix_ipc", "iceoryx2", "membridge"):
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


def _table(rows: list[Row], reference: float | None) -> list[str]:
    header = (
        "| transport | ok runs | median msgs/s | min .. max msgs/s | median MiB/s "
        "| ipc_ring push/pop is N x faster |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        rates = row.rates()
        ok = f"{len(rates)}/{len(row.runs)}"
        if not rates:
            lines.append(f"| {row.label} | {ok} | failed | | | |")
            continue
        median = statistics.median(rates)
        mib = median * row.size / (1 << 20)
        spread = f"{min(rates):,.0f} .. {max(rates):,.0f}"
        ratio = _ratio(reference, median)
        lines.append(f"| {row.label} | {ok} | {median:,.0f} | {spread} | {mib:,.1f} | {ratio} |")
    return lines


def _summary(row: Row, reference: float | None) -> dict[str, Any]:
    rates = row.rates()
    median = row.median()
    return {
        "transport": row.transport,
        "label": row.label,
        "size": row.size,
        "messages": row.messages,
        "ok_runs": len(rates),
        "median_msgs_per_sec": median,
        "min_msgs_per_sec": min(rates) if rates else None,
        "max_msgs_per_sec": max(rates) if rates else None,
        "median_MiB_per_sec": median * row.size / (1 << 20) if median else None,
        "ipc_ring_single_is_x_faster": reference / median if reference and median else None,
        "runs": [asdict(r) for r in row.runs],
    }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="64,256,4096", help="message sizes in bytes (>= 8)")
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages per run")
    parser.add_argument(
        "--bytes-budget",
        type=int,
        default=1 << 30,
        help="cap on messages * size per run, so large messages send fewer (default 1 GiB)",
    )
    parser.add_argument("--runs", type=int, default=5, help="rounds over all transports")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BY_NAME)}")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a run fails")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if any(size < 8 for size in args.sizes):
        parser.error("every size must hold the 8-byte sequence number")
    if args.messages < 1 or args.runs < 1:
        parser.error("--messages and --runs must be at least 1")
    names = args.only.split(",") if args.only else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown transport {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    args.transports = [BY_NAME[n] for n in names]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if sys.byteorder != "little":
        sys.exit("the messages carry a little-endian sequence number: run on a little-endian CPU")
    command = shlex.join([sys.executable, *sys.argv])
    machine, versions = _machine(), _versions()
    out: list[str] = [f"command: {command}"]
    out += [f"{key}: {value}" for key, value in machine.items()]
    out += [f"{key}: {value}" for key, value in versions.items()]

    skipped: list[str] = []
    transports = []
    for transport in args.transports:
        reason = missing_module(transport)
        if reason is None:
            transports.append(transport)
        else:
            skipped.append(f"skipped {transport.name}: {reason}")
    rows: dict[tuple[int, str], Row] = {}
    for size in args.sizes:
        count = max(1, min(args.messages, args.bytes_budget // size))
        out.append(f"{size} B messages: {count:,} per run, {args.runs} runs")
        for transport in transports:
            reason = transport.unfit(size) if transport.unfit else None
            if reason is None:
                rows[size, transport.name] = Row(transport.name, transport.label, size, count)
            else:
                skipped.append(f"skipped {transport.name} at {size} B: {reason}")
    out += skipped
    print("\n".join(out), file=sys.stderr if args.json else sys.stdout, flush=True)

    for round_number in range(args.runs):
        shift = round_number % max(1, len(transports))
        order = transports[shift:] + transports[:shift]
        for size in args.sizes:
            for transport in order:
                row = rows.get((size, transport.name))
                if row is None:
                    continue
                run = run_once(transport, Spec(size, row.messages), args.timeout)
                row.runs.append(run)
                outcome = f"{run.rate:,.0f} msgs/s" if run.ok else f"FAILED: {run.failure}"
                print(
                    f"[round {round_number + 1}/{args.runs}] {size} B {transport.name}: {outcome}",
                    file=sys.stderr,
                    flush=True,
                )

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
        failures = [
            f"  {row.label}: {r.failure}" for row in size_rows for r in row.runs if r.failure
        ]
        if failures:
            report += ["", "failed runs:", *failures]
    report += [
        "",
        "ipc_ring push/pop is N x faster = (ipc_ring push/pop median msgs/s) / (this transport's"
        " median msgs/s); below 1x this transport is the faster one.",
    ]
    if args.json:
        document = {
            "command": command,
            "machine": machine,
            "versions": versions,
            "batch": BATCH,
            "ring_capacity": RING_CAPACITY,
            "runs": args.runs,
            "skipped": skipped,
            "results": summaries,
        }
        print(json.dumps(document, indent=2))
    else:
        print("\n".join(report))
    failed = any(r.failure for row in rows.values() for r in row.runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
