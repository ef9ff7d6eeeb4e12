"""The `ipc-ring` command line (also `python -m ipc_ring`).

Exit status: 0 success (for `cat`, a stream its writer ended with close()); 1 an
error, or a stream that did not end cleanly (a dead, stopped or vanished writer for
`cat`, a dead reader for `write`); 2 a command line that does not parse; 130
interrupted (SIGINT or SIGTERM); 141 the reader of our stdout went away. Errors are
one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import stat
import struct
import sys
import termios
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import accumulate
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from . import __version__, _bench, _core, _inspect
from ._api import RingReader, RingWriter, unlink
from ._core import InvalidRing, MessageTooLarge, PeerDied, RingClosed, RingTimeout

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

FORMATS = ("lines", "raw", "length-prefixed")
LENGTH = struct.Struct("<I")
# Blocking calls of cat and write wait in slices this long, so that a signal is
# seen between slices, never between taking a message and writing it out.
SLICE = 0.1
# cat: messages and bytes per batch written to stdout (at most a pipe's buffer,
# so that what may come again after a kill is at most one pipe-full).
BATCH = 1024
BATCH_BYTES = 64 << 10
# write: bytes read from stdin at a time.
READ_SIZE = 1 << 20


class CliError(Exception):
    """An error for one line on stderr and exit status 1."""


def positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text}")
    return value


def cpu_pair(text: str) -> tuple[int, int]:
    try:
        writer, reader = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two CPU numbers like 0,1, got {text}") from None
    return writer, reader


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        # argparse ignores a failed write of --help or --version (a full disk):
        # report it instead.
        if message:
            _write_text(message, file or sys.stderr)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default when it has one worth showing and its help does not
    state it already (argparse's own formatter also prints "None" and "False")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        takes_value = action.option_strings and action.nargs != 0
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or not (takes_value or action.nargs == "?")
        ):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    formatter = _HelpFormatter
    parser = _Parser(
        prog="ipc-ring",
        description="A memory-mapped single-producer / single-consumer ring buffer between "
        "two processes: benchmark it, look inside a ring, or use one as a pipeline stage.",
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"ipc-ring {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser(
        "bench",
        help="throughput (or latency) between a writer process and a reader process",
        description=(
            "Push --messages messages of --msg-size bytes from a writer process to a reader "
            "process that checks every sequence number; print one JSON line with the "
            "result, then a line for people. The ring is created for the run and removed "
            "after it; --ring must not exist."
        ),
        formatter_class=formatter,
    )
    bench.add_argument(
        "role",
        nargs="?",
        choices=["both", "writer", "reader", "latency-echo", "latency-client"],
        default="both",
        help="both: run a writer and a reader process; or run one side alone "
        "(start the writer first: it creates the ring)",
    )
    bench.add_argument(
        "--ring",
        default=None,
        metavar="PATH",
        help="ring file path, which must not exist (default: a new name in /dev/shm or the "
        f"temporary directory; {_bench.default_ring_path()} for a side run alone)",
    )
    bench.add_argument(
        "--cap", type=positive_int, default=64 << 20, metavar="BYTES", help="capacity"
    )
    bench.add_argument(
        "--messages", type=positive_int, default=5_000_000, metavar="N", help="messages to send"
    )
    bench.add_argument(
        "--msg-size", type=positive_int, default=256, metavar="BYTES", help="bytes per message"
    )
    bench.add_argument(
        "--api",
        choices=_bench.APIS,
        default="single",
        help="single: push/pop; into: push/pop_into a reused buffer; batch: push_many/pop_many; "
        "zero-copy: reserve/pop_view",
    )
    bench.add_argument(
        "--batch", type=positive_int, default=256, metavar="N", help="messages per batch"
    )
    bench.add_argument(
        "--latency",
        action="store_true",
        help="measure latency instead: round trip through two rings, and the one-way "
        "wake-up of a reader asleep in pop (p50, p99, p99.9) against os.read asleep on a "
        "pipe in the same run",
    )
    bench.add_argument(
        "--latency-samples",
        type=positive_int,
        default=2000,
        metavar="N",
        help="wake-up samples of pop (and as many of the os.read floor), 1 ms apart",
    )
    bench.add_argument(
        "--pin",
        type=cpu_pair,
        default=None,
        metavar="W,R",
        help="pin writer and reader to these CPUs (default: not pinned)",
    )
    bench.add_argument(
        "--spin",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help=f"busy-wait this long before sleeping (default: {_core.DEFAULT_SPIN:g})",
    )
    bench.add_argument("--handshake", action="store_true", help=argparse.SUPPRESS)
    bench.add_argument(
        "--json", action="store_true", help="print only the JSON line(s), no line for people"
    )
    bench.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)

    inspect = commands.add_parser(
        "inspect",
        help="print a ring's header, fill level and which sides are alive (read-only)",
        description="Read-only: never writes the file, safe while both sides run.",
        formatter_class=formatter,
    )
    inspect.add_argument("path", help="the ring file")
    inspect.add_argument("--json", action="store_true", help="one JSON object")

    cat = commands.add_parser(
        "cat",
        help="attach as the reader and copy every message to stdout",
        description=(
            "Copy messages to stdout until the writer ends the stream with close() (exit "
            "0); exit 1 if the writer died or stopped without ending it. A message leaves "
            "the ring only once its bytes are written out (and, into a pipe, read by the "
            "next process), so an interrupted cat loses nothing: the next reader gets "
            "what was not delivered, and after a kill at most what was in flight again "
            "(what the pipe held and the batch being written)."
        ),
        formatter_class=formatter,
    )
    cat.add_argument("path", help="the ring file")
    cat.add_argument(
        "--format",
        choices=FORMATS,
        default="lines",
        help="lines: each message then a newline; raw: messages concatenated; "
        "length-prefixed: a 4-byte little-endian length, then the message",
    )
    cat.add_argument(
        "--wait",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for the ring to appear and the reader role to be free",
    )

    write = commands.add_parser(
        "write",
        help="create a ring (or attach as its writer) and push stdin into it",
        description=(
            "Every complete message is pushed as soon as its bytes arrive. Only the end "
            "of stdin ends the stream (close()); an error or an interrupt stops the "
            "writer without ending it, so the reader sees a failed stream, and a dead "
            "reader leaves the stream open for --attach to continue."
        ),
        formatter_class=formatter,
    )
    write.add_argument("path", help="the ring file")
    write.add_argument(
        "--capacity",
        type=positive_int,
        default=1 << 20,
        metavar="BYTES",
        help="data area of a ring it creates (a power of two)",
    )
    write.add_argument(
        "--format",
        choices=FORMATS,
        default="lines",
        help="lines: one message per line, without its newline; raw: messages of --chunk "
        "bytes (the last one may be shorter); length-prefixed: a 4-byte little-endian "
        "length, then the message",
    )
    write.add_argument(
        "--chunk", type=positive_int, default=65536, metavar="BYTES", help="message size for raw"
    )
    mode = write.add_mutually_exclusive_group()
    mode.add_argument(
        "--create", dest="attach", action="store_false", help="create the ring (the default)"
    )
    mode.add_argument(
        "--attach",
        dest="attach",
        action="store_true",
        help="continue the stream of an existing ring instead",
    )
    write.set_defaults(attach=False)
    write.add_argument(
        "--wait",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="with --attach: wait this long for the ring and the writer role",
    )

    remove = commands.add_parser(
        "rm",
        help="remove a ring file and its FIFOs",
        description="Remove ring files and their notification FIFOs. Every PATH must be a "
        "ring, else nothing is removed. Open handles keep working; nobody new can attach.",
        formatter_class=formatter,
    )
    remove.add_argument("path", nargs="+", help="a ring file")
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)
    return parser


class _Interrupt:
    """SIGINT and SIGTERM set a flag instead of raising, so a batch taken or read is
    always finished before the command stops; blocking calls wait in SLICE-long
    slices and look at the flag between them. While `raise_now` is set (blocked in
    a write that cannot be cut into slices) they raise KeyboardInterrupt."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.seen = False
        self.raise_now = False

    def __enter__(self) -> _Interrupt:
        self._previous = [signal.signal(s, self._handle) for s in self.SIGNALS]
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.seen = True
        if self.raise_now:
            raise KeyboardInterrupt

    def check(self) -> None:
        """KeyboardInterrupt if a signal came."""
        if self.seen:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for s, previous in zip(self.SIGNALS, self._previous, strict=True):
            signal.signal(s, previous)


