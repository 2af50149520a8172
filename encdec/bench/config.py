"""Experiment configs: frozen dataclasses loaded from YAML, every value checked.

An experiment file only chooses values; what each value means is the docstring under its field.
:func:`load_experiment` reads a YAML file, applies ``--set a.b=value`` overrides (the value is
parsed as YAML, so ``--set num_slots=[8,16]`` is a list), and builds an :class:`ExperimentConfig`.
An unknown key, a value of the wrong type or out of range is a :class:`ConfigError` naming the
key (``workloads[1].arrival: ...``). The loading itself is :mod:`encdec.experiment_config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from encdec.experiment_config import (
    ConfigError,  # noqa: F401 (re-exported for older imports)
    build,
    plain,
    read_yaml,
)
from encdec.experiment_config import require as _require

SYSTEMS = (
    "encdec-inflight",
    "encdec-static",
    "encdec-inflight-int8",
    "encdec-static-int8",
    "encdec-inflight-int8-f32kv",
    "hf-generate",
    "ctranslate2",
    "ctranslate2-int8",
)
PROFILES = ("translation", "summarization", "mixed")


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts."""

    kind: Literal["fixed", "uniform", "loguniform"] = "fixed"
    """``fixed`` (always ``value``), ``uniform`` or ``loguniform`` over ``[low, high]``."""
    value: int = 32
    """The length when ``kind`` is ``fixed``."""
    low: int = 1
    """Smallest length (inclusive) for ``uniform`` / ``loguniform``."""
    high: int = 64
    """Largest length (inclusive) for ``uniform`` / ``loguniform``."""

    def __post_init__(self):
        _require(self.value >= 1, "value", f"must be >= 1, got {self.value}")
        _require(self.low >= 1, "low", f"must be >= 1, got {self.low}")
        _require(self.high >= self.low, "high", f"must be >= low ({self.low}), got {self.high}")

    @property
    def max(self) -> int:
        return self.value if self.kind == "fixed" else self.high


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """A seeded synthetic request trace."""

    name: str
    """Label used in results and plots."""
    num_requests: int = 64
    """Requests in the trace."""
    profile: Literal["translation", "summarization", "mixed"] | None = None
    """Named input/output length profile; ``input_len`` / ``output_len`` given here override it."""
    input_len: LengthDist | None = None
    """Input (encoder) length distribution; required without a ``profile``."""
    output_len: LengthDist | None = None
    """Exact output length distribution (EOS banned until it is reached); required without a ``profile``."""
    arrival: Literal["all-at-once", "poisson"] = "all-at-once"
    """Every request at t=0, or a Poisson process of ``rate`` requests per second."""
    rate: float = 10.0
    """Mean arrivals per second for ``poisson``."""
    seed: int = 0
    """Seed of lengths, token ids and arrival times."""
    num_beams: int = 1
    """Beam search width for every system (1: greedy). Static baselines batch ``num_slots``
    requests (``num_slots x num_beams`` hypotheses, as CTranslate2's ``max_batch_size`` counts),
    and the engine gets ``num_slots x num_beams`` slots: every system holds as many sequences."""

    def __post_init__(self):
        _require(self.num_requests >= 1, "num_requests", f"must be >= 1, got {self.num_requests}")
        _require(self.num_beams >= 1, "num_beams", f"must be >= 1, got {self.num_beams}")
        _require(self.rate > 0, "rate", f"must be > 0, got {self.rate}")
        if self.profile is None:
            _require(self.input_len is not None, "input_len", "is required when no profile is given")
            _require(self.output_len is not None, "output_len", "is required when no profile is given")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model: a named shape with seeded random weights, or a local HF checkpoint."""

    shape: str | None = None
    """A name from :data:`encdec.bench.shapes.SHAPES` (``t5-small``, ``bart-large``, ...)."""
    path: str | None = None
    """A local Hugging Face checkpoint directory (``config.json`` + safetensors or
    ``pytorch_model.bin``, and a tokenizer for CTranslate2) instead of a shape."""
    dtype: Literal["float32", "bfloat16", "int8"] = "float32"
    """Weights and activations for every system (CTranslate2's ``compute_type``); ``int8``: int8
    weights with float32 activations (the reference stays float32; no ``hf-generate``)."""
    seed: int = 0
    """Seed of a shape's random weights; the checkpoint is cached per shape and seed."""

    def __post_init__(self):
        from encdec.bench.shapes import SHAPES

        _require((self.shape is None) != (self.path is None), "shape", "give exactly one of shape and path")
        if self.shape is not None:
            known = ", ".join(SHAPES)
            _require(self.shape in SHAPES, "shape", f"unknown shape {self.shape!r}; known: {known}")
        else:
            where = Path(self.path).expanduser()
            _require(where.is_dir(), "path", f"{self.path} is not a directory")
            _require((where / "config.json").exists(), "path", f"{self.path} has no config.json")

    @property
    def label(self) -> str:
        """Name in results: the shape or the checkpoint folder, with dtype and seed when not default."""
        label = self.shape if self.shape is not None else Path(self.path).expanduser().resolve().name
        label = label if self.dtype == "float32" else f"{label}@{self.dtype}"
        return label if self.seed == 0 or self.path is not None else f"{label}#seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class EngineSection:
    """Options of the encdec engine (both modes)."""

    page_size: int = 16
    """Tokens per KV page."""
    max_encoder_len: int = 0
    """Longest input the engine accepts; 0 = the trace's longest input."""
    max_new_tokens: int = 0
    """Longest output the engine accepts; 0 = the trace's longest output."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Further ``EngineConfig`` fields, passed through unchanged."""

    def __post_init__(self):
        _require(self.page_size >= 1, "page_size", f"must be >= 1, got {self.page_size}")
        _require(self.max_encoder_len >= 0, "max_encoder_len", f"must be >= 0, got {self.max_encoder_len}")
        _require(self.max_new_tokens >= 0, "max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class BaselineSection:
    """Where a baseline (HF transformers, CTranslate2) runs."""

    device: Literal["cpu", "cuda"] = "cpu"
    """Device of the baseline."""
    threads: int = 0
    """CPU threads (torch threads, CTranslate2 ``intra_threads``); 0 = every core. On a machine
    shared with other jobs, torch with every core can be several times slower than with one."""

    def __post_init__(self):
        _require(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Models x workloads x slot counts x systems, measured the same way."""

    name: str
    """Experiment name; results go to ``results/<name>`` unless ``--out`` says otherwise."""
    models: tuple[ModelSpec, ...]
    """Models to run."""
    workloads: tuple[WorkloadConfig, ...]
    """Request traces to run on every model."""
    systems: tuple[Literal[SYSTEMS], ...] = ("encdec-inflight", "encdec-static", "hf-generate")
    """Systems to compare: engine modes, HF ``generate``, CTranslate2 (float32 or int8)."""
    num_slots: tuple[int, ...] = (8,)
    """Concurrent sequences: engine slots, HF batch size, CTranslate2 ``max_batch_size``; a list sweeps."""
    description: str = ""
    """Free text copied into results.json."""
    engine: EngineSection = EngineSection()
    """encdec engine options."""
    hf: BaselineSection = BaselineSection()
    """HF transformers options."""
    ctranslate2: BaselineSection = BaselineSection()
    """CTranslate2 options."""
    warmup: Literal["trace", "short", "none"] = "trace"
    """Untimed run first: the whole trace, the whole trace with outputs capped at 4 tokens, or none."""
    repeats: int = 1
    """Timed runs per system; the run with the median throughput is reported."""
    check_outputs: bool = True
    """Compare every system's tokens with ``reference_generate`` (computed once per model x workload)."""
    tie_checks: int = 32
    """Diverging requests per run whose first divergence is checked for a numerical tie (0: none)."""
    reference_batch: int = 16
    """Requests per ``reference_generate`` batch, grouped by output length. On CPU a step costs
    about rows x steps, so small batches waste less on padding; on GPU make it large (fewer compiles)."""
    cache_dir: str | None = None
    """Where shape checkpoints are cached; default ``$ENCDEC_CACHE/shapes`` or ``~/.cache/encdec/shapes``."""
    bandwidth_probe_mib: int = 256
    """MiB the memory-bandwidth probe reads (at the start, and beside each row's decode step): well
    past the L3 share a process gets here, where reads under ~100 MiB ran up to 1.6x faster."""

    def __post_init__(self):
        _require(len(self.models) > 0, "models", "needs at least one model")
        _require(len(self.workloads) > 0, "workloads", "needs at least one workload")
        _require(len(self.systems) > 0, "systems", "needs at least one system")
        _require(len(set(self.systems)) == len(self.systems), "systems", f"repeats a system: {self.systems}")
        names = [w.name for w in self.workloads]
        _require(len(set(names)) == len(names), "workloads", f"workload names must be unique: {names}")
        for i, n in enumerate(self.num_slots):
            _require(n >= 1, f"num_slots[{i}]", f"must be >= 1, got {n}")
        _require(self.repeats >= 1, "repeats", f"must be >= 1, got {self.repeats}")
        _require(self.tie_checks >= 0, "tie_checks", f"must be >= 0, got {self.tie_checks}")
        _require(self.reference_batch >= 1, "reference_batch", f"must be >= 1, got {self.reference_batch}")
        mib = self.bandwidth_probe_mib
        _require(mib >= 1, "bandwidth_probe_mib", f"must be >= 1, got {mib}")

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


def load_experiment_dict(data: dict[str, Any], overrides: Sequence[str] = ()) -> ExperimentConfig:
    return build(ExperimentConfig, data, overrides)


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML file and apply ``--set`` overrides."""
    data = read_yaml(path)
    data.setdefault("name", Path(path).stem)
    return build(ExperimentConfig, data, overrides)
