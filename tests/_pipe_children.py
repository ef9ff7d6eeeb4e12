"""Targets of child processes for test_pipe.py (importable by name under spawn and
forkserver). Each one works with a connection end it was given, as a user's child
process would, and reports through its exit status."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any


def echo_until_eof(conn: Any) -> None:
    """Sends back every object it receives; exits 0 at EOFError or after echoing
    "stop" (a fork() child of a multiprocessing.Pipe also holds the parent's end, so
    it never sees an EOF)."""
    while True:
        try:
            obj = conn.recv()
        except EOFError:
            conn.close()
            sys.exit(0)
        conn.send(obj)
        if isinstance(obj, str) and obj == "stop":
            sys.exit(0)


def echo_bytes_until_eof(conn: Any) -> None:
    """recv_bytes and send_bytes them back, as echo_until_eof."""
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            sys.exit(0)
        conn.send_bytes(data)
        if data == b"stop":
            sys.exit(0)


def send_then_block(conn: Any, count: int) -> None:
    """Sends `count` numbers, then waits in recv() until it is killed."""
    for i in range(count):
        conn.send(i)
    conn.recv()
    sys.exit(3)


def send_after(conn: Any, delay: float, obj: object) -> None:
    time.sleep(delay)
    conn.send(obj)
    conn.close()


def stream_forever(conn: Any) -> None:
    """Sends numbered objects as fast as it can until it is killed."""
    i = 0
    while True:
        conn.send({"seq": i, "payload": b"x" * (i % 3000)})
        i += 1


def recv_until_eof_then_report(conn: Any, report: str) -> None:
    """Receives until an exception, then writes the exception's class names (its MRO)
    and how many objects came to `report`."""
    got = 0
    try:
        while True:
            conn.recv()
            got += 1
    except BaseException as e:  # what a user's except clause would see
        names = " ".join(c.__name__ for c in type(e).__mro__)
        with open(report + ".tmp", "w") as f:
            f.write(f"{got} {names}\n")
        os.rename(report + ".tmp", report)


def parent_of_a_receiver(make: str, method: str, report: str, ready: str) -> None:
    """Makes a pipe, hands one end to a child that receives until EOF (and reports),
    sends three objects, says it is ready and waits to be killed."""
    import multiprocessing

    import ipc_ring

    pipe = ipc_ring.Pipe if make == "ipc_ring" else multiprocessing.Pipe
    a, b = pipe()
    ctx = multiprocessing.get_context(method)
    child = ctx.Process(target=recv_until_eof_then_report, args=(b, report))
    child.start()
    b.close()
    for i in range(3):
        a.send(i)
    with open(ready, "w") as f:
        f.write(f"{child.pid}\n")
    while True:
        signal.pause()


def use_the_end_the_parent_holds(conn: Any) -> None:
    """Exit 0 if sending on an end another process writes fails clearly, else 1."""
    import ipc_ring

    try:
        conn.send("from the child")
    except ipc_ring.RingBusy as e:
        sys.exit(0 if "another process" in str(e) else 2)
    sys.exit(1)


def stream_in_a_child_of_its_own(report: str) -> None:
    """Makes a pipe, hands an end to a child that streams into it, reads a while, then
    writes both pids to `report` and goes on reading until it is killed."""
    import multiprocessing

    import ipc_ring

    a, b = ipc_ring.Pipe(capacity=1 << 16)
    child = multiprocessing.get_context("spawn").Process(target=stream_forever, args=(b,))
    child.start()
    b.close()
    for _ in range(1000):
        a.recv()
    with open(report + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}\n")
    os.rename(report + ".tmp", report)
    while True:
        a.recv()
