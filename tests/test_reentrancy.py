"""Python code that runs in the middle of a call and closes or re-enters the handle.

One table: every method that touches the ring x every way Python code can run inside
it x what that code does. Python code runs inside a call through an argument's
``__buffer__`` / ``__release_buffer__`` (PEP 688, 3.12+), an argument's ``__float__``,
a ``push_many`` iterator, the garbage collector on an allocation (``gc.callbacks`` and
finalizers of garbage; on 3.11 inside the call, from 3.12 at the next bytecode), a
signal handler or another thread while the call waits. What it does: close the
handle; close it and map another ring of the same size, which would take the freed
address; detach a writer; call the same handle again.

Whatever happens, the contract (docs/FORMAT.md "Mapping", "Lifetime") is checked
afterwards, from other handles: no crash; a writer's reader gets exactly the messages
the calls reported written, none torn, and the other ring gets nothing; a reader's
messages arrive exactly once across the outer call, the inner code and a successor
reader; a re-entrant call is refused with RuntimeError; a closed handle's role is free
for a successor at once.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ipc_ring import RingClosed, RingError, RingReader, RingTimeout, RingWriter

CAPACITY = 4096
MESSAGES = [b"message %04d " % i + bytes([i % 256]) * (i % 23) for i in range(40)]
# A blocked call is set free by the signal or the thread after this long.
ACT_AFTER = 0.05
# The outer call's own limit: it must end long before (closed), or at it (re-entered).
OUTER_TIMEOUT = 0.6
HAS_BUFFER_PROTOCOL = sys.version_info >= (3, 12)

WRITER_METHODS = ["push", "try_push", "push_many", "reserve"]
READER_METHODS = ["pop", "try_pop", "pop_into", "pop_many", "pop_view", "next"]
# Methods that wait, so that a signal or a thread can act while they sleep.
BLOCKING = {"push", "push_many", "reserve", "pop", "pop_into", "pop_many", "pop_view", "next"}
# Methods that take an argument whose buffer they export.
EXPORTING = {"push", "try_push", "push_many", "pop_into"}
# Methods that allocate an object the collector tracks, inside the call.
ALLOCATING = {"pop_many", "pop_view", "reserve"}
# Methods that take a timeout, whose __float__ runs inside the call.
TIMED = {"push", "push_many", "reserve", "pop", "pop_into", "pop_many", "pop_view"}

TRIGGERS = [
    "buffer",
    "release_buffer",
    "float",
    "iterator",
    "gc_callback",
    "finalizer",
    "signal",
    "thread",
]
ACTIONS = ["close", "close_and_remap", "detach", "reenter"]


def applies(method: str, trigger: str, action: str) -> bool:
    writer = method in WRITER_METHODS
    if action == "detach" and not writer:
        return False
    if trigger in ("buffer", "release_buffer"):
        return method in EXPORTING
    if trigger == "float":
        return method in TIMED
    if trigger == "iterator":
        return method == "push_many"
    if trigger in ("signal", "thread"):
        return method in BLOCKING
    # The collector runs inside a call only where the call allocates a tracked
    # object: pop_many's list, the slot of reserve and pop_view.
    return method in ALLOCATING


CASES = [
    pytest.param(m, t, a, id=f"{m}-{t}-{a}")
    for m in WRITER_METHODS + READER_METHODS
    for t in TRIGGERS
    for a in ACTIONS
    if applies(m, t, a)
]


@dataclass
class Scene:
    """The rings of one case and what its code did."""

    path: Path
    writer: RingWriter
    reader: RingReader
    method: str
    action: str
    other: list[RingWriter | RingReader] = field(default_factory=list)
    inner_results: list[object] = field(default_factory=list)
    inner_errors: list[BaseException] = field(default_factory=list)
    acted: int = 0
    # After a re-entrant attempt, a blocked call is set free through the other
    # handle: the reader pops (freed) or the writer pushes (b"wake").
    set_free: bool = False
    freed: list[bytes] = field(default_factory=list)
    # For the collector triggers: the action runs only while the call runs.
    trigger: str = ""
    inside: bool = False
    keep: list[object] = field(default_factory=list)

    def call(self, function: Callable[..., object], *args: object) -> object:
        """Calls the method under test. For the collector triggers, the next
        allocation of a tracked object after this point collects: on 3.11 that is
        the one the method makes inside the call (its result list, its slot)."""
        if self.trigger in ("gc_callback", "finalizer"):
            gc.disable()
            gc.collect()  # the allocation count starts again from 0 ...
            if self.trigger == "finalizer":
                Finalized(self)  # ... 1: garbage in a cycle, finalized when collected
            else:
                self.keep.append([])  # ... 1
            gc.set_threshold(1, 1, 1)  # so the next tracked allocation collects
            gc.enable()
            self.inside = True
        try:
            return function(*args)
        finally:
            self.inside = False

    @property
    def handle(self) -> RingWriter | RingReader:
        return self.writer if self.method in WRITER_METHODS else self.reader

    def act(self) -> None:
        """What the Python code inside the call does; runs at most once."""
        if self.acted:
            return
        self.acted += 1
        handle = self.handle
        if self.action == "close":
            handle.close()
        elif self.action == "detach":
            assert isinstance(handle, RingWriter)
            handle.detach()
        elif self.action == "close_and_remap":
            handle.close()
            # A new ring of the same size: unmapped memory would be reused here.
            other = self.path.with_name(self.path.name + ".other")
            other_writer = RingWriter.create(other, CAPACITY)
            self.other += [other_writer, RingReader.open(other)]
        else:
            try:
                if isinstance(handle, RingWriter):
                    self.inner_results.append(handle.try_push(b"inner"))
                else:
                    self.inner_results.append(handle.try_pop())
            except BaseException as e:
                self.inner_errors.append(e)
            if self.set_free:
                if isinstance(handle, RingWriter):
                    message = self.reader.try_pop()
                    assert message is not None
                    self.freed.append(message)
                else:
                    self.writer.push(b"wake", timeout=1)


class ActingBuffer:
    """A bytes-like argument whose __buffer__ (or __release_buffer__) runs the action."""

    def __init__(self, data: bytearray, scene: Scene, on_release: bool) -> None:
        self.data = data
        self.scene = scene
        self.on_release = on_release

    def __buffer__(self, flags: int) -> memoryview:
        if not self.on_release:
            self.scene.act()
        return memoryview(self.data)

    def __release_buffer__(self, view: memoryview) -> None:
        view.release()
        if self.on_release:
            self.scene.act()


class ActingTimeout:
    """A timeout whose __float__ runs the action."""

    def __init__(self, scene: Scene, seconds: float) -> None:
        self.scene = scene
        self.seconds = seconds

    def __float__(self) -> float:
        self.scene.act()
        return self.seconds


class Finalized:
    """Garbage in a reference cycle whose finalizer runs the action when collected."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.cycle = self

    def __del__(self) -> None:
        self.scene.act()


