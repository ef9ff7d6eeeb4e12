"""A Hypothesis state machine: one writer and one reader in one process against a model.

The model is a `collections.deque` of the records in the data area, in order: each message
with its record size, and the padding records the wrap rule inserts (payload None). It
predicts exactly when `try_push` fails: a message whose record does not fit before the end
of the data area needs a padding record first (published even when the message then does not
fit at index 0), and the reader skips padding on its next read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import deque

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from conftest import record_size
from ipc_ring import MessageTooLarge, RingClosed, RingReader, RingTimeout, RingWriter

RING_PARENT_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None

# FORMAT.md "Header": where the two sides publish their positions.
WRITE_POS_OFFSET = 128
READ_POS_OFFSET = 256


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="ipc_ring-sm-", dir=RING_PARENT_DIR)
        self.path = os.path.join(self.directory, "ring")
        self.writer: RingWriter | None = None
        self.reader: RingReader | None = None
        self.capacity = 0
        # Records written and not yet consumed: (record size, payload or None for padding).
        self.records: deque[tuple[int, bytes | None]] = deque()
        self.write_pos = 0
        self.read_pos = 0
        self.writer_closed = False
        self.push_attempts = 0

    # ---- the model ----------------------------------------------------------

    def messages(self) -> list[bytes]:
        return [payload for _, payload in self.records if payload is not None]

    def model_push(self, data: bytes) -> bool:
        """The wrap rule. Returns whether the message is written; may add padding either way."""
        size = record_size(len(data))
        to_end = self.capacity - self.write_pos % self.capacity
        if size > to_end:
            if self.capacity - (self.write_pos - self.read_pos) < to_end:
                event("full before padding")
                return False
            event("padding")
            self.records.append((to_end, None))
            self.write_pos += to_end
        if self.capacity - (self.write_pos - self.read_pos) < size:
            event("full")
            return False
        self.records.append((size, data))
        self.write_pos += size
        return True

    def model_skip_padding(self) -> None:
        while self.records and self.records[0][1] is None:
            self.read_pos += self.records.popleft()[0]

    def model_head(self) -> bytes | None:
        """The next message, after the reader skips any padding in front of it."""
        self.model_skip_padding()
        return self.records[0][1] if self.records else None

    def model_pop(self) -> None:
        self.read_pos += self.records.popleft()[0]

    # ---- rules --------------------------------------------------------------

    @initialize(capacity=st.sampled_from([64, 128, 256, 512, 1024]))
    def create_ring(self, capacity: int) -> None:
        self.capacity = capacity
        self.writer = RingWriter.create(self.path, capacity)
        self.reader = RingReader.open(self.path)

    def draw_message(self, data: st.DataObject) -> bytes:
        max_size = self.capacity - 8
        return data.draw(
            st.one_of(
                st.binary(max_size=min(max_size, 64)),
                st.binary(max_size=max_size),
                st.binary(min_size=max_size - 16, max_size=max_size),
            ),
            label="message",
        )

    def draw_buffer(self, data: st.DataObject, message: bytes) -> bytes | bytearray | memoryview:
        """`message` as one of the bytes-like types push accepts."""
        kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]), label="buffer type")
        return kind(message)

    @rule(data=st.data())
    def try_push(self, data: st.DataObject) -> None:
        assert self.writer is not None
        message = self.draw_message(data)
        self.push_attempts += 1
        if self.writer_closed:
            with pytest.raises(RingClosed):
                self.writer.try_push(message)
            return
        expected = self.model_push(message)
        assert self.writer.try_push(self.draw_buffer(data, message)) is expected

    @rule(data=st.data())
    def push_with_zero_timeout(self, data: st.DataObject) -> None:
        assert self.writer is not None
        message = self.draw_message(data)
        self.push_attempts += 1
        if self.writer_closed:
            with pytest.raises(RingClosed):
                self.writer.push(message, timeout=0)
        elif self.model_push(message):
            self.writer.push(self.draw_buffer(data, message), timeout=0)
        else:
            with pytest.raises(RingTimeout):
                self.writer.push(message, timeout=0)

    @rule(excess=st.integers(min_value=1, max_value=100))
    def push_too_large(self, excess: int) -> None:
        assert self.writer is not None
        too_large = b"x" * (self.capacity - 8 + excess)
        with pytest.raises(RingClosed if self.writer_closed else MessageTooLarge):
            self.writer.push(too_large, timeout=5)

    @rule()
    def try_pop(self) -> None:
        assert self.reader is not None
        expected = self.model_head()
        if expected is None and self.writer_closed:
            with pytest.raises(RingClosed):
                self.reader.try_pop()
            return
        assert self.reader.try_pop() == expected
        if expected is not None:
            self.model_pop()

    @rule()
    def pop_with_zero_timeout(self) -> None:
        assert self.reader is not None
        expected = self.model_head()
        if expected is None:
            with pytest.raises(RingClosed if self.writer_closed else RingTimeout):
                self.reader.pop(timeout=0)
            return
        assert self.reader.pop(timeout=0) == expected
        self.model_pop()

    @rule(size=st.integers(min_value=0, max_value=1024))
    def pop_into(self, size: int) -> None:
        assert self.reader is not None
        buffer = bytearray(b"\xa5" * size)
        expected = self.model_head()
        if expected is None:
            with pytest.raises(RingClosed if self.writer_closed else RingTimeout):
                self.reader.pop_into(buffer, timeout=0)
        elif len(expected) > size:
            with pytest.raises(ValueError):
                self.reader.pop_into(buffer, timeout=0)
            assert buffer == b"\xa5" * size
        else:
            assert self.reader.pop_into(buffer, timeout=0) == len(expected)
            assert buffer[: len(expected)] == expected
            assert buffer[len(expected) :] == b"\xa5" * (size - len(expected))
            self.model_pop()

    @rule()
    def reopen_reader(self) -> None:
        """A new reader continues from the read position the old one published."""
        assert self.reader is not None
        self.reader.close()
        self.reader = RingReader.open(self.path)

    # Ending the stream is allowed only after some pushes, so that most runs fill and wrap.
    @precondition(lambda self: self.push_attempts >= 8)
    @rule()
    def close_writer(self) -> None:
        """End of stream; closing again changes nothing."""
        assert self.writer is not None
        self.writer.close()
        self.writer_closed = True
        assert self.writer.closed

    @precondition(lambda self: self.push_attempts >= 8)
    @rule()
    def iterate_to_end_of_stream(self) -> None:
        """Closes the writer (iteration would wait for it), then reads everything left."""
        assert self.reader is not None
        self.close_writer()
        assert list(self.reader) == self.messages()
        self.records.clear()
        self.read_pos = self.write_pos
        with pytest.raises(RingClosed):
            self.reader.pop(timeout=0)

    # ---- invariants ---------------------------------------------------------

    @invariant()
    def positions_in_the_header_match_the_model(self) -> None:
        if self.writer is None:
            return
        with open(self.path, "rb") as file:
            header = file.read(READ_POS_OFFSET + 8)
        write_pos = int.from_bytes(header[WRITE_POS_OFFSET : WRITE_POS_OFFSET + 8], "little")
        read_pos = int.from_bytes(header[READ_POS_OFFSET : READ_POS_OFFSET + 8], "little")
        assert (write_pos, read_pos) == (self.write_pos, self.read_pos)

    def teardown(self) -> None:
        try:
            if self.writer is not None and self.reader is not None:
                self.writer.close()
                self.writer_closed = True
                while (expected := self.model_head()) is not None:
                    assert self.reader.try_pop() == expected
                    self.model_pop()
                with pytest.raises(RingClosed):
                    self.reader.try_pop()
        finally:
            for handle in (self.writer, self.reader):
                if handle is not None:
                    handle.close()
            shutil.rmtree(self.directory, ignore_errors=True)


RingMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    database=None,
)
test_ring_matches_a_deque_model = RingMachine.TestCase
