"""The life of a handle: create and its arguments, the properties, close() and context
managers, the end of the stream a writer's close() makes, open(wait=), detach(), pickling
(the ring's own hand-over of a role to another process), and fork().

The functions run by the `spawn` fixture (see conftest.py) get their arguments as strings
and return the child's exit status.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import pickle
import select
import signal
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

import _mp_children
from conftest import TIMEOUT, Spawn, fill, numbered
from ipc_ring import (
    InvalidRing,
    PeerDied,
    RingBusy,
    RingClosed,
    RingError,
    RingReader,
    RingTimeout,
    RingWriter,
)

START_METHODS = [m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]


# ---- child processes ---------------------------------------------------------------------


def create_after(path: str, delay: str) -> int:
    time.sleep(float(delay))
    with RingWriter.create(path, 4096) as writer:
        writer.push(b"hello", timeout=10)
    return 0


def open_reader_waiting(path: str, wait: str) -> int:
    with RingReader.open(path, wait=float(wait)) as reader:
        print("attached", flush=True)
        print(f"message {reader.pop(timeout=10).decode()}", flush=True)
    return 0


def hold_writer_then_die(path: str) -> int:
    writer = RingWriter.create(path, 4096)
    writer.push(b"before", timeout=10)
    print("pickled " + pickle.dumps(writer).hex(), flush=True)
    time.sleep(60)
    return 1


def child_probe_writer_alive(path: str) -> int:
    """Opens the ring as a reader and reports whether it sees a live writer and what a short
    pop does: "probe <writer_alive> <outcome>"."""
    with RingReader.open(path) as reader:
        alive = reader.writer_alive
        try:
            outcome = f"message:{len(reader.pop(timeout=0.3))}"
        except RingError as e:
            outcome = type(e).__name__
        print("probe", alive, outcome, flush=True)
    return 0


def child_forks_sleeper_then_dies(path: str, role: str) -> NoReturn:
    """Attaches as `role` ("writer": creates the ring and pushes 3 messages; "reader"),
    forks a grandchild that sleeps for 30 s holding the inherited handle, prints
    "grandchild <pid>", and dies without closing."""
    handle: RingWriter | RingReader
    if role == "writer":
        handle = RingWriter.create(path, 256)
        for i in range(3):
            handle.push(numbered(i))
    else:
        handle = RingReader.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        time.sleep(30)
        os._exit(0)
    print("grandchild", pid, flush=True)
    assert not handle.closed  # attached until the very end: os._exit does not close it
    os._exit(0)


# ---- create ------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, 8, 63, 65, 100, 96, 2**32 + 1, 2**33, -64], ids=repr)
def test_create_rejects_a_capacity_that_is_not_a_power_of_two_in_range(
    ring_path: Path, capacity: int
) -> None:
    with pytest.raises(ValueError, match="capacity"):
        RingWriter.create(ring_path, capacity)
    assert os.listdir(ring_path.parent) == []


@pytest.mark.parametrize("capacity", [True, 64.0, "64", None], ids=repr)
def test_create_rejects_a_capacity_that_is_not_an_int(ring_path: Path, capacity: object) -> None:
    with pytest.raises(TypeError):
        RingWriter.create(ring_path, capacity)  # type: ignore[arg-type]
    assert os.listdir(ring_path.parent) == []


@pytest.mark.parametrize("capacity", [64, 128, 4096, 1 << 20])
def test_create_accepts_power_of_two_capacities(ring_path: Path, capacity: int) -> None:
    with RingWriter.create(ring_path, capacity) as writer:
        assert writer.capacity == capacity
        assert writer.max_message_size == capacity - 8


@pytest.mark.parametrize("spin", [-1, 10**9, "fast"], ids=repr)
def test_create_with_a_bad_spin_fails_and_leaves_no_file(ring_path: Path, spin: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        RingWriter.create(ring_path, 64, spin=spin)  # type: ignore[arg-type]
    assert os.listdir(ring_path.parent) == []


def test_create_accepts_str_and_path_like_paths(ring_dir: Path) -> None:
    with (
        RingWriter.create(str(ring_dir / "a"), 64) as by_str,
        RingWriter.create(ring_dir / "b", 64) as by_path,
    ):
        assert by_str.path == str(ring_dir / "a")
        assert by_path.path == str(ring_dir / "b")


def test_create_rejects_a_bytes_path(ring_path: Path) -> None:
    with pytest.raises(TypeError):
        RingWriter.create(os.fsencode(ring_path), 64)  # type: ignore[arg-type]
    assert os.listdir(ring_path.parent) == []


@pytest.mark.parametrize("capacity", [64, 4096])
def test_handles_report_capacity_max_message_size_path_and_closed(
    ring_path: Path, capacity: int
) -> None:
    with RingWriter.create(ring_path, capacity) as writer, RingReader.open(ring_path) as reader:
        for handle in (writer, reader):
            assert handle.capacity == capacity
            assert handle.max_message_size == capacity - 8
            assert handle.path == str(ring_path)
            assert handle.closed is False
    assert writer.closed is True
    assert reader.closed is True
    assert writer.path == reader.path == str(ring_path)


# ---- close and context managers ----------------------------------------------------------


def test_close_is_idempotent(ring: tuple[RingWriter, RingReader]) -> None:
    writer, reader = ring
    for handle in (writer, reader):
        assert handle.closed is False
        handle.close()
        assert handle.closed is True
        handle.close()
        assert handle.closed is True


def test_context_managers_close_their_handles(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        writer.push(b"x", timeout=5)
        with RingReader.open(ring_path) as reader:
            assert reader.pop(timeout=5) == b"x"
        assert reader.closed
    assert writer.closed
    with RingReader.open(ring_path) as reader, pytest.raises(RingClosed):
        reader.pop(timeout=5)


def test_context_managers_close_their_handles_when_the_body_raises(ring_path: Path) -> None:
    with pytest.raises(KeyError), RingWriter.create(ring_path, 64) as writer:
        raise KeyError("body failed")
    assert writer.closed
    with pytest.raises(KeyError), RingReader.open(ring_path) as reader:
        raise KeyError("body failed")
    assert reader.closed


def test_messages_a_closed_reader_did_not_read_stay_for_the_next_reader(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        for i in range(5):
            writer.push(bytes([i]) * i, timeout=5)
        with RingReader.open(ring_path) as first:
            assert first.pop(timeout=5) == b""
            assert first.pop(timeout=5) == b"\x01"
        with RingReader.open(ring_path) as second:
            remaining = [second.pop(timeout=5) for _ in range(3)]
            assert remaining == [b"\x02" * 2, b"\x03" * 3, b"\x04" * 4]
            assert second.try_pop() is None


def test_a_ring_whose_writer_closed_can_still_be_opened_and_drained(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 64) as writer:
        writer.push(b"left behind", timeout=5)
    with RingReader.open(ring_path) as reader:
        assert list(reader) == [b"left behind"]


# ---- end of stream -----------------------------------------------------------------------


def test_reader_drains_remaining_messages_after_the_writer_closes(ring_path: Path) -> None:
    with RingWriter.create(ring_path, 256) as writer, RingReader.open(ring_path) as reader:
        for message in (b"one", b"", b"three"):
            writer.push(message, timeout=5)
        writer.close()
        assert reader.pop(timeout=5) == b"one"
        assert reader.try_pop() == b""
        buffer = bytearray(8)
        assert reader.pop_into(buffer, timeout=5) == 5
        assert buffer[:5] == b"three"


@pytest.mark.parametrize("timeout", [0, 5, None])
def test_pop_raises_ring_closed_after_writer_closes_and_ring_is_drained(
    ring: tuple[RingWriter, RingReader], timeout: float | None
) -> None:
    writer, reader = ring
    writer.push(b"last", timeout=5)
    writer.close()
    assert reader.pop(timeout=5) == b"last"
    with pytest.raises(RingClosed):
        reader.pop(timeout=timeout)
    with pytest.raises(RingClosed):
        reader.pop(timeout=timeout)


def test_try_pop_and_pop_into_raise_ring_closed_after_writer_closes_and_ring_is_drained(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.close()
    with pytest.raises(RingClosed):
        reader.try_pop()
    with pytest.raises(RingClosed):
        reader.pop_into(bytearray(8), timeout=5)


def test_pop_many_returns_the_rest_then_raises_ring_closed_at_end_of_stream(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push_many([b"last", b"words"], timeout=0)
    writer.close()
    assert reader.pop_many(10, timeout=TIMEOUT) == [b"last", b"words"]
    for timeout in (0, TIMEOUT):
        with pytest.raises(RingClosed):
            reader.pop_many(10, timeout=timeout)


def test_pop_view_raises_ring_closed_at_end_of_stream(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.push(b"last", timeout=0)
    writer.close()
    with reader.pop_view(timeout=TIMEOUT) as view:
        assert bytes(view) == b"last"
    for timeout in (0, TIMEOUT):
        with pytest.raises(RingClosed):
            reader.pop_view(timeout=timeout)


def test_ring_closed_at_end_of_stream_is_an_eof_error(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    writer.close()
    with pytest.raises(EOFError):
        reader.pop(timeout=5)


def test_iteration_yields_remaining_messages_and_stops_after_the_writer_closes(
    ring: tuple[RingWriter, RingReader],
) -> None:
    writer, reader = ring
    messages = [b"a", b"", b"ccc", b"d" * 16]  # 64 bytes of records: fills the ring
    for message in messages:
        writer.push(message, timeout=5)
    writer.close()
    assert iter(reader) is reader
    assert list(reader) == messages
    assert list(reader) == []
    with pytest.raises(StopIteration):
        next(reader)


# ---- open(wait=) -------------------------------------------------------------------------


def test_reader_open_waits_for_a_writer_created_later_in_another_process(
    ring_path: Path, spawn: Spawn
) -> None:
    writer = spawn(create_after, ring_path, 0.5)
    start = time.monotonic()
    with RingReader.open(ring_path, wait=20) as reader:
        assert time.monotonic() - start >= 0.3
        assert reader.pop(timeout=10) == b"hello"
    writer.finish()


def test_reader_open_waits_until_the_reader_role_is_released(ring_path: Path, spawn: Spawn) -> None:
    with RingWriter.create(ring_path, 4096) as writer:
        first = RingReader.open(ring_path)
        child = spawn(open_reader_waiting, ring_path, 20)
        time.sleep(0.5)
        assert child.output == []  # still waiting for the role
        first.close()
        child.expect_line("attached")
        writer.push(b"x", timeout=10)
        assert child.expect_line("message") == "message x"
        child.finish()


def test_open_without_wait_fails_at_once_when_the_file_is_missing(ring_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RingReader.open(ring_path)
    with pytest.raises(FileNotFoundError):
        RingWriter.open(ring_path, wait=0)


def test_open_wait_gives_up_after_the_given_seconds(ring_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        RingReader.open(ring_path, wait=0.2)
    assert 0.2 <= time.monotonic() - start < 5
    with RingWriter.create(ring_path, 4096), RingReader.open(ring_path):
        start = time.monotonic()
        with pytest.raises(RingBusy):
            RingReader.open(ring_path, wait=0.2)
        assert 0.2 <= time.monotonic() - start < 5


def test_open_wait_does_not_retry_an_invalid_ring(ring_path: Path) -> None:
    ring_path.write_bytes(b"not a ring" * 1000)
    start = time.monotonic()
    with pytest.raises(InvalidRing):
        RingReader.open(ring_path, wait=30)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("wait", [float("nan"), -1.0, "1"], ids=repr)
def test_open_rejects_a_wait_that_is_not_a_number_of_seconds(ring_path: Path, wait: object) -> None:
    RingWriter.create(ring_path, 4096).detach()
    with pytest.raises((ValueError, TypeError)):
        RingReader.open(ring_path, wait=wait)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError)):
        RingWriter.open(ring_path, wait=wait)  # type: ignore[arg-type]


# ---- detach and pickling: handing a role to another process ------------------------------


def test_detach_releases_the_writer_role_without_ending_the_stream(ring_path: Path) -> None:
    writer = RingWriter.create(ring_path, 4096)
    with RingReader.open(ring_path) as reader:
        writer.push(b"before", timeout=10)
        writer.detach()
        writer.detach()  # idempotent
        assert not reader.writer_alive
        assert reader.pop(timeout=10) == b"before"
        # Drained, and the role is vacant: not the end of the stream, not a death either:
        # the reader waits for the successor, within its timeout.
        with pytest.raises(RingTimeout, match="vacant"):
            reader.pop(timeout=0.2)
        with RingWriter.open(ring_path) as again:
            again.push(b"after", timeout=10)
        assert reader.pop(timeout=10) == b"after"
        with pytest.raises(RingClosed):
            reader.pop(timeout=10)


@pytest.mark.parametrize("method", START_METHODS)
def test_reader_handed_to_a_child_continues_from_the_committed_position(
    ring_path: Path, method: str
) -> None:
    ctx = multiprocessing.get_context(method)
    with RingWriter.create(ring_path, 4096) as writer:
        reader = RingReader.open(ring_path)
        writer.push(b"one", timeout=10)
        assert reader.pop(timeout=10) == b"one"
        writer.push(b"two", timeout=10)
        process = ctx.Process(target=_mp_children.read_and_check, args=(reader, [b"two", b"three"]))
        process.start()
        try:
            reader.close()  # the child's unpickle waits for this
            writer.push(b"three", timeout=10)
            process.join(timeout=60)
            assert process.exitcode == 0
        finally:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)


def test_pickled_writer_reattaches_once_the_sending_process_died(
    ring_path: Path, spawn: Spawn
) -> None:
    sender = spawn(hold_writer_then_die, ring_path)
    data = bytes.fromhex(sender.expect_line("pickled ").split()[1])
    with RingReader.open(ring_path) as reader:
        sender.kill()
        writer = pickle.loads(data)
        assert isinstance(writer, RingWriter)
        with writer:
            writer.push(b"after", timeout=10)
        assert reader.pop(timeout=10) == b"before"
        # Killed, it died holding the role: a break, reported where it happened.
        with pytest.raises(PeerDied):
            reader.pop(timeout=10)
        assert reader.pop(timeout=10) == b"after"
        with pytest.raises(RingClosed):
            reader.pop(timeout=10)


@pytest.mark.parametrize("method", START_METHODS)
def test_writer_handed_to_a_child_by_a_process_that_then_exits(
    ring_path: Path, method: str
) -> None:
    ctx = multiprocessing.get_context(method)
    writer_owner = ctx.Process(target=_mp_children.hand_over_writer, args=(str(ring_path), method))
    writer_owner.start()
    try:
        with RingReader.open(ring_path, wait=30) as reader:
            got = [reader.pop(timeout=30) for _ in range(3)]
            with pytest.raises(RingClosed):
                reader.pop(timeout=30)
        assert got == [b"parent", b"child 1", b"child 2"]
        writer_owner.join(timeout=30)
        assert writer_owner.exitcode == 0
    finally:
        if writer_owner.is_alive():
            writer_owner.kill()
            writer_owner.join(timeout=10)


@pytest.mark.parametrize("method", START_METHODS)
def test_writer_handed_to_a_child_with_detach_continues_the_stream(
    ring_path: Path, method: str
) -> None:
    ctx = multiprocessing.get_context(method)
    writer = RingWriter.create(ring_path, 4096)
    with RingReader.open(ring_path) as reader:
        writer.push(b"parent", timeout=10)
        child = ctx.Process(
            target=_mp_children.write_and_close, args=(writer, [b"child 1", b"child 2"])
        )
        child.start()
        try:
            writer.detach()  # the role goes to the child; the stream does not end
            assert writer.closed
            got = [reader.pop(timeout=30) for _ in range(3)]
            with pytest.raises(RingClosed):
                reader.pop(timeout=30)
            assert got == [b"parent", b"child 1", b"child 2"]
            child.join(timeout=60)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join(timeout=10)


STREAMED = 20000


def join_or_kill(process: multiprocessing.process.BaseProcess) -> int | None:
    process.join(timeout=120)
    if process.is_alive():
        process.kill()
        process.join(timeout=10)
    return process.exitcode


@pytest.mark.parametrize("method", START_METHODS)
def test_the_readme_reader_hand_over_streams_at_once_without_peer_died(
    ring_path: Path, method: str
) -> None:
    """README "Handing a ring to another process": start the child with the reader, close
    it, push at once; the writer never sees PeerDied while the child attaches."""
    ctx = multiprocessing.get_context(method)
    with RingWriter.create(ring_path, 4096) as writer:
        reader = RingReader.open(ring_path)
        child = ctx.Process(target=_mp_children.read_numbered, args=(reader, STREAMED))
        child.start()
        try:
            reader.close()
            for seq in range(STREAMED):
                writer.push(_mp_children.numbered(seq), timeout=30)
        finally:
            writer.close()
            assert join_or_kill(child) == 0


@pytest.mark.parametrize("ending", ["close", "detach"])
@pytest.mark.parametrize("method", START_METHODS)
def test_the_readme_writer_hand_over_streams_without_peer_died(
    ring_path: Path, method: str, ending: str
) -> None:
    ctx = multiprocessing.get_context(method)
    writer = RingWriter.create(ring_path, 4096)
    with RingReader.open(ring_path) as reader:
        child = ctx.Process(target=_mp_children.write_numbered, args=(writer, STREAMED))
        child.start()
        try:
            getattr(writer, ending)()
            got = [reader.pop(timeout=30) for _ in range(STREAMED)]
            with pytest.raises(RingClosed):
                reader.pop(timeout=30)
        finally:
            assert join_or_kill(child) == 0
    assert got == [_mp_children.numbered(seq) for seq in range(STREAMED)]


def test_the_readme_fork_pattern_detach_then_open_by_path_in_the_child(ring_path: Path) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method")
    ctx = multiprocessing.get_context("fork")
    with RingWriter.create(ring_path, 4096) as writer:
        reader = RingReader.open(ring_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, 3.12+
            child = ctx.Process(
                target=_mp_children.open_and_read_numbered, args=(str(ring_path), STREAMED)
            )
            child.start()
        try:
            reader.detach()
            for seq in range(STREAMED):
                writer.push(_mp_children.numbered(seq), timeout=30)
        finally:
            writer.close()
            assert join_or_kill(child) == 0


def test_pickling_a_closed_handle_raises(ring_path: Path) -> None:
    writer = RingWriter.create(ring_path, 4096)
    reader = RingReader.open(ring_path)
    writer.close()
    reader.close()
    for handle in (writer, reader):
        with pytest.raises(RingClosed):
            pickle.dumps(handle)


def test_a_pickled_writer_is_handed_over_so_closing_the_sender_does_not_end_the_stream(
    ring_path: Path,
) -> None:
    writer = RingWriter.create(ring_path, 4096)
    with RingReader.open(ring_path) as reader:
        writer.push(b"from the sender", timeout=10)
        data = pickle.dumps(writer)
        writer.close()  # a handed-over handle leaves the role vacant
        with pickle.loads(data) as successor:
            successor.push(b"from the successor", timeout=10)
        assert reader.pop(timeout=10) == b"from the sender"
        assert reader.pop(timeout=10) == b"from the successor"
        with pytest.raises(RingClosed):
            reader.pop(timeout=10)


def test_an_abort_after_pickling_still_marks_the_stream_failed(ring_path: Path) -> None:
    writer = RingWriter.create(ring_path, 4096)
    with RingReader.open(ring_path) as reader:
        writer.push(b"m", timeout=10)
        pickle.dumps(writer)  # pickled, never unpickled: no successor is coming
        writer.abort()
        assert reader.pop(timeout=10) == b"m"
        with pytest.raises(PeerDied):
            reader.pop(timeout=10)


@pytest.mark.parametrize("copy_function", [copy.copy, copy.deepcopy])
def test_handles_cannot_be_copied(ring_path: Path, copy_function: Callable[..., object]) -> None:
    with RingWriter.create(ring_path, 4096) as writer, RingReader.open(ring_path) as reader:
        for handle in (writer, reader):
            with pytest.raises(TypeError, match="cannot be copied"):
                copy_function(handle)
        writer.push(b"still one writer", timeout=10)
        assert reader.pop(timeout=10) == b"still one writer"


# ---- fork --------------------------------------------------------------------------------


def fork_and_report(child: Callable[[], list[str]], timeout: float = 20.0) -> list[str]:
    """Runs `child` in a fork()ed copy of this process; returns the lines it produced. The
    child always leaves through os._exit, never back into pytest."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, 3.12+
        pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(read_end)
            text = "\n".join(child()) + "\n"
            os.write(write_end, text.encode())
        except BaseException as e:
            os.write(write_end, f"child crashed: {e!r}\n".encode())
            status = 99
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"forked child produced no result within {timeout} s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        while time.monotonic() < deadline + 5:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("forked child did not exit")
    lines = b"".join(chunks).decode().splitlines()
    assert os.waitstatus_to_exitcode(status) == 0, lines
    return lines


