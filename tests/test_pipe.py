"""ipc_ring.Pipe as a drop-in for multiprocessing.Pipe (README "A drop-in for
multiprocessing.Pipe", docs/FORMAT.md "Pipe messages").

The tests a user of multiprocessing.Pipe would write run against both: `make_pipe`
is multiprocessing.Pipe or ipc_ring.Pipe (with a small ring, so that objects larger
than the ring are the common case), and each must pass unchanged with either. The
tests after them are ipc_ring's own promises: nothing left on disk after SIGKILL,
an end used by two processes at once, hand-overs."""

from __future__ import annotations

import array
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import _pipe_children as children
import ipc_ring

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="ipc_ring.Pipe: Linux")

METHODS = [
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
]
TIMEOUT = 30.0


def small_ipc_ring_pipe(duplex: bool = True) -> tuple[Any, Any]:
    return ipc_ring.Pipe(duplex, capacity=1 << 14)


PIPES = {"multiprocessing": multiprocessing.Pipe, "ipc_ring": small_ipc_ring_pipe}


@pytest.fixture(params=list(PIPES))
def make_pipe(request: pytest.FixtureRequest) -> Callable[..., tuple[Any, Any]]:
    return PIPES[request.param]  # type: ignore[return-value]


@pytest.fixture
def processes() -> Iterator[list[Any]]:
    """Child processes a test starts: killed and joined at the end, whatever happened."""
    started: list[Any] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(TIMEOUT)


def start(processes: list[Any], method: str, target: Callable[..., object], *args: object) -> Any:
    p = multiprocessing.get_context(method).Process(target=target, args=args)
    p.start()
    processes.append(p)
    return p


def finished(p: Any) -> int | None:
    p.join(TIMEOUT)
    assert not p.is_alive(), "the child did not finish"
    return p.exitcode


def recv(conn: Any) -> Any:
    """conn.recv(), with a limit: a bug fails the test instead of hanging it."""
    assert conn.poll(TIMEOUT), "nothing came"
    return conn.recv()


def same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        )
    return type(a) is type(b) and a == b


ARRAYS = [
    np.arange(10, dtype=np.float64),
    np.arange(24, dtype=np.int8).reshape(2, 3, 4),
    np.array(3.5),  # zero dimensions
    np.zeros((0, 5), dtype=np.uint16),
    np.arange(12, dtype=np.complex128).reshape(3, 4).T,  # Fortran order
    np.arange(200, dtype=np.int32).reshape(10, 20)[::3, 1::4],  # not contiguous
    np.array([True, False, True]),
    np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
    np.array(["ab", "cde"], dtype="U3"),
    np.array([{"x": 1}, None], dtype=object),
    np.arange(300_000, dtype=np.float64),  # 2.4 MB: far larger than a 16 KiB ring
    np.full((512, 1024), np.nan, dtype=np.float32)[:, ::2],  # large and not contiguous
]
OBJECTS: list[object] = [
    0,
    "text",
    None,
    (1, "two", 3.0),
    {"id": 1, "name": "sensor-7", "ts": 1733000000.25, "vals": [1, 2, 3], "ok": True},
    b"",
    b"x" * 3_000_000,
    bytearray(b"out of band" * 100_000),
    list(range(100_000)),
    *ARRAYS,
]


# ---- the tests a multiprocessing user writes, unchanged for either pipe -------------------


@pytest.mark.parametrize("method", METHODS)
def test_a_child_echoes_every_object_and_array_back_until_eof(
    make_pipe: Callable[..., tuple[Any, Any]], method: str, processes: list[Any]
) -> None:
    a, b = make_pipe()
    child = start(processes, method, children.echo_until_eof, b)
    b.close()
    for obj in [*OBJECTS, "stop"]:
        a.send(obj)
        back = recv(a)
        assert same(obj, back), (type(obj), type(back))
    assert finished(child) == 0
    a.close()


@pytest.mark.parametrize("method", METHODS)
def test_send_bytes_of_every_size_comes_back_whole(
    make_pipe: Callable[..., tuple[Any, Any]], method: str, processes: list[Any]
) -> None:
    a, b = make_pipe()
    child = start(processes, method, children.echo_bytes_until_eof, b)
    b.close()
    for size in (0, 1, 255, 4096, 16_384, 16_377, 100_000, 4_000_000):
        payload = os.urandom(size)
        a.send_bytes(payload)
        assert a.poll(TIMEOUT)
        assert a.recv_bytes() == payload
    a.send_bytes(b"stop")
    assert a.poll(TIMEOUT) and a.recv_bytes() == b"stop"
    assert finished(child) == 0
    a.close()


