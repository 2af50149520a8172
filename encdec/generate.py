"""``reference_generate``: the simple, dense-cache generator every faster path is held against.

:func:`dense_decode` is the one dense decoding loop: it runs a forced decoder prefix in one
decoder call, then one jitted decoder step per token over a :class:`~encdec.models.DenseKV`,
sampling with per-row parameters and optional token masks. ``reference_generate`` (text) and
Whisper's ``greedy_decode`` (audio) are its two front doors. No paging, no slots: obviously
right, not fast.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from encdec.checkpoints.pretrained import Model
from encdec.config import ModelConfig
from encdec.models import decode, encode, init_dense_kv
from encdec.sampling import TokenMasks, ban_token, ban_tokens, sample, step_keys


@dataclasses.dataclass
class GenerationOutput:
    token_ids: list[int]
    """Generated tokens, without the decoder start token; ends with EOS when it stopped on one."""
    finish_reason: str
    """``"stop"`` (EOS or a stop token) or ``"length"`` (``max_new_tokens`` reached)."""
    text: str | None = None


@dataclasses.dataclass
class DenseDecoded:
    """What :func:`dense_decode` produced for a batch."""

    tokens: list[list[int]]
    """Generated tokens per row (the prefix excluded); ends with EOS where the row stopped."""
    stopped: np.ndarray
    """``[B]`` whether each row stopped on EOS."""
    logits: np.ndarray | None = None
    """``[B, steps, V]`` float32 logits of every sampled step (before masks), if asked for."""


def tokenize(model: Model, inputs: Sequence[str] | Sequence[Sequence[int]]) -> tuple[list[list[int]], bool]:
    """Token ids per input (text goes through the model's tokenizer); also whether inputs were text."""
    if len(inputs) == 0:
        raise ValueError("inputs is empty")
    is_text = isinstance(inputs[0], str)
    if is_text:
        if model.tokenizer is None:
            raise ValueError("text inputs need a tokenizer; this model has none (pass token ids)")
        ids = [list(model.tokenizer(s)["input_ids"]) for s in inputs]
    else:
        ids = [[int(t) for t in seq] for seq in inputs]
    for i, seq in enumerate(ids):
        if not seq:
            raise ValueError(f"input {i} is empty")
        bad = [t for t in seq if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"input {i} has token ids outside [0, {model.config.vocab_size}): {bad[:5]}")
    return ids, is_text


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _encode(params, cfg: ModelConfig, ids_BS, mask_BS, *, dtype, lora=None):
    return encode(params, cfg, ids_BS, mask_BS, dtype=dtype, lora=lora)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "max_len"))
def _init_kv(params, cfg: ModelConfig, enc_BSD, mask_BS, *, dtype, max_len, lora=None):
    return init_dense_kv(params, cfg, enc_BSD, mask_BS, max_len, dtype=dtype, lora=lora)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"), donate_argnames=("kv",))
def _step(params, cfg: ModelConfig, tokens_BT, kv, n, rows, ban_B, masks, *, dtype, lora=None):
    """Feed ``tokens_BT`` (the prefix, or the last token), sample the next token per row."""
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(kv.index + jnp.arange(T, dtype=jnp.int32), (B, T))
    logits_BTV, kv = decode(params, cfg, tokens_BT, positions_BT, kv, dtype=dtype, lora=lora)
    logits_BV = ban_token(logits_BTV[:, -1], ban_B)
    if masks is not None:
        banned_V = masks.every_V | ((n == 0) & masks.first_V)
        logits_BV = ban_tokens(logits_BV, banned_V[None, :])
    seeds_B, temperature_B, top_k_B, top_p_B = rows
    keys = step_keys(seeds_B, jnp.broadcast_to(n, seeds_B.shape))
    return sample(logits_BV, keys, temperature_B, top_k_B, top_p_B), logits_BTV[:, -1], kv


