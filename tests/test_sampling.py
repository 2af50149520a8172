"""On-device sampling: greedy, filters, and independence from the rest of the batch."""

import jax
import jax.numpy as jnp
import numpy as np

from encdec.sampling import ban_token, sample, step_keys


def _draw(logits, temperature, top_k, top_p, seeds, step=0):
    B = logits.shape[0]
    keys = step_keys(jnp.asarray(seeds, jnp.int32), jnp.full((B,), step, jnp.int32))
    params = (
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32),
    )
    return np.asarray(sample(logits, keys, *params))


def test_greedy_rows_take_the_argmax():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50))
    out = _draw(logits, [0, 0, 0, 0], [0, 5, 0, 0], [1, 1, 0.5, 1], [0, 1, 2, 3])
    np.testing.assert_array_equal(out, np.argmax(np.asarray(logits), -1))


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = jnp.tile(jnp.log(jnp.asarray([0.5, 0.3, 0.1, 0.05, 0.05]))[None], (400, 1))
    seeds = np.arange(400)
    top2 = _draw(logits, [1.0] * 400, [2] * 400, [1.0] * 400, seeds)
    assert set(top2) == {0, 1}
    top_p = _draw(logits, [1.0] * 400, [0] * 400, [0.75] * 400, seeds)  # 0.5 + 0.3 reach 0.75
    assert set(top_p) == {0, 1}
    free = _draw(logits, [1.0] * 400, [0] * 400, [1.0] * 400, seeds)
    assert set(free) == {0, 1, 2, 3, 4}
    assert abs(np.mean(free == 0) - 0.5) < 0.1


def test_a_row_samples_the_same_whatever_shares_the_batch():
    logits = jax.random.normal(jax.random.PRNGKey(1), (3, 64)) * 3
    alone = _draw(logits[:1], [0.9], [0], [1.0], [7], step=3)
    # Next to a greedy row and a filtering row (which switch the batch to other code paths).
    crowd = _draw(logits, [0.9, 0.0, 1.0], [0, 0, 4], [1.0, 1.0, 0.8], [7, 8, 9], step=3)
    assert crowd[0] == alone[0]
    for s in range(20):  # and over many seeds
        a = _draw(logits[:1], [0.9], [0], [1.0], [s])
        c = _draw(logits, [0.9, 1.0, 1.0], [0, 3, 0], [1.0, 0.5, 1.0], [s, 1, 2])
        assert a[0] == c[0]


def test_ban_token():
    logits = jnp.zeros((2, 4))
    banned = ban_token(logits, jnp.asarray([2, -1]))
    assert np.isneginf(np.asarray(banned)[0, 2]) and np.isfinite(np.asarray(banned)[1]).all()
