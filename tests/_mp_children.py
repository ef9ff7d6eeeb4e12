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
    """Creates a ring, pushes one message, hands the writer to a child of its own, detaches
    and exits at once: the child attaches to the vacant role and ends the stream."""
    import multiprocessing
    import os

    writer = RingWriter.create(path, 4096)
    writer.push(b"parent", timeout=10)
    ctx = multiprocessing.get_context(method)
    child = ctx.Process(target=write_and_close, args=(writer, [b"child 1", b"child 2"]))
    child.start()
    writer.detach()
    os._exit(0)  # without joining the child: it carries on alone


def numbered(seq: int) -> bytes:
    """Message number `seq`: 8 to 32 bytes, distinct for every seq."""
    return seq.to_bytes(8, "little") * (1 + seq % 4)


def read_numbered(reader: RingReader, count: int) -> None:
    """Pops numbered(0) .. numbered(count - 1) from a handed-over reader, then the end of
    the stream; exits non-zero on anything else (a PeerDied included)."""
    from ipc_ring import RingClosed

    with reader:
        for seq in range(count):
            got = reader.pop(timeout=30)
            if got != numbered(seq):
                raise SystemExit(f"message {seq}: got {got!r}")
        try:
            reader.pop(timeout=30)
        except RingClosed:
            return
    raise SystemExit("a message after the last one")


def open_and_read_numbered(path: str, count: int) -> None:
    """read_numbered() through a reader this process opens by path (the fork pattern)."""
    read_numbered(RingReader.open(path, wait=30), count)


def write_numbered(writer: RingWriter, count: int) -> None:
    """Pushes numbered(0) .. numbered(count - 1) through a handed-over writer, then ends
    the stream."""
    with writer:
        for seq in range(count):
            writer.push(numbered(seq), timeout=30)
