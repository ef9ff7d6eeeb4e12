"""An asyncio service hands events to a worker process through a ring.

Run:  python examples/asyncio_producer.py [COUNT]

The service is an asyncio program: it creates the ring, starts a worker process
(multiprocessing "spawn") that attaches as the reader, and then produces COUNT
events (default 10000) with ``await writer.push_async(...)``, so a full ring
suspends only this coroutine, never the event loop: a heartbeat task keeps
running meanwhile. The worker processes the events with the blocking API and
prints a summary; the service closes the writer at the end (end of stream).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import tempfile

import ipc_ring
from ipc_ring import RingWriter


def worker(path: str, count: int) -> None:
    with ipc_ring.RingReader.open(path, wait=30) as reader:
        total = 0
        for expected, msg in enumerate(reader):  # ends when the writer closes
            event = json.loads(msg)
            assert event["seq"] == expected, (event, expected)
            total += event["value"]
    print(f"worker: {expected + 1} events, sum of values {total}")
    assert expected + 1 == count


async def heartbeat(beats: list[int]) -> None:
    while True:
        beats[0] += 1
        await asyncio.sleep(0.001)


async def produce(path: str, count: int) -> None:
    # A small ring, so that the producer really has to wait for the worker.
    with RingWriter.create(path, 4096) as writer:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=worker, args=(path, count))
        proc.start()
        beats = [0]
        ticker = asyncio.create_task(heartbeat(beats))
        for seq in range(count):
            event = {"seq": seq, "value": seq % 7, "kind": "tick"}
            await writer.push_async(json.dumps(event).encode(), timeout=30)
        ticker.cancel()
    # the writer is closed here: the worker drains the ring and stops
    await asyncio.get_running_loop().run_in_executor(None, proc.join, 60)
    print(f"service: {count} events sent; the event loop ran {beats[0]} heartbeats meanwhile")
    if proc.exitcode != 0:
        raise SystemExit(f"worker failed with exit code {proc.exitcode}")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(directory, f"ipc_ring.example.asyncio.{os.getpid()}")
    try:
        asyncio.run(produce(path, count))
    finally:
        ipc_ring.unlink(path)


if __name__ == "__main__":
    main()
