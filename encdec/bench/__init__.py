"""Benchmarks: named model shapes, synthetic request traces, runners for each compared system.

- :mod:`encdec.bench.shapes`: random-weight HF checkpoints of real architectures, cached;
- :mod:`encdec.bench.workloads`: seeded request traces (arrivals, input/output lengths);
- :mod:`encdec.bench.systems`: ``encdec-inflight``, ``encdec-static``, ``hf-generate``, ``ctranslate2``;
- :mod:`encdec.bench.metrics`: throughput, latency percentiles, parity with ``reference_generate``;
- :mod:`encdec.bench.config`, :mod:`encdec.bench.run`: experiment YAML -> ``results.json``, CSV, plots.
"""

from encdec.bench.config import ConfigError, ExperimentConfig, load_experiment
from encdec.bench.run import run_experiment
from encdec.bench.shapes import SHAPES, ct2_dir, write_shape
from encdec.bench.workloads import Trace, make_trace

__all__ = [
    "SHAPES",
    "ConfigError",
    "ExperimentConfig",
    "Trace",
    "ct2_dir",
    "load_experiment",
    "make_trace",
    "run_experiment",
    "write_shape",
]