@pytest.fixture
def collector() -> Iterator[None]:
    """Makes the collector run on almost every allocation, and restores it."""
    thresholds = gc.get_threshold()
    was_enabled = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if not was_enabled:
            gc.disable()


def outer_call(scene: Scene, trigger: str) -> tuple[object, BaseException | None]:
    """Runs the case's method with its trigger armed: (result, exception)."""
    method, writer, reader, call = scene.method, scene.writer, scene.reader, scene.call
    timeout: object = OUTER_TIMEOUT if trigger in ("signal", "thread") else 5.0
    if trigger == "float":
        timeout = ActingTimeout(scene, OUTER_TIMEOUT)
    data = bytearray(b"outer message")

    def argument() -> object:
        if trigger in ("buffer", "release_buffer"):
            return ActingBuffer(data, scene, on_release=trigger == "release_buffer")
        return bytes(data)

    try:
        if method == "push":
            call(writer.push, argument(), timeout)
            return "pushed", None
        if method == "try_push":
            return call(writer.try_push, argument()), None
        if method == "push_many":
            if trigger == "iterator":

                def messages() -> Iterator[bytes]:
                    yield b"batch 0"
                    scene.act()
                    yield b"batch 1"

                return call(writer.push_many, messages(), timeout), None
            batch = [b"batch 0", argument(), b"batch 2"]
            return call(writer.push_many, batch, timeout), None
        if method == "reserve":
            slot = call(writer.reserve, len(data), timeout)
            with slot as mv:  # type: ignore[attr-defined]
                mv[:] = data
            return "reserved", None
        if method == "pop":
            return call(reader.pop, timeout), None
        if method == "try_pop":
            return call(reader.try_pop), None
        if method == "pop_into":
            target = bytearray(CAPACITY)
            into: object = target
            if trigger in ("buffer", "release_buffer"):
                into = ActingBuffer(target, scene, on_release=trigger == "release_buffer")
            n = call(reader.pop_into, into, timeout)
            return bytes(target[: int(n)]), None  # type: ignore[call-overload]
        if method == "pop_many":
            return call(reader.pop_many, len(MESSAGES), timeout), None
        if method == "pop_view":
            slot = call(reader.pop_view, timeout)
            with slot as mv:  # type: ignore[attr-defined]
                return bytes(mv), None
        assert method == "next"
        return call(next, reader), None
    except (RingClosed, RingTimeout, RuntimeError) as e:
        return None, e
    except ValueError as e:
        # The slot's handle was closed after the call returned (from 3.12 the
        # collector runs at the next bytecode): its memory is not lent out.
        assert "closed" in str(e)
        return None, e


