"""Build the one C extension, ipc_ring._core (metadata lives in pyproject.toml).

IPC_RING_DEBUG=1     -O0 -g, assertions on
IPC_RING_SANITIZE=1  -fsanitize=address,undefined (run with LD_PRELOAD=libasan.so)
"""

import os
import sys

from setuptools import Extension, setup

flags = [
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Wshadow",
    "-Wconversion",
    "-Wno-missing-field-initializers",
]
link_flags: list[str] = []
if os.environ.get("IPC_RING_DEBUG"):
    flags += ["-O0", "-g3", "-UNDEBUG"]
else:
    flags += ["-O2"]
if os.environ.get("IPC_RING_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
    flags += [*san, "-g"]
    link_flags += san

core = Extension(
    "ipc_ring._core",
    sources=["src/ipc_ring/_core.c", "src/ipc_ring/_handle.c", "src/ipc_ring/_ring.c"],
    depends=["src/ipc_ring/_ring.h", "src/ipc_ring/_handle.h"],
    extra_compile_args=flags if sys.platform != "win32" else [],
    extra_link_args=link_flags,
)

setup(ext_modules=[core])
