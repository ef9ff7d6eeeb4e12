"""`ipc-ring inspect`: the header of a ring file, read-only.

The C core does the reading (``_core.inspect``): the file is opened O_RDONLY and
its header page mapped PROT_READ, so inspecting never changes a ring and works
while both sides run; every field comes under its docs/FORMAT.md name, validated
as ``RingReader.open`` validates it, and the liveness of each role is the same
test of its lock that the library makes. This module only adds the fill level
and formats the result.
"""

from __future__ import annotations

from . import _core


def inspect_ring(path: str) -> dict[str, int | float | bool]:
    """Every header field by its FORMAT.md name, then the fill figures and the
    liveness of both roles. InvalidRing if the file is not a valid ring; OSError
    if it cannot be opened."""
    fields: dict[str, int | float | bool] = dict(_core.inspect(path))
    used, capacity = int(fields["used_bytes"]), int(fields["capacity"])
    fields["fill_percent"] = round(100.0 * used / capacity, 2)
    return fields


def format_human(path: str, fields: dict[str, int | float | bool]) -> str:
    width = max(map(len, fields))
    lines = [f"{'path':<{width}}: {path}"]
    for name, value in fields.items():
        shown = f"{value:#018x}" if name == "magic" else str(value).lower()
        if isinstance(value, bool):
            shown = "yes" if value else "no"
        lines.append(f"{name:<{width}}: {shown}")
    return "\n".join(lines)
