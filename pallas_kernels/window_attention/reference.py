"""Pure-JAX window attention: :func:`attention_over_keys` over slot-major keys, and the T5
decoder bias as the kernel takes it (one row per head, indexed by distance)."""

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention.reference import attention_over_keys
from pallas_kernels.t5_bias import relative_position_bucket


def window_attention_reference(
    q_BNH: jax.Array,
    k_BNKH: jax.Array,
    v_BNKH: jax.Array,
    lengths_B: jax.Array,
    *,
    scale: float = 1.0,
    bias_NR: jax.Array | None = None,
    max_distance: int = 128,
    source_B: jax.Array | None = None,
) -> jax.Array:
    """Each slot's query over its first ``lengths[b]`` keys (rows past a length must be finite);
    with ``source_B``, slot ``b`` reads slot ``source_B[b]``'s rows."""
    if source_B is not None:
        k_BNKH, v_BNKH = k_BNKH[source_B], v_BNKH[source_B]
    return attention_over_keys(
        q_BNH, k_BNKH, v_BNKH, lengths_B, scale=scale, bias_NR=bias_NR, max_distance=max_distance,
        stale_v=False, slots_first=True,
    )


def distance_bias_NK(bias_NR: jax.Array, num_keys: int, *, max_distance: int) -> jax.Array:
    """The T5 decoder bias of a key ``d`` positions before the query, ``d`` in ``0 .. K - 1``:
    what :func:`~pallas_kernels.paged_attention.reference.relative_bias_BNK` gives key
    ``L - 1 - d`` of a slot of length ``L``, the same for every slot."""
    relative_K = -jnp.arange(num_keys, dtype=jnp.int32)
    bucket_K = relative_position_bucket(
        relative_K, bidirectional=False, num_buckets=bias_NR.shape[1], max_distance=max_distance
    )
    return jnp.take(bias_NR.astype(jnp.float32), bucket_K, axis=1)