def run_armed(scene: Scene, trigger: str) -> tuple[object, BaseException | None]:
    """Arms the trigger that runs Python code inside the call, runs the call, disarms."""
    if trigger in ("buffer", "release_buffer", "float", "iterator"):
        return outer_call(scene, trigger)
    if trigger in ("gc_callback", "finalizer"):

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start" and scene.inside:
                scene.act()

        gc.callbacks.append(callback)
        try:
            return outer_call(scene, trigger)
        finally:
            gc.set_threshold(700, 10, 10)
            gc.callbacks.remove(callback)
    if trigger == "signal":
        previous = signal.signal(signal.SIGALRM, lambda signum, frame: scene.act())
        signal.setitimer(signal.ITIMER_REAL, ACT_AFTER)
        try:
            return outer_call(scene, trigger)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    assert trigger == "thread"
    actor = threading.Timer(ACT_AFTER, scene.act)
    actor.start()
    try:
        return outer_call(scene, trigger)
    finally:
        actor.join(timeout=10)
        assert not actor.is_alive()


def drain(reader: RingReader) -> list[bytes]:
    """Every message available now (up to the end of the stream)."""
    out = []
    try:
        while (message := reader.try_pop()) is not None:
            out.append(message)
    except RingClosed:
        pass
    return out


def check_writer_case(scene: Scene, trigger: str) -> None:
    writer, reader = scene.writer, scene.reader
    # A blocking call must wait: fill the ring first.
    prefill: list[bytes] = []
    if trigger in ("signal", "thread"):
        for message in MESSAGES * 100:
            if not writer.try_push(message):
                break
            prefill.append(message)
        while writer.try_push(b""):  # the last gaps: nothing fits any more
            prefill.append(b"")
    scene.set_free = trigger in ("signal", "thread")
    result, error = run_armed(scene, trigger)
    assert scene.acted, "the trigger never ran the action"
    if scene.action == "reenter":
        assert not scene.inner_results or scene.inner_errors == [], (
            "a re-entrant call must fail or run outside the call"
        )
        assert all(isinstance(e, RuntimeError) for e in scene.inner_errors)
    # What the outer call reported written.
    reported: list[bytes] = []
    if (scene.method in ("push", "reserve") and error is None) or (
        scene.method == "try_push" and result is True
    ):
        reported = [b"outer message"]
    elif scene.method == "push_many":
        batch = (
            [b"batch 0", b"batch 1"]
            if trigger == "iterator"
            else [b"batch 0", b"outer message", b"batch 2"]
        )
        written = result if error is None else getattr(error, "written", 0)
        assert isinstance(written, int)
        reported = batch[:written]
    inner = [b"inner"] if True in scene.inner_results else []
    if scene.action != "reenter":
        assert writer.closed
    # Everything the reader can see, none torn, in order, nothing else.
    delivered = scene.freed + drain(reader)
    if scene.action == "detach":
        # The role is free at once for a successor, which continues the stream.
        with RingWriter.open(scene.path) as successor:
            successor.push(b"successor", timeout=1)
        delivered.append(reader.pop(timeout=1))
        reported.append(b"successor")
    else:
        writer.close()
    with pytest.raises(RingClosed):
        reader.pop(timeout=0)
    outer_part = [m for m in delivered if m != b"inner"]
    assert outer_part == prefill + reported
    assert delivered.count(b"inner") == len(inner)
    for handle in scene.other:
        if isinstance(handle, RingReader):
            assert handle.try_pop() is None, "a message landed in another ring"