def _check_open(fd: int, name: str) -> None:
    try:
        os.fstat(fd)
    except OSError as e:
        raise CliError(f"{name} is not open ({os.strerror(e.errno or errno.EBADF)})") from None


class _Output:
    """stdout for cat, and how much of what was written the next process has read:
    into a pipe, FIONREAD on our end says how much is still unread there, so a
    message counts as delivered only once the process after us took it (a `| head`
    that exits leaves the rest in the ring, not lost in the pipe)."""

    def __init__(self, fd: int) -> None:
        _check_open(fd, "stdout")
        self.fd = fd
        self.is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        self.written = 0
        self._count = array.array("i", [0])
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)

    def write(self, data: bytes, interrupt: _Interrupt) -> None:
        """Write all of `data`; KeyboardInterrupt if a signal comes first, even while
        the next process does not read (a full pipe)."""
        view = memoryview(data)
        while view:
            interrupt.check()
            try:
                if self.is_pipe:
                    # A pipe with room takes PIPE_BUF bytes without blocking, so a
                    # signal is seen within a slice however long the pipe stays full.
                    if not self._poll.poll(SLICE * 1000):
                        continue
                    n = os.write(self.fd, view[: select.PIPE_BUF])
                else:
                    interrupt.raise_now = True
                    try:
                        n = os.write(self.fd, view)
                    finally:
                        interrupt.raise_now = False
            except (InterruptedError, BlockingIOError):
                continue
            except BrokenPipeError:
                raise
            except OSError as e:
                raise CliError(
                    f"cannot write to stdout ({e.strerror}); every message not written "
                    "stays in the ring"
                ) from None
            self.written += n  # counted as it goes: a write that fails part-way
            view = view[n:]

    def delivered(self) -> int:
        """Bytes written that the next process has read (all of them, if not a pipe)."""
        if not self.is_pipe:
            return self.written
        try:
            fcntl.ioctl(self.fd, termios.FIONREAD, self._count, True)
        except OSError:
            return self.written
        return self.written - self._count[0]

    def check_reader(self) -> None:
        """BrokenPipeError if stdout is a pipe that nobody reads any more (`| head`
        exited), found without writing to it."""
        if self.is_pipe and any(ev & select.POLLERR for _, ev in self._poll.poll(0)):
            raise BrokenPipeError(errno.EPIPE, "the reader of stdout went away")


