"""Every script in examples/ runs to completion with exit status 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs_and_exits_0(script: str) -> None:
    if script == "numpy_arrays.py":
        pytest.importorskip("numpy")
    args = [sys.executable, str(EXAMPLES / script)]
    if script == "json_lines.py":
        args.append("20000")
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