def test_send_bytes_offset_and_size_and_their_errors(
    make_pipe: Callable[..., tuple[Any, Any]],
) -> None:
    a, b = make_pipe()
    with a, b:
        a.send_bytes(b"0123456789", 2, 5)
        a.send_bytes(b"0123456789", offset=7)
        a.send_bytes(memoryview(b"abcdef"), size=2)
        a.send_bytes(array.array("i", [1, 2, 3]), 4, 4)  # offset and size in bytes
        assert [b.recv_bytes() for _ in range(4)] == [
            b"23456",
            b"789",
            b"ab",
            array.array("i", [2]).tobytes(),
        ]
        for args, message in [
            ((b"abc", -1), "offset is negative"),
            ((b"abc", 4), "buffer length < offset"),
            ((b"abc", 0, -1), "size is negative"),
            ((b"abc", 1, 3), "buffer length < offset [+] size"),
        ]:
            with pytest.raises(ValueError, match=message):
                a.send_bytes(*args)
        with pytest.raises(TypeError):
            a.send_bytes("not bytes")
        assert not b.poll()  # none of them sent anything


def test_recv_bytes_maxlength_and_recv_bytes_into(
    make_pipe: Callable[..., tuple[Any, Any]],
) -> None:
    a, b = make_pipe()
    with a, b:
        a.send_bytes(b"hello")
        buf = bytearray(10)
        assert b.recv_bytes_into(buf, 3) == 5
        assert buf == b"\0\0\0hello\0\0"
        a.send_bytes(b"0123456789abc")
        with pytest.raises(multiprocessing.BufferTooShort) as short:
            b.recv_bytes_into(bytearray(12))
        assert short.value.args[0] == b"0123456789abc"  # the message comes with it
        a.send_bytes(array.array("d", [1.5]).tobytes())
        target = array.array("d", [0.0, 0.0])
        assert b.recv_bytes_into(target, 8) == 8
        assert target.tolist() == [0.0, 1.5]
        with pytest.raises(ValueError, match="negative maxlength"):
            b.recv_bytes(-1)
        a.send_bytes(b"too long")
        with pytest.raises(OSError, match="bad message length"):
            b.recv_bytes(3)


def test_poll_waits_up_to_its_timeout_and_eof_follows_close(
    make_pipe: Callable[..., tuple[Any, Any]],
) -> None:
    a, b = make_pipe()
    assert b.poll() is False
    started = time.monotonic()
    assert b.poll(0.2) is False
    assert 0.15 <= time.monotonic() - started < 5
    a.send("one")
    a.send("two")
    assert b.poll() is True and b.poll(timeout=1) is True
    a.close()
    assert b.recv() == "one" and b.recv() == "two"  # everything sent, then EOF
    assert b.poll(1) is True  # recv would not block: it raises
    with pytest.raises(EOFError):
        b.recv()
    with pytest.raises(EOFError):
        b.recv_bytes()
    with pytest.raises(BrokenPipeError):
        b.send("to nobody")
    b.close()


def test_a_closed_connection_raises_oserror_and_closes_once(
    make_pipe: Callable[..., tuple[Any, Any]],
) -> None:
    a, b = make_pipe()
    with a:
        assert not a.closed
    assert a.closed
    a.close()
    for call in (
        lambda: a.send(1),
        lambda: a.send_bytes(b"x"),
        lambda: a.recv(),
        lambda: a.recv_bytes(),
        lambda: a.poll(),
        lambda: a.fileno(),
    ):
        with pytest.raises(OSError, match="handle is closed"):
            call()
    assert a.readable and a.writable  # as before the close
    b.close()


def test_a_one_way_pipe_is_receive_end_then_send_end(
    make_pipe: Callable[..., tuple[Any, Any]],
) -> None:
    receiver, sender = make_pipe(False)
    with receiver, sender:
        assert (receiver.readable, receiver.writable) == (True, False)
        assert (sender.readable, sender.writable) == (False, True)
        sender.send({"k": "v"})
        assert receiver.recv() == {"k": "v"}
        with pytest.raises(OSError, match="connection is write-only"):
            sender.recv()
        with pytest.raises(OSError, match="connection is read-only"):
            receiver.send(1)