def _encode_batch(batch: list[bytes], fmt: str) -> tuple[bytes, list[int]]:
    """The bytes of a batch on stdout, and where each message's bytes end."""
    if fmt == "lines":
        return b"\n".join(batch) + b"\n", list(accumulate(len(m) + 1 for m in batch))
    if fmt == "raw":
        return b"".join(batch), list(accumulate(len(m) for m in batch))
    pack = LENGTH.pack
    data = b"".join(part for m in batch for part in (pack(len(m)), m))
    return data, list(accumulate(LENGTH.size + len(m) for m in batch))


class _Ledger:
    """The messages cat peeked and wrote but has not consumed yet: for each batch,
    where its messages' bytes end in the output and how many are consumed already."""

    def __init__(self, reader: RingReader, out: _Output) -> None:
        self.reader = reader
        self.out = out
        self.pending: deque[tuple[list[int], int]] = deque()

    def add(self, ends: list[int]) -> None:
        base = self.out.written
        self.pending.append(([base + end for end in ends], 0))

    def settle(self, everything: bool = False) -> None:
        """Consume the peeked messages whose bytes the next process has taken (or
        all that were written, once nothing can take them from us any more)."""
        delivered = self.out.written if everything else self.out.delivered()
        count = 0
        while self.pending:
            ends, done = self.pending[0]
            upto = bisect_right(ends, delivered, lo=done)
            count += upto - done
            if upto < len(ends):
                self.pending[0] = (ends, upto)
                break
            self.pending.popleft()
        if count:
            self.reader.consume(count)


