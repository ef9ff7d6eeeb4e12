"""The `ipc-ring` command line (also `python -m ipc_ring`)."""

from __future__ import annotations

import argparse
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
        choices=["both", "writer", "reader"],
        default="both",
        help="both (default): run a writer and a reader process; or run one side alone "
        "(start the reader first)",
    )
    bench.add_argument("--ring", default=_bench.default_ring_path(), help="ring file path")
    bench.add_argument("--cap", type=_positive, default=64 << 20, help="capacity in bytes")
    bench.add_argument("--messages", type=_positive, default=5_000_000)
    bench.add_argument("--msg-size", type=_positive, default=256, help="bytes per message (>= 8)")
    bench.add_argument("--handshake", action="store_true", help=argparse.SUPPRESS)
    return parser


def _bench_main(args: argparse.Namespace) -> int:
    if args.msg_size < 8:
        raise SystemExit("ipc-ring bench: --msg-size must be at least 8 (the sequence number)")
    cfg = _bench.BenchConfig(args.ring, args.cap, args.messages, args.msg_size)
    if args.role == "writer":
        return _bench.run_writer(cfg, wait_for_go=args.handshake)
    if args.role == "reader":
        return _bench.run_reader(cfg, announce=args.handshake)
    return _bench.run_both(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench_main(args)
    except (RingError, OSError, ValueError) as e:
        print(f"ipc-ring {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