def outcome(call: Callable[[], object]) -> str:
    try:
        result = call()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return f"returned {result!r}"


def test_forked_child_cannot_use_inherited_handles_and_parent_keeps_working(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 4096) as writer, RingReader.open(ring_path) as reader:
        writer.push(b"before")

        def in_child() -> list[str]:
            calls: dict[str, Callable[[], object]] = {
                "push": lambda: writer.push(b"from child", timeout=0.1),
                "try_push": lambda: writer.try_push(b"from child"),
                "pop": lambda: reader.pop(timeout=0.1),
                "try_pop": reader.try_pop,
                "pop_into": lambda: reader.pop_into(bytearray(64), timeout=0.1),
                "next": lambda: next(reader),
                "reader_alive": lambda: writer.reader_alive,
                "writer_alive": lambda: reader.writer_alive,
            }
            lines = [f"{name} -> {outcome(call)}" for name, call in calls.items()]
            # Closing inherited handles must not end the parent's stream.
            writer.close()
            reader.close()
            return lines

        lines = fork_and_report(in_child)
        assert len(lines) == 8, lines
        for line in lines:
            assert " -> RingError: " in line and "fork" in line, line

        assert reader.pop(timeout=1) == b"before"
        writer.push(b"after")
        assert reader.pop(timeout=1) == b"after"
        assert reader.writer_alive
        assert writer.reader_alive
        with pytest.raises(RingTimeout):
            reader.pop(timeout=0.2)


