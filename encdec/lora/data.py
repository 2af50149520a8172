"""Seq2seq examples for fine-tuning: files, a synthetic task, fixed-shape padded batches.

An example is a pair of token-id lists ``(source, target)``. The target is what the decoder must
produce, ending with EOS; the decoder reads ``[start] + target[:-1]`` (teacher forcing).
Batches always have the same shapes (``max_source_len``, ``max_target_len``, batch size), so the
training step compiles once.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encdec.config import ModelConfig

Example = tuple[list[int], list[int]]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are padded."""

    task: str = "reverse"
    """``reverse`` (synthetic: output the source ids reversed) or ``files`` (``train_file``/``eval_file``)."""
    train_file: str | None = None
    """JSONL (``{"source": ..., "target": ...}`` per line) or CSV (``source,target`` header); values are
    text (needs the model's tokenizer) or token-id lists (JSON lists, or space-separated ids in CSV)."""
    eval_file: str | None = None
    """Held-out examples in the same format; with ``task: reverse`` a disjoint split is generated."""
    num_train: int = 2048
    """Synthetic training examples."""
    num_eval: int = 64
    """Synthetic held-out examples (never seen in training)."""
    min_len: int = 3
    """Shortest synthetic sequence (before EOS)."""
    max_len: int = 6
    """Longest synthetic sequence (before EOS)."""
    token_low: int = 3
    """Smallest token id the synthetic task uses (keep clear of pad/EOS/start ids)."""
    token_high: int = 13
    """One past the largest token id the synthetic task uses."""
    max_source_len: int = 8
    """Source positions per batch row; longer examples are an error."""
    max_target_len: int = 8
    """Target positions per batch row (including EOS); longer examples are an error."""
    seed: int = 0
    """Seed of the synthetic task and of the shuffling."""

    def __post_init__(self):
        if self.task not in ("reverse", "files"):
            raise ValueError(f"task: must be 'reverse' or 'files', got {self.task!r}")
        if self.task == "files" and not self.train_file:
            raise ValueError("train_file: required when task is 'files'")
        for name in ("num_train", "num_eval", "min_len", "max_len", "max_source_len", "max_target_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len: {self.min_len} is above max_len {self.max_len}")
        if not 0 <= self.token_low < self.token_high:
            raise ValueError(f"token_high: must be above token_low={self.token_low}, got {self.token_high}")


def reverse_task(
    num_examples: int, *, min_len: int, max_len: int, low: int, high: int, eos: int, seed: int
) -> list[Example]:
    """Distinct random sequences of ids in ``[low, high)``; the target is the source reversed.

    Both sides end with EOS. Raises when there are not ``num_examples`` distinct sequences.
    """
    if eos in range(low, high):
        raise ValueError(f"EOS id {eos} lies inside the task's token range [{low}, {high})")
    possible = sum((high - low) ** n for n in range(min_len, max_len + 1))
    if num_examples > possible:
        raise ValueError(f"only {possible} distinct sequences exist; asked for {num_examples}")
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    out: list[Example] = []
    while len(out) < num_examples:
        n = int(rng.integers(min_len, max_len + 1))
        seq = tuple(int(t) for t in rng.integers(low, high, n))
        if seq in seen:
            continue
        seen.add(seq)
        out.append(([*seq, eos], [*reversed(seq), eos]))
    return out


def _as_ids(value: Any, tokenizer, *, target: bool, where: str) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(f"{where}: text needs the model's tokenizer, and this model has none")
        enc = tokenizer(text_target=value) if target else tokenizer(value)
        return list(enc["input_ids"])
    if isinstance(value, (list, tuple)) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        return [int(t) for t in value]
    raise ValueError(f"{where}: expected text or a list of token ids, got {type(value).__name__}")


def _ensure_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else [*ids, eos]