def dense_decode(
    model: Model,
    enc_BSD: jax.Array,
    enc_mask_BS: jax.Array,
    prefix: Sequence[int],
    max_new_tokens: int,
    *,
    eos_token_id: int,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    masks: TokenMasks | None = None,
    lora=None,
    return_logits: bool = False,
) -> DenseDecoded:
    """Decode every row of an encoded batch from the same forced ``prefix`` (start token first).

    Row ``i``'s sample at step ``n`` uses key ``fold_in(PRNGKey(seeds[i]), n)``, as the engine
    does. EOS (``eos_token_id``; -1: never stop) is banned for the first ``min_new_tokens``
    steps; ``masks`` bans tokens at every / the first step (Whisper's suppression).
    """
    cfg = model.config
    B = enc_BSD.shape[0]
    kv = _init_kv(
        model.params, cfg, enc_BSD, enc_mask_BS, dtype=model.dtype,
        max_len=len(prefix) - 1 + max_new_tokens, lora=lora,
    )
    rows = (
        jnp.asarray(list(seeds) if seeds is not None else [0] * B, jnp.int32),
        jnp.full((B,), temperature, jnp.float32),
        jnp.full((B,), top_k, jnp.int32),
        jnp.full((B,), top_p, jnp.float32),
    )
    tokens_BT = jnp.asarray(np.tile(np.asarray(prefix, np.int32), (B, 1)))
    out: list[list[int]] = [[] for _ in range(B)]
    stopped = np.zeros(B, bool)
    all_logits = []
    for n in range(max_new_tokens):
        ban_B = jnp.full((B,), eos_token_id if n < min_new_tokens else -1, jnp.int32)
        next_B, logits_BV, kv = _step(
            model.params, cfg, tokens_BT, kv, jnp.int32(n), rows, ban_B, masks, dtype=model.dtype, lora=lora
        )
        if return_logits:
            all_logits.append(np.asarray(logits_BV, np.float32))
        for i, t in enumerate(np.asarray(next_B).tolist()):
            if not stopped[i]:
                out[i].append(t)
                stopped[i] = t == eos_token_id
        if stopped.all():
            break
        tokens_BT = next_B[:, None]
    return DenseDecoded(out, stopped, np.stack(all_logits, axis=1) if return_logits else None)


def reference_generate(
    model: Model,
    inputs: Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | Sequence[int] = 0,
    eos_token_id: int | None = None,
    return_logits: bool = False,
    lora=None,
    pad_to_multiple: int = 1,
) -> list[GenerationOutput] | tuple[list[GenerationOutput], np.ndarray]:
    """Generate for a batch of text or token-id inputs with a dense cache.

    ``seed`` may be one int (row ``i`` then uses ``seed + i``) or one per input; a row's
    samples depend only on its seed. EOS is banned for the first ``min_new_tokens`` steps;
    ``eos_token_id=-1`` never stops early. ``return_logits`` also returns the per-step logits
    ``[B, steps, V]`` (float32) for parity checks. ``lora`` is an adapter tree (``encdec.lora``),
    shared by every row or with a leading row axis.
    ``pad_to_multiple`` pads inputs (masked) to a multiple of it, which bounds recompilation
    when called for many input lengths.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    cfg = model.config
    ids, is_text = tokenize(model, inputs)
    B, S = len(ids), max(len(s) for s in ids)
    if cfg.position != "relative" and S > cfg.max_positions:
        raise ValueError(f"input of {S} tokens exceeds the model's {cfg.max_positions} positions")
    S = -(-S // pad_to_multiple) * pad_to_multiple
    ids_BS = np.full((B, S), cfg.pad_token_id, np.int32)
    mask_BS = np.zeros((B, S), bool)
    for i, seq in enumerate(ids):
        ids_BS[i, : len(seq)] = seq
        mask_BS[i, : len(seq)] = True
    mask_BS = jnp.asarray(mask_BS)
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    enc_BSD = _encode(model.params, cfg, jnp.asarray(ids_BS), mask_BS, dtype=model.dtype, lora=lora)
    decoded = dense_decode(
        model,
        enc_BSD,
        mask_BS,
        [cfg.decoder_start_token_id],
        max_new_tokens,
        eos_token_id=eos,
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seeds=[seed + i for i in range(B)] if isinstance(seed, int) else list(seed),
        lora=lora,
        return_logits=return_logits,
    )
    results = []
    for toks in decoded.tokens:
        reason = "stop" if toks and toks[-1] == eos else "length"
        text = model.tokenizer.decode(toks, skip_special_tokens=True) if is_text and model.tokenizer else None
        results.append(GenerationOutput(token_ids=toks, finish_reason=reason, text=text))
    if return_logits:
        return results, decoded.logits
    return results
