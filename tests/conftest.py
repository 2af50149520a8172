"""Hooks for every test folder."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _optimize_real_models(request):
    """Compile the real Whisper-base tests' steps with XLA's full optimizations.

    ``scripts/test.sh`` turns most of them off (``JAX_DISABLE_MOST_OPTIMIZATIONS``): tiny models
    compile faster and run in microseconds either way. A real model's fused loops run long
    enough to repay LLVM's work (the four tests of ``tests/whisper`` using its weights: 80 -> 68 s).
    """
    if "whisper_base_path" not in request.fixturenames:
        yield
        return
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
