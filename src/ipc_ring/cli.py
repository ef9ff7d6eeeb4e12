"""The `ipc-ring` command line (also `python -m ipc_ring`)."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import struct
import sys
from collections.abc import Iterator
from types import FrameType
from typing import BinaryIO

from . import _bench, _inspect
from ._api import RingReader, RingWriter
from ._core import MessageTooLarge, PeerDied, RingClosed, RingError, RingTimeout

FORMATS = ("lines", "raw", "length-prefixed")
LENGTH = struct.Struct("<I")
# Blocking calls of cat and write wait in slices this long, so Ctrl-C is seen
# between slices, never between popping a message and writing it out.
SLICE = 0.1
BATCH = 1024
OUT_BUFFER = 1 << 20


def _positive(text: str) -> int:
    value = int(text, 0)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipc-ring", description="Memory-mapped SPSC ring buffer for IPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench",
        help="throughput between a writer process and a reader process",
        description=(
            "Push --messages messages of --msg-size bytes from a writer process to a reader "
            "process that checks every sequence number. Prints the seed's JSON line."
        ),
    )
    bench.add_argument(
        "role",
        nargs="?",
        choices=["both", "writer", "reader", "latency-echo", "latency-client"],
        default="both",
        help="both (default): run a writer and a reader process; or run one side alone "
        "(start the reader first)",
    )
    bench.add_argument("--ring", default=_bench.default_ring_path(), help="ring file path")
    bench.add_argument("--cap", type=_positive, default=64 << 20, help="capacity in bytes")
    bench.add_argument("--messages", type=_positive, default=5_000_000)
    bench.add_argument("--msg-size", type=_positive, default=256, help="bytes per message (>= 8)")
    bench.add_argument(
        "--api",
        choices=_bench.APIS,
        default="single",
        help="single: push/pop; into: push/pop_into a reused buffer; batch: push_many/pop_many; "
        "zero-copy: reserve/pop_view",
    )
    bench.add_argument("--batch", type=_positive, default=256, help="messages per batch")
    bench.add_argument(
        "--latency",
        action="store_true",
        help="measure latency instead: round trip through two rings, and the one-way "
        "wake-up of a reader asleep in pop (p50, p99, p99.9)",
    )
    bench.add_argument(
        "--latency-samples", type=_positive, default=2000, help="wake-up samples, 1 ms apart"
    )
    bench.add_argument(
        "--pin", type=_cpu_pair, default=None, metavar="W,R", help="pin writer and reader to CPUs"
    )
    bench.add_argument(
        "--spin",
        type=float,
        default=None,
        metavar="SECONDS",
        help="busy-wait before sleeping (default: the library's)",
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
    )
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="one JSON object")

    cat = commands.add_parser(
        "cat",
        help="attach as the reader and copy every message to stdout",
        description=(
            "Read messages until the writer closes the ring (exit 0). lines: each message "
            "then a newline (added even if the message ends with one); raw: messages "
            "concatenated; length-prefixed: a 4-byte little-endian length, then the message."
        ),
    )
    cat.add_argument("path")
    cat.add_argument("--format", choices=FORMATS, default="lines")
    cat.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for the ring to appear and the reader role to be free",
    )

    write = commands.add_parser(
        "write",
        help="create a ring (or attach as its writer) and push stdin into it",
        description=(
            "lines: one message per line, without its newline; raw: messages of --chunk "
            "bytes; length-prefixed: a 4-byte little-endian length, then the message. At "
            "the end of stdin the writer closes the ring (end of stream)."
        ),
    )
    write.add_argument("path")
    write.add_argument("--capacity", type=_positive, default=1 << 20, help="bytes (create)")
    write.add_argument("--format", choices=FORMATS, default="lines")
    write.add_argument("--chunk", type=_positive, default=65536, help="message size for raw")
    mode = write.add_mutually_exclusive_group()
    mode.add_argument("--create", dest="attach", action="store_false", help="(default)")
    mode.add_argument(
        "--attach", dest="attach", action="store_true", help="re-attach to an existing ring"
    )
    write.set_defaults(attach=False)
    write.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --attach: wait this long for the ring and the writer role",
    )
    return parser


def _cpu_pair(text: str) -> tuple[int, int]:
    try:
        writer, reader = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two CPU numbers like 0,1, got {text}") from None
    return writer, reader


class _Interrupt:
    """SIGINT sets a flag instead of raising, so a popped or read batch is always
    finished before the command stops; blocking calls wait in SLICE-long slices.
    While `raise_now` is set (blocked reading stdin) it raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.seen = False
        self.raise_now = False

    def __enter__(self) -> _Interrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.seen = True
        if self.raise_now:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _encode_batch(batch: list[bytes], fmt: str) -> bytes:
    if fmt == "lines":
        return b"\n".join(batch) + b"\n"
    if fmt == "raw":
        return b"".join(batch)
    pack = LENGTH.pack
    return b"".join(part for msg in batch for part in (pack(len(msg)), msg))


