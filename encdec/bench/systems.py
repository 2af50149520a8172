"""Runners for every compared system, all driven by the same :class:`~encdec.bench.workloads.Trace`.

- ``encdec-inflight`` / ``encdec-static``: the encdec engine in its two modes;
- ``hf-generate``: transformers PyTorch ``generate``, greedy (or the trace's beam width), static
  padded batches of ``num_slots`` requests in trace order, each batch run to its longest output;
- ``ctranslate2`` / ``ctranslate2-int8``: ``Translator.translate_batch`` on the CTranslate2
  conversion of the same checkpoint, batched like ``hf-generate``.

Every request's output length is exact (``min = max`` new tokens); the static baselines run a
batch to its longest request and keep each row's prefix. They cannot stream a batch, so they
report no time to first token, and a request's latency is its batch's completion.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from encdec.bench.bandwidth import PROBE_BYTES, decode_kv_bytes, measure_bandwidth
from encdec.bench.config import BaselineSection, EngineSection, ExperimentConfig, ModelSpec
from encdec.bench.ctranslate2 import CT2Translate
from encdec.bench.machine import cpu_threads
from encdec.bench.metrics import SystemRun, dense_kv_memory, engine_memory
from encdec.bench.static_batches import run_static_batches
from encdec.bench.workloads import Trace
from encdec.config import ModelConfig

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


class System(Protocol):
    name: str

    def prepare(self, trace: Trace, num_slots: int) -> None:
        """Build whatever is sized to the full trace (called before the warm-up and timed runs)."""

    def run(self, trace: Trace, num_slots: int) -> SystemRun:
        """Serve every request of ``trace``; blocking, results in trace order."""

    def close(self) -> None: ...


class SystemUnavailable(RuntimeError):
    """A system's dependency is missing in this environment."""


ENCDEC_SYSTEMS = (
    "encdec-inflight",
    "encdec-static",
    "encdec-inflight-int8",
    "encdec-static-int8",
    "encdec-inflight-int8-f32kv",
)
"""The engine's systems; ``-int8``: the same model with int8 weights (:func:`encdec.quantize_model`),
so one run puts float32, int8 and CTranslate2 int8 side by side against one float32 reference;
``-f32kv``: int8 with the K/V window decode attention reads in float32, not the int8 default's
bfloat16 (``EngineConfig.window_dtype``)."""


def available_systems() -> dict[str, str | None]:
    """Each system name -> ``None`` when it can run here, else why not."""
    reasons: dict[str, str | None] = {}
    try:
        import encdec.engine as eng

        engine_reason = None if hasattr(eng, "Engine") else "encdec.engine has no Engine yet"
    except ImportError as e:
        engine_reason = f"encdec.engine cannot be imported: {e}"
    for name in ENCDEC_SYSTEMS:
        reasons[name] = engine_reason
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        reasons["hf-generate"] = None
    except ImportError as e:
        reasons["hf-generate"] = str(e)
    try:
        import ctranslate2  # noqa: F401

        reasons["ctranslate2"] = reasons["ctranslate2-int8"] = None
    except ImportError as e:
        reasons["ctranslate2"] = reasons["ctranslate2-int8"] = str(e)
    return reasons


def _dense_batches(trace: Trace, num_slots: int) -> list[list[tuple[int, int]]]:
    """Each static batch's rows (one per beam): (input length, the batch's output length)."""
    batches = [trace.requests[s : s + num_slots] for s in range(0, len(trace), num_slots)]
    return [
        [(len(r.input_ids), max(x.output_len for x in b)) for r in b for _ in range(trace.num_beams)]
        for b in batches
    ]


