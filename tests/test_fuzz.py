"""Fuzzing: a corrupted or hostile ring file must never crash, hang or confuse a process.

Valid rings are built with the real API, then corrupted (header fields at their FORMAT.md
offsets, positions, record headers, random bytes, truncation) before and while a reader uses
them, or rewritten by another process the whole time. The only outcomes allowed are the
documented ones: a message (bytes, or a length from pop_into), None (empty), InvalidRing,
RingClosed, PeerDied, RingTimeout; for a writer also True/False. Any other exception, a hang
or a crash fails.

The cases run in a child interpreter so that a crash (SIGSEGV, SIGBUS) or a hang is reported
with the seed of the case that caused it, and a command that replays it. The time budget is
IPC_RING_FUZZ_SECONDS (default 5 s over all the tests here), so CI can fuzz longer, e.g. under
the ASan build; IPC_RING_FUZZ_SEED fixes the seeds.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import record_size
from ipc_ring import (
    InvalidRing,
    PeerDied,
    RingClosed,
    RingReader,
    RingTimeout,
    RingWriter,
)

TESTS_DIR = Path(__file__).resolve().parent
FUZZ_SECONDS = float(os.environ.get("IPC_RING_FUZZ_SECONDS", "5"))
BASE_SEED = int(os.environ.get("IPC_RING_FUZZ_SEED", str(random.randrange(1 << 32))))

DATA_OFFSET = 4096
RECORD_HEADER = 8
CAPACITIES = [64, 128, 256, 1024, 4096]
ALLOWED_ERRORS = (InvalidRing, RingClosed, PeerDied, RingTimeout)

# FORMAT.md "Header": (name, offset, size) of every field.
HEADER_FIELDS = [
    ("magic", 0, 8),
    ("version", 8, 4),
    ("ready", 12, 4),
    ("capacity", 16, 8),
    ("data_offset", 24, 8),
    ("max_message_size", 32, 8),
    ("write_pos", 128, 8),
    ("read_pos", 256, 8),
    ("reader_waiting", 384, 4),
    ("data_seq", 388, 4),
    ("reader_attached", 392, 4),
    ("writer_waiting", 512, 4),
    ("space_seq", 516, 4),
    ("writer_closed", 520, 4),
]
WRITE_POS, READ_POS = 128, 256


# ---- building and corrupting rings -----------------------------------------------------------


def random_message(rng: random.Random, max_len: int) -> bytes:
    """Zero-length and maximal messages often (a maximal one always wraps to the next lap
    unless the write index is 0), else a random or small length."""
    pick = rng.random()
    if pick < 0.15:
        length = 0
    elif pick < 0.3:
        length = max_len
    elif pick < 0.5:
        length = rng.randint(0, max_len)
    else:
        length = min(rng.randint(1, 40), max_len)
    return rng.randbytes(length)


def build_ring(rng: random.Random, path: Path) -> tuple[RingWriter | None, int]:
    """A valid ring with a random history: messages of every kind pushed, some popped (so
    that wraps happen), the reader detached, and the writer closed or left
    open. Returns the writer if it is still open, and the capacity."""
    capacity = rng.choice(CAPACITIES)
    writer = RingWriter.create(path, capacity)
    max_len = writer.max_message_size
    with RingReader.open(path) as reader:
        for _ in range(rng.randint(0, 60)):
            if rng.random() < 0.6:
                message = random_message(rng, max_len)
                while not writer.try_push(message):
                    reader.try_pop()  # frees space
            else:
                reader.try_pop()
    if rng.random() < 0.5:
        writer.close()
        return None, capacity
    return writer, capacity


def interesting_value(rng: random.Random, old: int, size: int, capacity: int) -> int:
    bits = size * 8
    choices = [
        0,
        1,
        2,
        3,
        (1 << bits) - 1,
        1 << (bits - 1),
        rng.getrandbits(bits),
        old + rng.choice([-1, 1]) * rng.choice([1, 4, 7, 8, 16, capacity, capacity + 8]),
        old ^ (1 << rng.randrange(bits)),
        capacity,
        capacity * 2,
        capacity // 2,
        capacity - RECORD_HEADER,
        1 << rng.randrange(bits),
    ]
    return rng.choice(choices) % (1 << bits)


def read_u(f: int, offset: int, size: int) -> int:
    data = os.pread(f, size, offset)
    return int.from_bytes(data.ljust(size, b"\0"), "little")


def write_u(f: int, offset: int, size: int, value: int) -> None:
    os.pwrite(f, value.to_bytes(size, "little"), offset)


def record_offsets(f: int, capacity: int, limit: int = 64) -> list[int]:
    """Data-area indices of the records between read_pos and write_pos, as the file says
    (walking stops at anything that does not look like a record)."""
    write_pos, read_pos = read_u(f, WRITE_POS, 8), read_u(f, READ_POS, 8)
    mask = capacity - 1
    offsets: list[int] = []
    position = read_pos
    while position < write_pos and len(offsets) < limit:
        index = position & mask
        offsets.append(index)
        length, kind = struct.unpack("<II", os.pread(f, 8, DATA_OFFSET + index).ljust(8, b"\0"))
        step = record_size(length) if kind == 1 else capacity - index
        if kind not in (1, 2) or step > capacity - index:
            break
        position += step
    return offsets


def corrupt(rng: random.Random, path: Path, capacity: int, allow_truncate: bool) -> str:
    """Applies one random corruption to the ring file; returns what it did."""
    file_size = path.stat().st_size
    kinds = ["header", "position", "record", "bytes"] + (["truncate"] if allow_truncate else [])
    kind = rng.choice(kinds)
    fd = os.open(path, os.O_RDWR)
    try:
        if kind == "header":
            name, offset, size = rng.choice(HEADER_FIELDS)
            value = interesting_value(rng, read_u(fd, offset, size), size, capacity)
            write_u(fd, offset, size, value)
            return f"{name}={value:#x}"
        if kind == "position":
            offset = rng.choice([WRITE_POS, READ_POS])
            old = read_u(fd, offset, 8)
            value = rng.choice(
                [
                    interesting_value(rng, old, 8, capacity),
                    (old + 8 * rng.randint(-capacity // 8 - 2, capacity // 8 + 2)) % (1 << 64),
                    old + rng.randint(1, 7),  # misaligned
                    rng.getrandbits(64),
                    (1 << 64) - 8 * rng.randint(1, 4),  # just below the 64-bit wrap
                ]
            ) % (1 << 64)
            write_u(fd, offset, 8, value)
            return f"{'write_pos' if offset == WRITE_POS else 'read_pos'}={value:#x}"
        if kind == "record":
            offsets = record_offsets(fd, capacity)
            if offsets and rng.random() < 0.8:
                index = rng.choice(offsets)
            else:
                index = rng.randrange(0, capacity, 8)
            to_end = capacity - index
            length = rng.choice(
                [0, 1, to_end - 8, to_end, capacity, capacity - 8, rng.getrandbits(32), 0xFFFFFFFF]
            ) % (1 << 32)
            record_kind = rng.choice([0, 1, 1, 2, 2, 3, rng.getrandbits(32)])
            part = rng.choice(["both", "both", "length", "kind"])
            if part in ("both", "length"):
                os.pwrite(fd, struct.pack("<I", length), DATA_OFFSET + index)
            if part in ("both", "kind"):
                os.pwrite(fd, struct.pack("<I", record_kind), DATA_OFFSET + index + 4)
            return f"record at {index}: {part} length={length:#x} kind={record_kind:#x}"
        if kind == "bytes":
            offset = rng.randrange(file_size) if file_size else 0
            data = rng.randbytes(rng.randint(1, 16))
            if file_size:
                data = data[: file_size - offset]  # overwrite only, do not extend
            os.pwrite(fd, data, offset)
            return f"bytes at {offset}: {data.hex()}"
        size = rng.choice(
            [
                0,
                100,
                DATA_OFFSET - 1,
                DATA_OFFSET,
                DATA_OFFSET + capacity // 2,
                max(file_size - 1, 0),
                file_size + 4096,
            ]
        )
        os.ftruncate(fd, size)
        return f"truncate to {size}"
    finally:
        os.close(fd)


# ---- exercising a reader and a writer under corruption ---------------------------------------


def check_reader_call(reader: RingReader, call: Callable[[], object], context: str) -> str:
    """Runs one reader call; returns a short name of the outcome, or raises AssertionError
    for anything that is not allowed."""
    try:
        result = call()
    except ALLOWED_ERRORS as e:
        return type(e).__name__
    except Exception as e:
        raise AssertionError(f"{context}: reader raised {type(e).__name__}: {e}") from e
    if result is None:
        return "empty"
    if isinstance(result, bytes):
        assert len(result) <= reader.max_message_size, f"{context}: {len(result)}-byte message"
        return "message"
    if isinstance(result, int):
        assert 0 <= result <= reader.max_message_size, f"{context}: pop_into gave {result}"
        return "message"
    raise AssertionError(f"{context}: reader returned {result!r}")


def exercise_reader(
    rng: random.Random, reader: RingReader, context: str, mutate: Callable[[], str] | None
) -> list[str]:
    """A bounded mix of try_pop / pop(timeout=0.01) / pop(timeout=0) / pop_into, with a
    corruption between calls when `mutate` is given. Stops after a few calls in a row that
    made no progress."""
    buffer = bytearray(reader.capacity)
    calls: list[Callable[[], object]] = [
        reader.try_pop,
        lambda: reader.pop(timeout=0.01),
        lambda: reader.pop(timeout=0),
        lambda: reader.pop_into(buffer, timeout=0.01),
    ]
    outcomes = []
    stalled = 0
    for step in range(80):
        if mutate is not None and rng.random() < 0.3:
            context += f"; then {mutate()}"
        call = rng.choice(calls) if stalled == 0 else reader.try_pop
        outcome = check_reader_call(reader, call, f"{context} (call {step})")
        outcomes.append(outcome)
        stalled = 0 if outcome == "message" else stalled + 1
        if stalled >= 3:
            break
    return outcomes


def corruption_case(directory: str, seed: int) -> None:
    """Builds a ring, corrupts it 1-4 times, opens a reader and pops, corrupting again now
    and then (but never truncating a mapped file: that is documented to raise SIGBUS)."""
    rng = random.Random(seed)
    path = Path(directory) / f"ring-{seed}"
    writer, capacity = build_ring(rng, path)
    try:
        context = f"seed {seed}: capacity {capacity}, writer {'open' if writer else 'closed'}"
        for _ in range(rng.randint(1, 4)):
            # A live writer's own close() writes its header: keep the header page while it lives.
            allow_truncate = writer is None
            context += f"; {corrupt(rng, path, capacity, allow_truncate)}"
        try:
            reader = RingReader.open(path)
        except InvalidRing:
            return
        except Exception as e:
            raise AssertionError(f"{context}: open raised {type(e).__name__}: {e}") from e
        with reader:

            def mutate() -> str:
                return corrupt(rng, path, capacity, allow_truncate=False)

            exercise_reader(rng, reader, context, mutate if rng.random() < 0.5 else None)
    finally:
        if writer is not None:
            writer.close()
        path.unlink(missing_ok=True)


def hostile_reader_case(directory: str, seed: int) -> None:
    """A writer whose reader rewrites read_pos (and other fields) with nonsense: push and
    try_push may only succeed, return False, or raise InvalidRing, RingTimeout or PeerDied."""
    rng = random.Random(seed)
    capacity = rng.choice(CAPACITIES)
    path = Path(directory) / f"ring-{seed}"
    writer = RingWriter.create(path, capacity)
    reader: RingReader | None = RingReader.open(path)
    try:
        max_len = writer.max_message_size
        for _ in range(rng.randint(0, 30)):
            writer.try_push(random_message(rng, max_len))
            if rng.random() < 0.5:
                assert reader is not None
                reader.try_pop()
        context = f"seed {seed}: capacity {capacity}"
        if rng.random() < 0.3:
            assert reader is not None
            reader.close()  # the writer may see PeerDied once it has to wait
            reader = None
            context += ", reader closed"
        fd = os.open(path, os.O_RDWR)
        try:
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.7:
                    old = read_u(fd, READ_POS, 8)
                    value = rng.choice(
                        [
                            interesting_value(rng, old, 8, capacity),
                            old + rng.randint(1, 7),
                            (old - 8 * rng.randint(1, capacity // 8 + 2)) % (1 << 64),
                            old + 8 * rng.randint(1, capacity // 8 + 2),
                            rng.getrandbits(64),
                        ]
                    ) % (1 << 64)
                    write_u(fd, READ_POS, 8, value)
                    context += f"; read_pos={value:#x}"
                else:
                    context += f"; {corrupt(rng, path, capacity, allow_truncate=False)}"
        finally:
            os.close(fd)
        for step in range(20):
            message = random_message(rng, max_len)
            op = rng.choice(["try_push", "push0", "push"])
            try:
                if op == "try_push":
                    result = writer.try_push(message)
                    assert result in (True, False), f"{context}: try_push returned {result!r}"
                elif op == "push0":
                    writer.push(message, timeout=0)
                else:
                    writer.push(message, timeout=0.01)
            except (InvalidRing, RingTimeout, PeerDied):
                pass
            except Exception as e:
                raise AssertionError(
                    f"{context}: {op} (call {step}) raised {type(e).__name__}: {e}"
                ) from e
        if reader is not None:
            exercise_reader(rng, reader, context + "; reader after", None)
    finally:
        if reader is not None:
            reader.close()
        writer.close()
        path.unlink(missing_ok=True)


def mutator_main(path: str, seconds: str, seed: str, mode: str) -> int:
    """Child process: keeps flipping random bits of the data area, the record headers in it,
    the positions and now and then the other shared header fields, through its own mapping,
    for `seconds`. "aggressive": as fast as it can, never undone. "transient": a few at a
    time, each undone shortly after, so the ring keeps working between moments of
    corruption."""
    rng = random.Random(int(seed))
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    transient = mode == "transient"
    with mmap.mmap(fd, size) as m:
        os.close(fd)
        print("mutating", flush=True)
        deadline = time.monotonic() + float(seconds)
        data_size = size - DATA_OFFSET
        pending: list[tuple[int, int]] = []
        while time.monotonic() < deadline:
            for _ in range(5 if transient else 200):
                pick = rng.random()
                if pick < 0.5:
                    offset = DATA_OFFSET + rng.randrange(data_size)
                elif pick < 0.7:
                    # a record header: length or kind of whatever sits on an 8-byte boundary
                    offset = DATA_OFFSET + rng.randrange(0, data_size, 8) + rng.randrange(8)
                elif pick < 0.8:
                    offset = WRITE_POS + rng.randrange(8)
                elif pick < 0.9:
                    offset = READ_POS + rng.randrange(8)
                else:
                    offset = rng.choice(HEADER_FIELDS[8:])[1] + rng.randrange(4)
                bit = 1 << rng.randrange(8)
                m[offset] ^= bit
                if transient:
                    pending.append((offset, bit))
                    while len(pending) > rng.randint(0, 3):
                        undo_offset, undo_bit = pending.pop(0)
                        m[undo_offset] ^= undo_bit
            if transient:
                time.sleep(0.0005)
    return 0


def concurrent_case(directory: str, seed: int, seconds: float, mode: str) -> dict[str, int]:
    """A writer and a reader in this process keep pushing and popping while a child process
    rewrites the file under them (mutator_main, `mode`); every call must have an allowed
    outcome. Returns how often each outcome happened."""
    rng = random.Random(seed)
    capacity = rng.choice(CAPACITIES)
    path = Path(directory) / f"ring-{seed}"
    writer = RingWriter.create(path, capacity)
    reader = RingReader.open(path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_fuzz; "
        "sys.exit(test_fuzz.mutator_main(*sys.argv[2:]))"
    )
    mutator = subprocess.Popen(
        [sys.executable, "-c", code, str(TESTS_DIR), str(path), str(seconds), str(seed), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    counts: dict[str, int] = {}
    context = f"seed {seed}: capacity {capacity}, {mode} concurrent mutation"
    try:
        assert mutator.stdout is not None
        assert mutator.stdout.readline() == "mutating\n"
        max_len = writer.max_message_size
        buffer = bytearray(capacity)
        while mutator.poll() is None:
            try:
                pushed = writer.try_push(random_message(rng, max_len))
                assert pushed in (True, False)
            except (InvalidRing, PeerDied):
                pass
            except Exception as e:
                raise AssertionError(f"{context}: try_push raised {type(e).__name__}: {e}") from e
            call = rng.choice(
                [
                    reader.try_pop,
                    lambda: reader.pop(timeout=0.001),
                    lambda: reader.pop_into(buffer, timeout=0),
                ]
            )
            outcome = check_reader_call(reader, call, context)
            counts[outcome] = counts.get(outcome, 0) + 1
        assert mutator.wait(timeout=10) == 0
    finally:
        if mutator.poll() is None:
            mutator.kill()
            mutator.wait(timeout=10)
        if mutator.stdout is not None:
            mutator.stdout.close()
        reader.close()
        writer.close()
        path.unlink(missing_ok=True)
    return counts


# ---- the driver (in a child interpreter) and the tests ----------------------------------------


def driver_main(kind: str, directory: str, seconds: str, seed: str) -> int:
    """Child process: runs cases of `kind` with seeds drawn from `seed` until `seconds` have
    passed, printing "case <seed>" before each so that a crash or hang names its case."""
    master = random.Random(int(seed))
    deadline = time.monotonic() + float(seconds)
    cases = 0
    while True:
        case_seed = master.getrandbits(63)
        if kind == "corruption":
            print("case", case_seed, flush=True)
            corruption_case(directory, case_seed)
        elif kind == "hostile_reader":
            print("case", case_seed, flush=True)
            hostile_reader_case(directory, case_seed)
        else:
            mode = ["transient", "aggressive"][cases % 2]
            print("case", case_seed, mode, flush=True)
            counts = concurrent_case(directory, case_seed, min(1.0, float(seconds)), mode)
            print("outcomes", mode, counts, flush=True)
        cases += 1
        if time.monotonic() >= deadline:
            break
    print("cases", cases, flush=True)
    return 0


def run_driver(kind: str, directory: Path, seconds: float) -> list[str]:
    """Runs driver_main in a child; fails with the case seed and a replay command if the
    child crashed, hung, or found a disallowed outcome."""
    seed = BASE_SEED + ["corruption", "hostile_reader", "concurrent"].index(kind)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_fuzz; "
        "sys.exit(test_fuzz.driver_main(*sys.argv[2:]))"
    )
    argv = [sys.executable, "-c", code, str(TESTS_DIR), kind, str(directory), str(seconds)]
    limit = seconds + 60
    hung = False
    with subprocess.Popen(
        [*argv, str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        try:
            out, err = child.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate(timeout=10)
            hung = True
    lines = out.splitlines()
    if hung or child.returncode != 0:
        last = [line.split() for line in lines if line.startswith("case ")]
        case = last[-1][1] if last else "?"
        function = {"corruption": "corruption_case", "hostile_reader": "hostile_reader_case"}.get(
            kind, "concurrent_case"
        )
        extra = f', 1.0, "{last[-1][2]}"' if function == "concurrent_case" and last else ""
        how = f"hung for {limit} s" if hung else f"exited with {child.returncode}"
        pytest.fail(
            f"fuzz child ({kind}) {how} during case seed {case} "
            f"(IPC_RING_FUZZ_SEED={BASE_SEED}).\nReplay: python -c 'import sys; "
            f'sys.path.insert(0, "tests"); import test_fuzz; '
            f'test_fuzz.{function}("/tmp", {case}{extra})\'\n'
            f"--- stderr ---\n{err[-4000:]}"
        )
    return lines


def test_reader_of_a_corrupted_ring_only_gets_messages_or_documented_errors(
    ring_dir: Path,
) -> None:
    lines = run_driver("corruption", ring_dir, FUZZ_SECONDS * 0.5)
    assert int(lines[-1].split()[1]) > 0


def test_writer_with_a_hostile_reader_only_succeeds_or_raises_documented_errors(
    ring_dir: Path,
) -> None:
    lines = run_driver("hostile_reader", ring_dir, FUZZ_SECONDS * 0.2)
    assert int(lines[-1].split()[1]) > 0


def test_reader_and_writer_survive_another_process_rewriting_the_file_under_them(
    ring_dir: Path,
) -> None:
    lines = run_driver("concurrent", ring_dir, FUZZ_SECONDS * 0.3)
    transient = [line for line in lines if line.startswith("outcomes transient")]
    assert transient, lines
    assert "'message'" in transient[0], f"no message got through: {transient[0]}"