def _cat_main(args: argparse.Namespace) -> int:
    out = io.BufferedWriter(io.FileIO(sys.stdout.fileno(), "wb", closefd=False), OUT_BUFFER)
    with RingReader.open(args.path, wait=args.wait) as reader, _Interrupt() as interrupt:
        pop_many, fmt = reader.pop_many, args.format
        try:
            while not interrupt.seen:
                try:
                    batch = pop_many(BATCH, 0)
                except RingTimeout:
                    # Empty: hand what we have to the consumer, then sleep a slice.
                    out.flush()
                    try:
                        batch = pop_many(BATCH, SLICE)
                    except RingTimeout:
                        continue
                out.write(_encode_batch(batch, fmt))
        except RingClosed:
            pass
        except PeerDied:
            out.flush()
            raise PeerDied("writer died (every message it committed was written)") from None
        finally:
            out.flush()
    return 130 if interrupt.seen else 0


def _read_lines(stream: BinaryIO) -> Iterator[list[bytes]]:
    """Batches of lines without their newline; a last line without one counts too."""
    read = getattr(stream, "read1", stream.read)
    pending: list[bytes] = []  # pieces of a line that spans reads
    while chunk := read(OUT_BUFFER):
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        if pending:
            pending.append(chunk)
            chunk = b"".join(pending)
            pending.clear()
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if rest:
            pending.append(rest)
        yield lines
    if pending:
        yield [b"".join(pending)]


def _read_chunks(stream: BinaryIO, size: int) -> Iterator[list[bytes]]:
    while data := stream.read(size * 16):
        yield [data[i : i + size] for i in range(0, len(data), size)]


def _read_framed(stream: BinaryIO) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    while header := stream.read(LENGTH.size):
        if len(header) < LENGTH.size:
            raise ValueError("stdin ends inside a length prefix")
        (length,) = LENGTH.unpack(header)
        payload = stream.read(length)
        if len(payload) < length:
            raise ValueError(f"stdin ends inside a message of {length} bytes")
        batch.append(payload)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _push_all(writer: RingWriter, batch: list[bytes], interrupt: _Interrupt) -> bool:
    """Push every message of `batch`; False if Ctrl-C stopped it part-way."""
    done = 0
    while done < len(batch):
        try:
            done += writer.push_many(batch[done:] if done else batch, SLICE)
        except RingTimeout as e:
            done += e.written
            if interrupt.seen:
                return False
        except MessageTooLarge as e:
            size = len(batch[done + e.written])
            raise MessageTooLarge(
                f"a message of {size} bytes exceeds max_message_size={writer.max_message_size}"
            ) from None
        except PeerDied:
            raise PeerDied("the reader died and the ring is full") from None
    return True


def _write_main(args: argparse.Namespace) -> int:
    if args.attach:
        writer = RingWriter.open(args.path, wait=args.wait)
    else:
        writer = RingWriter.create(args.path, args.capacity)
    stdin = sys.stdin.buffer
    with writer, _Interrupt() as interrupt:
        if args.format == "lines":
            batches = _read_lines(stdin)
        elif args.format == "raw":
            batches = _read_chunks(stdin, min(args.chunk, writer.max_message_size))
        else:
            batches = _read_framed(stdin)
        try:
            interrupt.raise_now = True
            for lines in batches:
                interrupt.raise_now = False
                for start in range(0, len(lines), BATCH):
                    if not _push_all(writer, lines[start : start + BATCH], interrupt):
                        return 130
                if interrupt.seen:
                    return 130
                interrupt.raise_now = True
        except KeyboardInterrupt:
            # Only ever raised while reading stdin: everything read so far is pushed.
            return 130
        finally:
            interrupt.raise_now = False
    return 0


def _inspect_main(args: argparse.Namespace) -> int:
    fields = _inspect.inspect_ring(args.path)
    if args.json:
        print(json.dumps({"path": args.path, **fields}))
    else:
        print(_inspect.format_human(args.path, fields))
    return 0


def _bench_main(args: argparse.Namespace) -> int:
    if args.msg_size < 8:
        raise SystemExit("ipc-ring bench: --msg-size must be at least 8 (the sequence number)")
    cfg = _bench.BenchConfig(
        ring=args.ring,
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


COMMANDS = {"bench": _bench_main, "inspect": _inspect_main, "cat": _cat_main, "write": _write_main}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head -1`): exit quietly
        # as a killed-by-SIGPIPE process would, without a second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (RingError, OSError, ValueError) as e:
        print(f"ipc-ring {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