def _cat_main(args: argparse.Namespace) -> int:
    out = _Output(sys.stdout.fileno() if sys.stdout is not None else 1)
    with RingReader.open(args.path, wait=args.wait) as reader, _Interrupt() as interrupt:
        ledger = _Ledger(reader, out)
        fmt = args.format
        try:
            while not interrupt.seen:
                ledger.settle()
                out.check_reader()
                try:
                    # With bytes still in the pipe, come back soon to consume them.
                    timeout = 0.001 if ledger.pending else SLICE
                    batch = reader.peek_many(BATCH, timeout, BATCH_BYTES)
                except RingTimeout:
                    continue
                ledger.settle()  # what the next process took meanwhile is not in flight
                data, ends = _encode_batch(batch, fmt)
                ledger.add(ends)
                out.write(data, interrupt)
        except (RingClosed, PeerDied) as end:
            # Everything is written into stdout, which the next process keeps
            # reading after we exit, unless it is gone already.
            out.check_reader()
            ledger.settle(everything=True)
            if isinstance(end, RingClosed):
                return 0
            raise CliError(
                "the writer died or stopped without ending the stream (every "
                "message it committed was written)"
            ) from None
        finally:
            # Interrupted, a closed pipe, a full disk: only what the next process
            # took is consumed; the rest stays in the ring for the next reader.
            if not reader.closed:
                with contextlib.suppress(Exception):
                    ledger.settle()
    return 130


class _Input:
    """stdin for write, read as the bytes arrive: no more than a read's worth is
    ever held back, and a signal is seen within a slice while stdin is quiet."""

    def __init__(self, fd: int) -> None:
        _check_open(fd, "stdin")
        self.fd = fd

    def chunks(self, interrupt: _Interrupt) -> Iterator[bytes]:
        """What each read returns, until the end of stdin; KeyboardInterrupt once a
        signal came (a message that arrived in part is then not pushed)."""
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        while True:
            interrupt.check()
            if not poll.poll(SLICE * 1000):
                continue
            try:
                data = os.read(self.fd, READ_SIZE)
            except (InterruptedError, BlockingIOError):
                continue
            if not data:
                return
            yield data


def _too_large(size: int, limit: int, more: str = "") -> CliError:
    return CliError(f"a message of {more}{size} bytes exceeds max_message_size={limit}")


def _split_lines(chunks: Iterable[bytes], limit: int) -> Iterator[list[bytes]]:
    """The complete lines in each chunk, without their newline; a last line without
    one counts too. A line that grows past `limit` fails before it is all read."""
    pending: list[bytes] = []  # pieces of a line that spans reads
    size = 0
    for chunk in chunks:
        if b"\n" not in chunk:
            pending.append(chunk)
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit, "at least ")
            continue
        if pending:
            pending.append(chunk)
            chunk = b"".join(pending)
            pending.clear()
        lines = chunk.split(b"\n")
        rest = lines.pop()
        yield lines
        if rest:
            pending.append(rest)
        size = len(rest)
        if size > limit:
            raise _too_large(size, limit, "at least ")
    if pending:
        yield [b"".join(pending)]


