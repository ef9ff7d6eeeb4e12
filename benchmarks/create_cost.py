"""What create() and open() cost, with the mapping pre-faulted (MAP_POPULATE):
median of 5 per capacity.

    python benchmarks/create_cost.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import ipc_ring
from ipc_ring import RingReader, RingWriter


def main() -> None:
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(directory, f"ipc_ring.create_cost.{os.getpid()}")
    for capacity in (1 << 20, 64 << 20, 1 << 30):
        creates, opens = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            writer = RingWriter.create(path, capacity)
            t1 = time.perf_counter()
            reader = RingReader.open(path)
            t2 = time.perf_counter()
            creates.append(t1 - t0)
            opens.append(t2 - t1)
            reader.close()
            writer.close()
            ipc_ring.unlink(path)
        print(
            f"{capacity >> 20:5d} MiB: create {statistics.median(creates) * 1e3:7.1f} ms, "
            f"open {statistics.median(opens) * 1e3:6.1f} ms (median of 5)"
        )


if __name__ == "__main__":
    main()