def check_reader_case(scene: Scene, trigger: str) -> None:
    writer, reader = scene.writer, scene.reader
    blocking = trigger in ("signal", "thread")
    pushed = [] if blocking else list(MESSAGES)
    for message in pushed:
        writer.push(message, timeout=1)
    scene.set_free = blocking
    result, error = run_armed(scene, trigger)
    if scene.set_free and scene.action == "reenter":
        pushed.append(b"wake")
    assert scene.acted, "the trigger never ran the action"
    got: list[bytes] = []
    if error is None:
        if isinstance(result, list):
            got += result
        elif isinstance(result, bytes):
            got.append(result)
    if scene.action == "reenter":
        assert all(isinstance(e, RuntimeError) for e in scene.inner_errors)
        got += [m for m in scene.inner_results if isinstance(m, bytes)]
    else:
        assert reader.closed
    # The rest comes to a successor, which can attach at once after a close.
    reader.close()
    with RingReader.open(scene.path) as successor:
        rest = drain(successor)
    assert sorted(got + rest) == sorted(pushed), "a message was lost or delivered twice"
    assert len(got + rest) == len(set(got + rest))
    assert rest == pushed[len(pushed) - len(rest) :], "the successor's messages are not in order"
    for handle in scene.other:
        if isinstance(handle, RingReader):
            assert handle.try_pop() is None


@pytest.mark.parametrize(("method", "trigger", "action"), CASES)
def test_python_code_inside_a_call_that_closes_or_reenters_the_handle_breaks_nothing(
    ring_path: Path, collector: None, method: str, trigger: str, action: str
) -> None:
    if trigger in ("buffer", "release_buffer") and not HAS_BUFFER_PROTOCOL:
        pytest.skip("__buffer__ in Python code needs Python 3.12 (PEP 688)")
    writer = RingWriter.create(ring_path, CAPACITY)
    reader = RingReader.open(ring_path)
    scene = Scene(ring_path, writer, reader, method, action, trigger=trigger)
    try:
        if method in WRITER_METHODS:
            check_writer_case(scene, trigger)
        else:
            check_reader_case(scene, trigger)
    finally:
        for handle in (writer, reader, *scene.other):
            handle.close()


# ---- the role is released at once; a handle is initialised once ------------------


def test_close_releases_the_reader_role_while_an_array_made_from_a_view_is_alive(
    ring_path: Path,
) -> None:
    np = pytest.importorskip("numpy")
    with RingWriter.create(ring_path, CAPACITY) as writer:
        writer.push(b"x" * 64, timeout=1)
        writer.push(b"next", timeout=1)
        reader = RingReader.open(ring_path)
        slot = reader.pop_view(timeout=1)
        array = np.frombuffer(slot.__enter__(), dtype=np.uint8)
        assert int(array.sum()) == ord("x") * 64
        reader.close()
        # A new reader attaches the moment close() returned, while the array lives;
        # the array stays valid memory, detached from the ring: it reads zeros now,
        # never a successor's messages.
        with RingReader.open(ring_path) as successor:
            assert successor.pop(timeout=1) == b"x" * 64
            writer.push(b"y" * 64, timeout=1)
            assert successor.pop(timeout=1) == b"next"
            assert not array.any()
            assert successor.pop(timeout=1) == b"y" * 64
        with pytest.raises(RingClosed, match="not consumed"):
            slot.__exit__(None, None, None)
        del array, slot


def test_detach_releases_the_writer_role_while_a_reservation_buffer_is_alive(
    ring_path: Path,
) -> None:
    np = pytest.importorskip("numpy")
    writer = RingWriter.create(ring_path, CAPACITY)
    with RingReader.open(ring_path) as reader:
        slot = writer.reserve(64, timeout=1)
        mv = slot.__enter__()
        array = np.frombuffer(mv, dtype=np.uint8)
        writer.detach()
        with pytest.raises(ValueError):  # the block's own view is released ...
            mv[0] = 1
        with RingWriter.open(ring_path) as successor:
            successor.push(b"S" * 64, timeout=1)
            array[:] = 0xFF  # ... and a buffer made from it no longer reaches the ring
        assert reader.pop(timeout=1) == b"S" * 64
        with pytest.raises(RingClosed, match="nothing was published"):
            slot.__exit__(None, None, None)
        del array, mv, slot


