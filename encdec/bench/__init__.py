"""Benchmarks: named model shapes, synthetic request traces, runners for each compared system.

- :mod:`encdec.bench.shapes`: random-weight HF checkpoints of real architectures, cached;
- :mod:`encdec.bench.workloads`: seeded request traces (arrivals, input/output lengths);
- :mod:`encdec.bench.systems`: ``encdec-inflight``, ``encdec-static``, ``hf-generate``, ``ctranslate2``;
- :mod:`encdec.bench.metrics`: throughput, latency percentiles, parity with ``reference_generate``;
- :mod:`encdec.bench.config`, :mod:`encdec.bench.run`: experiment YAML -> ``results.json``, CSV, plots.
"""
