"""The host side of the engine: the synchronous API over a scheduler, jitted steps and a front end.

Each :meth:`Engine.step` asks the :class:`~encdec.engine.scheduler.Scheduler` for a plan,
encodes the requests it admits, dispatches one decode and reads the *previous* dispatch's small
result array: dispatch ``k`` is queued before the results of ``k - 1`` are read, so the device
always has work while Python bookkeeps. The engine knows no model family: its front end turns
requests into encoder rows and tokens into text.

Lifecycle: a request is tracked from ``submit`` until its output is handed over (returned by
``generate``, fully consumed from ``stream``, or fetched with ``result``); then the engine holds
nothing of it. A stream closed early cancels its request. Handles are never reused. Every public
method takes one lock, so several threads may share an engine (each call runs alone).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from encdec.cache.allocator import PageAllocator, pages_for
from encdec.cache.pools import PoolConfig, init_pools, pool_bytes
from encdec.checkpoints.pretrained import Model
from encdec.engine.config import EngineConfig
from encdec.engine.frontend import FrontEnd, Prepared, TextFrontEnd
from encdec.engine.outputs import SequenceState, request_output, top_dict
from encdec.engine.request import (
    FinishReason,
    Request,
    RequestError,
    RequestOutput,
    check_limits,
    checked_request,
    group_width,
)
from encdec.engine.scheduler import Admission, NeverFits, PageGrant, Scheduler, SeqSpec
from encdec.engine.sharded import sharded_state, sharded_steps
from encdec.engine.slots import SlotParams, SlotShape, init_state, slot_row, stack_rows
from encdec.engine.stats import Counters, EngineStats
from encdec.engine.steps import (
    FINISHED_BIT,
    FORCED_BIT,
    StepResults,
    attention_path,
    jitted_steps,
    prefill_width,
    prefill_widths,
)
from encdec.engine.stream import TokenStream
from encdec.lora.bank import AdapterBank, gather_rows
from encdec.models.packing import engine_params
from encdec.models.quant import is_quantized, with_encoder_weights
from encdec.sharding import DATA, axis_size, check_mesh, make_mesh, shard_params, to_host


@dataclasses.dataclass
class _Tracked:
    """Host record of a request the engine still holds."""

    rid: int
    request: Request
    """The checked request (plain values)."""
    prepared: Prepared
    timings: dict[str, float]
    seqs: list[SequenceState]
    """One per returned sequence (beams: filled when the group finishes)."""
    slots: tuple[int, ...] = ()
    """The slots it was admitted to; sample ``i`` decodes in ``slots[i]``."""
    prompt_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    spec: SeqSpec | None = None
    preemptions: int = 0
    """Times it gave its slots back; it resumes by replaying its tokens (one sequence) or afresh
    (a group: its samples' repeated tokens are then skipped)."""
    output: RequestOutput | None = None
    done_sink: set[int] | None = None
    """Where ``generate`` learns that it finished."""

    @property
    def tokens(self) -> list[int]:
        """The first sequence's tokens so far (what ``stream`` yields)."""
        return self.seqs[0].tokens


class Engine:
    """In-flight batching over a fixed number of decode slots with a dual paged KV cache.

    ``submit`` queues a request and returns its handle; ``step`` does one round of admission,
    encoding and decoding; ``generate`` and ``stream`` drive ``step`` for you.

    ``frontend`` turns requests into encoder inputs (default :class:`TextFrontEnd`; Whisper's is
    ``encdec.whisper.WhisperFrontEnd``, see ``encdec.whisper.whisper_engine``).

    ``mesh`` (or ``EngineConfig.mesh_shape``): a ``(data, model)`` device mesh
    (:func:`encdec.sharding.make_mesh`) to run over; see :mod:`encdec.sharding`. The engine then
    holds its own split copy of parameters not loaded onto that mesh (``load_pretrained(...,
    mesh=)`` avoids the copy), and splits an adapter bank in place.
    """

    def __init__(
        self,
        model: Model,
        config: EngineConfig | None = None,
        *,
        frontend: FrontEnd | None = None,
        adapters: AdapterBank | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.model = model
        self.config = config = config or EngineConfig()
        if mesh is None and config.mesh_shape is not None:
            mesh = make_mesh(config.mesh_shape)
        if mesh is not None:
            check_mesh(mesh, config.mesh_shape)
        self.mesh = mesh
        self.data_shards = axis_size(mesh, DATA)
        self.frontend = frontend = frontend or TextFrontEnd(model)
        self.adapters = adapters
        cfg = model.config
        self.encoder_buckets = frontend.encoder_buckets(config)
        self.encoder_len = self.encoder_buckets[-1]
        self.max_prefix = config.max_decoder_prefix or frontend.default_prefix_len
        decoder_len = self.max_prefix - 1 + config.max_new_tokens
        if cfg.position != "relative" and decoder_len > cfg.max_positions:
            raise ValueError(
                f"max_new_tokens={config.max_new_tokens} (+ {self.max_prefix - 1} prefix tokens) "
                f"exceed the model's {cfg.max_positions} positions"
            )
        G = config.page_size
        self.slot_shape = SlotShape(
            self_pages=pages_for(decoder_len, G),
            cross_pages=pages_for(self.encoder_len, G),
            stop_tokens=config.max_stop_tokens,
            # A resumed request replays its tokens as a longer prefix.
            prefix=self.max_prefix + (config.max_new_tokens if config.kv_allocation == "incremental" else 0),
            suppress=config.max_suppress_tokens,
            group=min(config.max_num_beams, config.num_slots // self.data_shards),
            max_new=config.max_new_tokens,
            top_logprobs=config.max_logprobs,
        )
        on_cpu = jax.default_backend() == "cpu"
        cache_dtype = config.cache_dtype or ("float32" if on_cpu else jnp.dtype(model.dtype).name)
        self.pool_config = self._pool_config(cache_dtype)
        D = self.data_shards
        self.scheduler = Scheduler(
            config,
            num_self_pages=self.pool_config.num_self_pages // D,
            num_cross_pages=self.pool_config.num_cross_pages // D,
            data_shards=D,
        )
        step_args = (
            cfg,
            jnp.dtype(model.dtype).name,
            config.steps_per_dispatch,
            config.max_logprobs,
            config.attention_impl,
            frontend.encode,
            frontend.logits_processor,
            None if adapters is None else gather_rows,
        )
        # A request prefills its own prefix but its last token.
        self._prefill_widths = prefill_widths(self.max_prefix - 1)
        window = attention_path(config.attention_impl) == "window"
        # With int8 weights the K/V a decode step reads rival the weights' bytes (t5-small at 8
        # slots of 128 + 64 tokens: as many; Whisper's 1,500 cross positions: more): bfloat16
        # halves them at the same teacher-forced agreement and WER (docs/PERFORMANCE.md).
        self.window_dtype = config.window_dtype or ("bfloat16" if is_quantized(model.params) else None)
        params = with_encoder_weights(model.params) if cfg.is_audio else model.params
        if mesh is None:
            self.params = engine_params(params, cfg, decode_rows=config.num_slots)
            pools = init_pools(self.pool_config)
            self.state = init_state(
                pools, config.num_slots, self.slot_shape, window=window, window_dtype=self.window_dtype
            )
            steps = jitted_steps(*step_args)
        else:  # the same steps per data shard, tensor parallel inside (encdec.engine.sharded)
            self.params = shard_params(params, mesh)
            if adapters is not None:
                adapters.shard(mesh)
            shape = self.slot_shape
            self.state = sharded_state(
                self.pool_config, config.num_slots, shape, mesh,
                window=window, window_dtype=self.window_dtype,
            )
            steps = sharded_steps(mesh, cfg.decoder_heads, *step_args)
        self._encode, self._insert, self._decode, self._release, self._grant = steps
        self._grant_width = config.num_slots * (config.steps_per_dispatch // G + 2)
        self._lock = threading.RLock()
        self._handles = itertools.count()
        self._tracked: dict[int, _Tracked] = {}
        self._pending: tuple[jax.Array, tuple[int | None, ...]] | None = None
        self.reset_stats()

    def _pool_config(self, dtype: str) -> PoolConfig:
        """Both pools; with data shards, each shard's block gets an equal whole share (its own
        sentinel included), so the totals are rounded down to a multiple of the shard count."""
        c, cfg, shape, D = self.config, self.model.config, self.slot_shape, self.data_shards
        if c.num_self_pages is None and c.num_cross_pages is None and c.memory_budget_bytes is not None:
            pools = PoolConfig.from_budget(
                cfg,
                memory_bytes=c.memory_budget_bytes,
                page_size=c.page_size,
                cross_kv_fraction=c.cross_kv_fraction,
                dtype=dtype,
            )
            num_self, num_cross = pools.num_self_pages, pools.num_cross_pages
        else:
            num_self, num_cross = c.num_self_pages, c.num_cross_pages  # None: every slot at its longest
            slots = c.num_slots // D
            num_self = D * (slots * shape.self_pages + 1) if num_self is None else num_self
            num_cross = D * (slots * shape.cross_pages + 1) if num_cross is None else num_cross
        if D > 1 and min(num_self, num_cross) < 2 * D:
            raise ValueError(
                f"{num_self} self and {num_cross} cross pages cannot give each of {D} data shards "
                "a sentinel page and one more"
            )
        return PoolConfig.from_pages(
            cfg,
            page_size=c.page_size,
            num_self_pages=num_self // D * D,
            num_cross_pages=num_cross // D * D,
            dtype=dtype,
        )

    @property
    def self_alloc(self) -> PageAllocator:
        return self.scheduler.self_alloc

    @property
    def cross_alloc(self) -> PageAllocator:
        return self.scheduler.cross_alloc

    # ---- requests in --------------------------------------------------------------------------

    def submit(self, request: Request, *, arrival: float | None = None) -> int:
        """Check and queue a request; return its handle. Bad requests raise :class:`RequestError`.

        ``arrival`` (a ``time.perf_counter()`` stamp) is when it arrived, if before now.
        """
        arrival = time.perf_counter() if arrival is None else arrival
        rid = next(self._handles)
        checked = checked_request(request)
        self._enqueue(rid, checked, self._prepare(checked), arrival)
        return rid

    def _prepare(self, request: Request) -> Prepared:
        """The front end's work on a checked request, and the engine's limits (no lock held:
        reading and featurizing audio does not stall other threads' steps)."""
        try:
            prepared = self.frontend.prepare(request, self.config)
        except RequestError:
            raise
        except Exception as e:  # a front end that fails on odd input fails this request alone
            raise RequestError(f"the request could not be prepared: {type(e).__name__}: {e}") from e
        if not 0 < prepared.encoder_len <= self.encoder_len:
            raise RequestError(f"encoder length {prepared.encoder_len} is outside [1, {self.encoder_len}]")
        if request.stop and self.frontend.text(prepared, []) is None:
            raise RequestError("stop strings need text output: give text input to a model with a tokenizer")
        check_limits(
            request,
            self.config,
            max_new_tokens=prepared.max_new_tokens,
            prefix=prepared.prefix,
            max_prefix=self.max_prefix,
            decoder_vocab_size=self.model.config.decoder_vocab_size,
            adapters=self.adapters,
        )
        return prepared

    def _enqueue(
        self,
        rid: int,
        request: Request,
        prepared: Prepared,
        arrival: float,
        done_sink: set[int] | None = None,
    ) -> None:
        bucket = next(b for b in self.encoder_buckets if b >= prepared.encoder_len)
        steps = len(prepared.prefix) - 1 + prepared.max_new_tokens
        width = group_width(request)
        # The prefix but its last token is stored at the encode step, except the positions whose
        # log-probabilities the request wants (the decode steps report them).
        prefill = len(prepared.prefix) - 1
        if request.prompt_logprobs is not None:
            prefill = min(prefill, request.prompt_logprobs_from)
        spec = SeqSpec(
            rid, prepared.encoder_len, bucket, steps, width, self._input_key(request, prepared), prefill
        )
        timings = {"arrival": arrival}
        seqs = [SequenceState() for _ in range(1 if request.num_beams > 1 else width)]
        with self._lock:
            try:
                self.scheduler.add(spec)
            except NeverFits as e:
                raise RequestError(str(e)) from None
            tracked = _Tracked(rid, request, prepared, timings, seqs, spec=spec, done_sink=done_sink)
            self._tracked[rid] = tracked

    def _input_key(self, request: Request, prepared: Prepared) -> tuple | None:
        """What makes two requests' cross K/V equal: encoder row and adapter (None: never share)."""
        if not self.config.cross_kv_reuse or prepared.inputs is None:
            return None
        row = np.ascontiguousarray(prepared.inputs)
        digest = hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest()
        return (request.adapter_id, prepared.encoder_len, row.dtype.str, row.shape, digest)

    def cancel(self, handle: int) -> bool:
        """Stop a request; its slot and pages return to the pool and its output (``cancelled``)
        waits for :meth:`result`. Returns False for a finished or unknown request."""
        with self._lock:
            tracked = self._tracked.get(handle)
            if tracked is None or tracked.output is not None:
                return False
            self._stop_slots(self.scheduler.cancel(handle))
            self._finish(tracked, "cancelled")
            return True

    def _stop_slots(self, slots: Sequence[int]) -> None:
        if slots:
            release = np.zeros(self.config.num_slots, bool)
            release[list(slots)] = True
            self.state = self._release(self.state, jnp.asarray(release))

    def load_adapter(self, adapter_id: str, lora) -> None:
        """Put a LoRA adapter in the bank (or replace one); requests may use it from now on.

        The bank's shapes never change, so nothing recompiles; requests already running keep the
        adapter they were admitted with unless it is replaced under the same id.
        """
        if self.adapters is None:
            raise ValueError("this engine has no adapter bank (pass adapters=AdapterBank(...))")
        with self._lock:
            self.adapters.load(adapter_id, lora)
            self.scheduler.cross_cache.forget(lambda key: key[0] == adapter_id)

    def unload_adapter(self, adapter_id: str) -> None:
        """Remove an adapter; refused while a queued or running request uses it."""
        if self.adapters is None:
            raise ValueError("this engine has no adapter bank")
        with self._lock:
            users = [
                t.rid
                for t in self._tracked.values()
                if t.output is None and t.request.adapter_id == adapter_id
            ]
            if users:
                raise ValueError(f"adapter {adapter_id!r} is in use by {len(users)} unfinished request(s)")
            self.adapters.unload(adapter_id)

    # ---- outputs out --------------------------------------------------------------------------

    def result(self, handle: int) -> RequestOutput | None:
        """The output of a finished request, handed over once (the engine then forgets it);
        None while it runs. ``KeyError`` for a handle it does not hold."""
        with self._lock:
            tracked = self._tracked.get(handle)
            if tracked is None:
                raise KeyError(
                    f"no request with handle {handle}: never submitted, or its output was handed over"
                )
            if tracked.output is None:
                return None
            del self._tracked[handle]
            return tracked.output

    def generate(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Run requests to completion; outputs in request order, one per request. A bad request
        gets an output with ``finish_reason="error"`` (and its handle) and the rest are served.

        ``Request.arrival_time`` delays a request's submission by that many seconds from now.
        """
        start = time.perf_counter()
        requests = list(requests)
        outputs: dict[int, RequestOutput] = {}
        arrivals = []
        for i, request in enumerate(requests):
            rid = next(self._handles)
            try:
                checked = checked_request(request)
            except RequestError as e:
                outputs[i] = _error_output(rid, e)
                continue
            arrivals.append((checked.arrival_time or 0.0, i, rid, checked))
        arrivals.sort(key=lambda a: (a[0], a[1]))
        handles: dict[int, int] = {}
        done: set[int] = set()
        k = 0
        try:
            while k < len(arrivals) or len(done) < len(handles):
                now = time.perf_counter() - start
                while k < len(arrivals) and arrivals[k][0] <= now:
                    at, i, rid, checked = arrivals[k]
                    k += 1
                    try:
                        self._enqueue(rid, checked, self._prepare(checked), start + at, done)
                    except RequestError as e:
                        outputs[i] = _error_output(rid, e)
                        continue
                    handles[i] = rid
                if not self.step() and k < len(arrivals):
                    time.sleep(max(0.0, min(0.01, arrivals[k][0] - (time.perf_counter() - start))))
        finally:  # hand every output over; if the loop raised, stop this call's other requests
            with self._lock:
                for i, rid in handles.items():
                    tracked = self._tracked.get(rid)
                    if tracked is None:
                        continue
                    if tracked.output is None:
                        try:
                            self.cancel(rid)
                        except Exception:  # noqa: BLE001 - already failing: free the host side
                            self.scheduler.cancel(rid)
                    del self._tracked[rid]
                    outputs[i] = tracked.output
        return [outputs[i] for i in range(len(requests))]

    def stream(self, request: Request) -> TokenStream:
        """Submit a request and iterate over its tokens as they are produced (other requests
        progress too). Closing the iterator early (or dropping it) cancels the request.

        One sequence only: beams are known when the search ends, samples come one per slot.
        """
        checked = checked_request(request)
        if group_width(checked) > 1:
            raise RequestError("stream() serves one sequence: num_beams and num_return_sequences must be 1")
        return TokenStream(self, self.submit(checked))

    def _forget(self, handle: int) -> RequestOutput | None:
        """Stop (if unfinished) and drop a request; its output, if it finished."""
        with self._lock:
            tracked = self._tracked.get(handle)
            if tracked is None:
                return None
            if tracked.output is None:
                self.cancel(handle)
            del self._tracked[handle]
            return tracked.output

    # ---- compile up front ---------------------------------------------------------------------

    def warmup(self, max_input_len: int | None = None) -> dict[str, int]:
        """Compile every step variant now (no-op inputs), so serving never compiles; returns the counts.

        ``max_input_len`` limits it to the buckets inputs up to that length use. Refused while
        requests are queued or running (it would advance their slots).
        """
        with self._lock:
            live = sum(t.output is None for t in self._tracked.values())
            if live:
                raise RuntimeError(f"warmup() needs an idle engine: {live} request(s) are queued or running")
            self._pending = None
            c = self.config
            top = min(max_input_len or self.encoder_len, self.encoder_len)
            top = next(b for b in self.encoder_buckets if b >= top)
            for bucket in (b for b in self.encoder_buckets if b <= top):
                limit, rows = c.encoder_batch_rows(bucket), 1
                sizes = []
                while rows < limit:
                    sizes.append(rows)
                    rows *= 2
                for rows in [*sizes, limit]:
                    for width in self._prefill_widths:  # padding rows only: writes nothing
                        self._run_encode(bucket, rows, [], [], width=width)
            if c.cross_kv_reuse:  # starts that share cross pages, padding rows only
                size, most = 1, self.scheduler.shards.slots_per_shard
                while True:
                    slot_bK, pages_bKM = self._slot_arrays(size, ())
                    rows = self._stack_rows(size, [], ())
                    self.state = self._insert(self.state, jnp.asarray(slot_bK), jnp.asarray(pages_bKM), rows)
                    if size >= most:
                        break
                    size = min(2 * size, most)
            if c.kv_allocation == "incremental":
                self._grant_pages(())
            self.state, results = self._decode(
                self.params, self.state, np.int32(c.steps_per_dispatch), **self._decode_args()
            )
            self.state = self._release(self.state, jnp.zeros((c.num_slots,), bool))
            jax.block_until_ready(results)
            self.reset_stats()
            return self.compile_counts()

    def compile_counts(self) -> dict[str, int]:
        """Compiled variants of each jitted step.

        Bounded: one decode, one release, one page grant, per encoder bucket one encode per
        power-of-two batch size up to its row limit and prefill width (one, or two for long
        prompts: :func:`~encdec.engine.steps.prefill_widths`), and one shared-input start per
        power-of-two batch size up to the slot count.
        """
        steps = {
            "encode": self._encode, "insert": self._insert, "decode": self._decode,
            "release": self._release, "grant": self._grant,
        }
        return {name: fn._cache_size() for name, fn in steps.items()}

    # ---- figures ------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Start the counters of :meth:`stats` afresh (e.g. after a warm-up run)."""
        with self._lock:
            self._counters = Counters(self.config.num_slots)
            self.scheduler.reset_peaks()
            self.scheduler.preemptions = 0
            self.scheduler.cross_cache.reset_counts()

    def stats(self) -> EngineStats:
        """Counters since :meth:`reset_stats`, cache and request figures now."""
        with self._lock:
            c = self._counters
            page_bytes = self.pool_config.page_bytes
            return EngineStats(
                dispatches=c.dispatches,
                decode_steps=c.decode_steps,
                encode_batches=c.encode_batches,
                early_releases=c.early_releases,
                slot_fills=tuple(c.slot_fills),
                slot_occupancy=c.occupancy(),
                mean_busy_slots=c.mean_busy_slots(),
                self_pages_total=self.self_alloc.capacity,
                cross_pages_total=self.cross_alloc.capacity,
                self_pages_used=self.self_alloc.num_used,
                cross_pages_used=self.cross_alloc.num_used - self.scheduler.cross_cache.idle_pages,
                peak_self_pages=self.scheduler.peak_self_pages,
                peak_cross_pages=self.scheduler.peak_cross_pages,
                peak_kv_bytes=(self.scheduler.peak_self_pages + self.scheduler.peak_cross_pages) * page_bytes,
                kv_bytes_total=pool_bytes(self.pool_config)["total"],
                compiled=self.compile_counts(),
                tracked_requests=len(self._tracked),
                queued_requests=self.scheduler.num_queued,
                running_requests=self.scheduler.num_running,
                preemptions=self.scheduler.preemptions,
                cross_reuse_lookups=self.scheduler.cross_cache.lookups,
                cross_reuse_hits=self.scheduler.cross_cache.hits,
                cross_idle_pages=self.scheduler.cross_cache.idle_pages,
            )

    # ---- the loop -----------------------------------------------------------------------------

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def step(self) -> bool:
        """One round: admit and encode, dispatch one decode, read the previous dispatch.

        Returns False when there is nothing left to do.
        """
        with self._lock:
            plan = self.scheduler.schedule()
            if plan.preempted:
                self._preempt(plan.preempted)
            self._start(plan.admitted)
            if plan.grants:
                self._grant_pages(plan.grants)
            previous, self._pending = self._pending, None
            if plan.num_steps:
                self.state, results = self._decode(
                    self.params, self.state, np.int32(plan.num_steps), **self._decode_args()
                )
                self._pending = (results, plan.owners)
                busy = sum(rid is not None for rid in plan.owners)
                self._counters.dispatched(time.perf_counter(), plan.num_steps, busy)
                self._counters.early_releases += len(plan.handed_on)
            if previous is not None:
                self._read(*previous)
            return self._pending is not None or self.scheduler.has_work()

    def _decode_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.adapters is not None:
            args["lora_bank"] = self.adapters.stacked
        if self.frontend.masks is not None:
            args["masks"] = self.frontend.masks
        return args

    def _preempt(self, rids: Sequence[int]) -> None:
        """Stop preempted requests' slots; their tokens so far stay, and they resume later."""
        slots = []
        for rid in rids:
            tracked = self._tracked[rid]
            slots.extend(tracked.slots)
            tracked.preemptions += 1
        self._stop_slots(slots)

    def _grant_pages(self, grants: Sequence[PageGrant]) -> None:
        width = self._grant_width
        slot_X = np.full(width, self.config.num_slots, np.int32)
        index_X, page_X = np.zeros(width, np.int32), np.zeros(width, np.int32)
        for i, g in enumerate(grants):
            slot_X[i], index_X[i], page_X[i] = g.slot, g.index, g.page
        self.state = self._grant(self.state, jnp.asarray(slot_X), jnp.asarray(index_X), jnp.asarray(page_X))

    def _start(self, admitted: Sequence[Admission]) -> None:
        """Encode the admitted requests, grouped by bucket in batches of the bucket's row limit;
        start those that share an earlier request's cross pages without encoding."""
        if not admitted:
            return
        now = time.perf_counter()
        c = self._counters
        by_bucket: dict[int, list[tuple[_Tracked, Admission]]] = collections.defaultdict(list)
        shared: list[tuple[_Tracked, Admission]] = []
        for a in admitted:
            tracked = self._tracked[a.rid]
            tracked.timings.setdefault("admitted", now)
            tracked.slots = a.slots
            if tracked.request.prompt_logprobs is not None and not tracked.preemptions:
                tracked.prompt_logprobs = [{} for _ in range(a.prefilled)]  # stored, not reported
            if tracked.preemptions and len(tracked.seqs) > 1:  # samples start over: skip repeats
                for seq in tracked.seqs:
                    seq.skip = len(seq.tokens)
            for slot in a.slots:
                c.slot_fills[slot] += 1
            if not a.encode:
                shared.append((tracked, a))
                continue
            bucket = next(b for b in self.encoder_buckets if b >= tracked.prepared.encoder_len)
            by_bucket[bucket].append((tracked, a))
        failed: set[tuple[int, tuple[int, ...]]] = set()
        for bucket, group in sorted(by_bucket.items()):
            limit = self.config.encoder_batch_rows(bucket)
            # Each data shard encodes its own requests: a batch holds up to ``limit`` of each.
            by_shard = collections.defaultdict(list)
            for item in group:
                by_shard[self._shard_of(item[1])].append(item)
            for i in range(0, max(map(len, by_shard.values())), limit):
                batch = [x for d in sorted(by_shard) for x in by_shard[d][i : i + limit]]
                failed |= self._encode_group(bucket, batch)
        if shared:
            self._insert_shared(shared, failed)

    def _shard_of(self, a: Admission) -> int:
        return self.scheduler.shards.shard_of(a.slots[0])

    def _rows_per_shard(self, admitted: Sequence[Admission], limit: int) -> int:
        """Rows per data shard of a batch of ``admitted``: the busiest shard's count rounded up to
        a power of two (capped), so a lone refill does not pay for a full batch and each batch
        kind compiles at most log2(limit) + 1 variants."""
        most = max(collections.Counter(map(self._shard_of, admitted)).values())
        return min(limit, 1 << (most - 1).bit_length())

    def _insert_shared(
        self, shared: list[tuple[_Tracked, Admission]], failed: set[tuple[int, tuple[int, ...]]]
    ) -> None:
        """Start requests whose cross pages an earlier request's encode wrote (or failed to)."""

        def entry(a: Admission) -> tuple[int, tuple[int, ...]]:
            return self._shard_of(a), a.cross_pages

        for tracked, _ in [(t, a) for t, a in shared if entry(a) in failed]:
            self._finish(tracked, "error", error="encoding failed for a request with the same input")
        live = [(t, a) for t, a in shared if entry(a) not in failed]
        if not live:
            return
        admitted = [a for _, a in live]
        size = self._rows_per_shard(admitted, self.scheduler.shards.slots_per_shard)
        slot_bK, pages_bKM = self._slot_arrays(size, admitted)
        rows = self._stack_rows(size, [self._slot_row(t, a) for t, a in live], admitted)
        self.state = self._insert(self.state, jnp.asarray(slot_bK), jnp.asarray(pages_bKM), rows)
        self._counters.shared_starts += len(live)
        if self.config.kv_allocation != "incremental":
            for tracked, _ in live:
                tracked.prepared.inputs = None

    def _encode_group(
        self, bucket: int, group: list[tuple[_Tracked, Admission]]
    ) -> set[tuple[int, tuple[int, ...]]]:
        """Encode one batch; if it fails, each request alone, so one bad request fails alone.
        Returns the (data shard, cross pages) of the requests whose encode failed."""
        try:
            rows = [self._slot_row(t, a) for t, a in group]
            admitted = [a for _, a in group]
            size = self._rows_per_shard(admitted, self.config.encoder_batch_rows(bucket))
            self._run_encode(bucket, size, [t.prepared.inputs for t, _ in group], rows, admitted)
        except Exception as e:  # noqa: BLE001 - isolate the request that caused it
            if any(leaf.is_deleted() for leaf in jax.tree.leaves(self.state)):
                raise RuntimeError("the engine's device state was lost in a failed encode") from e
            if len(group) > 1:
                return set().union(*(self._encode_group(bucket, [item]) for item in group))
            tracked, a = group[0]
            self.scheduler.forget_cross(a)
            self._finish(tracked, "error", error=f"encoding failed: {type(e).__name__}: {e}")
            return {(self._shard_of(a), a.cross_pages)}
        if self.config.kv_allocation != "incremental":  # else kept: a preempted request re-encodes
            for tracked, _ in group:
                tracked.prepared.inputs = None  # the cross pages hold what the decoder needs now
        return set()

    def _slot_row(self, tracked: _Tracked, a: Admission) -> SlotParams:
        request, prepared = tracked.request, tracked.prepared
        adapter = request.adapter_id
        prefix = prepared.prefix
        if tracked.preemptions and len(tracked.seqs) == 1:  # resume: replay its tokens
            prefix = (*prefix, *tracked.seqs[0].tokens)
        return slot_row(
            self.slot_shape,
            request,
            cross_pages=a.cross_pages,
            encoder_len=prepared.encoder_len,
            prefix=prefix,
            max_new_tokens=prepared.max_new_tokens,
            adapter_row=0 if adapter is None else self.adapters.row_of(adapter),
            gen_start=len(prepared.prefix),
            prefilled=a.prefilled,
        )

    def _by_shard(self, admitted: Sequence[Admission]) -> list[list[int]]:
        """Indices into ``admitted`` of each data shard's requests, in order."""
        D = self.scheduler.shards.num_shards
        return [[r for r, a in enumerate(admitted) if self._shard_of(a) == d] for d in range(D)]

    def _slot_arrays(self, size: int, admitted: Sequence[Admission]) -> tuple[np.ndarray, np.ndarray]:
        """Each request's slots and each slot's own self pages, ``size`` rows per data shard: shard
        ``d``'s requests (in order) fill rows ``d * size ..`` with slot ids local to the shard (page
        ids are already); the rest is padding (no slot)."""
        shape, shards = self.slot_shape, self.scheduler.shards
        D = shards.num_shards
        slot_bK = np.full((D * size, shape.group), shards.slots_per_shard, np.int32)
        pages_bKM = np.zeros((D * size, shape.group, shape.self_pages), np.int32)
        for d, rs in enumerate(self._by_shard(admitted)):
            for i, r in enumerate(rs):
                a = admitted[r]
                slot_bK[d * size + i, : len(a.slots)] = [shards.local_slot(s) for s in a.slots]
                for j, pages in enumerate(a.self_pages):
                    pages_bKM[d * size + i, j, : len(pages)] = pages
        return slot_bK, pages_bKM

    def _stack_rows(self, size: int, rows: list[SlotParams], admitted: Sequence[Admission]) -> SlotParams:
        """``rows`` (one per admitted request) laid out as :meth:`_slot_arrays` lays out slots."""
        shape = self.slot_shape
        stacked = [stack_rows([rows[r] for r in rs], size, shape) for rs in self._by_shard(admitted)]
        return jax.tree.map(lambda *x: jnp.asarray(np.concatenate(x)), *stacked)

    def _run_encode(
        self,
        bucket: int,
        size: int,
        inputs: list[np.ndarray],
        rows: list[SlotParams],
        admitted: Sequence[Admission] = (),
        width: int | None = None,
    ) -> None:
        """One encoder batch of ``size`` rows per data shard, laid out as :meth:`_slot_arrays`;
        its prefill as wide as its longest (``width`` overrides)."""
        mine = self._by_shard(admitted)
        batch = np.concatenate(
            [self.frontend.encoder_batch(bucket, size, [inputs[r] for r in rs]) for rs in mine]
        )
        slot_bK, pages_bKM = self._slot_arrays(size, admitted)
        params_b = self._stack_rows(size, rows, admitted)
        bank = {} if self.adapters is None else {"lora_bank": self.adapters.stacked}
        if width is None:
            width = prefill_width(self._prefill_widths, max((a.prefilled for a in admitted), default=0))
        self.state = self._encode(
            self.params, self.state, jnp.asarray(batch), jnp.asarray(slot_bK), jnp.asarray(pages_bKM),
            params_b, **bank, prefill_width=width,
        )
        self._counters.encode_batches += 1

    def _read(self, results: StepResults, owners: tuple[int | None, ...]) -> None:
        res = to_host(results)
        now = time.perf_counter()
        eos = self.model.config.eos_token_id
        for s, step_row in enumerate(res.tokens_SB):
            for slot in np.nonzero(step_row >= 0)[0]:
                rid = owners[slot]
                tracked = self._tracked.get(rid) if rid is not None else None
                if tracked is None or tracked.output is not None:
                    continue  # cancelled, failed or forgotten while this dispatch ran
                value = int(step_row[slot])
                token = value & (FINISHED_BIT - 1)  # clears FORCED_BIT too
                request = tracked.request
                if value & FORCED_BIT:
                    if request.prompt_logprobs is not None and not tracked.preemptions:
                        n, watched = request.prompt_logprobs, request.prompt_logprob_token_id
                        tracked.prompt_logprobs.append(top_dict(res, s, slot, n, token, watched))
                    continue
                if "first_token" not in tracked.timings:
                    tracked.timings["first_token"] = now
                if request.num_beams > 1:  # a finished group: its hypotheses, best first
                    self._take_hypotheses(tracked, res.hyps)
                    self._finish(tracked, tracked.seqs[0].finish_reason or "length")
                    continue
                seq = tracked.seqs[tracked.slots.index(slot)]
                if seq.skip:  # a resumed sample repeats its tokens up to where it stopped
                    seq.skip -= 1
                    continue
                seq.append(token, float(res.logprob_SB[s, slot]), request.logprobs, res, s, slot)
                if value & FINISHED_BIT:
                    stopped = token == eos or token in request.stop_token_ids
                    seq.finish_reason = "stop" if stopped else "length"
                elif request.stop and len(tracked.seqs) == 1 and self._hits_stop(tracked):
                    self._stop_slots(self.scheduler.cancel(rid))
                    seq.finish_reason = "stop"
                if all(q.finish_reason is not None for q in tracked.seqs):
                    self._finish(tracked, tracked.seqs[0].finish_reason)

    def _take_hypotheses(self, tracked: _Tracked, hyps) -> None:
        eos = self.model.config.eos_token_id
        tracked.seqs = []
        for slot in tracked.slots[: tracked.request.num_return_sequences]:
            n = int(hyps.length_B[slot])
            seq = SequenceState(
                tokens=hyps.tokens_BN[slot, :n].tolist(),
                logprobs=hyps.logprobs_BN[slot, :n].tolist(),
                score=float(hyps.score_B[slot]),
            )
            last = seq.tokens[-1] if seq.tokens else None
            seq.finish_reason = "stop" if last == eos or last in tracked.request.stop_token_ids else "length"
            tracked.seqs.append(seq)

    def _hits_stop(self, tracked: _Tracked) -> bool:
        """Whether the text so far contains a stop string (checked as tokens arrive)."""
        text = self.frontend.text(tracked.prepared, tracked.seqs[0].tokens)
        return text is not None and any(stop in text for stop in tracked.request.stop)

    def _finish(self, tracked: _Tracked, reason: FinishReason, *, error: str | None = None) -> None:
        self.scheduler.finish(tracked.rid)
        tracked.timings["done"] = time.perf_counter()
        texts: list[str | None] = [None] * len(tracked.seqs)
        if reason != "error":
            try:
                texts = [self.frontend.text(tracked.prepared, q.tokens) for q in tracked.seqs]
            except Exception as e:  # noqa: BLE001 - tokens are still worth returning
                error = f"detokenizing failed: {type(e).__name__}: {e}"
        tracked.prepared.inputs = None
        tracked.spec = None
        tracked.output = request_output(
            tracked.rid,
            tracked.request,
            tracked.seqs,
            texts,
            reason,
            timings=dict(tracked.timings),
            error=error,
            audio_seconds=tracked.prepared.audio_seconds,
            prompt_logprobs=tracked.prompt_logprobs if tracked.request.prompt_logprobs is not None else None,
        )
        if tracked.done_sink is not None:
            tracked.done_sink.add(tracked.rid)


def _error_output(rid: int, error: Exception) -> RequestOutput:
    return RequestOutput(rid, [], "error", error=str(error))