def load_examples(path: str | Path, cfg: ModelConfig, tokenizer=None) -> list[Example]:
    """Read a JSONL or CSV file of ``(source, target)`` pairs into token ids.

    Text goes through the tokenizer (``text_target=`` for targets); id lists are used as given,
    except that EOS is appended to a target that lacks it (so the model learns to stop).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows: list[tuple[Any, Any, str]] = []
    if path.suffix in (".jsonl", ".json"):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
                if not isinstance(row, dict) or "source" not in row or "target" not in row:
                    raise ValueError(f"{path}:{n}: expected an object with 'source' and 'target'")
                rows.append((row["source"], row["target"], f"{path}:{n}"))
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"source", "target"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: the CSV header must name 'source' and 'target' columns")
            for n, row in enumerate(reader, 2):
                rows.append(
                    (
                        _csv_value(row["source"], tokenizer),
                        _csv_value(row["target"], tokenizer),
                        f"{path}:{n}",
                    )
                )
    else:
        raise ValueError(f"{path}: unknown data format {path.suffix!r} (use .jsonl or .csv)")
    examples = []
    for source, target, where in rows:
        src = _as_ids(source, tokenizer, target=False, where=where)
        tgt = _as_ids(target, tokenizer, target=True, where=where)
        if not src or not tgt:
            raise ValueError(f"{where}: empty source or target")
        examples.append((src, _ensure_eos(tgt, cfg.eos_token_id)))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _csv_value(value: str, tokenizer) -> Any:
    """CSV cells are text when there is a tokenizer, else space-separated ids."""
    if tokenizer is not None:
        return value
    try:
        return [int(t) for t in value.split()]
    except ValueError:
        return value


def make_batch(
    examples: Sequence[Example], cfg: ModelConfig, source_len: int, target_len: int
) -> dict[str, np.ndarray]:
    """Pad to fixed shapes: ``source_ids``/``source_mask`` ``[B, S]``; ``decoder_ids``, ``labels`` and
    ``label_mask`` ``[B, T]`` (the decoder reads ``[start] + target[:-1]``)."""
    B = len(examples)
    source = np.full((B, source_len), cfg.pad_token_id, np.int32)
    source_mask = np.zeros((B, source_len), bool)
    decoder = np.full((B, target_len), cfg.pad_token_id, np.int32)
    labels = np.full((B, target_len), cfg.pad_token_id, np.int32)
    label_mask = np.zeros((B, target_len), bool)
    for i, (src, tgt) in enumerate(examples):
        if len(src) > source_len:
            raise ValueError(f"example {i} has {len(src)} source tokens; max_source_len is {source_len}")
        if len(tgt) > target_len:
            raise ValueError(f"example {i} has {len(tgt)} target tokens; max_target_len is {target_len}")
        source[i, : len(src)] = src
        source_mask[i, : len(src)] = True
        labels[i, : len(tgt)] = tgt
        label_mask[i, : len(tgt)] = True
        decoder[i, 0] = cfg.decoder_start_token_id
        decoder[i, 1 : len(tgt)] = tgt[:-1]
    return {
        "source_ids": source,
        "source_mask": source_mask,
        "decoder_ids": decoder,
        "labels": labels,
        "label_mask": label_mask,
    }


def batch_indices(num_examples: int, step: int, batch_size: int, accum: int, seed: int) -> np.ndarray:
    """Example indices ``[accum, batch_size]`` for optimizer step ``step``: a pure function of it.

    Examples are read epoch by epoch, each epoch a fresh permutation seeded by ``(seed, epoch)``,
    so resuming at step ``k`` sees exactly the batches an uninterrupted run sees.
    """
    start = step * accum * batch_size
    flat = np.arange(start, start + accum * batch_size)
    epochs, offsets = np.divmod(flat, num_examples)
    out = np.empty_like(flat)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out.reshape(accum, batch_size)


def train_batch(
    examples: Sequence[Example], cfg: ModelConfig, data: DataConfig, step: int, batch_size: int, accum: int
) -> dict[str, np.ndarray]:
    """The stacked micro-batches ``[accum, B, ...]`` of one optimizer step."""
    idx = batch_indices(len(examples), step, batch_size, accum, data.seed)
    micro = [
        make_batch([examples[i] for i in row], cfg, data.max_source_len, data.max_target_len) for row in idx
    ]
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def load_splits(data: DataConfig, cfg: ModelConfig, tokenizer=None) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)`` examples as the config describes."""
    if data.task == "reverse":
        if data.token_high > cfg.vocab_size:
            raise ValueError(f"data.token_high: {data.token_high} exceeds the vocabulary ({cfg.vocab_size})")
        special = {cfg.eos_token_id, cfg.pad_token_id, cfg.decoder_start_token_id}
        if special & set(range(data.token_low, data.token_high)):
            raise ValueError(
                f"data.token_low: ids [{data.token_low}, {data.token_high}) include the special ids {special}"
            )
        every = reverse_task(
            data.num_train + data.num_eval,
            min_len=data.min_len,
            max_len=data.max_len,
            low=data.token_low,
            high=data.token_high,
            eos=cfg.eos_token_id,
            seed=data.seed,
        )
        return every[: data.num_train], every[data.num_train :]
    train = load_examples(data.train_file, cfg, tokenizer)
    held = load_examples(data.eval_file, cfg, tokenizer) if data.eval_file else []
    return train, held
