"""Instructions per message on the per-message path, counted by callgrind.

    python benchmarks/callgrind_pair.py                      # this interpreter's ipc_ring
    python benchmarks/callgrind_pair.py --python OTHER/bin/python   # another install, to compare

For each loop below, one process pushes and pops N and then 2N messages of
256 B through a ring in /dev/shm under `valgrind --tool=callgrind`; the
difference of the two totals divided by N is the cost of one iteration, the
Python loop included, without start-up. Instruction counts do not depend on
what else the machine is doing, so before/after comparisons of a change to
push, pop, try_push or try_pop are repeatable where timings are not.

Compare installs made the same way (`pip install .` into a fresh virtual
environment for each side): an editable install changes the interpreter's
allocation pattern enough to move the count by ~15 instructions.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

LOOPS = {
    "push+pop": "for _ in range(n):\n    push(msg)\n    pop()\n",
    "try_push+try_pop": "for _ in range(n):\n    try_push(msg)\n    try_pop()\n",
    "push+pop_into": "for _ in range(n):\n    push(msg)\n    pop_into(buf)\n",
    "push_many+pop_many/64": (
        "batch = [msg] * 64\nfor _ in range(n // 64):\n    push_many(batch)\n    pop_many(64)\n"
    ),
}

PROLOGUE = """\
import os, sys
from ipc_ring import RingReader, RingWriter, unlink
path = sys.argv[1]
n = int(sys.argv[2])
w = RingWriter.create(path, 1 << 20)
r = RingReader.open(path)
push, try_push, push_many = w.push, w.try_push, w.push_many
pop, try_pop, pop_into, pop_many = r.pop, r.try_pop, r.pop_into, r.pop_many
msg = bytes(256)
buf = bytearray(256)
"""

EPILOGUE = "w.close()\nr.close()\nunlink(path)\n"


def _instructions(python: str, body: str, n: int) -> int:
    directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        script = os.path.join(tmp, "loop.py")
        with open(script, "w") as f:
            f.write(PROLOGUE + body + EPILOGUE)
        out = os.path.join(tmp, "callgrind.out")
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             python, script, os.path.join(tmp, "ring"), str(n)],
            capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"), check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"valgrind failed: {proc.stderr[-2000:]}")
        match = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
        if not match:
            raise RuntimeError(f"no instruction count in valgrind's output: {proc.stderr[-500:]}")
        return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure")
    parser.add_argument("-n", type=int, default=20_000, help="messages in the short run")
    parser.add_argument("--only", default="", help="comma-separated loop names")
    args = parser.parse_args()
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"measured: {args.python}")
    wanted = set(args.only.split(",")) if args.only else set(LOOPS)
    for name, body in LOOPS.items():
        if name not in wanted:
            continue
        short = _instructions(args.python, body, args.n)
        long = _instructions(args.python, body, 2 * args.n)
        print(f"{name:<24} {(long - short) / args.n:10.1f} instructions per message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