@pytest.mark.parametrize("method", METHODS)
def test_wait_reports_the_end_with_a_message_and_the_sentinel_of_a_child_that_exited(
    make_pipe: Callable[..., tuple[Any, Any]], method: str, processes: list[Any]
) -> None:
    a, b = make_pipe()
    other_r, other_w = multiprocessing.Pipe(False)
    child = start(processes, method, children.send_after, b, 0.2, "late")
    b.close()
    wait = multiprocessing.connection.wait
    assert wait([a, other_r], timeout=0.05) == []  # nothing yet
    assert wait([a, other_r], timeout=TIMEOUT) == [a]
    assert a.recv() == "late"
    assert wait([other_r, child.sentinel], timeout=TIMEOUT) == [child.sentinel]
    assert finished(child) == 0
    # Its only message taken, a is readable again for the EOF of the closed end.
    assert wait([a, other_r], timeout=TIMEOUT) == [a]
    with pytest.raises(EOFError):
        a.recv()
    other_w.send("x")
    assert set(wait([other_r], timeout=TIMEOUT)) == {other_r}
    for conn in (a, other_r, other_w):
        conn.close()


def test_wait_does_not_report_a_drained_end(make_pipe: Callable[..., tuple[Any, Any]]) -> None:
    a, b = make_pipe()
    with a, b:
        wait = multiprocessing.connection.wait
        for i in range(3):
            a.send(i)
            assert wait([b], timeout=TIMEOUT) == [b]
            assert b.recv() == i
            assert wait([b], timeout=0.05) == []  # taken: nothing to read
        a.send("x")
        a.send("y")
        assert wait([b], timeout=TIMEOUT) == [b]
        assert b.recv() == "x"
        assert wait([b], timeout=0.05) == [b]  # one left
        assert b.recv() == "y"


@pytest.mark.parametrize("method", METHODS)
def test_a_child_killed_while_it_waits_is_seen_by_the_parent(
    make_pipe: Callable[..., tuple[Any, Any]], method: str, processes: list[Any]
) -> None:
    a, b = make_pipe()
    child = start(processes, method, children.send_then_block, b, 3)
    b.close()
    assert [recv(a) for _ in range(3)] == [0, 1, 2]
    os.kill(child.pid, signal.SIGKILL)
    assert finished(child) == -signal.SIGKILL
    assert a.poll(TIMEOUT)
    with pytest.raises((EOFError, ConnectionResetError)):
        a.recv()
    a.close()


@pytest.mark.parametrize("method", [m for m in METHODS if m != "fork"])
def test_a_parent_killed_is_seen_by_its_child(
    make_pipe: Callable[..., tuple[Any, Any]], method: str, tmp_path: Path, processes: list[Any]
) -> None:
    # The middle process makes the pipe and hands one end to its own child; then it is
    # killed. (Under fork a multiprocessing.Pipe child inherits the parent's end too and
    # never sees the death: spawn and forkserver here; ipc_ring's fork case is below.)
    report, ready = str(tmp_path / "report"), str(tmp_path / "ready")
    name = next(k for k, v in PIPES.items() if v is make_pipe)
    parent = start(processes, method, children.parent_of_a_receiver, name, method, report, ready)
    grandchild = int(wait_for_file(ready))
    os.kill(parent.pid, signal.SIGKILL)
    got, *names = wait_for_file(report).split()
    assert got == "3"
    assert "EOFError" in names or "ConnectionResetError" in names, names
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(grandchild, 0)
            time.sleep(0.05)


def wait_for_file(path: str) -> str:
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)
    return Path(path).read_text()


# ---- ipc_ring's own promises ------------------------------------------------------------


def test_eof_and_death_are_the_exceptions_multiprocessing_code_catches() -> None:
    assert issubclass(ipc_ring.RingClosed, EOFError)
    assert issubclass(ipc_ring.PipePeerDied, EOFError)
    assert issubclass(ipc_ring.PipePeerDied, ipc_ring.PeerDied)
    assert issubclass(ipc_ring.PipePeerGone, BrokenPipeError)


