"""LoRA adapters: a pytree beside the parameters, with the same paths.

For a projection whose weight ``w`` is ``[*in, *out]`` (e.g. ``q``: ``[D, N, H]``, ``o``:
``[N, H, D]``, ``wi``: ``[D, F]``) the adapter at the same path holds ``a`` ``[*in, r]``, ``b``
``[r, *out]`` and ``scale`` (``alpha / r``); the model adds ``scale * (x a) b`` to the projection
(:func:`encdec.models.layers.lora_delta`). Layers without adapters are empty dicts, so
``lora["decoder"]["layers"][i]["cross_attn"]["q"]`` mirrors ``params`` exactly.

Which projections can carry an adapter is read from :func:`encdec.checkpoints.tensor_specs`, by
PEFT's module names (T5, mT5, UMT5: ``q k v o wi wo wi_0 wi_1``; BART, mBART, Marian, Pegasus,
M2M100/NLLB: ``q_proj k_proj v_proj out_proj fc1 fc2``), so PEFT files map onto the same paths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from encdec.checkpoints.hf import tensor_specs
from encdec.config import ModelConfig

Path = tuple[Any, ...]
ALL_LINEAR = "all-linear"
STACKS = ("encoder", "decoder")
T5_MODULES = ("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1")
BART_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class AdapterError(ValueError):
    """An adapter does not fit the base model, or a bank cannot take it."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Shape and initialisation of a LoRA adapter (PEFT's ``LoraConfig`` subset)."""

    rank: int = 8
    """Rank r of every adapter: ``a`` is ``[*in, r]``, ``b`` is ``[r, *out]``."""
    alpha: float = 16.0
    """The update is scaled by ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training, in ``[0, 1)``."""
    target_modules: tuple[str, ...] | str = ALL_LINEAR
    """PEFT module names to adapt, or ``"all-linear"`` for every attention and FFN projection."""
    use_rslora: bool = False
    """Rank-stabilised scale ``alpha / sqrt(rank)``."""
    stacks: tuple[str, ...] = STACKS
    """Which stacks' projections are adapted: ``[decoder]`` leaves the encoder frozen and unadapted
    (its outputs can then be computed once per input and reused across training steps)."""

    def __post_init__(self):
        for name in ("target_modules", "stacks"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        stacks = self.stacks
        if not stacks or any(s not in STACKS for s in stacks) or len(set(stacks)) != len(stacks):
            raise ValueError(f"stacks: must be distinct names from {list(STACKS)}, got {self.stacks!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"rank: must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"alpha: must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"target_modules: must be module names or {ALL_LINEAR!r}, got {self.target_modules!r}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class Site:
    """A projection that can carry an adapter."""

    path: Path
    """Its path in the parameter tree (the dict holding ``w``)."""
    hf_module: str
    """Its Hugging Face module name, e.g. ``encoder.block.0.layer.0.SelfAttention.q``."""
    in_ndim: int
    """How many leading axes of ``w`` are inputs (2 for attention outputs ``[N, H, D]``)."""

    @property
    def module(self) -> str:
        return self.hf_module.rsplit(".", 1)[-1]


def family_modules(cfg: ModelConfig) -> tuple[str, ...]:
    return T5_MODULES if cfg.is_t5 else BART_MODULES


def hf_module_prefix(cfg: ModelConfig) -> str:
    """What the HF ``*ForConditionalGeneration`` puts before :func:`tensor_specs` names."""
    return "" if cfg.is_t5 else "model."


def sites(cfg: ModelConfig) -> dict[Path, Site]:
    """Every adaptable projection of this architecture, by parameter path."""
    out: dict[Path, Site] = {}
    modules = family_modules(cfg)
    for name, spec in tensor_specs(cfg).items():
        if (
            not name.endswith(".weight")
            or spec.path[-1] != "w"
            or name[: -len(".weight")].rsplit(".", 1)[-1] not in modules
        ):
            continue
        path = spec.path[:-1]
        out[path] = Site(path, name[: -len(".weight")], 2 if path[-1] == "o" else 1)
    return out


def _matches(site: Site, target: str) -> bool:
    """PEFT's rule for a list entry: the module's name is the target or ends with ``.target``."""
    return site.hf_module == target or site.hf_module.endswith("." + target)


def resolve_targets(cfg: ModelConfig, target_modules: tuple[str, ...] | str) -> tuple[str, ...]:
    """Module names for this family; unknown names raise naming the valid ones.

    A name is a module (``q_proj``) or, as in PEFT, a dotted tail of the module's full name
    (``encoder_attn.q_proj``, ``decoder.layers.0.fc1``) selecting only the modules it ends.
    """
    known = family_modules(cfg)
    if target_modules == ALL_LINEAR or target_modules == (ALL_LINEAR,):
        present = {s.module for s in sites(cfg).values()}
        return tuple(m for m in known if m in present)
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in known]
    if unknown:
        raise AdapterError(
            f"target_modules {unknown} are not {cfg.model_type} modules; choose from {', '.join(known)} "
            f"(or dotted tails of their names, e.g. self_attn.{known[0]}) or {ALL_LINEAR!r}"
        )
    every = list(sites(cfg).values())
    absent = [t for t in targets if not any(_matches(s, t) for s in every)]
    if len(absent) == len(targets):
        raise AdapterError(f"none of target_modules {list(targets)} exists in this {cfg.model_type} model")
    return targets


def target_sites(
    cfg: ModelConfig, target_modules: tuple[str, ...] | str, stacks: tuple[str, ...] = STACKS
) -> list[Site]:
    targets = resolve_targets(cfg, target_modules)
    return [s for s in sites(cfg).values() if s.path[0] in stacks and any(_matches(s, t) for t in targets)]


# ---- tree helpers ---------------------------------------------------------------------------


def get_path(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
    """Set ``value`` at ``path``, creating dicts, and lists padded with ``{}``, on the way."""
    node = tree
    for key, nxt in zip(path[:-1], path[1:], strict=False):
        if isinstance(key, int):
            while len(node) <= key:
                node.append({})
            node = node[key]
        else:
            if key not in node:
                node[key] = [] if isinstance(nxt, int) else {}
            node = node[key]
    node[path[-1]] = value


def iter_adapters(lora: Any, prefix: Path = ()) -> Iterator[tuple[Path, Mapping[str, Any]]]:
    """``(path, {"a", "b", "scale", ...})`` for every adapter in the tree."""
    if isinstance(lora, Mapping):
        if "a" in lora and "b" in lora:
            yield prefix, lora
            return
        for key, sub in lora.items():
            yield from iter_adapters(sub, (*prefix, key))
    elif isinstance(lora, (list, tuple)):
        for i, sub in enumerate(lora):
            yield from iter_adapters(sub, (*prefix, i))


def build_tree(entries: Mapping[Path, Any], params: Mapping[str, Any]) -> dict:
    """A lora tree with ``entries`` at their paths; layer lists as long as the model's."""
    tree: dict = {}
    for stack in ("encoder", "decoder"):
        if any(p[0] == stack for p in entries):
            tree[stack] = {"layers": [{} for _ in params[stack]["layers"]]}
    for path, value in entries.items():
        set_path(tree, path, value)
    return tree


def map_adapters(fn, lora: Any, params: Mapping[str, Any]) -> dict:
    """Rebuild ``lora`` with ``fn(path, adapter)`` at every adapter (None drops it)."""
    entries = {}
    for path, adapter in iter_adapters(lora):
        new = fn(path, adapter)
        if new is not None:
            entries[path] = new
    return build_tree(entries, params)


def rank_of(adapter: Mapping[str, Any]) -> int:
    return int(adapter["a"].shape[-1])


# ---- creation, checking, merging ------------------------------------------------------------


def init_lora(key: jax.Array, params: Mapping[str, Any], cfg: ModelConfig, config: LoraConfig) -> dict:
    """A fresh adapter: ``b = 0`` (the model starts unchanged), ``a`` as PEFT initialises it.

    PEFT's ``kaiming_uniform_(a=sqrt(5))`` on ``lora_A`` ``[r, in]`` is uniform on
    ``+-1/sqrt(in)`` with ``in`` the flattened input width.
    """
    entries = {}
    site_list = target_sites(cfg, config.target_modules, config.stacks)
    if not site_list:
        raise AdapterError(
            f"target_modules {config.target_modules!r} select nothing in stacks {list(config.stacks)}"
        )
    keys = jax.random.split(key, len(site_list))
    for k, site in zip(keys, site_list, strict=True):
        w = get_path(params, site.path)["w"]
        in_shape, out_shape = w.shape[: site.in_ndim], w.shape[site.in_ndim :]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        entries[site.path] = {
            "a": jax.random.uniform(k, (*in_shape, config.rank), jnp.float32, -bound, bound),
            "b": jnp.zeros((config.rank, *out_shape), jnp.float32),
            "scale": jnp.asarray(config.scale, jnp.float32),
        }
    return build_tree(entries, params)


def check_adapter(params: Mapping[str, Any], cfg: ModelConfig, lora: Any) -> None:
    """Raise :class:`AdapterError` naming the first path that does not fit the base model."""
    known = sites(cfg)
    found = False
    for path, adapter in iter_adapters(lora):
        found = True
        where = "/".join(map(str, path))
        if path not in known:
            raise AdapterError(f"adapter at {where}: the base model has no projection there")
        site = known[path]
        w = get_path(params, path)["w"]
        a, b = np.shape(adapter["a"]), np.shape(adapter["b"])
        want_a, want_b = w.shape[: site.in_ndim], w.shape[site.in_ndim :]
        if len(a) != site.in_ndim + 1 or a[:-1] != want_a or len(b) != len(want_b) + 1 or b[1:] != want_b:
            raise AdapterError(
                f"adapter at {where} ({site.hf_module}) has a {a}, b {b}; the base weight {tuple(w.shape)} "
                f"needs a {(*want_a, 'r')} and b {('r', *want_b)}"
            )
        if a[-1] != b[0]:
            raise AdapterError(f"adapter at {where}: a has rank {a[-1]} but b has rank {b[0]}")
        if np.ndim(adapter["scale"]) != 0:
            raise AdapterError(f"adapter at {where}: scale must be a scalar")
    if not found:
        raise AdapterError("the adapter tree holds no adapters")


def delta_weight(adapter: Mapping[str, Any], w_shape: tuple[int, ...]) -> jax.Array:
    """``scale * a @ b`` laid out like the base weight, in float32."""
    r = rank_of(adapter)
    a = jnp.asarray(adapter["a"], jnp.float32).reshape(-1, r)
    b = jnp.asarray(adapter["b"], jnp.float32).reshape(r, -1)
    return (jnp.asarray(adapter["scale"], jnp.float32) * (a @ b)).reshape(w_shape)


def merge_adapter(params: Mapping[str, Any], lora: Any, *, sign: float = 1.0) -> dict:
    """Parameters with every adapter folded into its weight (``sign=-1`` takes it out again).

    The input tree is not modified; untouched leaves are shared with it.
    """
    merged = _copy_containers(params)
    for path, adapter in iter_adapters(lora):
        p = get_path(merged, path)
        if "w_scale" in p:
            raise AdapterError(f"{path}: int8 weights take adapters on top, unmerged (merge into float ones)")
        w = p["w"]
        p["w"] = (w.astype(jnp.float32) + sign * delta_weight(adapter, w.shape)).astype(w.dtype)
    return merged


def unmerge_adapter(params: Mapping[str, Any], lora: Any) -> dict:
    return merge_adapter(params, lora, sign=-1.0)


def _copy_containers(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _copy_containers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy_containers(v) for v in tree]
    return tree


# ---- trainable weights vs fixed scales ------------------------------------------------------


def split_trainable(lora: Any, params: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(weights, scales)``: ``a``/``b`` (what the optimizer sees) and the fixed ``scale``s."""
    weights = map_adapters(lambda _, ad: {"a": ad["a"], "b": ad["b"]}, lora, params)
    scales = map_adapters(lambda _, ad: {"scale": ad["scale"]}, lora, params)
    return weights, scales


def join_trainable(weights: Any, scales: Any, extra: Mapping[Path, Mapping[str, Any]] | None = None) -> Any:
    """Inverse of :func:`split_trainable` (structure-preserving, so it works under ``jit``/``grad``).

    ``extra`` adds entries per adapter path (e.g. dropout keys).
    """

    def walk(w, s, path):
        if isinstance(w, Mapping):
            if "a" in w:
                out = {"a": w["a"], "b": w["b"], "scale": s["scale"]}
                if extra is not None and path in extra:
                    out.update(extra[path])
                return out
            return {k: walk(v, s[k], (*path, k)) for k, v in w.items()}
        return [walk(v, s[i], (*path, i)) for i, v in enumerate(w)]

    return walk(weights, scales, ())
