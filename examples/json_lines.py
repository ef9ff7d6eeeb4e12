"""Stream JSON lines from this process to a reader process through a ring.

Run:  python examples/json_lines.py [COUNT]

The parent creates the ring and opens the reader handle, then hands that handle to
a child started with multiprocessing ("spawn"): pickling a handle sends its path,
and the child re-attaches as the reader once the parent closed its copy. The
parent waits until the child is attached, then pushes COUNT JSON documents
(default 100000) in batches and closes the writer; the child decodes every
document, checks the sequence and prints a summary.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
from multiprocessing.synchronize import Event

import ipc_ring
from ipc_ring import RingClosed, RingReader, RingWriter


def consume(reader: RingReader, count: int, attached: Event) -> None:
    attached.set()  # the handle was unpickled, so this process is the reader now
    total = 0
    with reader:
        try:
            while True:
                for line in reader.pop_many(1024, timeout=30):
                    event = json.loads(line)
                    if event["seq"] != total:
                        raise SystemExit(f"expected seq {total}, got {event['seq']}")
                    total += 1
        except RingClosed:
            pass
    print(f"reader: {total} JSON documents received in order")
    if total != count:
        raise SystemExit(f"reader: expected {count}")


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(directory, f"json_lines.{os.getpid()}")
    ctx = multiprocessing.get_context("spawn")
    try:
        with RingWriter.create(path, 1 << 20) as writer:
            reader = RingReader.open(path)
            attached = ctx.Event()
            child = ctx.Process(target=consume, args=(reader, count, attached))
            child.start()  # pickles the reader: its path and role
            reader.close()  # the child attaches as soon as the role is free
            # Until then no reader is alive: a push into a full ring would be
            # PeerDied, so wait for the hand-over to complete.
            if not attached.wait(timeout=30):
                raise SystemExit("the reader did not attach within 30 s")
            batch: list[bytes] = []
            for seq in range(count):
                batch.append(json.dumps({"seq": seq, "name": f"event-{seq}"}).encode())
                if len(batch) == 256:
                    writer.push_many(batch, timeout=30)
                    batch.clear()
            writer.push_many(batch, timeout=30)
        # writer closed: end of stream
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
            raise SystemExit("reader did not finish within 60 s")
        print(f"writer: {count} JSON documents sent")
        return child.exitcode or 0
    finally:
        ipc_ring.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
