"""Decode's new K/V rows written in place on CPU: a C++ kernel called by XLA whose output
aliases the cache it writes (``cpu_kernel.cc``, built on first use by ``build.py``); its
reference is XLA's scatter (``reference.py``)."""

from pallas_kernels.put_rows.api import kernel_available, put_rows
from pallas_kernels.put_rows.reference import put_rows_reference

__all__ = ["kernel_available", "put_rows", "put_rows_reference"]
