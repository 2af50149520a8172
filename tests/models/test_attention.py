"""Blocked (head by head, query blocks) attention equals the one-shot einsum version."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encdec.models import attention
from encdec.models.attention import dot_product_attention


@pytest.mark.parametrize("B, T, K, N, H", [(2, 600, 300, 3, 8), (1, 37, 5, 2, 4)])
def test_blocked_attention_equals_plain(monkeypatch, B, T, K, N, H):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 256)  # 600 queries: blocks of 256, the last padded
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, N, K, H)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((B, T, K)) > 0.3).at[0, 3].set(False)  # a query with no key
    bias = jnp.asarray(rng.standard_normal((1, N, T, K)), jnp.float32)  # broadcast over the batch
    for m, b in [(jnp.ones((B, T, K), bool), None), (mask, bias)]:
        plain, blocked = (
            jax.jit(
                lambda q, k, v, m, b, blocked=blocked: dot_product_attention(
                    q, k, v, scale=0.3, mask_BTK=m, bias_BNTK=b, blocked=blocked
                )
            )(q, k, v, m, b)
            for blocked in (False, True)
        )
        np.testing.assert_allclose(np.asarray(blocked), np.asarray(plain), atol=2e-6)
    assert not np.any(np.asarray(blocked)[0, 3])  # no valid key: zeros
