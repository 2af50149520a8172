"""Shared helpers for the LoRA tests: a teacher-forced forward pass and random adapters."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encdec.lora.adapters import iter_adapters, map_adapters
from encdec.models import decode, encode, init_dense_kv


@pytest.fixture(autouse=True)
def strict_rank_promotion():
    """Imported by every LoRA test module: no implicit rank promotion anywhere (STYLE 13)."""
    with jax.numpy_rank_promotion("raise"):
        yield


def random_batch(cfg, lengths=(5, 3, 7), target_len=6, seed=1, low=3, high=40):
    """Right-padded source ids/mask ``[B, S]`` and decoder ids ``[B, T]`` starting with the start token."""
    rng = np.random.default_rng(seed)
    S = max(lengths)
    ids = np.full((len(lengths), S), cfg.pad_token_id, np.int64)
    mask = np.zeros((len(lengths), S), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(low, high, n)
        mask[i, :n] = 1
    dec = rng.integers(low, high, (len(lengths), target_len))
    dec[:, 0] = cfg.decoder_start_token_id
    return ids, mask, dec


def forward(params, cfg, ids, mask, dec, lora=None):
    """Teacher-forced float32 logits ``[B, T, V]`` through encode -> init_dense_kv -> decode (jitted)."""
    ids, mask, dec = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool), jnp.asarray(dec, jnp.int32)
    return np.asarray(_forward(params, cfg, ids, mask, dec, lora))


@functools.partial(jax.jit, static_argnums=1)
def _forward(params, cfg, ids, mask, dec, lora):
    enc = encode(params, cfg, ids, mask, lora=lora)
    kv = init_dense_kv(params, cfg, enc, mask, dec.shape[1], lora=lora)
    positions = jnp.broadcast_to(jnp.arange(dec.shape[1], dtype=jnp.int32), dec.shape)
    logits, _ = decode(params, cfg, dec, positions, kv, lora=lora)
    return logits


def randomize_b(lora, params, seed=0, std=0.3):
    """The same adapter with a nonzero ``b`` (a fresh adapter has ``b = 0`` and changes nothing)."""
    paths = [p for p, _ in iter_adapters(lora)]
    keys = dict(zip(paths, jax.random.split(jax.random.PRNGKey(seed), len(paths)), strict=True))
    return map_adapters(
        lambda p, ad: {**ad, "b": std * jax.random.normal(keys[p], ad["b"].shape, jnp.float32)}, lora, params
    )
