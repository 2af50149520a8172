"""Packed weights in huge-page memory (encdec.models.huge_pages): the same values, shared with
JAX without a copy, in a mapping advised MADV_HUGEPAGE, alive as long as any array of it; an
engine's packed weights land there, and ENCDEC_HUGE_PAGES=0 keeps XLA's buffers."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encdec.models.huge_pages import HUGE_PAGES_ENV, huge_pages_usable, in_huge_page_memory, to_huge_pages
from encdec.models.packing import PACKED_LEAVES, engine_params
from pallas_kernels.decode_matmul import build as decode_build
from tests.tiny_models import save_hf_model

needs_huge_pages = pytest.mark.skipif(not huge_pages_usable(), reason="no MADV_HUGEPAGE on this system")


@needs_huge_pages
def test_arrays_keep_their_values_and_move_into_advised_memory():
    rng = np.random.default_rng(0)
    arrays = [
        jnp.asarray(rng.standard_normal((3, 700, 32), np.float32)),
        jnp.asarray(rng.integers(-128, 128, (5000,), np.int8)),  # not a multiple of a page
        jnp.zeros((0, 4), jnp.float32),
        jnp.asarray(rng.standard_normal((17,), np.float32)),
    ]
    moved = to_huge_pages(arrays)
    for a, m in zip(arrays, moved, strict=True):
        assert m.dtype == a.dtype and m.shape == a.shape
        np.testing.assert_array_equal(np.asarray(m), np.asarray(a))
    for m in (moved[0], moved[1], moved[3]):
        assert in_huge_page_memory(m)
    # Page-aligned starts: no array shares a page with the one before it.
    starts = [moved[i].unsafe_buffer_pointer() for i in (0, 1, 3)]
    assert all(s % 4096 == 0 for s in starts) and starts == sorted(starts)
    # Jitted code reads them in place.
    np.testing.assert_allclose(jax.jit(jnp.sum)(moved[0]), np.asarray(arrays[0]).sum(), rtol=1e-5)


@needs_huge_pages
def test_the_arena_lives_as_long_as_any_of_its_arrays():
    rng = np.random.default_rng(1)
    values = [rng.standard_normal((1000,), np.float32) for _ in range(3)]
    moved = to_huge_pages([jnp.asarray(v) for v in values])
    last = moved[2]
    del moved
    gc.collect()
    _ = [np.ones(1 << 20, np.float32) for _ in range(8)]  # reuse of freed memory would show
    np.testing.assert_array_equal(np.asarray(last), values[2])
    assert in_huge_page_memory(last)


def test_nothing_moves_when_turned_off(monkeypatch):
    monkeypatch.setenv(HUGE_PAGES_ENV, "0")
    a = jnp.arange(10, dtype=jnp.float32)
    assert not huge_pages_usable()
    assert to_huge_pages([a])[0] is a


@needs_huge_pages
@pytest.mark.skipif(bool(decode_build.cpu_missing()), reason="no float32 decode kernel on this CPU")
def test_an_engines_packed_weights_are_in_huge_page_memory(tmp_path, monkeypatch):
    import encdec

    save_hf_model("bart", tmp_path)
    model = encdec.load_pretrained(tmp_path)
    packed = engine_params(model.params, model.config, decode_rows=8)
    leaves = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(packed)
        if getattr(path[-1], "key", None) in PACKED_LEAVES
    ]
    assert leaves and all(in_huge_page_memory(leaf) for _, leaf in leaves)
    monkeypatch.setenv(HUGE_PAGES_ENV, "0")
    plain = engine_params(model.params, model.config, decode_rows=8)
    plain_leaves = dict(jax.tree_util.tree_leaves_with_path(plain))
    for path, leaf in leaves:  # XLA's: another library may have advised its heap too
        assert plain_leaves[path].unsafe_buffer_pointer() != leaf.unsafe_buffer_pointer()
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(plain_leaves[path]))


@needs_huge_pages
def test_moved_arrays_keep_their_committed_state_so_jitted_steps_do_not_recompile():
    """DLPack's arrays come back committed to their device. An engine's weights committed where
    its state is not made every step after warm-up compile again (test_engine's
    no-recompilation check caught it): a moved array is committed exactly when its source was."""
    loose = jax.jit(lambda: jnp.ones((64, 32)))()  # a jitted output: not committed
    pinned = jax.device_put(jnp.ones((64, 32)), jax.devices()[0])  # committed
    moved_loose, moved_pinned = to_huge_pages([loose, pinned])
    assert not loose.committed and not moved_loose.committed
    assert pinned.committed and moved_pinned.committed
    double = jax.jit(lambda x: x * 2)
    double(loose)
    np.testing.assert_array_equal(np.asarray(double(moved_loose)), 2 * np.asarray(loose))
    assert double._cache_size() == 1
