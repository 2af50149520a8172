"""T5's relative position buckets, shared by the models and the fused-bias kernels.

Pure ``jnp`` on integer arrays so the same function runs inside a Pallas kernel body.
"""

import math

import jax.numpy as jnp


def relative_position_bucket(
    relative_position: jnp.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jnp.ndarray:
    """Bucket of ``key_position - query_position``, as T5 defines it.

    Half the buckets are exact offsets, the rest log-spaced up to ``max_distance``. The
    decoder (``bidirectional=False``) sees only non-positive offsets and uses all buckets
    for them; the encoder splits the buckets between the two signs.
    """
    relative_position = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # max(distance, 1) keeps log finite where the small branch is taken anyway.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    if_large = jnp.minimum(if_large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, if_large)
