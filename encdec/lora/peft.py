"""Hugging Face PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names an adapter by the module it wraps inside ``*ForConditionalGeneration``:
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight`` (``[out, r]``),
e.g. ``base_model.model.encoder.block.0.layer.0.SelfAttention.q`` (T5) or
``base_model.model.model.encoder.layers.0.self_attn.q_proj`` (BART, Marian). Modules map to
encdec paths through :func:`encdec.lora.adapters.sites`; ``a = A.T`` and ``b = B.T``, reshaped to
the weight's input and output axes. Scales follow ``lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``) and PEFT's ``rank_pattern``/``alpha_pattern``.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from encdec.config import ModelConfig
from encdec.lora.adapters import (
    STACKS,
    AdapterError,
    LoraConfig,
    build_tree,
    check_adapter,
    get_path,
    hf_module_prefix,
    iter_adapters,
    rank_of,
    sites,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# Options of PEFT's LoraConfig that change the computation and that encdec does not implement.
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_bdlora": None,
}


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's rule: a pattern matches a module name it ends, at a ``.`` boundary (as a regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def save_peft(
    directory: str | Path,
    lora: Any,
    cfg: ModelConfig,
    *,
    lora_config: LoraConfig | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``lora`` as a PEFT LoRA adapter that ``peft.PeftModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    site_by_path = sites(cfg)
    prefix = _PEFT_PREFIX + hf_module_prefix(cfg)
    rslora = bool(lora_config.use_rslora) if lora_config else False
    tensors: dict[str, np.ndarray] = {}
    per_module: dict[str, tuple[int, float]] = {}
    for path, adapter in iter_adapters(lora):
        if path not in site_by_path:
            raise AdapterError(
                f"adapter at {'/'.join(map(str, path))}: no such projection in a {cfg.model_type}"
            )
        module = prefix[len(_PEFT_PREFIX) :] + site_by_path[path].hf_module
        r = rank_of(adapter)
        a = np.asarray(adapter["a"], np.float32).reshape(-1, r)
        b = np.asarray(adapter["b"], np.float32).reshape(r, -1)
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
        scale = float(np.asarray(adapter["scale"]))
        per_module[module] = (r, scale * (math.sqrt(r) if rslora else r))
    if not per_module:
        raise AdapterError("the adapter tree holds no adapters")
    r0 = collections.Counter(r for r, _ in per_module.values()).most_common(1)[0][0]
    alpha0 = collections.Counter(round(al, 6) for _, al in per_module.values()).most_common(1)[0][0]
    rank_pattern = {m: r for m, (r, _) in per_module.items() if r != r0}
    alpha_pattern = {m: al for m, (_, al) in per_module.items() if not math.isclose(al, alpha0, rel_tol=1e-6)}
    short = {m.rsplit(".", 1)[-1] for m in per_module}
    every = {hf_module_prefix(cfg) + s.hf_module for s in site_by_path.values() if s.module in short}
    # PEFT matches a target by the end of a module's name: short names where every module of
    # that name is adapted, else the full names (a decoder-only adapter leaves the encoder's alone).
    targets = sorted(short) if set(per_module) == every else sorted(per_module)
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": float(lora_config.dropout) if lora_config else 0.0,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


def read_peft_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.exists():
        raise AdapterError(f"{directory} has no {CONFIG_FILE}: not a PEFT adapter directory")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(
            f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported"
        )
    for key, neutral in _UNSUPPORTED.items():
        value = config.get(key, neutral)
        if value not in (neutral, None, False, [], {}):
            raise AdapterError(f"{path}: {key}={value!r} is not supported by encdec")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    return config


def load_peft(directory: str | Path, params: Mapping[str, Any], cfg: ModelConfig) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA adapter for this base model: ``(lora tree, LoraConfig)``.

    Every tensor must map to a projection of the model with matching shapes; anything else
    raises :class:`AdapterError` naming the tensor.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = read_peft_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.exists():
        raise AdapterError(f"{directory} has no {WEIGHTS_FILE}")
    tensors = load_file(str(weights_path))
    module_prefix = hf_module_prefix(cfg)
    by_module = {module_prefix + s.hf_module: s for s in sites(cfg).values()}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise AdapterError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight")
        module, which = m.groups()
        if module not in by_module:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} names module {module!r}, which this "
                f"{cfg.model_type} model does not have"
            )
        pairs.setdefault(module, {})[which] = value
    alpha, use_rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    entries = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(
                f"{weights_path}: module {module!r} has lora_{''.join(ab)} but not both A and B"
            )
        site = by_module[module]
        w = get_path(params, site.path)["w"]
        A, B = ab["A"].astype(np.float32), ab["B"].astype(np.float32)
        r = A.shape[0]
        in_shape, out_shape = w.shape[: site.in_ndim], w.shape[site.in_ndim :]
        if A.shape != (r, math.prod(in_shape)) or B.shape != (math.prod(out_shape), r):
            raise AdapterError(
                f"{weights_path}: {module} has lora_A {A.shape} and lora_B {B.shape}; the base weight needs "
                f"({r}, {math.prod(in_shape)}) and ({math.prod(out_shape)}, {r})"
            )
        key = _pattern_key(alpha_pattern, module)
        module_alpha = float(alpha_pattern[key]) if key is not None else alpha
        entries[site.path] = {
            "a": jnp.asarray(A.T.reshape(*in_shape, r)),
            "b": jnp.asarray(B.T.reshape(r, *out_shape)),
            "scale": jnp.asarray(module_alpha / (math.sqrt(r) if use_rslora else r), jnp.float32),
        }
    if not entries:
        raise AdapterError(f"{weights_path} holds no LoRA weights")
    lora = build_tree(entries, params)
    check_adapter(params, cfg, lora)
    lora_config = LoraConfig(
        rank=int(config.get("r", 8)),
        alpha=alpha,
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=tuple(sorted({by_module[m].module for m in pairs})),
        use_rslora=use_rslora,
        stacks=tuple(s for s in STACKS if any(by_module[m].path[0] == s for m in pairs)),
    )
    return lora, lora_config
