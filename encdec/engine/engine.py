"""The host side of the engine: a request queue, admission, encoder batches and the decode loop.

The loop never waits on the device except to read the previous decode dispatch's small result
array: dispatch ``k`` is queued before the results of ``k - 1`` are read, so the device always
has work while Python bookkeeps. Only this class changes page ownership.

Models with an audio encoder (Whisper) take audio requests: :mod:`encdec.engine.audio` turns
them into log-mel windows at submit, and the same loop serves them (one encoder bucket of
``audio_positions``, Whisper's prompt as a forced decoder prefix, its suppression masks).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from encdec.cache.allocator import PageAllocator, pages_for
from encdec.cache.pools import PoolConfig, init_pools, pool_bytes
from encdec.checkpoints.pretrained import Model
from encdec.engine.audio import AudioFrontEnd
from encdec.engine.config import EngineConfig
from encdec.engine.request import (
    DEFAULT_MAX_NEW_TOKENS,
    AudioInput,
    Request,
    RequestError,
    RequestOutput,
    check_inputs,
    validate,
)
from encdec.engine.steps import FINISHED_BIT, SlotInit, decode_steps, encode_insert, init_state, release_slots
from encdec.lora.bank import AdapterBank, gather_rows
from encdec.whisper.tokens import WhisperTokens


@dataclasses.dataclass
class _Live:
    """Host bookkeeping of one request."""

    rid: int
    request: Request
    ids: list[int]
    """Token-id inputs (empty for audio)."""
    is_text: bool
    timings: dict[str, float]
    enc_len: int
    """Encoder positions: its cross-attention length."""
    max_new: int
    prefix: list[int]
    mel_CA: np.ndarray | None = None
    """Log-mel window of an audio request, until it is encoded."""
    audio_seconds: float | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    self_pages: list[int] = dataclasses.field(default_factory=list)
    cross_pages: list[int] = dataclasses.field(default_factory=list)
    output: RequestOutput | None = None
    cancelled: bool = False
    steps_dispatched: int = 0
    """Decode steps dispatched since admission (forced prefix steps included)."""
    draining: bool = False
    """Its slot and pages were handed on before its last tokens were read: the dispatch in
    flight is certain to end it (see :meth:`Engine._release_bounded`)."""


@functools.lru_cache(maxsize=32)
def _jitted_steps(cfg, dtype: str, num_steps: int, implementation: str, lora_gather):
    """The jitted steps, shared by engines of the same model config: a new engine (another mode,
    another slot count) reuses compiled variants instead of compiling them again."""
    lora_kw = {} if lora_gather is None else {"lora_gather": lora_gather}
    encode = jax.jit(
        functools.partial(encode_insert, cfg=cfg, dtype=jnp.dtype(dtype), **lora_kw),
        donate_argnames=("state",),
    )
    decode = jax.jit(
        functools.partial(
            decode_steps,
            cfg=cfg,
            dtype=jnp.dtype(dtype),
            num_steps=num_steps,
            implementation=implementation,
            **lora_kw,
        ),
        donate_argnames=("state",),
    )
    return encode, decode, jax.jit(release_slots, donate_argnames=("state",))


class Engine:
    """In-flight batching over a fixed number of decode slots with a dual paged KV cache.

    ``submit`` queues a request and returns its handle; ``step`` does one round of admission,
    encoding and decoding; ``generate`` and ``stream`` drive ``step`` for you.

    For an audio model, ``whisper_tokens`` overrides the special tokens and suppression lists
    read from the model's directory.
    """

    def __init__(
        self,
        model: Model,
        config: EngineConfig | None = None,
        *,
        adapters: AdapterBank | None = None,
        whisper_tokens: WhisperTokens | None = None,
    ):
        self.model = model
        self.config = config = config or EngineConfig()
        cfg = model.config
        self.audio = AudioFrontEnd(model, whisper_tokens) if cfg.is_audio else None
        if self.audio is not None:
            self.encoder_len, self.encoder_buckets = cfg.audio_positions, (cfg.audio_positions,)
        else:
            self.encoder_len, self.encoder_buckets = config.max_encoder_len, config.encoder_buckets
        self.max_prefix = config.max_decoder_prefix or (
            self.audio.default_prompt_len if self.audio is not None else 1
        )
        if cfg.position != "relative":
            decoder_len = self.max_prefix - 1 + config.max_new_tokens
            if (self.audio is None and config.max_encoder_len > cfg.max_positions) or (
                decoder_len > cfg.max_positions
            ):
                raise ValueError(
                    f"max_encoder_len={config.max_encoder_len} / max_new_tokens={config.max_new_tokens} "
                    f"(+ {self.max_prefix - 1} prefix tokens) exceed the model's "
                    f"{cfg.max_positions} positions"
                )
        on_cpu = jax.default_backend() == "cpu"
        cache_dtype = config.cache_dtype or ("float32" if on_cpu else jnp.dtype(model.dtype).name)
        G = config.page_size
        self._self_width = pages_for(self.max_prefix - 1 + config.max_new_tokens, G)
        self._cross_width = pages_for(self.encoder_len, G)
        self.pool_config = self._pool_config(cache_dtype)
        self.self_alloc = PageAllocator(self.pool_config.num_self_pages)
        self.cross_alloc = PageAllocator(self.pool_config.num_cross_pages)
        self.adapters = adapters
        self.state = init_state(
            init_pools(self.pool_config),
            config.num_slots,
            self._self_width,
            self._cross_width,
            config.max_stop_tokens,
            self.max_prefix,
        )
        self._encode, self._decode, self._release = _jitted_steps(
            cfg,
            jnp.dtype(model.dtype).name,
            config.steps_per_dispatch,
            config.attention_impl,
            None if adapters is None else gather_rows,
        )
        self._next_id = 0
        self._live: dict[int, _Live] = {}
        self._queue: collections.deque[int] = collections.deque()
        self._slots: list[int | None] = [None] * config.num_slots
        self._pending: tuple[jax.Array, list[int | None]] | None = None
        self.reset_stats()

    # ---- construction helpers -------------------------------------------------------------

    def _pool_config(self, dtype: str) -> PoolConfig:
        c, cfg = self.config, self.model.config
        if c.num_self_pages is None and c.num_cross_pages is None and c.memory_budget_bytes is not None:
            return PoolConfig.from_budget(
                cfg,
                memory_bytes=c.memory_budget_bytes,
                page_size=c.page_size,
                cross_kv_fraction=c.cross_kv_fraction,
                dtype=dtype,
            )
        return PoolConfig.from_pages(
            cfg,
            page_size=c.page_size,
            num_self_pages=c.num_self_pages or c.num_slots * self._self_width + 1,
            num_cross_pages=c.num_cross_pages or c.num_slots * self._cross_width + 1,
            dtype=dtype,
        )

    # ---- public API -----------------------------------------------------------------------

    def submit(self, request: Request, *, arrival: float | None = None) -> int:
        """Validate and queue a request; return its handle. Bad requests raise :class:`RequestError`.

        ``arrival`` (a ``time.perf_counter()`` stamp) is when it arrived, if before now.
        """
        arrival = arrival or time.perf_counter()
        rid = self._next_id
        live = self._prepare(rid, request, {"arrival": arrival})
        need_self, need_cross = self._pages_needed(live)
        if need_self > self.self_alloc.capacity or need_cross > self.cross_alloc.capacity:
            raise RequestError(
                f"request needs {need_self} self and {need_cross} cross pages; the cache has "
                f"{self.self_alloc.capacity} and {self.cross_alloc.capacity}: it can never fit"
            )
        self._next_id += 1
        self._live[rid] = live
        self._queue.append(rid)
        return rid

    def cancel(self, handle: int) -> None:
        """Stop a request; its pages return to the pool. Finished requests are left as they are."""
        live = self._live.get(handle)
        if live is None or live.output is not None:
            return
        live.cancelled = True
        if live.draining:
            pass  # ends on device within the dispatch in flight; its slot already serves another
        elif live.slot is None:
            self._queue.remove(handle)
        else:
            release = np.zeros(self.config.num_slots, bool)
            release[live.slot] = True
            self.state = self._release(self.state, jnp.asarray(release))
        self._finish(live, "cancelled")

    def load_adapter(self, adapter_id: str, lora) -> None:
        """Put a LoRA adapter in the bank (or replace one); requests may use it from now on.

        The bank's shapes never change, so nothing recompiles; requests already running keep the
        adapter they were admitted with unless it is replaced under the same id.
        """
        if self.adapters is None:
            raise ValueError("this engine has no adapter bank (pass adapters=AdapterBank(...))")
        self.adapters.load(adapter_id, lora)

    def unload_adapter(self, adapter_id: str) -> None:
        """Remove an adapter; refused while a queued or running request uses it."""
        if self.adapters is None:
            raise ValueError("this engine has no adapter bank")
        users = [
            live.rid
            for live in self._live.values()
            if live.output is None and live.request.adapter_id == adapter_id
        ]
        if users:
            raise ValueError(f"adapter {adapter_id!r} is in use by {len(users)} unfinished request(s)")
        self.adapters.unload(adapter_id)

    def result(self, handle: int) -> RequestOutput | None:
        """The output of a finished request (None while it runs)."""
        return self._live[handle].output

    def generate(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Run requests to completion; outputs in request order. A bad request gets an
        output with ``finish_reason="error"`` and the rest are served."""
        start = time.perf_counter()
        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_time or 0.0)
        handles: dict[int, int] = {}
        outputs: dict[int, RequestOutput] = {}
        k = 0
        while k < len(order) or any(self._live[h].output is None for h in handles.values()):
            now = time.perf_counter() - start
            while k < len(order) and (requests[order[k]].arrival_time or 0.0) <= now:
                i = order[k]
                try:
                    handles[i] = self.submit(requests[i], arrival=start + (requests[i].arrival_time or 0.0))
                except RequestError as e:
                    outputs[i] = RequestOutput(-1, [], "error", error=str(e))
                k += 1
            if not self.step() and k < len(order):
                time.sleep(max(0.0, min(0.01, (requests[order[k]].arrival_time or 0.0) - now)))
        for i, h in handles.items():
            outputs[i] = self._live.pop(h).output
        return [outputs[i] for i in range(len(requests))]

    def stream(self, request: Request) -> Iterator[int]:
        """Yield a request's tokens as they are produced (other queued requests progress too)."""
        handle = self.submit(request)
        live = self._live[handle]
        sent = 0
        while True:
            busy = self.step()
            while sent < len(live.tokens):
                yield live.tokens[sent]
                sent += 1
            if live.output is not None:
                return
            if not busy:
                raise RuntimeError("engine idle while a streamed request is unfinished")

    def warmup(self, max_input_len: int | None = None) -> dict[str, int]:
        """Compile every step variant now (no-op inputs), so serving never compiles; returns the counts.

        ``max_input_len`` limits it to the buckets inputs up to that length use.
        """
        c = self.config
        top = self._bucket_for(min(max_input_len or self.encoder_len, self.encoder_len))
        for bucket in (b for b in self.encoder_buckets if b <= top):
            rows = 1
            while rows <= c.encoder_batch_rows(bucket):
                self._encode_batch(bucket, rows, [])  # padding rows only: writes nothing
                rows *= 2
            if rows // 2 != c.encoder_batch_rows(bucket):
                self._encode_batch(bucket, c.encoder_batch_rows(bucket), [])
        steps = np.int32(c.steps_per_dispatch)
        self.state, results = self._decode(self.model.params, self.state, steps, **self._decode_args())
        self.state = self._release(self.state, jnp.zeros((c.num_slots,), bool))
        jax.block_until_ready(results)
        self.reset_stats()
        return self.compile_counts()

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def reset_stats(self) -> None:
        """Start the figures of :meth:`stats` afresh (e.g. after a warm-up run)."""
        self.metrics = {
            "dispatches": 0,
            "encode_batches": 0,
            "early_releases": 0,
            "decode_steps": 0,
            "peak_self_pages": self.self_alloc.num_used,
            "peak_cross_pages": self.cross_alloc.num_used,
            "slot_fills": [0] * self.config.num_slots,
            "occupancy": [],
        }

    def stats(self) -> dict:
        """Cache, slot and compile figures since construction."""
        page_bytes = self.pool_config.page_bytes
        sizes = pool_bytes(self.pool_config)
        return {
            **{k: v for k, v in self.metrics.items() if k != "occupancy"},
            "slot_occupancy": list(self.metrics["occupancy"]),  # (perf_counter time, busy slots)
            "self_pages_total": self.self_alloc.capacity,
            "cross_pages_total": self.cross_alloc.capacity,
            "self_pages_used": self.self_alloc.num_used,
            "cross_pages_used": self.cross_alloc.num_used,
            "peak_kv_bytes": (self.metrics["peak_self_pages"] + self.metrics["peak_cross_pages"])
            * page_bytes,
            "kv_bytes_total": sizes["total"],
            "compiled": self.compile_counts(),
        }

    def compile_counts(self) -> dict[str, int]:
        """Compiled variants of each jitted step.

        Bounded: one decode, one release, and per encoder bucket one encode per power-of-two
        batch size up to its row limit.
        """
        return {
            name: fn._cache_size()
            for name, fn in (("encode", self._encode), ("decode", self._decode), ("release", self._release))
        }

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> bool:
        """Dispatch one decode, read the previous one, admit and encode into freed slots.

        Returns False when there is nothing left to do.
        """
        self._admit()
        previous, self._pending = self._pending, None
        if any(s is not None for s in self._slots):
            steps = self._dispatch_steps()
            self.state, results = self._decode(
                self.model.params, self.state, np.int32(steps), **self._decode_args()
            )
            self._pending = (results, list(self._slots))
            self.metrics["dispatches"] += 1
            self.metrics["decode_steps"] += steps
            self.metrics["occupancy"].append((time.perf_counter(), sum(s is not None for s in self._slots)))
            self._release_bounded(steps)
        if previous is not None:
            self._read(*previous)
            self._admit()  # queued behind the decode just dispatched: the device never idles
        return self._pending is not None or bool(self._queue) or any(s is not None for s in self._slots)

    def _remaining_steps(self, live: _Live) -> int:
        """Decode steps until ``live``'s token budget is spent (its forced prefix counts)."""
        return live.max_new + len(live.prefix) - 1 - live.steps_dispatched

    def _dispatch_steps(self) -> int:
        """Steps of the next dispatch: ``steps_per_dispatch``, cut short where the last slot's
        budget ends and, while requests wait for a slot (in-flight), where the first one's does."""
        c = self.config
        remaining = [self._remaining_steps(self._live[rid]) for rid in self._slots if rid is not None]
        steps = min(c.steps_per_dispatch, max(remaining))
        if c.mode == "inflight" and self._queue:
            steps = min(steps, min(remaining))
        return max(1, steps)

    def _release_bounded(self, steps: int) -> None:
        """Hand on the slots whose requests reach ``max_new_tokens`` within the dispatch just issued.

        Without this a slot whose request ends in dispatch ``k`` idles through dispatch ``k + 1``
        too, as its end is only read after ``k + 1`` is queued. A request's token budget bounds
        its end, so its slot and pages can go to the next request now: that request's encode is
        queued behind dispatch ``k`` (the state it takes is dispatch ``k``'s output) and it
        decodes from dispatch ``k + 1``. Requests ending early at EOS or a stop token are
        found when read, as before.
        """
        for rid in self._slots:
            if rid is None:
                continue
            live = self._live[rid]
            live.steps_dispatched += steps
            if self._remaining_steps(live) <= 0:
                self._free_slot(live)
                live.draining = True
                self.metrics["early_releases"] += 1

    def _free_slot(self, live: _Live) -> None:
        self._slots[live.slot] = None
        self.self_alloc.free(live.self_pages)
        self.cross_alloc.free(live.cross_pages)
        live.slot, live.self_pages, live.cross_pages = None, [], []

    def _bank_arg(self) -> dict:
        return {} if self.adapters is None else {"lora_bank": self.adapters.stacked}

    def _decode_args(self) -> dict:
        return {**self._bank_arg(), **(self.audio.masks if self.audio is not None else {})}

    def _bucket_for(self, length: int) -> int:
        return next(b for b in self.encoder_buckets if b >= length)

    def _pages_needed(self, live: _Live) -> tuple[int, int]:
        """Self pages (prefix and generated tokens) and cross pages (encoder positions)."""
        G = self.config.page_size
        return pages_for(len(live.prefix) - 1 + live.max_new, G), pages_for(live.enc_len, G)

    def _admit(self) -> None:
        c = self.config
        free = [i for i, s in enumerate(self._slots) if s is None]
        if c.mode == "static" and len(free) < c.num_slots:
            return
        admitted: list[_Live] = []
        while free and self._queue:
            live = self._live[self._queue[0]]
            need_self, need_cross = self._pages_needed(live)
            self_pages = self.self_alloc.allocate(need_self)
            if self_pages is None:
                break  # FIFO: the head waits for pages, so nothing behind it can starve it
            cross_pages = self.cross_alloc.allocate(need_cross)
            if cross_pages is None:
                self.self_alloc.free(self_pages)
                break
            self._queue.popleft()
            live.slot = free.pop(0)
            live.self_pages, live.cross_pages = self_pages, cross_pages
            live.timings["admitted"] = time.perf_counter()
            self._slots[live.slot] = live.rid
            self.metrics["slot_fills"][live.slot] += 1
            admitted.append(live)
        if not admitted:
            return
        self.metrics["peak_self_pages"] = max(self.metrics["peak_self_pages"], self.self_alloc.num_used)
        self.metrics["peak_cross_pages"] = max(self.metrics["peak_cross_pages"], self.cross_alloc.num_used)
        by_bucket: dict[int, list[_Live]] = collections.defaultdict(list)
        for live in admitted:
            by_bucket[self._bucket_for(live.enc_len)].append(live)
        for bucket, group in sorted(by_bucket.items()):
            limit = c.encoder_batch_rows(bucket)
            for i in range(0, len(group), limit):
                chunk = group[i : i + limit]
                # Row counts are powers of two (capped): a lone refill does not pay for a full
                # batch, and each bucket compiles at most log2(limit) + 1 variants.
                rows = min(limit, 1 << (len(chunk) - 1).bit_length())
                self._encode_batch(bucket, rows, chunk)

    def _encode_batch(self, bucket: int, rows: int, group: list[_Live]) -> None:
        c, cfg = self.config, self.model.config
        if self.audio is not None:
            inputs = np.zeros((rows, *self.audio.mel_shape), np.float32)
        else:
            inputs = np.full((rows, bucket), cfg.pad_token_id, np.int32)
        init = {
            "slot_b": np.full(rows, c.num_slots, np.int32),
            "self_page_table_bM": np.zeros((rows, self._self_width), np.int32),
            "cross_page_table_bM": np.zeros((rows, self._cross_width), np.int32),
            "enc_len_b": np.zeros(rows, np.int32),
            "max_new_b": np.zeros(rows, np.int32),
            "min_new_b": np.zeros(rows, np.int32),
            "stop_ids_bX": np.full((rows, c.max_stop_tokens), -1, np.int32),
            "temperature_b": np.zeros(rows, np.float32),
            "top_k_b": np.zeros(rows, np.int32),
            "top_p_b": np.ones(rows, np.float32),
            "seed_b": np.zeros(rows, np.int32),
            "adapter_row_b": np.zeros(rows, np.int32),
            "prefix_bX": np.zeros((rows, self.max_prefix), np.int32),
            "prefix_len_b": np.ones(rows, np.int32),
        }
        for r, live in enumerate(group):
            req = live.request
            if live.mel_CA is not None:
                inputs[r] = live.mel_CA
                live.mel_CA = None  # the cross pages hold what the decoder needs from now on
            else:
                inputs[r, : len(live.ids)] = live.ids
            init["slot_b"][r] = live.slot
            init["self_page_table_bM"][r, : len(live.self_pages)] = live.self_pages
            init["cross_page_table_bM"][r, : len(live.cross_pages)] = live.cross_pages
            init["enc_len_b"][r] = live.enc_len
            init["max_new_b"][r] = live.max_new
            init["prefix_bX"][r, : len(live.prefix)] = live.prefix
            init["prefix_len_b"][r] = len(live.prefix)
            init["min_new_b"][r] = req.min_new_tokens
            init["stop_ids_bX"][r, : len(req.stop_token_ids)] = list(req.stop_token_ids)
            init["temperature_b"][r] = req.temperature
            init["top_k_b"][r] = req.top_k
            init["top_p_b"][r] = req.top_p
            init["seed_b"][r] = req.seed
            if req.adapter_id is not None:
                init["adapter_row_b"][r] = self.adapters.row_of(req.adapter_id)
        self.state = self._encode(
            self.model.params,
            self.state,
            jnp.asarray(inputs),
            SlotInit(**{k: jnp.asarray(v) for k, v in init.items()}),
            **self._bank_arg(),
        )
        self.metrics["encode_batches"] += 1

    def _read(self, results: jax.Array, owners: list[int | None]) -> None:
        res = np.asarray(results)
        now = time.perf_counter()
        for step_row in res:
            for slot in np.nonzero(step_row >= 0)[0]:
                rid = owners[slot]
                live = self._live.get(rid) if rid is not None else None
                if live is None or live.output is not None:
                    continue  # cancelled (or already finished) while this dispatch ran
                value = int(step_row[slot])
                token = value & (FINISHED_BIT - 1)
                if not live.tokens:
                    live.timings["first_token"] = now
                live.tokens.append(token)
                if value & FINISHED_BIT:
                    req = live.request
                    stop = token == self.model.config.eos_token_id or token in req.stop_token_ids
                    self._finish(live, "stop" if stop else "length")

    def _finish(self, live: _Live, reason: str) -> None:
        if live.slot is not None:
            self._free_slot(live)
        live.timings["done"] = time.perf_counter()
        text = None
        tok = self.model.tokenizer
        if self.audio is not None:
            text = self.audio.text(tok, live.tokens)
        elif live.is_text and tok is not None:
            text = tok.decode(live.tokens, skip_special_tokens=True)
        live.output = RequestOutput(
            live.rid, list(live.tokens), reason, text, dict(live.timings), audio_seconds=live.audio_seconds
        )

    def _prepare(self, rid: int, request: Request, timings: dict[str, float]) -> _Live:
        """Inputs (token ids or a log-mel window), decoder prefix and token budget; validated."""
        cfg = self.model.config
        mel_CA, seconds = None, None
        if self.audio is not None:
            audio = self.audio.prepare(request.inputs)
            ids, is_text, enc_len = [], False, self.encoder_len
            mel_CA, seconds, prefix = audio.mel_CA, audio.seconds, audio.prompt
            if request.decoder_prefix is not None:
                prefix = [int(t) for t in request.decoder_prefix]
            limit = self.audio.max_new_tokens(len(prefix))
            asked = self.config.max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
            max_new = min(asked, limit)
        else:
            if isinstance(request.inputs, AudioInput):
                raise RequestError(f"{cfg.model_type} has no audio encoder: inputs must be text or token ids")
            ids, is_text = self._tokenize(request)
            ids = check_inputs(ids, self.config, cfg.vocab_size)
            enc_len = len(ids)
            prefix = [cfg.decoder_start_token_id]
            if request.decoder_prefix is not None:
                prefix = [int(t) for t in request.decoder_prefix]
            max_new = DEFAULT_MAX_NEW_TOKENS if request.max_new_tokens is None else request.max_new_tokens
        validate(
            request,
            self.config,
            self.adapters,
            max_new_tokens=max_new,
            prefix=prefix,
            max_prefix=self.max_prefix,
            decoder_vocab_size=cfg.decoder_vocab_size,
        )
        return _Live(rid, request, ids, is_text, timings, enc_len, max_new, prefix, mel_CA, seconds)

    def _tokenize(self, request: Request) -> tuple[list[int], bool]:
        if isinstance(request.inputs, str):
            if self.model.tokenizer is None:
                raise RequestError("text input needs a tokenizer; this model has none (pass token ids)")
            return list(self.model.tokenizer(request.inputs)["input_ids"]), True
        try:
            return [int(t) for t in request.inputs], False
        except (TypeError, ValueError) as e:
            raise RequestError(f"inputs must be text or a sequence of token ids: {e}") from e
