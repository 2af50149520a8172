"""Pallas GPU kernels, each beside its pure-JAX reference.

One folder per op: ``reference.py`` (pure JAX, also the CPU path), ``kernel.py`` (Pallas with
the Triton lowering) and ``api.py`` choosing between them (``implementation="pallas" | "xla" |
"auto"``).
"""
