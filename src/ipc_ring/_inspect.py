"""`ipc-ring inspect`: the header of a ring file, read-only.

The file is opened O_RDONLY and its header page mapped PROT_READ, so inspecting
never changes a ring, and works while both sides run. Field names and offsets are
those of docs/FORMAT.md; the liveness of each role is the test of its lock
(F_OFD_GETLK on Linux, F_GETLK elsewhere), as the library's own test.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import sys
from typing import Final

from ._core import DATA_OFFSET, FORMAT_VERSION, MAX_CAPACITY, MIN_CAPACITY, InvalidRing

MAGIC: Final = 0x474E495243504921
HEADER_SIZE: Final = 4096

# (name, offset, struct format) in FORMAT.md order; all little-endian.
FIELDS: Final[tuple[tuple[str, int, str], ...]] = (
    ("magic", 0, "<Q"),
    ("version", 8, "<I"),
    ("ready", 12, "<I"),
    ("capacity", 16, "<Q"),
    ("data_offset", 24, "<Q"),
    ("max_message_size", 32, "<Q"),
    ("write_pos", 128, "<Q"),
    ("read_pos", 256, "<Q"),
    ("reader_waiting", 384, "<I"),
    ("data_seq", 388, "<I"),
    ("reader_attached", 392, "<I"),
    ("writer_waiting", 512, "<I"),
    ("space_seq", 516, "<I"),
    ("writer_closed", 520, "<I"),
)
# Statistics counters (relaxed u64s); zero in files written before they existed.
COUNTERS: Final[tuple[tuple[str, int], ...]] = (
    ("messages_pushed", 136),
    ("bytes_pushed", 144),
    ("messages_popped", 264),
    ("bytes_popped", 272),
    ("reader_empty_waits", 400),
    ("writer_full_waits", 528),
    ("high_water", 536),
)
# The role locks of FORMAT.md "Liveness and roles": (offset, length).
WRITER_LOCK: Final = (128, 8)
READER_LOCK: Final = (256, 8)


def _flock_struct() -> tuple[str, int]:
    """The platform's struct flock layout and the GETLK command to use."""
    if sys.platform.startswith("linux"):
        # short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
        return "@hhqqi", getattr(fcntl, "F_OFD_GETLK", fcntl.F_GETLK)
    # BSD and macOS: off_t l_start, off_t l_len, pid_t l_pid, short l_type, short l_whence
    return "@qqihh", fcntl.F_GETLK


def _lock_held(fd: int, offset: int, length: int) -> bool:
    """Whether another open file description (another process) holds a lock on the
    range. A read-lock probe conflicts with the holder's write lock and is allowed on
    a descriptor open only for reading."""
    layout, command = _flock_struct()
    if layout.startswith("@hh"):
        probe = struct.pack(layout, fcntl.F_RDLCK, os.SEEK_SET, offset, length, 0)
    else:
        probe = struct.pack(layout, offset, length, 0, fcntl.F_RDLCK, os.SEEK_SET)
    buf = probe + bytes(8)  # room for any trailing padding of the C struct
    result = fcntl.fcntl(fd, command, buf)
    fields = struct.unpack_from(layout, result)
    lock_type = fields[0] if layout.startswith("@hh") else fields[3]
    return bool(lock_type != fcntl.F_UNLCK)


def _validate(path: str, values: dict[str, int], file_size: int) -> None:
    if values["magic"] != MAGIC:
        raise InvalidRing(f"{path!r} is not a ring file (magic {values['magic']:#018x})")
    if values["version"] != FORMAT_VERSION:
        raise InvalidRing(
            f"{path!r} has format version {values['version']}, this library reads "
            f"version {FORMAT_VERSION}"
        )
    capacity = values["capacity"]
    if not (MIN_CAPACITY <= capacity <= MAX_CAPACITY) or capacity & (capacity - 1):
        raise InvalidRing(f"{path!r} has an invalid capacity {capacity}")
    if values["data_offset"] != DATA_OFFSET:
        raise InvalidRing(f"{path!r} has data_offset={values['data_offset']}, not {DATA_OFFSET}")
    if values["max_message_size"] != capacity - 8:
        raise InvalidRing(
            f"{path!r} has max_message_size={values['max_message_size']}, not capacity - 8"
        )
    if file_size < DATA_OFFSET + capacity:
        raise InvalidRing(
            f"{path!r} is {file_size} bytes, shorter than data_offset + capacity = "
            f"{DATA_OFFSET + capacity}"
        )
    used = (values["write_pos"] - values["read_pos"]) % (1 << 64)
    if used > capacity:
        raise InvalidRing(
            f"{path!r} has inconsistent positions: write_pos={values['write_pos']}, "
            f"read_pos={values['read_pos']}"
        )


def inspect_ring(path: str) -> dict[str, int | float | bool]:
    """Every header field by its FORMAT.md name, the statistics counters, the
    derived fill figures and the liveness of both roles. InvalidRing if the file is
    not a valid ring; OSError if it cannot be opened."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError as e:
        raise InvalidRing(f"{path!r} is a directory, not a ring file") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRing(f"{path!r} is not a regular file")
        if info.st_size < HEADER_SIZE:
            raise InvalidRing(f"{path!r} is {info.st_size} bytes, too short for a ring header")
        with mmap.mmap(fd, HEADER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as header:
            values = {name: struct.unpack_from(fmt, header, off)[0] for name, off, fmt in FIELDS}
            counters = {name: struct.unpack_from("<Q", header, off)[0] for name, off in COUNTERS}
        _validate(path, values, info.st_size)
        try:
            writer_alive = _lock_held(fd, *WRITER_LOCK)
            reader_alive = _lock_held(fd, *READER_LOCK)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EBADF):
                raise
            raise InvalidRing(f"{path!r}: cannot test the role locks ({e})") from e
    finally:
        os.close(fd)
    capacity = values["capacity"]
    used = (values["write_pos"] - values["read_pos"]) % (1 << 64)
    result: dict[str, int | float | bool] = dict(values)
    result.update(
        used_bytes=used,
        free_bytes=capacity - used,
        fill_percent=round(100.0 * used / capacity, 2),
        writer_alive=writer_alive,
        reader_alive=reader_alive,
        closed=bool(values["writer_closed"]),
    )
    result.update(counters)
    return result


def format_human(path: str, fields: dict[str, int | float | bool]) -> str:
    width = max(map(len, fields))
    lines = [f"{'path':<{width}}: {path}"]
    for name, value in fields.items():
        shown = f"{value:#018x}" if name == "magic" else str(value).lower()
        if isinstance(value, bool):
            shown = "yes" if value else "no"
        lines.append(f"{name:<{width}}: {shown}")
    return "\n".join(lines)