@pytest.mark.parametrize("side", ["writer", "reader"])
def test_a_handle_is_initialised_once(ring_path: Path, side: str) -> None:
    other = ring_path.with_name("other")
    with (
        RingWriter.create(ring_path, CAPACITY) as writer,
        RingReader.open(ring_path) as reader,
        RingWriter.create(other, CAPACITY) as other_writer,
        RingReader.open(other) as other_reader,
    ):
        handle = writer if side == "writer" else reader
        slot = writer.reserve(8, timeout=1) if side == "writer" else None
        handle.close()
        fd = os.open(other, os.O_RDWR)
        try:
            with pytest.raises(RuntimeError, match="initialised only once"):
                type(handle).__init__(handle, fd, str(other))  # type: ignore[misc]
        finally:
            os.close(fd)
        assert handle.closed
        if slot is not None:
            # A stale slot stays dead: it cannot write into the other ring.
            with pytest.raises(ValueError, match="closed"), slot as mv:
                mv[:] = b"stale!!!"
            with pytest.raises(RingClosed):
                slot.commit()
        assert other_reader.try_pop() is None
        other_writer.push(b"fresh", timeout=1)
        assert other_reader.try_pop() == b"fresh"


def test_a_reentrant_call_from_a_signal_handler_during_a_wait_is_refused(
    ring_path: Path,
) -> None:
    with RingWriter.create(ring_path, CAPACITY) as writer, RingReader.open(ring_path) as reader:
        errors: list[BaseException] = []

        def handler(signum: int, frame: object) -> None:
            try:
                reader.try_pop()
            except RuntimeError as e:
                errors.append(e)
            writer.push(b"wake", timeout=1)

        previous = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, ACT_AFTER)
        try:
            started = time.monotonic()
            assert reader.pop(timeout=5) == b"wake"
            assert time.monotonic() - started < 4
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert len(errors) == 1 and "in progress" in str(errors[0])


# ---- the cases a hostile review found beyond the table ----------------------------


class Doomed(bytearray):
    """A buffer whose finalizer runs `action` when the last reference goes."""

    action: Callable[[], None] = staticmethod(lambda: None)

    def __del__(self) -> None:
        type(self).action()


def run_push_many_losing_its_item(ring_path: Path, action: Callable[[RingWriter], None]) -> list:
    """push_many of [memoryview(Doomed), b"second"] into a full ring: a signal handler
    makes room and drops the list's reference to the first item during the wait, so
    its finalizer runs right after push_many staged it. Returns [written, delivered]."""
    writer = RingWriter.create(ring_path, CAPACITY)
    reader = RingReader.open(ring_path)
    try:
        while writer.try_push(b"f" * 100):
            pass
        while writer.try_push(b""):
            pass
        Doomed.action = staticmethod(lambda: action(writer))
        batch: list[object] = [memoryview(Doomed(b"THE-ITEM")), b"second"]

        def handler(signum: int, frame: object) -> None:
            for _ in range(8):
                reader.try_pop()
            batch[0] = None

        previous = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, ACT_AFTER)
        try:
            written = writer.push_many(batch, timeout=2)  # type: ignore[arg-type]
        except RingError as e:  # RingClosed; RingError in a fork() child
            written = getattr(e, "written", None)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            Doomed.action = staticmethod(lambda: None)
        delivered = [m for m in drain(reader) if m not in (b"f" * 100, b"")]
        return [written, delivered]
    finally:
        writer.close()
        reader.close()


def test_push_many_counts_no_staged_message_that_an_items_finalizer_closed_away(
    ring_path: Path,
) -> None:
    written, delivered = run_push_many_losing_its_item(ring_path, lambda w: w.close())
    assert isinstance(written, int)
    assert delivered == [b"THE-ITEM", b"second"][:written]


