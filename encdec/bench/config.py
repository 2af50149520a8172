"""Experiment configs: frozen dataclasses loaded from YAML, every value checked.

An experiment file only chooses values; what each value means is the docstring under its field.
:func:`load_experiment` reads a YAML file, applies ``--set a.b=value`` overrides (the value is
parsed as YAML, so ``--set num_slots=[8,16]`` is a list), and builds an :class:`ExperimentConfig`.
An unknown key, a value of the wrong type or out of range is a :class:`ConfigError` naming the
key (``workloads[1].arrival: ...``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

SYSTEMS = ("encdec-inflight", "encdec-static", "hf-generate", "ctranslate2", "ctranslate2-int8")
PROFILES = ("translation", "summarization", "mixed")


class ConfigError(ValueError):
    """An experiment config is invalid; the message starts with the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


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

    def __post_init__(self):
        _require(self.num_requests >= 1, "num_requests", f"must be >= 1, got {self.num_requests}")
        _require(self.rate > 0, "rate", f"must be > 0, got {self.rate}")
        if self.profile is None:
            _require(self.input_len is not None, "input_len", "is required when no profile is given")
            _require(self.output_len is not None, "output_len", "is required when no profile is given")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model: a named shape with seeded random weights."""

    shape: str
    """A name from :data:`encdec.bench.shapes.SHAPES` (``t5-small``, ``bart-large``, ...)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights and activations for every system (CTranslate2's ``compute_type``)."""
    seed: int = 0
    """Seed of the random weights; the checkpoint is cached per shape and seed."""

    def __post_init__(self):
        from encdec.bench.shapes import SHAPES

        _require(self.shape in SHAPES, "shape", f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")


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

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


def plain(x: Any) -> Any:
    """Tuples to lists, recursively: what YAML and JSON hold."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


# --- building dataclasses from plain data -------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        _require(value is not None, key, f"must be {_type_name(inner)}, got null")
        return _convert(inner, value, key)
    if origin is Literal:
        choices = args[0] if len(args) == 1 and isinstance(args[0], tuple) else args
        _require(value in choices, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        _require(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _require(ok, key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and each class's own rules."""
    where = key or "config"
    _require(isinstance(data, dict), where, f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        sub = f"{key}.{unknown[0]}" if key else str(unknown[0])
        raise ConfigError(sub, f"unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, "is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a class's own rule: its key is relative to the class
        if not key:
            raise
        raise ConfigError(f"{key}.{e.key}" if e.key else key, e.message) from None


# --- overrides and loading ----------------------------------------------------------------------


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` to raw config data in place.

    The value is YAML. A numeric part indexes a list (``workloads.0.rate=2``); any other part
    applied to a list sets it in every element (``workloads.num_requests=8``).
    """
    if "=" not in assignment:
        raise ConfigError(assignment, "an override must look like key=value")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    _require(all(parts), path, "empty key in override")
    value = yaml.safe_load(raw) if raw.strip() else ""
    _set(data, parts, value, "")


def _set(node: Any, parts: list[str], value: Any, prefix: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if head.lstrip("-").isdigit():
            i = int(head)
            ok = -len(node) <= i < len(node)
            _require(ok, f"{prefix}[{head}]", f"index out of range ({len(node)} items)")
            if rest:
                _set(node[i], rest, value, f"{prefix}[{i}]")
            else:
                node[i] = value
        else:
            for i, item in enumerate(node):
                _set(item, parts, value, f"{prefix}[{i}]")
        return
    key = f"{prefix}.{head}" if prefix else head
    _require(isinstance(node, dict), prefix or key, f"cannot set {head!r} inside {node!r}")
    if not rest:
        node[head] = value
        return
    if head not in node or node[head] is None:
        node[head] = {}
    _set(node[head], rest, value, key)


def load_experiment_dict(data: dict[str, Any], overrides: Sequence[str] = ()) -> ExperimentConfig:
    data = plain(data or {})
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(ExperimentConfig, data)


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML file and apply ``--set`` overrides."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"experiment file {path} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError("", f"{path} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    _require(isinstance(data, dict), str(path), "must be a mapping at the top level")
    data.setdefault("name", path.stem)
    return load_experiment_dict(data, overrides)
