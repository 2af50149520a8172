"""A device-resident bank of LoRA adapters for serving many adapters in one batch.

For every adaptable projection the bank holds ``a`` ``[C, *in, R]``, ``b`` ``[C, R, *out]`` and
``scale`` ``[C]``: ``C = capacity + 1`` rows, row 0 the all-zero "no adapter", ``R`` the bank's
maximum rank. A smaller adapter is zero-padded to ``R`` (the padding adds nothing), and a
projection an adapter does not target stays zero. Loading and unloading overwrite one row in
place (a donated, jitted update), so shapes never change and nothing that consumes the bank
recompiles. :meth:`AdapterBank.gather` turns per-row indices into the model's ``lora=`` tree
with a leading batch axis.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from encdec.config import ModelConfig
from encdec.lora.adapters import (
    ALL_LINEAR,
    STACKS,
    AdapterError,
    build_tree,
    check_adapter,
    get_path,
    iter_adapters,
    rank_of,
    target_sites,
)
from encdec.sharding import adapter_shardings


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_row(stacked, row, entry):
    return jax.tree.map(lambda s, e: s.at[row].set(e.astype(s.dtype)), stacked, entry)


@jax.jit
def gather_rows(stacked: Any, rows_B: jax.Array) -> Any:
    """The per-row adapter tree for batch rows using bank rows ``rows_B`` (pure, jit-friendly)."""
    return jax.tree.map(lambda s: s[rows_B], stacked)


class AdapterBank:
    """``capacity`` adapters of rank at most ``max_rank`` on ``target_modules``, by string id."""

    def __init__(
        self,
        params: Mapping[str, Any],
        cfg: ModelConfig,
        *,
        capacity: int,
        max_rank: int,
        target_modules: Sequence[str] | str = ALL_LINEAR,
        stacks: Sequence[str] = STACKS,
        dtype: Any = jnp.float32,
    ):
        if capacity <= 0 or max_rank <= 0:
            raise AdapterError(f"capacity and max_rank must be positive, got {capacity} and {max_rank}")
        self.params, self.cfg = params, cfg
        self.capacity, self.max_rank = capacity, max_rank
        self._sites = {s.path: s for s in target_sites(cfg, target_modules, tuple(stacks))}
        rows = capacity + 1
        entries = {}
        for path, site in self._sites.items():
            w = get_path(params, path)["w"]
            entries[path] = {
                "a": jnp.zeros((rows, *w.shape[: site.in_ndim], max_rank), dtype),
                "b": jnp.zeros((rows, max_rank, *w.shape[site.in_ndim :]), dtype),
                "scale": jnp.zeros((rows,), jnp.float32),
            }
        self.stacked = build_tree(entries, params)
        self._row_of: dict[str, int] = {}
        self._mesh: Mesh | None = None
        self._shardings = None

    @classmethod
    def for_adapters(
        cls, params: Mapping[str, Any], cfg: ModelConfig, loras: Sequence[Any], *, capacity: int | None = None
    ) -> AdapterBank:
        """A bank just wide enough for ``loras``: their module names, stacks and largest rank
        (an encoder left unadapted by all of them gets no bank rows to gather)."""
        from encdec.lora.adapters import sites

        by_path = sites(cfg)
        paths = [p for lora in loras for p, _ in iter_adapters(lora)]
        if not paths:
            raise AdapterError("no adapters to size a bank for")
        for p in paths:
            if p not in by_path:
                where = "/".join(map(str, p))
                raise AdapterError(f"adapter at {where}: the base model has no projection there")
        modules = tuple(sorted({by_path[p].hf_module for p in paths}))  # full names: those sites only
        rank = max(rank_of(a) for lora in loras for _, a in iter_adapters(lora))
        return cls(params, cfg, capacity=capacity or len(loras), max_rank=rank, target_modules=modules)

    # ---- bookkeeping ---------------------------------------------------------------------------

    @property
    def adapter_ids(self) -> list[str]:
        return list(self._row_of)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._row_of

    def __len__(self) -> int:
        return len(self._row_of)

    def row_of(self, adapter_id: str) -> int:
        if adapter_id not in self._row_of:
            known = ", ".join(map(repr, self._row_of)) or "none"
            raise AdapterError(f"unknown adapter id {adapter_id!r} (loaded: {known})")
        return self._row_of[adapter_id]

    def rows_for(self, adapter_ids: Sequence[str | None]) -> np.ndarray:
        """Bank rows ``int32 [B]`` for a batch; ``None`` means no adapter (row 0)."""
        return np.asarray([0 if a is None else self.row_of(a) for a in adapter_ids], np.int32)

    # ---- loading -------------------------------------------------------------------------------

    def load(self, adapter_id: str, lora: Any) -> int:
        """Write ``lora`` into a free row (or over the same id's row); return the row."""
        if not isinstance(adapter_id, str) or not adapter_id:
            raise AdapterError(f"adapter ids are non-empty strings, got {adapter_id!r}")
        check_adapter(self.params, self.cfg, lora)
        given = dict(iter_adapters(lora))
        for path, adapter in given.items():
            where = "/".join(map(str, path))
            if path not in self._sites:
                raise AdapterError(
                    f"adapter {adapter_id!r} adapts {where}, which this bank does not hold "
                    f"(bank targets: {sorted({s.module for s in self._sites.values()})})"
                )
            if rank_of(adapter) > self.max_rank:
                raise AdapterError(
                    f"adapter {adapter_id!r} has rank {rank_of(adapter)} at {where}, above the "
                    f"bank's max_rank {self.max_rank}"
                )
        if adapter_id in self._row_of:
            row = self._row_of[adapter_id]
        else:
            free = sorted(set(range(1, self.capacity + 1)) - set(self._row_of.values()))
            if not free:
                raise AdapterError(
                    f"the adapter bank is full ({self.capacity} adapters: {', '.join(self._row_of)}); "
                    "unload one first"
                )
            row = free[0]
        self._write(row, self._padded(given))
        self._row_of[adapter_id] = row
        return row

    def unload(self, adapter_id: str) -> None:
        """Zero the adapter's row and free it."""
        row = self.row_of(adapter_id)
        self._write(row, self._padded({}))
        del self._row_of[adapter_id]

    def _padded(self, given: Mapping[tuple, Mapping[str, Any]]) -> dict:
        entries = {}
        for path, adapter in iter_adapters(self.stacked):
            a_shape, b_shape = adapter["a"].shape[1:], adapter["b"].shape[1:]
            if path in given:
                src = given[path]
                r = rank_of(src)
                a = jnp.zeros(a_shape, jnp.float32).at[..., :r].set(jnp.asarray(src["a"], jnp.float32))
                b = jnp.zeros(b_shape, jnp.float32).at[:r].set(jnp.asarray(src["b"], jnp.float32))
                scale = jnp.asarray(src["scale"], jnp.float32)
            else:
                a, b, scale = jnp.zeros(a_shape), jnp.zeros(b_shape), jnp.zeros((), jnp.float32)
            entries[path] = {"a": a, "b": b, "scale": scale}
        return build_tree(entries, self.params)

    def _write(self, row: int, entry: Any) -> None:
        if self._shardings is not None:  # an adapter trained on one device joins the mesh whole
            entry = jax.device_put(entry, NamedSharding(self._mesh, P()))
        self.stacked = _write_row(self.stacked, jnp.int32(row), entry)
        if self._shardings is not None:  # keep the bank's layout whatever XLA chose for the update
            self.stacked = jax.device_put(self.stacked, self._shardings)

    def shard(self, mesh: Mesh) -> None:
        """Split the bank over ``mesh`` like the weights it adapts (each ``a`` takes its weight's
        input axes, each ``b`` its output axes: an adapter on the heads of ``q`` splits by heads)."""
        self._mesh, self._shardings = mesh, adapter_shardings(self.stacked, mesh, rows=True)
        self.stacked = jax.device_put(self.stacked, self._shardings)

    # ---- reading -------------------------------------------------------------------------------

    def gather(self, rows_B: Any) -> Any:
        """The ``lora=`` tree for a batch whose row ``i`` uses bank row ``rows_B[i]``."""
        return gather_rows(self.stacked, jnp.asarray(rows_B, jnp.int32))

    def adapter(self, adapter_id: str) -> Any:
        """One adapter's (padded) tree as loaded, without the row axis."""
        row = self.row_of(adapter_id)
        return jax.tree.map(lambda s: s[row], self.stacked)
