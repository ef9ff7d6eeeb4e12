"""Run `ipc-ring bench` configurations several times, alternating, and print
medians with min and max: the figures in the README come from this output.

    python benchmarks/medians.py                 # the README's set, 5 runs each
    python benchmarks/medians.py --runs 7 --only single-256,batch-256

Each configuration is one `ipc-ring bench` command (a fresh writer and
reader process per run); runs alternate between configurations so that
machine noise hits them alike. The C driver (benchmarks/ring_bench.c) is
built with `cc` into benchmarks/bin/ when it is selected.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH = [sys.executable, "-m", "ipc_ring", "bench"]


@dataclass(frozen=True)
class Config:
    name: str
    argv: list[str]
    metric: str  # key of the JSON line: msgs_per_sec, or a latency path like wakeup_us.p50


def _configs(messages: int) -> list[Config]:
    n = str(messages)
    big = str(max(messages // 20, 20_000))
    return [
        Config("single-256", [*BENCH, "--messages", n, "--api", "single"], "msgs_per_sec"),
        Config("into-256", [*BENCH, "--messages", n, "--api", "into"], "msgs_per_sec"),
        Config("batch-256", [*BENCH, "--messages", n, "--api", "batch"], "msgs_per_sec"),
        Config("zero-copy-256", [*BENCH, "--messages", n, "--api", "zero-copy"], "msgs_per_sec"),
        Config(
            "single-64KiB",
            [*BENCH, "--messages", big, "--msg-size", "65536", "--api", "single"],
            "GB_per_sec",
        ),
        Config(
            "zero-copy-64KiB",
            [*BENCH, "--messages", big, "--msg-size", "65536", "--api", "zero-copy"],
            "GB_per_sec",
        ),
        Config("c-core-256", [str(HERE / "bin" / "ring_bench"), "--messages", n], "msgs_per_sec"),
        Config(
            "latency",
            [*BENCH, "--latency", "--messages", "100000", "--latency-samples", "1000"],
            "round_trip_us.p50,wakeup_us.p50",
        ),
    ]


def _build_c_driver() -> None:
    out = HERE / "bin" / "ring_bench"
    out.parent.mkdir(exist_ok=True)
    subprocess.run(
        ["cc", "-std=c11", "-O2", "-I", str(ROOT / "src" / "ipc_ring"),
         str(ROOT / "src" / "ipc_ring" / "_ring.c"), str(ROOT / "src" / "ipc_ring" / "_handle.c"),
         str(HERE / "ring_bench.c"), "-pthread", "-o", str(out)],
        check=True,
    )  # fmt: skip


def _measure(cfg: Config) -> dict[str, float]:
    proc = subprocess.run(cfg.argv, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg.name} failed ({proc.returncode}): {proc.stderr.strip()}")
    line = json.loads(proc.stdout.splitlines()[0])
    values: dict[str, float] = {}
    for key in cfg.metric.split(","):
        if key == "GB_per_sec":
            values["GB/s"] = line["msgs_per_sec"] * line["msg_size"] / 1e9
            continue
        if key == "msgs_per_sec":
            values["M msgs/s"] = line["msgs_per_sec"] / 1e6
            continue
        node = line
        for part in key.split("."):
            node = node[part]
        values[key] = float(node)
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()
    configs = _configs(args.messages)
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in configs if c.name in wanted]
    if any(c.name.startswith("c-core") for c in configs):
        _build_c_driver()
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    samples: dict[str, dict[str, list[float]]] = {c.name: {} for c in configs}
    for run in range(1, args.runs + 1):
        for cfg in configs:
            for key, value in _measure(cfg).items():
                samples[cfg.name].setdefault(key, []).append(value)
            print(f"  run {run}/{args.runs} {cfg.name}: done", file=sys.stderr, flush=True)
    print(f"{'configuration':<18} {'metric':<22} {'median':>12} {'min':>12} {'max':>12}  runs")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for cfg in configs:
        for key, values in samples[cfg.name].items():
            med = statistics.median(values)
            summary.setdefault(cfg.name, {})[key] = {
                "median": med,
                "min": min(values),
                "max": max(values),
            }
            print(
                f"{cfg.name:<18} {key:<22} {med:>12,.2f} {min(values):>12,.2f} "
                f"{max(values):>12,.2f}  {len(values)}"
            )
    for cfg in configs:
        print(f"  {cfg.name}: {shlex.join(cfg.argv)}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