class HFGenerate:
    """transformers PyTorch ``generate``: greedy, explicit GenerationConfig, static padded batches."""

    name = "hf-generate"

    def __init__(self, model_dir: Path, dtype: str, options: BaselineSection):
        import torch
        import transformers as tf

        tf.logging.set_verbosity_error()
        self._torch = torch
        if options.device == "cpu":
            torch.set_num_threads(cpu_threads(options.threads))
        self.device = options.device
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        model = tf.AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), dtype=torch_dtype)
        self.model = model.to(self.device).eval()
        self.config = ModelConfig.from_json(Path(model_dir) / "config.json")
        self.dtype_bytes = _DTYPE_BYTES[dtype]
        c = self.model.config
        # HF T5's cache update fails when encoder and decoder depths differ (FACTS).
        self.use_cache = not (c.model_type in ("t5", "mt5", "umt5") and c.num_layers != c.num_decoder_layers)

    def generation_config(self, length: int, num_beams: int = 1):
        import transformers as tf

        c = self.model.config
        return tf.GenerationConfig(
            max_new_tokens=length, min_new_tokens=length, do_sample=False, num_beams=num_beams,
            eos_token_id=self.config.eos_token_id, pad_token_id=c.pad_token_id,
            decoder_start_token_id=c.decoder_start_token_id, forced_bos_token_id=None,
            forced_eos_token_id=None, use_cache=self.use_cache,
        )

    def generate_batch(
        self, inputs: Sequence[Sequence[int]], length: int, num_beams: int = 1
    ) -> list[list[int]]:
        torch = self._torch
        S = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), S), self.model.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), S), dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = torch.tensor(list(x))
            mask[i, : len(x)] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                generation_config=self.generation_config(length, num_beams),
            )
        return out[:, 1:].tolist()  # drop the decoder start token

    def prepare(self, trace: Trace, num_slots: int) -> None:
        pass

    def run(self, trace: Trace, num_slots: int) -> SystemRun:
        def batch(inputs, length):
            return self.generate_batch(inputs, length, trace.num_beams)

        run = run_static_batches(self.name, trace, num_slots, batch)
        run.memory = dense_kv_memory(self.config, self.dtype_bytes, _dense_batches(trace, num_slots))
        return run

    def close(self) -> None:
        del self.model
        if self.device == "cuda":
            self._torch.cuda.empty_cache()


def hf_beam_reference(
    model_dir: Path, dtype: str, trace: Trace, *, progress: bool = False
) -> list[list[int]]:
    """HF ``generate``'s beam search on each request alone, at its exact length: the independent
    reference of a beam workload (encdec has no dense beam search of its own to compare with)."""
    hf = HFGenerate(model_dir, dtype, BaselineSection())
    requests = trace.requests
    if progress:
        from tqdm.auto import tqdm

        requests = tqdm(requests, desc=f"HF beam reference {trace.name}", leave=False)
    try:
        return [
            hf.generate_batch([list(r.input_ids)], r.output_len, trace.num_beams)[0][: r.output_len]
            for r in requests
        ]
    finally:
        hf.close()


