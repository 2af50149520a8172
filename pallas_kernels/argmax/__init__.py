"""Argmax over the last axis on CPU: a C++ AVX-512 kernel called by XLA (``cpu_kernel.cc``,
built on first use by ``build.py``); its reference is ``jnp.argmax``. Greedy decoding's pick."""

from pallas_kernels.argmax.api import argmax, argmax_normalizer, kernel_available

__all__ = ["argmax", "argmax_normalizer", "kernel_available"]