def _split_chunks(chunks: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    """Messages of `size` bytes as soon as they are complete; the rest at the end."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        end = len(buffer) - len(buffer) % size
        if end:
            yield [bytes(buffer[i : i + size]) for i in range(0, end, size)]
            del buffer[:end]
    if buffer:
        yield [bytes(buffer)]


def _split_framed(chunks: Iterable[bytes], limit: int) -> Iterator[list[bytes]]:
    """The complete length-prefixed messages in what arrived so far."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        messages: list[bytes] = []
        at = 0
        while len(buffer) - at >= LENGTH.size:
            (length,) = LENGTH.unpack_from(buffer, at)
            if length > limit:
                if messages:
                    yield messages
                raise _too_large(length, limit)
            start = at + LENGTH.size
            if len(buffer) - start < length:
                break
            messages.append(bytes(buffer[start : start + length]))
            at = start + length
        del buffer[:at]
        if messages:
            yield messages
    if len(buffer) >= LENGTH.size:
        (length,) = LENGTH.unpack_from(buffer)
        raise CliError(f"stdin ends inside a message of {length} bytes")
    if buffer:
        raise CliError("stdin ends inside a length prefix")


def _push_all(writer: RingWriter, batch: list[bytes], interrupt: _Interrupt) -> None:
    """Push every message of `batch`; KeyboardInterrupt if a signal stopped it part-way."""
    done = 0
    while done < len(batch):
        try:
            done += writer.push_many(batch[done:] if done else batch, SLICE)
        except RingTimeout as e:
            done += e.written
            interrupt.check()
        except MessageTooLarge as e:
            raise _too_large(len(batch[done + e.written]), writer.max_message_size) from None


def _open_writer(args: argparse.Namespace) -> RingWriter:
    if args.attach:
        return RingWriter.open(args.path, wait=args.wait)
    try:
        return RingWriter.create(args.path, args.capacity)
    except FileExistsError:
        if not os.path.lexists(args.path):
            raise  # one of its FIFOs' names is taken: the message says which
        raise CliError(
            f"{args.path!r} exists: continue its stream with `ipc-ring write --attach`, "
            "or remove a stale ring with `ipc-ring rm`"
        ) from None


def _write_main(args: argparse.Namespace) -> int:
    stdin = _Input(0)
    writer = _open_writer(args)
    with _Interrupt() as interrupt:
        try:
            chunks = stdin.chunks(interrupt)
            limit = writer.max_message_size
            if args.format == "lines":
                batches = _split_lines(chunks, limit)
            elif args.format == "raw":
                batches = _split_chunks(chunks, min(args.chunk, limit))
            else:
                batches = _split_framed(chunks, limit)
            for messages in batches:
                for start in range(0, len(messages), BATCH):
                    _push_all(writer, messages[start : start + BATCH], interrupt)
        except KeyboardInterrupt:
            # What was pushed stays in the ring; the stream is not ended.
            writer.abort()
            return 130
        except PeerDied:
            # Stopped, not ended: a new reader drains what was pushed and then sees a
            # failed stream (cat exits 1); `ipc-ring write --attach` can continue it.
            writer.abort()
            raise CliError(
                "the reader died or closed and the ring is full; the stream is not ended "
                "(continue it with --attach)"
            ) from None
        except BaseException:
            writer.abort()
            raise
    writer.close()  # the end of stdin: the one clean end of the stream
    return 0


def _require_stdout() -> None:
    if sys.stdout is None:
        _check_open(1, "stdout")
        raise CliError("stdout is not open")


def _inspect_main(args: argparse.Namespace) -> int:
    _require_stdout()
    fields = _inspect.inspect_ring(args.path)
    if args.json:
        print(json.dumps({"path": args.path, **fields}))
    else:
        print(_inspect.format_human(args.path, fields))
    return 0


def _rm_main(args: argparse.Namespace) -> int:
    # Every path is checked before anything is removed: a typo among rings
    # removes nothing.
    for path in args.path:
        try:
            _core.check_ring_file(path)  # any version: an old ring can be removed too
        except InvalidRing as e:
            raise CliError(f"not a ring, nothing removed: {e}") from None
    for path in args.path:
        unlink(path)
    return 0


def _check_bench_args(args: argparse.Namespace) -> None:
    """What would make a child process fail, refused before one starts."""
    if args.msg_size < 8:
        raise CliError("--msg-size must be at least 8 (the sequence number)")
    if not _core.capacity_valid(args.cap):
        raise CliError(
            f"--cap must be a power of two between {_core.MIN_CAPACITY} and "
            f"{_core.MAX_CAPACITY} bytes, got {args.cap}"
        )
    if args.msg_size > args.cap - _core.RECORD_HEADER:
        raise CliError(
            f"--msg-size {args.msg_size} exceeds the max_message_size of a ring of --cap "
            f"{args.cap} ({args.cap - _core.RECORD_HEADER} bytes)"
        )
    if args.spin is not None and not 0 <= args.spin <= _core.MAX_SPIN:
        raise CliError(f"--spin must be between 0 and {_core.MAX_SPIN:g} seconds, got {args.spin}")
    if args.pin is not None and hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)
        for cpu in args.pin:
            if cpu not in allowed:
                raise CliError(
                    f"--pin: CPU {cpu} is not available here (CPUs {sorted(allowed)} are)"
                )