class EncdecEngine:
    """The encdec engine (``inflight`` or ``static`` mode), sized once per trace and slot count."""

    def __init__(
        self, name: str, model: Any, mode: str, options: EngineSection, *, probe_bytes: int = PROBE_BYTES
    ):
        from encdec.engine import Engine, EngineConfig, Request

        self.name = name
        self.model = model
        self.mode = mode
        self.options = options
        self.probe_bytes = probe_bytes  # the bandwidth probe's read beside the step
        self._classes = (Engine, EngineConfig, Request)
        self._key: tuple[int, int, int] | None = None
        self._engine: Any = None  # one at a time: its page pools are large

    def _config_for(self, trace: Trace, num_slots: int) -> tuple[int, int, int]:
        enc = self.options.max_encoder_len or trace.max_input_len
        new = self.options.max_new_tokens or trace.max_output_len
        return trace.engine_slots(num_slots), enc, new

    def prepare(self, trace: Trace, num_slots: int) -> None:
        key = self._config_for(trace, num_slots)
        if key != self._key:
            self._engine = None
            Engine, EngineConfig, _ = self._classes
            try:
                cfg = EngineConfig(
                    num_slots=key[0], page_size=self.options.page_size, max_encoder_len=key[1],
                    max_new_tokens=key[2], mode=self.mode, **self.options.options,
                )
            except TypeError as e:
                raise ValueError(f"engine.options: {e}") from e
            self._engine = Engine(self.model, cfg)
            self._engine.warmup(max_input_len=key[1])  # compile what the trace uses before timing
            self._key = key

    def run(self, trace: Trace, num_slots: int) -> SystemRun:
        if self._engine is None:
            self.prepare(trace, num_slots)
        _, _, Request = self._classes
        requests = [
            Request(
                inputs=list(r.input_ids), max_new_tokens=r.output_len, min_new_tokens=r.output_len,
                arrival_time=r.arrival_s, num_beams=trace.num_beams,
            )
            for r in trace.requests
        ]
        self._engine.reset_stats()  # peaks and occupancy of this run only
        t0 = time.perf_counter()
        outs = self._engine.generate(requests)
        for r, o in zip(trace.requests, outs, strict=True):
            if o.finish_reason == "error":
                raise RuntimeError(f"{self.name}: request {r.index} was rejected: {o.error}")
        # Latency from the scheduled arrival (as for the static baselines), not the submit stamp,
        # which lags it by up to one dispatch.
        arrival = [t0 + r.arrival_s for r in trace.requests]
        latency = [o.timings["done"] - a for o, a in zip(outs, arrival, strict=True)]
        ttft = [o.timings["first_token"] - a for o, a in zip(outs, arrival, strict=True)]
        stats = self._engine.stats()
        memory = engine_memory(stats, trace.engine_slots(num_slots))
        memory["compiled"] = stats.compiled
        probe = step_probe(trace, num_slots, Request)
        extra: dict[str, Any] = {"decode_step_ms": None}
        if trace.num_beams == 1:
            # The floor's bandwidth, read between the step's probe runs (a neighbour's load moves
            # both): the fastest of those reads, as each of the step's dispatches keeps its fastest.
            reads: list[float] = []
            times = decode_step_times(
                self._engine, probe, between=lambda: reads.append(self._bandwidth_GBps())
            )
            if times is not None:
                extra["decode_step_ms"], extra["run_step_ms"] = times.dispatch_ms, times.run_ms
            extra["bandwidth_GBps"] = max(reads, default=None)
        if extra["decode_step_ms"] is not None:
            window = self._engine.state.window  # what attention reads, where the engine keeps one
            stored = window.self_k_BNKH[0] if window is not None else self._engine.state.pools.self_k_LNPGH
            itemsize = stored.dtype.itemsize
            extra["kv_bytes_per_step"] = decode_kv_bytes(
                self.model.config, itemsize, [len(r.inputs) for r in probe], [r.max_new_tokens for r in probe]
            )
        return SystemRun(
            system=self.name, token_ids=[list(map(int, o.token_ids)) for o in outs], latency_s=latency,
            wall_s=max(o.timings["done"] for o in outs) - t0, ttft_s=ttft, memory=memory, extra=extra,
        )

    def _bandwidth_GBps(self) -> float:
        return measure_bandwidth(self.probe_bytes, numpy_copy=False)["jax_read_GBps"]

    def close(self) -> None:
        self._key, self._engine = None, None


PROBE_REPEATS = 5
"""Times the step probe runs; the bench keeps each dispatch's fastest (``timeit`` advises the
fastest, and five is its default ``repeat``): the machines here are shared, and a neighbour's
burst inflates a probe by 10-30% (bart-base float32 at 8 slots: 15.7-20.6 ms in one process, one
probe after another)."""


def step_probe(trace: Trace, num_slots: int, request_class: type) -> list:
    """The requests the step probe times: the trace's first ``num_slots`` inputs, each to the
    longest of their output lengths, so every step runs with every slot busy (a mixed trace's
    short outputs would leave most steps at one or two rows, and the encoder's start-up would
    weigh on a few steps)."""
    first = trace.requests[:num_slots]
    length = max((r.output_len for r in first), default=0)
    return [
        request_class(inputs=list(r.input_ids), max_new_tokens=length, min_new_tokens=length) for r in first
    ]


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """One decode step's milliseconds, from :func:`decode_step_times`'s runs.

    ``dispatch_ms``: each dispatch's fastest over the runs (the same requests give every run the
    same dispatches, step for step), summed, per step. A dispatch lasts ~10-70 ms, near the
    bandwidth probe's ~9 ms reads, and both keep their fastest: a neighbour's burst that spares
    some of the probe's reads spares some of a step's dispatches too. ``run_ms``: the fastest
    whole run (~0.25-2 s), which a burst anywhere in it inflates. ``dispatch_ms <= run_ms``."""

    dispatch_ms: float
    run_ms: float


