"""Send numpy arrays through a ring without an extra copy on either side.

Run:  python examples/numpy_arrays.py   (needs numpy)

The writer reserves a record of the array's size in the ring and lets numpy
compute straight into it (np.frombuffer over the reserved slot); push(arr) would
work too, since push accepts any buffer. The reader takes each message in place
with pop_view() and wraps it with np.frombuffer, so the data is read from shared
memory without being copied into bytes first. A child process (multiprocessing,
"spawn") is the reader; it prints each array's sum and the writer checks them.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile

import numpy as np

import ipc_ring
from ipc_ring import RingClosed, RingReader, RingWriter

SHAPE = (256, 256)
COUNT = 20


def consume(path: str, results: multiprocessing.Queue[float]) -> None:
    with RingReader.open(path, wait=30) as reader:
        try:
            while True:
                with reader.pop_view(timeout=30) as view:
                    array = np.frombuffer(view, dtype=np.float64).reshape(SHAPE)
                    results.put(float(array.sum()))
                    del array  # the view must be released before the slot is
        except RingClosed:
            pass


def main() -> int:
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(directory, f"numpy_arrays.{os.getpid()}")
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[float] = ctx.Queue()
    nbytes = int(np.prod(SHAPE)) * 8
    try:
        with RingWriter.create(path, 4 << 20) as writer:
            child = ctx.Process(target=consume, args=(path, results))
            child.start()
            for i in range(COUNT):
                with writer.reserve(nbytes, timeout=30) as slot:
                    array = np.frombuffer(slot, dtype=np.float64).reshape(SHAPE)
                    array[:] = i  # computed in place, in the ring
                    del array
        sums = [results.get(timeout=60) for _ in range(COUNT)]
        child.join(timeout=60)
        expected = [float(i * np.prod(SHAPE)) for i in range(COUNT)]
        verdict = "match" if sums == expected else "DIFFER"
        print(f"{COUNT} arrays of {SHAPE} float64 received; sums {verdict}")
        return 0 if sums == expected and child.exitcode == 0 else 1
    finally:
        ipc_ring.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