def _bench_main(args: argparse.Namespace) -> int:
    _require_stdout()
    _check_bench_args(args)
    alone = args.role in ("writer", "reader")
    ring = args.ring or (_bench.default_ring_path() if alone else _bench.fresh_ring_path())
    cfg = _bench.BenchConfig(
        ring=ring,
        cap=args.cap,
        messages=args.messages,
        msg_size=args.msg_size,
        api=args.api,
        batch=args.batch,
        spin=args.spin,
        pin=args.pin,
        latency_samples=args.latency_samples,
        json_only=args.json,
        progress=args.progress or (_shows_progress(args) and sys.stderr.isatty()),
    )
    role = args.role
    if role in ("writer", "latency-client", "latency-echo"):
        # A side run alone creates its ring: refuse an existing path in the words of
        # a run of both sides, not in those of RingWriter.create.
        if role == "latency-echo":
            _bench._refuse_existing(_bench._pong_path(cfg), _bench._floor_path(cfg))
        else:
            _bench._refuse_existing(ring)
    if role == "writer":
        return _bench.run_writer(cfg, wait_for_go=args.handshake)
    if role == "reader":
        return _bench.run_reader(cfg, announce=args.handshake)
    if role == "latency-echo":
        return _bench.run_latency_echo(cfg)
    if role == "latency-client":
        return _bench.run_latency_client(cfg)
    if args.latency:
        return _bench.run_latency(cfg)
    return _bench.run_both(cfg)


def _shows_progress(args: argparse.Namespace) -> bool:
    """The process that reports progress: the parent of a throughput run, or a reader
    run alone by hand (not one that the parent started)."""
    if args.role == "both":
        return not args.latency
    return bool(args.role == "reader" and not args.handshake)


COMMANDS = {
    "bench": _bench_main,
    "inspect": _inspect_main,
    "cat": _cat_main,
    "write": _write_main,
    "rm": _rm_main,
}


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit cannot fail
    a second time on a closed pipe or a full disk."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


def _flush_stdout() -> None:
    """Flush what print() buffered: a failure is an error of the command, not a
    message from the interpreter at exit."""
    if sys.stdout is not None:
        _write_text("", sys.stdout)


def _write_text(text: str, file: SupportsWrite[str]) -> None:
    try:
        file.write(text)
        flush = getattr(file, "flush", None)
        if flush is not None:
            flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        _quiet_stdout()
        raise CliError(f"cannot write to stdout ({e.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    prog = "ipc-ring"
    try:
        try:
            args, unknown = build_parser().parse_known_args(argv)
            if unknown:  # named by the command they were given to
                args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        except SystemExit:  # --help, --version, or a command line that does not parse
            _flush_stdout()
            raise
        prog = f"ipc-ring {args.command}"
        status = COMMANDS[args.command](args)
        _flush_stdout()
        return status
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head -1`): exit quietly, as a
        # process killed by SIGPIPE would.
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        message = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and e.filename not in message:
            message = f"{message}: {e.filename!r}"
        print(f"{prog}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
