"""Compile a C++ XLA FFI kernel once per machine and register its handlers with XLA:CPU.

A library is built on first use with the system C++ compiler (``$CXX``, else ``g++``) against
jaxlib's FFI headers, and cached under ``$ENCDEC_KERNEL_CACHE`` (default
``~/.cache/encdec/kernels``) by a hash of its sources, the flags and the jaxlib version, so a
new jaxlib or an edited kernel rebuilds. Without a compiler or the instructions a kernel needs,
:meth:`CpuKernel.register` says why and callers keep their XLA reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jax
import jaxlib

ROOT = Path(__file__).parent
# Headers every kernel may include (``#include "cpu_parallel.h"``): part of each library's hash.
HEADERS = (ROOT / "cpu_parallel.h", ROOT / "cpu_math.h")
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")


@dataclass(frozen=True)
class CpuKernel:
    """One kernel library: ``name`` (its cache file's stem), its source, the ``-m`` flags it is
    compiled with and the /proc/cpuinfo flags those need, and ``targets``: FFI target name ->
    the handler symbol the source exports."""

    name: str
    source: Path
    isa_flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]
    targets: tuple[tuple[str, str], ...]
    fallback: str = "the XLA reference"

    @property
    def flags(self) -> tuple[str, ...]:
        return BASE_FLAGS + self.isa_flags

    def cpu_missing(self) -> list[str]:
        """The instruction sets the kernel needs that this CPU lacks (all of them off x86 Linux)."""
        if platform.machine() not in ("x86_64", "AMD64"):
            return list(self.cpu_flags)
        have = cpu_flags()
        return [f for f in self.cpu_flags if f not in have]

    def library_path(self) -> Path:
        digest = hashlib.sha256(self.source.read_bytes())
        for header in HEADERS:
            digest.update(header.read_bytes())
        digest.update(" ".join(self.flags).encode() + jaxlib.__version__.encode())
        root = Path(os.environ.get("ENCDEC_KERNEL_CACHE", Path.home() / ".cache" / "encdec" / "kernels"))
        return root / f"{self.name}-{digest.hexdigest()[:16]}.so"

    def build(self) -> Path:
        """The compiled library, building it if the cache has none; raises ``RuntimeError`` with
        the compiler's message when it cannot."""
        path = self.library_path()
        if path.exists():
            return path
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if not compiler:
            raise RuntimeError("no C++ compiler (set CXX or install g++)")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several processes may build at once: each writes its own file and renames it into place.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        cmd = [compiler, *self.flags, f"-I{jax.ffi.include_dir()}", f"-I{ROOT}", str(self.source), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            os.unlink(tmp)
            why = done.stderr[-2000:]
            raise RuntimeError(f"building the {self.name} kernel failed:\n{' '.join(cmd)}\n{why}")
        os.replace(tmp, path)
        return path

    def register(self) -> str | None:
        """Registers the kernel's targets with XLA:CPU (once per process); returns ``None`` when
        they are ready, else why they are not (also warned once)."""
        return _register(self)


def unpartitioned() -> bool:
    """Whether the current trace runs on one device's whole arrays: no mesh, or every axis
    XLA would partition (not manual, under ``shard_map``) of size 1. XLA's partitioner cannot
    split a custom call: it would gather every operand to each device first."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    return all(
        size == 1 or kind == jax.sharding.AxisType.Manual
        for size, kind in zip(mesh.axis_sizes, mesh.axis_types, strict=True)
    )


@cache
def _register(kernel: CpuKernel) -> str | None:
    missing = kernel.cpu_missing()
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    try:
        library = ctypes.cdll.LoadLibrary(str(kernel.build()))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"{kernel.name} CPU kernel unavailable, using {kernel.fallback}: {e}", stacklevel=3)
        return str(e)
    for target, symbol in kernel.targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


@cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (none where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "flags:")
    return frozenset(line.split(":", 1)[1].split())