def test_push_many_in_a_child_forked_by_an_items_finalizer_publishes_nothing(
    ring_path: Path,
) -> None:
    parent = os.getpid()

    def fork(writer: RingWriter) -> None:
        if os.fork() == 0:
            time.sleep(0.2)  # the child goes on inside push_many, then exits below

    try:
        written, delivered = run_push_many_losing_its_item(ring_path, fork)
    finally:
        if os.getpid() != parent:
            os._exit(0)  # the child leaves here, whatever happened in it
    _, status = os.wait()
    assert status == 0
    assert delivered == [b"THE-ITEM", b"second"][: int(written)]  # type: ignore[call-overload]
    # The child never touched the ring: it is consistent and ends cleanly.
    with RingReader.open(ring_path) as reader, pytest.raises(RingClosed):
        reader.pop(timeout=1)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.11 collects inside allocations")
def test_a_slot_finished_by_the_collector_inside_its_enter_lends_no_view(
    ring_path: Path, collector: None
) -> None:
    with RingWriter.create(ring_path, CAPACITY) as writer, RingReader.open(ring_path) as reader:
        finished: list[bool] = []
        target: list[object] = []

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start" and target:
                slot = target.pop()
                slot.__exit__(None, None, None)  # type: ignore[attr-defined]
                finished.append(True)

        gc.callbacks.append(callback)
        try:
            for threshold in range(1, 8):
                writer.push(b"A" * 64, timeout=1)
                slot = reader.pop_view(timeout=1)
                gc.disable()
                gc.collect()
                gc.set_threshold(threshold, 1000, 1000)
                target.append(slot)
                gc.enable()
                try:
                    view = slot.__enter__()
                except ValueError:
                    view = None
                gc.set_threshold(700, 10, 10)
                target.clear()
                if not slot.open:
                    # Finished while __enter__ ran: no live view of consumed memory.
                    assert view is None or view.obj is None or not finished
                    if view is not None:
                        with pytest.raises(ValueError):
                            bytes(view)
                elif slot.open:
                    slot.__exit__(None, None, None)
        finally:
            gc.callbacks.remove(callback)
        assert finished, "the collector never ran inside __enter__"


def test_a_close_from_python_code_run_by_init_is_not_forgotten(ring_path: Path) -> None:
    from ipc_ring import _core

    with RingWriter.create(ring_path, CAPACITY):
        reader = _core.Reader.__new__(_core.Reader)

        class Spin:
            def __float__(self) -> float:
                reader.close()
                return 0.0

        with pytest.raises(RingClosed):
            reader.__init__(str(ring_path), spin=Spin())  # type: ignore[misc, arg-type]
        assert reader.closed
        with RingReader.open(ring_path) as successor:  # the role was never taken
            assert successor.try_pop() is None


@pytest.mark.parametrize("how", ["closed before", "closed by the timeout's __float__"])
def test_push_many_exceptions_always_say_how_many_were_written(ring_path: Path, how: str) -> None:
    with RingWriter.create(ring_path, CAPACITY) as writer, RingReader.open(ring_path):

        class Timeout:
            def __float__(self) -> float:
                writer.close()
                return 1.0

        if how == "closed before":
            writer.close()
            timeout: object = 1.0
        else:
            timeout = Timeout()
        with pytest.raises(RingClosed) as raised:
            writer.push_many([b"a"], timeout)  # type: ignore[arg-type]
        assert raised.value.written == 0  # type: ignore[attr-defined]


def test_closing_during_pop_async_leaves_the_event_loop_watching_nothing_of_it(
    ring_path: Path,
) -> None:
    import asyncio
    import socket

    async def main() -> bytes:
        with RingWriter.create(ring_path, CAPACITY):
            reader = RingReader.open(ring_path)
            loop = asyncio.get_running_loop()
            ring_fd = reader.fileno()

            async def consumer() -> str:
                try:
                    await reader.pop_async(timeout=5)
                except RingClosed:
                    return "RingClosed"
                return "message"

            task = asyncio.create_task(consumer())
            await asyncio.sleep(0.02)
            reader.close()
            # A socket that takes the number of the closed descriptor.
            a, b = socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            if b.fileno() == ring_fd:
                a, b = b, a
            try:
                received = asyncio.ensure_future(loop.sock_recv(a, 10))
                await asyncio.sleep(0)
                assert await asyncio.wait_for(task, 2) == "RingClosed"
                b.send(b"ping")
                return await asyncio.wait_for(received, 2)
            finally:
                a.close()
                b.close()

    assert asyncio.run(main()) == b"ping"