def test_a_parent_killed_is_seen_by_a_forked_child(tmp_path: Path, processes: list[Any]) -> None:
    report, ready = str(tmp_path / "report"), str(tmp_path / "ready")
    parent = start(
        processes, "spawn", children.parent_of_a_receiver, "ipc_ring", "fork", report, ready
    )
    wait_for_file(ready)
    os.kill(parent.pid, signal.SIGKILL)
    got, *names = wait_for_file(report).split()
    assert (got, names[0]) == ("3", "PipePeerDied") and "EOFError" in names


def ring_mappings(pid: int) -> list[str]:
    """What process `pid` maps of ipc_ring's: the files behind its shared mappings."""
    names = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1] == "rw-s":  # shared and writable: rings
            names.append(fields[5])
    return names


def test_nothing_is_left_behind_after_both_processes_are_killed_mid_stream(
    tmp_path: Path, processes: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))  # the processes' temporary files go here
    shm_before = set(os.listdir("/dev/shm"))
    report = str(tmp_path / "pids")
    top = start(processes, "spawn", children.stream_in_a_child_of_its_own, report)
    parent_pid, child_pid = map(int, wait_for_file(report).split())
    assert parent_pid == top.pid
    # Mid-stream, each process maps its rings from a memfd, which has no path.
    for pid in (parent_pid, child_pid):
        mapped = ring_mappings(pid)
        assert mapped and all(name.startswith("/memfd:ipc_ring.pipe") for name in mapped), mapped
    os.kill(child_pid, signal.SIGKILL)
    os.kill(parent_pid, signal.SIGKILL)
    assert finished(top) == -signal.SIGKILL
    deadline = time.monotonic() + TIMEOUT
    while os.path.exists(f"/proc/{child_pid}/maps"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert os.listdir(private_tmp) == []
    # Other programs may use /dev/shm meanwhile: only what no other tool of ours names so.
    new = {n for n in set(os.listdir("/dev/shm")) - shm_before if "pipe" in n or "memfd" in n}
    assert new == set(), new


def test_an_end_used_by_two_processes_at_once_fails_clearly(processes: list[Any]) -> None:
    a, b = ipc_ring.Pipe()
    b.send("from the parent")  # the parent now writes through b
    child = start(processes, "fork", children.use_the_end_the_parent_holds, b)
    assert finished(child) == 0
    assert a.recv() == "from the parent"
    assert not a.poll(0.1)  # nothing else, nothing torn
    b.send("still the parent's")
    assert a.recv() == "still the parent's"
    a.close()
    b.close()


@pytest.mark.parametrize("method", [m for m in METHODS if m != "fork"])
def test_an_end_used_then_passed_to_a_child_is_handed_over(
    method: str, processes: list[Any]
) -> None:
    a, b = ipc_ring.Pipe()
    b.send("parent first")  # attached here, then handed over by pickling
    child = start(processes, method, children.echo_until_eof, b)
    assert recv(a) == "parent first"
    a.send("for the child")
    assert recv(a) == "for the child"
    with pytest.raises(ipc_ring.RingBusy, match="another process"):
        b.send("the parent again")  # the child holds the end now
    b.close()
    a.close()
    assert finished(child) == 0


def test_pickling_a_closed_end_raises() -> None:
    a, b = ipc_ring.Pipe()
    a.close()
    with pytest.raises(OSError, match="handle is closed"):
        pickle.dumps(a)
    b.close()


def test_out_of_band_buffers_come_back_as_what_was_sent(processes: list[Any]) -> None:
    a, b = ipc_ring.Pipe(capacity=1 << 16)
    child = start(processes, "spawn", children.echo_until_eof, b)
    b.close()
    big = np.arange(1 << 17, dtype=np.float64)  # 1 MiB, 16 times the ring
    a.send(pickle.PickleBuffer(big))
    got = recv(a)  # as pickle gives it back: the bytes, writable
    assert isinstance(got, bytearray)
    assert np.array_equal(np.frombuffer(got, dtype=np.float64), big)
    a.send([big, big[::2], bytearray(b"ab"), pickle.PickleBuffer(b"cd")])
    arrays = recv(a)
    assert np.array_equal(arrays[0], big) and arrays[0].flags.writeable
    assert np.array_equal(arrays[1], big[::2])
    assert arrays[2] == bytearray(b"ab") and bytes(arrays[3]) == b"cd"
    a.send("stop")
    assert recv(a) == "stop"
    assert finished(child) == 0
    a.close()


def test_a_message_abandoned_by_a_sender_that_stopped_midway_is_dropped() -> None:
    a, b = ipc_ring.Pipe(capacity=1 << 12)
    with a, b:
        writer = a._writer or a._attach_writer()
        # The first records of a message of two segments (a head: frame 4, FORMAT.md
        # "Pipe messages"), then no more of it.
        with writer.reserve(8 + 24) as slot:
            slot[:8] = (4 | (2 << 32)).to_bytes(8, "little")
            slot[8:] = (1000).to_bytes(8, "little") + (10).to_bytes(8, "little") + b"abcdefgh"
        a.send({"next": "message"})
        assert recv(b) == {"next": "message"}


def test_pipe_rejects_a_bad_capacity() -> None:
    with pytest.raises(ValueError, match="power of two"):
        ipc_ring.Pipe(capacity=1000)
    with pytest.raises(TypeError):
        ipc_ring.Pipe(capacity="big")  # type: ignore[arg-type]


class SendsOnTheSameEnd:
    """An object whose pickling sends another message on the same end first."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        self.conn.send(np.full(3, 2))
        return (str, ("evil",))


def test_a_send_from_inside_a_send_keeps_each_message_its_own_buffers() -> None:
    a, b = ipc_ring.Pipe()
    with a, b:
        a.send([np.full(3, 1), SendsOnTheSameEnd(a)])
        first, second = recv(b), recv(b)
        assert np.array_equal(first, np.full(3, 2))
        assert np.array_equal(second[0], np.full(3, 1)) and second[1] == "evil"


def test_recv_bytes_of_an_object_with_buffers_is_its_pickle_and_runs_nothing(
    processes: list[Any],
) -> None:
    a, b = ipc_ring.Pipe(capacity=1 << 16)
    with a, b:
        sent = [np.arange(3000, dtype=np.int16), pickle.PickleBuffer(b"read-only"), "x"]
        a.send(sent)
        data = b.recv_bytes()  # nothing unpickled: just bytes
        assert isinstance(data, bytes)
        back = pickle.loads(data)
        assert np.array_equal(back[0], sent[0]) and back[1] == b"read-only" and back[2] == "x"


def test_recv_bytes_maxlength_of_a_payload_larger_than_the_ring(processes: list[Any]) -> None:
    a, b = ipc_ring.Pipe(capacity=1 << 12)
    child = start(processes, "fork", children.echo_bytes_until_eof, b)
    b.close()
    a.send_bytes(bytes(10_000))  # read-only, larger than the ring: in parts
    assert a.poll(TIMEOUT)
    with pytest.raises(OSError, match="bad message length"):
        a.recv_bytes(9_999)
    assert a.recv_bytes(10_000) == bytes(10_000)  # it stayed
    a.send_bytes(b"stop")
    assert recv_bytes(a) == b"stop"
    assert finished(child) == 0
    a.close()


def recv_bytes(conn: Any) -> bytes:
    assert conn.poll(TIMEOUT), "nothing came"
    return conn.recv_bytes()  # type: ignore[no-any-return]


def test_an_end_is_not_readable_when_the_other_end_only_attaches() -> None:
    a, b = ipc_ring.Pipe()
    with a, b:
        b.send("one")
        assert a.recv() == "one"
        a.send("to b")  # a's writer attaches: no event for b's reading side
        assert b.recv() == "to b"
        wait = multiprocessing.connection.wait
        assert wait([a], timeout=0.1) == []
        b.send("two")
        assert wait([a], timeout=TIMEOUT) == [a] and a.recv() == "two"


def test_poll_with_a_negative_timeout_does_not_wait() -> None:
    a, b = ipc_ring.Pipe()
    with a, b:
        assert b.poll(-1) is False
        a.send(1)
        assert b.poll(-1) is True


def test_a_pipe_that_cannot_be_made_leaves_no_descriptor() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for capacity in (48, 100, 0, -1):
        with pytest.raises(ValueError):
            ipc_ring.Pipe(capacity=capacity)
    assert len(os.listdir("/proc/self/fd")) == before


def test_two_threads_sending_on_one_end_never_deliver_a_wrong_message() -> None:
    import threading

    a, b = ipc_ring.Pipe(capacity=1 << 12)
    errors: list[BaseException] = []

    def send(tag: int) -> None:
        for i in range(300):
            try:
                a.send((tag, i, np.full(100, i)))
            except RuntimeError as e:  # one thread's call while the other's waits
                errors.append(e)

    threads = [threading.Thread(target=send, args=(t,), daemon=True) for t in (1, 2)]
    for t in threads:
        t.start()
    got = []
    while any(t.is_alive() for t in threads) or b.poll():
        if b.poll(0.05):
            got.append(b.recv())
    for t in threads:
        t.join(TIMEOUT)
    for tag, i, values in got:
        assert np.array_equal(values, np.full(100, i)), (tag, i)
    assert len(got) + len(errors) == 600
    assert all("in progress" in str(e) for e in errors)
    a.close()
    b.close()


def _collect(conn: Any, count: int, raw: bool) -> tuple[Any, list[Any]]:
    """A thread receiving `count` messages from conn (recv_bytes or recv), each with a
    limit; (the thread, the list it fills)."""
    import threading

    got: list[Any] = []

    def run() -> None:
        for _ in range(count):
            if not conn.poll(TIMEOUT):
                return
            got.append(conn.recv_bytes() if raw else conn.recv())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


@pytest.fixture(params=[0, 1, 2], ids=["copy-picked", "copy-memcpy", "copy-streaming"])
def copy_mode(request: pytest.FixtureRequest) -> Iterator[int]:
    """Each way a writer may copy the parts of a long message into the ring."""
    from ipc_ring import _core

    _core._copy_mode(request.param)
    yield request.param
    _core._copy_mode(0)


def test_messages_of_several_records_come_back_byte_exact_at_odd_sizes_and_offsets(
    copy_mode: int,
) -> None:
    # A ring of 1 MiB: records of 256 KiB, so the copies into the ring are long enough to
    # take the streaming (non-temporal) path when it is picked, and end at every alignment.
    rng = np.random.default_rng(7)
    source = rng.integers(0, 256, 4_000_100, dtype=np.uint8).tobytes()
    cases = [(offset, size) for offset in (0, 1, 7, 15) for size in (65_537, 262_129, 1_000_003)]
    cases.append((3, 3_333_333))
    a, b = ipc_ring.Pipe(capacity=1 << 20)
    with a, b:
        thread, got = _collect(b, len(cases), raw=True)
        for offset, size in cases:
            a.send_bytes(source, offset, size)
        thread.join(TIMEOUT)
        assert len(got) == len(cases)
        for (offset, size), data in zip(cases, got, strict=True):
            assert data == source[offset : offset + size], (offset, size)
        arrays = [
            np.frombuffer(source, np.uint8, 1_000_001, 5),  # an unaligned out-of-band buffer
            np.frombuffer(source, np.float64, 300_001, 8).reshape(-1, 1)[::2],  # not contiguous
        ]
        thread, got = _collect(b, len(arrays), raw=False)
        for arr in arrays:
            a.send(arr)
        thread.join(TIMEOUT)
        assert len(got) == len(arrays)
        for sent, came in zip(arrays, got, strict=True):
            assert same(sent, came)


def test_the_sender_refuses_misuse_without_crashing() -> None:
    from ipc_ring import _core

    with pytest.raises(TypeError):
        _core._Sender()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="Writer"):
        _core._Sender(object(), (), print, print)  # type: ignore[arg-type]
    bare = _core._Sender.__new__(_core._Sender)
    for call in (bare.send, bare.write, bare._buffer):
        with pytest.raises(TypeError, match="not initialised"):
            call(b"x")


class Registered:
    def __init__(self, value: int) -> None:
        self.value = value


def test_a_reducer_registered_after_the_first_send_is_used_by_the_next() -> None:
    import copyreg

    a, b = ipc_ring.Pipe(capacity=1 << 14)
    with a, b:
        a.send(Registered(1))
        assert recv(b).value == 1
        copyreg.pickle(Registered, lambda r: (str, (f"reduced {r.value}",)))
        try:
            a.send(Registered(2))
            assert recv(b) == "reduced 2"
        finally:
            del copyreg.dispatch_table[Registered]
        a.send(Registered(3))
        assert recv(b).value == 3


def test_a_failed_pickling_sends_nothing_and_the_next_send_goes_through() -> None:
    a, b = ipc_ring.Pipe(capacity=1 << 14)
    with a, b:
        for bad in (lambda: 0, [b"x" * 200_000, lambda: 0], [np.arange(5), lambda: 0]):
            with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
                a.send(bad)
            assert not b.poll(0)
            a.send({"after": 1})
            assert recv(b) == {"after": 1}


def test_a_closed_end_lets_its_writer_go() -> None:
    import gc
    import weakref

    a, b = ipc_ring.Pipe(capacity=1 << 14)
    a.send("attach")
    writer = weakref.ref(a._writer)
    a.close()
    b.close()
    del a
    gc.collect()
    assert writer() is None


def test_records_that_are_not_a_message_are_skipped_or_refused() -> None:
    a, b = ipc_ring.Pipe(capacity=1 << 14)
    with a, b:
        writer = a._writer or a._attach_writer()
        with writer.reserve(16) as slot:  # a part with no head before it: skipped
            slot[:8] = (5).to_bytes(8, "little")
        a.send("after the part")
        assert recv(b) == "after the part"
        with writer.reserve(16) as slot:  # an unknown frame: refused, and consumed
            slot[:8] = (9).to_bytes(8, "little")
        a.send("after the unknown")
        with pytest.raises(OSError, match="not part of a message"):
            recv(b)
        assert recv(b) == "after the unknown"


class Mutator:
    """Pickles after `target` in the same message, and changes it."""

    def __init__(self, target: bytearray, grow: bool) -> None:
        self.target, self.grow = target, grow

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        self.target[:] = b"B" * len(self.target)
        if self.grow:
            self.target.extend(b"!!!")
        return (str, ("m",))


@pytest.mark.parametrize("grow", [False, True])
def test_a_large_bytearray_changed_later_in_the_same_send_goes_as_it_was_pickled(
    make_pipe: Callable[..., tuple[Any, Any]], grow: bool
) -> None:
    a, b = make_pipe()
    with a, b:
        thread, got = _collect(b, 1, raw=False)  # the message is larger than the ring
        data = bytearray(b"A" * 100_000)  # in band, and large enough to reach write() itself
        a.send([data, Mutator(data, grow)])
        thread.join(TIMEOUT)
        assert got == [[bytearray(b"A" * 100_000), "m"]]


def test_an_end_sent_over_itself_goes_through(make_pipe: Callable[..., tuple[Any, Any]]) -> None:
    a, b = make_pipe()
    with a, b:
        a.send({"reply_to": a})
        got = recv(b)
        assert type(got["reply_to"]).__name__ == "Connection"
        got["reply_to"].close()
        a.send("after")
        assert recv(b) == "after"


class Replaced:
    pass


def test_a_reducer_replaced_or_removed_without_changing_the_tables_sizes_is_seen() -> None:
    import copyreg
    from multiprocessing.reduction import ForkingPickler

    a, b = ipc_ring.Pipe(capacity=1 << 14)
    with a, b:
        try:
            copyreg.pickle(Replaced, lambda r: (str, ("old",)))
            a.send(Replaced())
            assert recv(b) == "old"
            copyreg.pickle(Replaced, lambda r: (str, ("new",)))  # the same size
            a.send(Replaced())
            assert recv(b) == "new"
            del copyreg.dispatch_table[Replaced]
            copyreg.pickle(Registered, lambda r: (str, ("other",)))  # the same size again
            a.send(Replaced())
            assert type(recv(b)) is Replaced
            ForkingPickler.register(Replaced, lambda r: (str, ("forking old",)))
            a.send(Replaced())
            assert recv(b) == "forking old"
            ForkingPickler.register(Replaced, lambda r: (str, ("forking new",)))
            a.send(Replaced())
            assert recv(b) == "forking new"
        finally:
            copyreg.dispatch_table.pop(Replaced, None)
            copyreg.dispatch_table.pop(Registered, None)
            ForkingPickler._extra_reducers.pop(Replaced, None)  # type: ignore[attr-defined]


def test_a_sent_object_is_not_kept_alive_by_the_end(
    make_pipe: Callable[..., tuple[Any, Any]],
) -> None:
    import gc
    import weakref

    a, b = make_pipe()
    with a, b:
        sent = Registered(1)
        array = np.arange(10)
        a.send([sent, array])
        kept = (weakref.ref(sent), weakref.ref(array))
        del sent, array
        gc.collect()
        assert [ref() for ref in kept] == [None, None]
        assert recv(b)[0].value == 1


def test_the_sender_cannot_be_initialised_again_while_it_pickles() -> None:
    from ipc_ring import _core, _pipe

    a, b = ipc_ring.Pipe(capacity=1 << 14)
    errors: list[BaseException] = []

    class Reinit:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            try:
                sender.__init__(a._writer, _pipe._TABLES, _pipe._new_pickler, _pipe._send_slow)
            except TypeError as e:
                errors.append(e)
            return (str, ("r",))

    with a, b:
        a.send("attach")
        assert recv(b) == "attach"
        sender = a._sender
        assert isinstance(sender, _core._Sender)
        a.send([Reinit(), list(range(1000))])
        assert recv(b) == ["r", list(range(1000))]
        assert errors and "runs once" in str(errors[0])


def test_segment_lengths_that_wrap_past_2_64_are_refused_as_too_large() -> None:
    a, b = ipc_ring.Pipe(capacity=1 << 14)
    with a, b:
        writer = a._writer or a._attach_writer()
        lengths = ((1 << 63) - 1, (1 << 63) - 1, 2)
        with writer.reserve(8 + 8 * len(lengths)) as slot:
            slot[:8] = (4 | (len(lengths) << 32)).to_bytes(8, "little")
            slot[8:] = b"".join(n.to_bytes(8, "little") for n in lengths)
        a.send("after")
        with pytest.raises(OSError, match="a message of"):
            recv(b)
        assert recv(b) == "after"


def test_poll_does_not_report_the_rest_of_an_abandoned_message_as_a_message() -> None:
    a, b = ipc_ring.Pipe(capacity=1 << 14)
    with a, b:
        writer = a._writer or a._attach_writer()
        for _ in range(2):  # parts with no head before them, as a dead receiver leaves
            with writer.reserve(16) as slot:
                slot[:8] = (5).to_bytes(8, "little")
        assert b.poll(0) is False
        start = time.monotonic()
        assert b.poll(0.05) is False
        assert time.monotonic() - start < 1.0
        a.send("whole")
        assert b.poll(0) is True
        assert b.recv() == "whole"


def test_poll_keeps_its_timeout_while_parts_of_an_abandoned_message_keep_coming(
    processes: list[Any],
) -> None:
    a, b = ipc_ring.Pipe(capacity=1 << 16)
    with a, b:
        b.poll(0)  # the reader attached here; the writer attaches in the child
        pid = os.fork()
        if pid == 0:  # a writer of nothing but parts, as fast as it can
            try:
                writer = a._attach_writer()
                batch = [(5).to_bytes(8, "little") + bytes(8)] * 256
                end = time.monotonic() + 3.0
                while time.monotonic() < end:
                    writer.push_many(batch, timeout=5)
            finally:
                os._exit(0)
        try:
            time.sleep(0.1)
            end = time.monotonic() + 1.5
            worst = {0.05: 0.0, 0.0: 0.0}
            while time.monotonic() < end:
                for timeout in worst:
                    start = time.monotonic()
                    assert b.poll(timeout) is False
                    worst[timeout] = max(worst[timeout], time.monotonic() - start)
            for timeout, took in worst.items():
                assert took < timeout + 0.25, f"poll({timeout}) took {took:.3f} s"
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_an_end_dropped_without_close_after_a_send_ends_the_stream_without_the_collector() -> None:
    # The end's sender refers back to it weakly: no reference cycle keeps a dropped end (and
    # its writer's role) alive until a collection, so the peer sees the end at once.
    import gc

    a, b = ipc_ring.Pipe(capacity=1 << 14)
    gc.disable()
    try:
        a.send("last")
        del a
        assert recv(b) == "last"
        assert b.poll(TIMEOUT), "the dropped end was never seen to go"
        with pytest.raises(EOFError):
            b.recv()
    finally:
        gc.enable()
        b.close()
