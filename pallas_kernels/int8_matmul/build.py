"""Compile ``cpu_kernel.cc`` once per machine and register it with XLA.

The library is built on first use with the system C++ compiler (``$CXX``, else ``g++``)
against jaxlib's FFI headers, and cached under ``$ENCDEC_KERNEL_CACHE`` (default
``~/.cache/encdec/kernels``) by a hash of the source, the flags and the jaxlib version, so a
new jaxlib or an edited kernel rebuilds. Building needs a compiler and running needs AVX-512
VNNI; without either, :func:`register` says why and callers keep the XLA reference.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import jax
import jaxlib

TARGET = "encdec_int8_matmul"
SOURCE = Path(__file__).with_name("cpu_kernel.cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
FLAGS += ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def cpu_missing() -> list[str]:
    """The instruction sets the kernel needs that this CPU lacks (all of them off x86 Linux)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return list(CPU_FLAGS)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return list(CPU_FLAGS)
    lines = text.splitlines()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f not in flags]


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + jaxlib.__version__.encode())
    root = Path(os.environ.get("ENCDEC_KERNEL_CACHE", Path.home() / ".cache" / "encdec" / "kernels"))
    return root / f"int8_matmul-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """The compiled library, building it if the cache has none; raises ``RuntimeError`` with the
    compiler's message when it cannot."""
    path = library_path()
    if path.exists():
        return path
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may build at once: each writes its own file and renames it into place.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"building the int8 kernel failed:\n{' '.join(cmd)}\n{done.stderr[-2000:]}")
    os.replace(tmp, path)
    return path


@cache
def register() -> str | None:
    """Registers the kernel as the CPU FFI target ``encdec_int8_matmul``; returns ``None`` when
    it is ready, else why it is not (also warned once)."""
    missing = cpu_missing()
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"int8 CPU kernel unavailable, using XLA's int8 dot: {e}", stacklevel=2)
        return str(e)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.EncdecInt8Matmul), platform="cpu")
    return None

