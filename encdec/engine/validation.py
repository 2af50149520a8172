"""Field rules, declared once beside each field and checked in the dtype the device will use.

A rule is attached to a dataclass field with :func:`rule` (``dataclasses.field(metadata=...)``);
:func:`check_fields` runs every rule of an object and returns the normalized values: Python
``int``/``float``/``tuple`` that fit int32 / float32, or the error naming the field and value.
``Request`` (checked at the engine's door) and ``EngineConfig`` (checked at construction) use
the same rules, so a value the device cannot hold never reaches a slot.

Integers accept any ``numbers.Integral`` but ``bool`` (numpy integers included) and never a
float, even ``4.0``: a float that happens to be whole is as likely a unit mistake as not.
Floats accept any real but ``bool``; they must be finite as float32, and a positive value that
float32 rounds to zero (``1e-50``) is refused rather than served as zero.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
"""The smallest normal float32: XLA:CPU flushes smaller (subnormal) values to zero."""


class FieldError(ValueError):
    """A value a rule refuses; ``field`` names it, ``str()`` is the whole message."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field} {message}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FieldError(field, f"must be an integer, got {_show(value)} ({type(value).__name__})")
    value = int(value)
    if not low <= value <= high:
        raise FieldError(field, f"must be in [{low}, {high}], got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer in ``[low, high]`` (int32 unless widened)."""

    low: int = INT32_MIN
    high: int = INT32_MAX
    optional: bool = False

    def check(self, field: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        return _integer(field, value, self.low, self.high)


@dataclasses.dataclass(frozen=True)
class Float:
    """A real number in ``[low, high]`` (``(low, ...`` when ``open_low``), finite as float32.

    ``float64``: the value stays on the host (a timestamp), so only float64 finiteness matters.
    """

    low: float = -FLOAT32_MAX
    high: float = FLOAT32_MAX
    open_low: bool = False
    optional: bool = False
    float64: bool = False

    def check(self, field: str, value: Any) -> float | None:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise FieldError(field, f"must be a number, got {_show(value)} ({type(value).__name__})")
        value = float(value)
        if not math.isfinite(value):
            raise FieldError(field, f"must be finite, got {value}")
        if not self.float64:
            with np.errstate(over="ignore"):
                device = float(np.float32(value))
            if not math.isfinite(device):
                raise FieldError(field, f"overflows float32, got {value}")
            if value != 0.0 and abs(device) < FLOAT32_TINY:
                raise FieldError(
                    field, f"underflows float32 (smallest normal {FLOAT32_TINY:.3g}), got {value}"
                )
        below = value <= self.low if self.open_low else value < self.low
        if below or value > self.high:
            bracket = "(" if self.open_low else "["
            raise FieldError(field, f"must be in {bracket}{self.low:g}, {self.high:g}], got {value}")
        return value


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """A sequence of non-negative int32 ids: a list, tuple, range or 1-D integer array.

    Strings, bytes, mappings and sets are refused (a dict would be read as its keys, a set in no
    particular order); vocabulary bounds are the model's, checked where the model is known.
    """

    min_len: int = 0
    optional: bool = False

    def check(self, field: str, value: Any) -> tuple[int, ...] | None:
        if value is None and self.optional:
            return None
        if isinstance(value, np.ndarray):
            if value.ndim != 1 or not (np.issubdtype(value.dtype, np.integer) or value.size == 0):
                raise FieldError(
                    field, f"must be a 1-D integer array of token ids, got {value.dtype} {value.shape}"
                )
            value = value.tolist()
        elif not isinstance(value, list | tuple | range):
            raise FieldError(
                field, f"must be a list or tuple of token ids, got {_show(value)} ({type(value).__name__})"
            )
        ids = tuple(_integer(f"{field}[{i}]", t, 0, INT32_MAX) for i, t in enumerate(value))
        if len(ids) < self.min_len:
            raise FieldError(field, f"must hold at least {self.min_len} token id(s), got {len(ids)}")
        return ids


@dataclasses.dataclass(frozen=True)
class Ints:
    """A sequence of integers, each checked by ``item`` (config lists such as bucket lengths)."""

    item: Int
    length: int | None = None
    """Exactly this many integers (None: any number)."""
    optional: bool = False

    def check(self, field: str, value: Any) -> tuple[int, ...] | None:
        if value is None and self.optional:
            return None
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise FieldError(field, f"must be a sequence of integers, got {_show(value)}")
        out = tuple(self.item.check(f"{field}[{i}]", v) for i, v in enumerate(value))
        if self.length is not None and len(out) != self.length:
            raise FieldError(field, f"must hold {self.length} integers, got {len(out)}")
        return out


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (compared with ``==``; ``None`` allowed if listed)."""

    choices: tuple[Any, ...]

    def check(self, field: str, value: Any) -> Any:
        if isinstance(value, bool) and not any(isinstance(c, bool) for c in self.choices):
            raise FieldError(field, f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        try:
            ok = any(value == c and type(value) is type(c) for c in self.choices)
        except Exception:  # noqa: BLE001 - an object whose == raises is not a choice
            ok = False
        if not ok:
            choices = ", ".join(map(repr, self.choices))
            raise FieldError(field, f"must be one of {choices}, got {_show(value)}")
        return value


def unicode_text(field: str, text: str) -> str:
    """``text`` if it encodes as UTF-8: a JSON ``"\\ud800"`` escape arrives as a lone surrogate,
    which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = f"a lone surrogate {text[e.start]!r} at character {e.start}"
        raise FieldError(field, f"is not valid Unicode: {bad}") from None
    return text


@dataclasses.dataclass(frozen=True)
class Text:
    """A string (``None`` too when optional)."""

    optional: bool = False

    def check(self, field: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, str):
            raise FieldError(field, f"must be a string, got {_show(value)} ({type(value).__name__})")
        return unicode_text(field, value)


@dataclasses.dataclass(frozen=True)
class Texts:
    """Non-empty strings: a sequence of them, or one string (OpenAI's ``stop`` takes both)."""

    def check(self, field: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, list | tuple):
            raise FieldError(field, f"must be a string or a list of strings, got {_show(value)}")
        for i, text in enumerate(value):
            if not isinstance(text, str) or not text:
                raise FieldError(f"{field}[{i}]", f"must be a non-empty string, got {_show(text)}")
            unicode_text(f"{field}[{i}]", text)
        return tuple(value)


def rule(check: Any, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a default and a rule: ``temperature: float = rule(Float(0.0), 0.0)``."""
    return dataclasses.field(default=default, metadata={"rule": check})


def check_fields(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every ruled field of dataclass ``obj``, checked and normalized; raises :class:`FieldError`."""
    out = {}
    for f in dataclasses.fields(obj):
        check = f.metadata.get("rule")
        if check is not None:
            out[f.name] = check.check(prefix + f.name, getattr(obj, f.name))
    return out