def decode_step_times(
    engine: Any, requests: list, repeats: int = PROBE_REPEATS, between: Callable[[], Any] | None = None
) -> StepTimes | None:
    """One decode step's time, every dispatch waited on, over ``repeats`` runs of one batch of
    ``requests`` (at most the engine's slots; of one output length, every step runs full): what
    the bench prints beside the memory floor. Each dispatch's clock starts once its inputs are
    ready. ``between`` is called before each run and after the last (the bench reads the
    machine's bandwidth there). None when the engine has no ``_decode`` to time."""
    import jax

    jitted = getattr(engine, "_decode", None)
    if jitted is None or not requests:
        return None
    spent: list[float] = []

    def waited(*a, **kw):
        # Dispatch is asynchronous: the encoder's work for the same requests may still be running
        # when the step is called. Wait for the step's inputs first, so its time is its own.
        jax.block_until_ready((a, kw))
        start = time.perf_counter()
        out = jax.block_until_ready(jitted(*a, **kw))
        spent.append(time.perf_counter() - start)
        return out

    runs: list[tuple[list[float], int]] = []
    for _ in range(max(1, repeats)):
        if between is not None:
            between()
        spent.clear()
        before = engine.stats().decode_steps
        engine._decode = waited
        try:
            engine.generate([dataclasses.replace(r) for r in requests])
        finally:
            engine._decode = jitted
        steps = engine.stats().decode_steps - before
        if steps:
            runs.append((list(spent), steps))
    if between is not None:
        between()
    if not runs:
        return None
    run_ms = min(sum(s) / steps for s, steps in runs) * 1e3
    shapes = {(len(s), steps) for s, steps in runs}
    if len(shapes) > 1:  # runs that split the steps differently: no dispatch to match
        return StepTimes(dispatch_ms=run_ms, run_ms=run_ms)
    (_, steps), = shapes
    fastest = [min(column) for column in zip(*(s for s, _ in runs), strict=True)]
    return StepTimes(dispatch_ms=sum(fastest) / steps * 1e3, run_ms=run_ms)


def make_system(name: str, spec: ModelSpec, cfg: ExperimentConfig, *, model_dir: Path, model: Any) -> System:
    """Build system ``name`` for one model; ``model`` is the loaded encdec ``Model`` (shared; int8
    when the spec's dtype is ``int8``)."""
    reason = available_systems().get(name, f"unknown system {name!r}")
    if reason is not None:
        raise SystemUnavailable(f"{name}: {reason}")
    if name in ENCDEC_SYSTEMS:
        if "-int8" in name and model.quantize is None:
            from encdec import quantize_model

            model = quantize_model(model)
        options = cfg.engine
        if name.endswith("-f32kv"):
            options = dataclasses.replace(options, options={**options.options, "window_dtype": "float32"})
        mode, probe_bytes = name.split("-")[1], cfg.bandwidth_probe_mib << 20
        return EncdecEngine(name, model, mode, options, probe_bytes=probe_bytes)
    if name == "hf-generate":
        if spec.dtype == "int8":
            raise SystemUnavailable("hf-generate: no int8 weights (dtype int8)")
        return HFGenerate(model_dir, spec.dtype, cfg.hf)
    from encdec.bench.models import ct2_model_dir

    if spec.dtype == "int8":  # int8 weights, float32 activations: CTranslate2's int8 / int8_float32
        compute = "int8" if name == "ctranslate2" else "int8_float32"
    else:
        compute = spec.dtype if name == "ctranslate2" else f"int8_{spec.dtype}"
    return CT2Translate(name, ct2_model_dir(spec, cfg.cache_dir), compute, cfg.ctranslate2)