def test_forked_child_exiting_does_not_make_the_reader_think_the_writer_died(
    spawn: Spawn, ring_path: Path
) -> None:
    with RingWriter.create(ring_path, 4096) as writer:
        writer.push(b"x")
        assert fork_and_report(lambda: ["exited"]) == ["exited"]
        probe = spawn(child_probe_writer_alive, ring_path)
        assert probe.expect_line("probe") == "probe True message:1"
        probe.finish()
        probe = spawn(child_probe_writer_alive, ring_path)
        assert probe.expect_line("probe") == "probe True RingTimeout"
        probe.finish()


def test_forked_child_exiting_does_not_make_the_writer_think_the_reader_died(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 256) as writer, RingReader.open(ring_path):
        assert fork_and_report(lambda: ["exited"]) == ["exited"]
        assert writer.reader_alive
        following = len(fill(writer, 16))
        with pytest.raises(RingTimeout):
            writer.push(numbered(following), timeout=0.3)


@contextlib.contextmanager
def forked_idle_child() -> Iterator[int]:
    """A fork()ed copy of this process that touches nothing and waits (at most 20 s) until
    the block ends; yields its pid once the child runs (so its at-fork handlers, which drop
    its copies of the ring descriptors, have run: until then it shares them)."""
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, 3.12+
        pid = os.fork()
    if pid == 0:
        try:
            os.close(write_end)
            os.write(ready_write, b"r")
            select.select([read_end], [], [], 20)
        finally:
            os._exit(0)
    os.close(read_end)
    os.close(ready_write)
    try:
        assert select.select([ready_read], [], [], 10)[0], "forked child did not start"
        os.close(ready_read)
        yield pid
    finally:
        os.close(write_end)
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)


