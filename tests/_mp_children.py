"""Targets for multiprocessing children (importable by name under spawn and forkserver)."""

from __future__ import annotations

from ipc_ring import RingReader, RingWriter


def read_and_check(reader: RingReader, expected: list[bytes]) -> None:
    """Pops len(expected) messages from a reader handed over by pickling; exits 1 on a
    mismatch, 0 otherwise."""
    with reader:
        got = [reader.pop(timeout=10) for _ in expected]
    if got != expected:
        raise SystemExit(f"got {got!r}, expected {expected!r}")


def write_and_close(writer: RingWriter, messages: list[bytes]) -> None:
    """Pushes messages through a writer handed over by pickling, then ends the stream."""
    with writer:
        for message in messages:
            writer.push(message, timeout=10)


def hand_over_writer(path: str, method: str) -> None:
    """Creates a ring, pushes one message, hands the writer to a child of its own and
    exits without close(): the child re-attaches once this process is gone and ends
    the stream."""
    import multiprocessing
    import os

    writer = RingWriter.create(path, 4096)
    writer.push(b"parent", timeout=10)
    ctx = multiprocessing.get_context(method)
    child = ctx.Process(target=write_and_close, args=(writer, [b"child 1", b"child 2"]))
    child.start()
    os._exit(0)  # dies without close(): the role is free, the stream goes on
