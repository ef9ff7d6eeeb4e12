"""A Hypothesis state machine: one writer and one reader in one process against a model, through
the single-message calls and every way a role is given up and taken again.

The model is conftest.RingModel (FORMAT.md "Wrap rule"): it predicts exactly when `try_push`
finds the ring full and what every read returns. On top of it this machine models the roles
(FORMAT.md "Roles and states", "Breaks"): a writer that closes ends the stream; one that aborts
or is detached leaves its role to a successor (RingWriter.open). A reader, once it has every
message, reports an aborted writer once (PeerDied; a new reader reports it again) and then waits
for the next one; if a successor attached before any reader reported the abort, the reader
reports it where the aborted writer's messages end (a break), before the successor's.
Every call uses timeout 0, so each outcome is predictable.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import RingModel, positions, ring_parent_dir
from ipc_ring import MessageTooLarge, PeerDied, RingClosed, RingReader, RingTimeout, RingWriter


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ring_dir = Path(tempfile.mkdtemp(prefix="ipc_ring-sm-", dir=ring_parent_dir()))
        self.path = self.ring_dir / "ring"
        self.writer: RingWriter | None = None
        self.reader: RingReader | None = None
        self.capacity = 0
        self.model = RingModel(0)
        # The writer's role as the header has it: "attached", "closed" (end of stream),
        # "failed" (aborted: a PeerDied for each reader that drains the ring) or "vacant"
        # (handed over).
        self.writer_role = "attached"
        self.push_attempts = 0
        # Writers counted from 1 (the header's writer_generation); the latest writer whose
        # end this reader reported, and the latest any reader reported (the header's).
        self.generation = 0
        self.reported = 0
        self.reported_by_any = 0
        # The header's break table: (position, writer generation), 0 for a free entry.
        self.breaks = [(0, 0)] * 4
        self.break_generation = 0

    # ---- what a read of an empty ring reports ---------------------------------

    def report(self, generation: int) -> None:
        self.reported = max(self.reported, generation)
        self.reported_by_any = max(self.reported_by_any, generation)

    def break_here(self) -> bool:
        """Whether the next read stops at a break (PeerDied); records it as reported."""
        if self.break_generation <= self.reported:
            return False
        self.reported = max(self.reported, self.reported_by_any)
        ahead = [g for at, g in self.breaks if g > self.reported and at >= self.model.read_pos]
        if not ahead:
            return False
        generation = min(ahead)
        at = next(at for at, g in self.breaks if g == generation)
        if at != self.model.read_pos:
            return False
        self.report(generation)
        event("PeerDied at a break")
        return True

    def empty_outcome(self) -> type[Exception]:
        """What pop(timeout=0) raises on a drained ring; records a PeerDied as reported."""
        if self.writer_role == "closed":
            return RingClosed
        if self.writer_role == "failed" and self.reported != self.generation:
            self.report(self.generation)
            event("PeerDied reported")
            return PeerDied
        return RingTimeout

    def record_break(self) -> None:
        """A successor attaches after a writer that aborted: unless a reader reported that
        writer with nothing of it left, its end is a break, in a free entry of the table
        (never used, or behind the read position) or merged into the latest."""
        model = self.model
        if (
            self.reported_by_any == self.generation
            and model.read_published == model.write_published
        ):
            return
        free = [i for i, (at, g) in enumerate(self.breaks) if g == 0 or at < model.read_published]
        if free:
            self.breaks[free[0]] = (model.write_published, self.generation)
        else:
            event("break merged")
            latest = max(range(4), key=lambda i: self.breaks[i][1])
            self.breaks[latest] = (self.breaks[latest][0], self.generation)
        self.break_generation = self.generation

    @property
    def max_size(self) -> int:
        return self.capacity - 8

    # ---- rules: the writer --------------------------------------------------------

    @initialize(capacity=st.sampled_from([64, 128, 256, 512, 1024]))
    def create_ring(self, capacity: int) -> None:
        self.capacity = capacity
        self.model = RingModel(capacity)
        self.writer = RingWriter.create(self.path, capacity)
        self.generation = 1
        self.reader = RingReader.open(self.path)

    def draw_message(self, data: st.DataObject) -> bytes:
        return data.draw(
            st.one_of(
                st.binary(max_size=min(self.max_size, 64)),
                st.binary(max_size=self.max_size),
                st.binary(min_size=self.max_size - 16, max_size=self.max_size),
            ),
            label="message",
        )

    def draw_buffer(self, data: st.DataObject, message: bytes) -> bytes | bytearray | memoryview:
        """`message` as one of the bytes-like types push accepts."""
        kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]), label="buffer type")
        return kind(message)

    @precondition(lambda self: self.writer is not None)
    @rule(data=st.data())
    def try_push(self, data: st.DataObject) -> None:
        assert self.writer is not None
        message = self.draw_message(data)
        self.push_attempts += 1
        expected = self.model.push(message)
        assert self.writer.try_push(self.draw_buffer(data, message)) is expected

    @precondition(lambda self: self.writer is not None)
    @rule(data=st.data())
    def push_with_zero_timeout(self, data: st.DataObject) -> None:
        assert self.writer is not None
        message = self.draw_message(data)
        self.push_attempts += 1
        if self.model.push(message):
            self.writer.push(self.draw_buffer(data, message), timeout=0)
        else:
            with pytest.raises(RingTimeout):
                self.writer.push(message, timeout=0)

    @precondition(lambda self: self.writer is not None)
    @rule(excess=st.integers(min_value=1, max_value=100))
    def push_too_large(self, excess: int) -> None:
        assert self.writer is not None
        with pytest.raises(MessageTooLarge):
            self.writer.push(b"x" * (self.max_size + excess), timeout=5)

    # Giving the role up is allowed only after some pushes, so that most runs fill and wrap.
    @precondition(lambda self: self.writer is not None and self.push_attempts >= 8)
    @rule(how=st.sampled_from(["close", "abort", "detach"]))
    def writer_leaves(self, how: str) -> None:
        assert self.writer is not None
        getattr(self.writer, how)()
        assert self.writer.closed
        with pytest.raises(RingClosed):
            self.writer.try_push(b"")
        self.writer = None
        self.writer_role = {"close": "closed", "abort": "failed", "detach": "vacant"}[how]

    @precondition(lambda self: self.writer is None)
    @rule()
    def writer_reopens(self) -> None:
        """A successor continues the stream where the last one left it; a closed stream
        cannot be continued."""
        if self.writer_role == "closed":
            with pytest.raises(RingClosed):
                RingWriter.open(self.path)
            return
        self.writer = RingWriter.open(self.path)
        if self.writer_role == "failed":
            self.record_break()
        self.generation += 1
        self.writer_role = "attached"

    # ---- rules: the reader ----------------------------------------------------------

    @rule()
    def try_pop(self) -> None:
        assert self.reader is not None
        if self.break_here():
            with pytest.raises(PeerDied):
                self.reader.try_pop()
            return
        expected = self.model.head()
        if expected is None and self.writer_role == "closed":
            with pytest.raises(RingClosed):
                self.reader.try_pop()
            return
        assert self.reader.try_pop() == expected
        if expected is not None:
            self.model.pop()

    @rule()
    def pop_with_zero_timeout(self) -> None:
        assert self.reader is not None
        if self.break_here():
            with pytest.raises(PeerDied):
                self.reader.pop(timeout=0)
            return
        expected = self.model.head()
        if expected is None:
            with pytest.raises(self.empty_outcome()):
                self.reader.pop(timeout=0)
            return
        assert self.reader.pop(timeout=0) == expected
        self.model.pop()

    @rule(size=st.integers(min_value=0, max_value=1024))
    def pop_into(self, size: int) -> None:
        assert self.reader is not None
        buffer = bytearray(b"\xa5" * size)
        if self.break_here():
            with pytest.raises(PeerDied):
                self.reader.pop_into(buffer, timeout=0)
            assert buffer == b"\xa5" * size
            return
        expected = self.model.head()
        if expected is None:
            with pytest.raises(self.empty_outcome()):
                self.reader.pop_into(buffer, timeout=0)
        elif len(expected) > size:
            with pytest.raises(ValueError):
                self.reader.pop_into(buffer, timeout=0)
            assert buffer == b"\xa5" * size
        else:
            assert self.reader.pop_into(buffer, timeout=0) == len(expected)
            assert buffer[: len(expected)] == expected
            assert buffer[len(expected) :] == b"\xa5" * (size - len(expected))
            self.model.pop()

    @rule(how=st.sampled_from(["close", "detach"]))
    def reopen_reader(self, how: str) -> None:
        """A new reader continues from the read position the old one published."""
        assert self.reader is not None
        getattr(self.reader, how)()
        self.reader = RingReader.open(self.path)
        self.reported = 0  # a new reader reports a failed writer again

    @precondition(lambda self: self.writer is not None and self.push_attempts >= 8)
    @rule()
    def iterate_to_end_of_stream(self) -> None:
        """Closes the writer (iteration would wait for it), then reads everything left."""
        assert self.reader is not None
        self.writer_leaves("close")
        assert self.read_to_the_end() == self.expected_to_the_end()
        with pytest.raises(RingClosed):
            self.reader.pop(timeout=0)

    def read_to_the_end(self) -> list[bytes | str]:
        """Iterates to the end of the stream; a break shows as "PeerDied"."""
        assert self.reader is not None
        got: list[bytes | str] = []
        while True:
            try:
                got.extend(self.reader)
                return got
            except PeerDied:
                got.append("PeerDied")

    def expected_to_the_end(self) -> list[bytes | str]:
        expected: list[bytes | str] = []
        while True:
            if self.break_here():
                expected.append("PeerDied")
            elif self.model.head() is not None:
                expected.append(self.model.pop())
            else:
                return expected

    # ---- invariants ---------------------------------------------------------

    @invariant()
    def positions_in_the_header_match_the_model(self) -> None:
        if self.reader is not None:
            assert positions(self.path) == (self.model.write_published, self.model.read_published)

    def teardown(self) -> None:
        try:
            if self.reader is not None:
                if self.writer is None and self.writer_role != "closed":
                    self.writer_reopens()
                if self.writer is not None:
                    self.writer.close()
                assert self.read_to_the_end() == self.expected_to_the_end()
        finally:
            for handle in (self.writer, self.reader):
                if handle is not None:
                    handle.close()
            shutil.rmtree(self.ring_dir, ignore_errors=True)


RingMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    database=None,
)
test_ring_matches_a_deque_model = RingMachine.TestCase
