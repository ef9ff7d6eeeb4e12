"""The `ipc-ring` command line (also `python -m ipc_ring`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from . import _bench
from ._core import RingError


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
    return parser


def _cpu_pair(text: str) -> tuple[int, int]:
    try:
        writer, reader = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two CPU numbers like 0,1, got {text}") from None
    return writer, reader


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench_main(args)
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
    return 2


if __name__ == "__main__":
    sys.exit(main())
