"""On-device token sampling with per-row parameters (shared by the reference and the engine).

Each row carries its own temperature, top-k, top-p and PRNG key, so a request samples the same
tokens whatever else shares the batch: its key at step ``t`` is ``fold_in(PRNGKey(seed), t)``.
"""

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.argmax import argmax


@flax.struct.dataclass
class TokenMasks:
    """Vocabulary masks a front end bans on device (Whisper's suppression lists), boolean ``[V]``."""

    every_V: jax.Array
    """Banned at every sampled step (``suppress_tokens``)."""
    first_V: jax.Array
    """Banned besides at a sequence's first sampled step (``begin_suppress_tokens``)."""


def step_keys(seeds_B: jax.Array, steps_B: jax.Array, streams_B: jax.Array | None = None) -> jax.Array:
    """Per-row PRNG keys for this step: a function of the row's seed and step only.

    ``streams_B``: which of a request's independent samples the row draws (its beam index);
    stream 0 draws exactly what a single-sample request with that seed draws.
    """
    def key(seed, step, stream):
        k = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        return jnp.where(stream > 0, jax.random.fold_in(k, stream), k)

    if streams_B is None:
        streams_B = jnp.zeros_like(steps_B)
    return jax.vmap(key)(seeds_B, steps_B, streams_B)


def ban_token(logits_BV: jax.Array, token_B: jax.Array) -> jax.Array:
    """Set one token's logit per row to -inf (``token == -1`` bans nothing): ``min_new_tokens``."""
    vocab_V = jnp.arange(logits_BV.shape[-1], dtype=jnp.int32)
    return jnp.where(vocab_V[None, :] == token_B[:, None], -jnp.inf, logits_BV)


def ban_tokens(logits_BV: jax.Array, banned_BV: jax.Array) -> jax.Array:
    """Set the logits where ``banned_BV`` is true to -inf (a vocabulary mask, e.g. Whisper's suppression)."""
    return jnp.where(banned_BV, -jnp.inf, logits_BV)


def sample(
    logits_BV: jax.Array,
    keys_B: jax.Array | Callable[[], jax.Array],
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
    greedy_B: jax.Array | None = None,
) -> jax.Array:
    """Next token per row: greedy where ``temperature == 0``, else top-k/top-p sampling.
    ``greedy_B``: the rows' argmax when the caller has it (:func:`argmax_normalizer`).

    ``top_k == 0`` and ``top_p == 1`` disable those filters. ``keys_B``: the rows' PRNG keys,
    or a function that makes them (traced only where some row samples: threefry is dozens of
    small loops on CPU, which a greedy step need not run).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if greedy_B is None:
        greedy_B = argmax(logits_BV)  # XLA:CPU's own argmax is a scalar loop: a kernel there

    # Sorting a vocabulary per row is the costliest op of a decode step on CPU: pay for it only
    # when some row filters, and for sampling only when some row samples.
    def sampled(_):
        keys = keys_B() if callable(keys_B) else keys_B
        filtered = jnp.any((temperature_B > 0) & ((top_k_B > 0) | (top_p_B < 1)))
        return jax.lax.cond(
            filtered,
            lambda: jax.vmap(_sample_row)(logits_BV, keys, temperature_B, top_k_B, top_p_B),
            lambda: jax.vmap(_sample_unfiltered)(logits_BV, keys, temperature_B),
        )

    sampled_B = jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda _: greedy_B, None)
    return jnp.where(temperature_B > 0, sampled_B, greedy_B)


def _sample_unfiltered(logits_V, key, temperature):
    return jax.random.categorical(key, logits_V / jnp.maximum(temperature, 1e-6)).astype(jnp.int32)


def _sample_row(logits_V, key, temperature, top_k, top_p):
    V = logits_V.shape[-1]
    logits_V = logits_V / jnp.maximum(temperature, 1e-6)
    sorted_V = jnp.sort(logits_V)[::-1]
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
    kth = sorted_V[k - 1]
    # top-p on the top-k-filtered distribution: keep the smallest prefix whose mass reaches p.
    sorted_V = jnp.where(sorted_V >= kth, sorted_V, -jnp.inf)
    probs_V = jax.nn.softmax(sorted_V)
    mass_before_V = jnp.cumsum(probs_V) - probs_V
    # The top token always stays: a top_p that the device flushes to zero keeps exactly it.
    keep_V = (mass_before_V < top_p) | (jnp.arange(V) == 0)
    cutoff = jnp.min(jnp.where(keep_V, sorted_V, jnp.inf))
    threshold = jnp.maximum(kth, cutoff)
    # A row without filters must sample exactly as in _sample_unfiltered (cumsum rounding could
    # otherwise drop tail tokens): its draw may not depend on whether another row filters.
    threshold = jnp.where((k < V) | (top_p < 1), threshold, -jnp.inf)
    masked_V = jnp.where(logits_V >= threshold, logits_V, -jnp.inf)
    return jax.random.categorical(key, masked_V).astype(jnp.int32)