def test_reader_close_releases_the_reader_role_while_a_forked_child_lives(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        reader = RingReader.open(ring_path)
        with forked_idle_child():
            reader.close()
            assert not writer.reader_alive, "closed reader still counts as attached"
            RingReader.open(ring_path).close()  # not RingBusy
            following = len(fill(writer, 16))
            with pytest.raises(PeerDied):
                writer.push(numbered(following), timeout=5)


@pytest.fixture
def grandchildren() -> Iterator[list[int]]:
    """Pids of orphaned grandchildren to SIGKILL at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_reader_sees_peer_died_when_writer_process_dies_while_its_forked_child_lives(
    spawn: Spawn, ring_path: Path, grandchildren: list[int]
) -> None:
    middle = spawn(child_forks_sleeper_then_dies, ring_path, "writer")
    grandchildren.append(int(middle.expect_line("grandchild").split()[1]))
    middle.finish()
    os.kill(grandchildren[0], 0)  # the grandchild, which inherited the handle, still lives
    with RingReader.open(ring_path) as reader:
        assert [struct.unpack_from("<Q", reader.pop(timeout=5))[0] for _ in range(3)] == [0, 1, 2]
        assert not reader.writer_alive, "the forked grandchild keeps the dead writer's lock"
        started = time.monotonic()
        with pytest.raises(PeerDied):
            reader.pop(timeout=10)
        assert time.monotonic() - started < 1.0


def test_writer_sees_peer_died_when_reader_process_dies_while_its_forked_child_lives(
    spawn: Spawn, ring_path: Path, grandchildren: list[int]
) -> None:
    with RingWriter.create(ring_path, 256) as writer:
        middle = spawn(child_forks_sleeper_then_dies, ring_path, "reader")
        grandchildren.append(int(middle.expect_line("grandchild").split()[1]))
        middle.finish()
        os.kill(grandchildren[0], 0)
        assert not writer.reader_alive, "the forked grandchild keeps the dead reader's lock"
        following = len(fill(writer, 16))
        with pytest.raises(PeerDied):
            writer.push(numbered(following), timeout=10)
