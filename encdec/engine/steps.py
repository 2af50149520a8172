"""The engine's device side: a typed state and the pure jitted steps over it.

``encode_insert`` runs the encoder on a bucket-shaped batch (token ids, or log-mel windows for
audio models), writes every layer's cross K/V into the requests' cross pages and sets their
slots' rows; ``decode_steps`` advances every slot ``n`` tokens (a ``lax.scan``), samples on
device and retires finished slots. Both take the state donated and return it. The host reads
one small int32 array per decode dispatch.

A slot starts from its request's forced decoder prefix (the start token, or Whisper's 4-token
prompt): while the next position is inside the prefix, the step feeds the prefix token instead
of the sampled one and reports nothing (-1), so one compiled step serves every prompt length.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from encdec.cache.paged_kv import PagedKV, write_cross
from encdec.cache.pools import PagePools
from encdec.cache.window_kv import WindowKV, open_window
from encdec.config import ModelConfig
from encdec.models import decode, encode, project_cross_kv
from encdec.models.whisper import encode_audio
from encdec.sampling import ban_token, ban_tokens, sample, step_keys

# A decode result packs the token and a finished flag: token | FINISHED_BIT; -1 = slot idle.
FINISHED_BIT = 1 << 24


@flax.struct.dataclass
class DecodeState:
    """Everything the decode step reads, one row per slot."""

    pools: PagePools
    self_page_table_BM: jax.Array
    self_lengths_B: jax.Array
    """Tokens stored in the self pages: the position of ``last_token_B``."""
    cross_page_table_BM: jax.Array
    cross_lengths_B: jax.Array
    active_B: jax.Array
    last_token_B: jax.Array
    num_generated_B: jax.Array
    """Sampled tokens so far (forced prefix tokens not counted)."""
    max_new_B: jax.Array
    min_new_B: jax.Array
    stop_ids_BX: jax.Array
    """Per-slot stop tokens besides EOS, padded with -1."""
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    seed_B: jax.Array
    adapter_row_B: jax.Array
    """Row of the LoRA adapter bank (0 = none)."""
    prefix_BX: jax.Array
    """Forced decoder tokens of each slot (start token first), padded with 0."""
    prefix_len_B: jax.Array


@flax.struct.dataclass
class SlotInit:
    """Rows for the slots an encoder batch fills; a padding row has ``slot == num_slots``."""

    slot_b: jax.Array
    self_page_table_bM: jax.Array
    cross_page_table_bM: jax.Array
    enc_len_b: jax.Array
    max_new_b: jax.Array
    min_new_b: jax.Array
    stop_ids_bX: jax.Array
    temperature_b: jax.Array
    top_k_b: jax.Array
    top_p_b: jax.Array
    seed_b: jax.Array
    adapter_row_b: jax.Array
    prefix_bX: jax.Array
    prefix_len_b: jax.Array


def init_state(
    pools: PagePools, num_slots: int, self_pages: int, cross_pages: int, max_stop: int, max_prefix: int = 1
) -> DecodeState:
    B = num_slots

    def zeros():  # a fresh buffer per field: donated fields must not alias
        return jnp.zeros((B,), jnp.int32)

    return DecodeState(
        pools=pools,
        self_page_table_BM=jnp.zeros((B, self_pages), jnp.int32),
        self_lengths_B=zeros(),
        cross_page_table_BM=jnp.zeros((B, cross_pages), jnp.int32),
        cross_lengths_B=zeros(),
        active_B=jnp.zeros((B,), bool),
        last_token_B=zeros(),
        num_generated_B=zeros(),
        max_new_B=zeros(),
        min_new_B=zeros(),
        stop_ids_BX=jnp.full((B, max_stop), -1, jnp.int32),
        temperature_B=jnp.zeros((B,), jnp.float32),
        top_k_B=zeros(),
        top_p_B=jnp.ones((B,), jnp.float32),
        seed_B=zeros(),
        adapter_row_B=zeros(),
        prefix_BX=jnp.zeros((B, max_prefix), jnp.int32),
        prefix_len_B=jnp.ones((B,), jnp.int32),
    )


def _lora_rows(lora_bank, lora_gather, rows):
    return None if lora_bank is None else lora_gather(lora_bank, rows)


def encode_insert(
    params,
    state: DecodeState,
    inputs: jax.Array,
    init: SlotInit,
    lora_bank=None,
    *,
    cfg: ModelConfig,
    dtype,
    lora_gather=None,
) -> DecodeState:
    """Encode a batch, write its cross K/V pages and start its slots.

    ``inputs``: right-padded token ids ``[b, S]``, or for audio models log-mel windows
    ``[b, C, A]`` (every row ``S = audio_positions`` encoder positions, no padding mask).
    """
    lora = _lora_rows(lora_bank, lora_gather, init.adapter_row_b)
    if cfg.is_audio:
        enc_bSD = encode_audio(params, cfg, inputs, dtype=dtype, lora=lora)
    else:
        S = inputs.shape[1]
        mask_bS = jnp.arange(S, dtype=jnp.int32)[None, :] < init.enc_len_b[:, None]
        enc_bSD = encode(params, cfg, inputs, mask_bS, dtype=dtype, lora=lora)
    k_LbSNH, v_LbSNH = project_cross_kv(params, cfg, enc_bSD, lora=lora)
    pool_dtype = state.pools.cross_k_LNPGH.dtype
    pools = write_cross(
        state.pools,
        k_LbSNH.astype(pool_dtype),
        v_LbSNH.astype(pool_dtype),
        init.cross_page_table_bM,
        init.enc_len_b,
    )
    slot_b = init.slot_b

    def put(x, rows):
        return x.at[slot_b].set(rows.astype(x.dtype), mode="drop")

    b = slot_b.shape[0]
    return state.replace(
        pools=pools,
        self_page_table_BM=put(state.self_page_table_BM, init.self_page_table_bM),
        self_lengths_B=put(state.self_lengths_B, jnp.zeros((b,), jnp.int32)),
        cross_page_table_BM=put(state.cross_page_table_BM, init.cross_page_table_bM),
        cross_lengths_B=put(state.cross_lengths_B, init.enc_len_b),
        active_B=put(state.active_B, jnp.ones((b,), bool)),
        last_token_B=put(state.last_token_B, init.prefix_bX[:, 0]),
        num_generated_B=put(state.num_generated_B, jnp.zeros((b,), jnp.int32)),
        max_new_B=put(state.max_new_B, init.max_new_b),
        min_new_B=put(state.min_new_B, init.min_new_b),
        stop_ids_BX=put(state.stop_ids_BX, init.stop_ids_bX),
        temperature_B=put(state.temperature_B, init.temperature_b),
        top_k_B=put(state.top_k_B, init.top_k_b),
        top_p_B=put(state.top_p_B, init.top_p_b),
        seed_B=put(state.seed_B, init.seed_b),
        adapter_row_B=put(state.adapter_row_B, init.adapter_row_b),
        prefix_BX=put(state.prefix_BX, init.prefix_bX),
        prefix_len_B=put(state.prefix_len_B, init.prefix_len_b),
    )


def decode_steps(
    params,
    state: DecodeState,
    steps: jax.Array | int,
    lora_bank=None,
    suppress_V: jax.Array | None = None,
    suppress_first_V: jax.Array | None = None,
    *,
    cfg: ModelConfig,
    dtype,
    num_steps: int,
    implementation: str,
    lora_gather=None,
) -> tuple[DecodeState, jax.Array]:
    """Advance every active slot ``steps`` tokens (traced, at most the static ``num_steps``);
    return the state and ``[num_steps, B]`` results, rows from ``steps`` on -1.

    One compiled step serves every dispatch length, so the host can end a dispatch exactly
    where a slot's token budget ends.

    ``suppress_V`` / ``suppress_first_V``: the model's banned tokens (Whisper's
    ``suppress_tokens``) at every sampled step and, besides, at a slot's first sampled step
    (``begin_suppress_tokens``); boolean ``[V]`` masks, or None for models without them.

    ``implementation``: ``"window"`` attends over a dense copy of the pages made once per
    dispatch (:mod:`encdec.cache.window_kv`); else paged attention with that implementation.
    ``"auto"`` is the Pallas kernel on GPU and the window elsewhere.
    """
    lora = _lora_rows(lora_bank, lora_gather, state.adapter_row_B)
    if implementation == "auto" and jax.default_backend() != "gpu":
        implementation = "window"
    window = None
    if implementation == "window":
        window = open_window(
            state.pools, state.self_page_table_BM, state.self_lengths_B,
            state.cross_page_table_BM, state.cross_lengths_B,
        )

    def body(i, carry):
        state, window, results_SB = carry
        active_B = state.active_B
        if window is not None:
            kv = WindowKV(
                pools=state.pools,
                window=window,
                self_page_table_BM=state.self_page_table_BM,
                self_lengths_B=state.self_lengths_B,
                cross_lengths_B=state.cross_lengths_B,
                active_B=active_B,
            )
        else:
            kv = PagedKV(
                pools=state.pools,
                self_page_table_BM=state.self_page_table_BM,
                self_lengths_B=state.self_lengths_B,
                cross_page_table_BM=state.cross_page_table_BM,
                cross_lengths_B=state.cross_lengths_B,
                active_B=active_B,
                implementation=implementation,
            )
        logits_B1V, kv = decode(
            params,
            cfg,
            state.last_token_B[:, None],
            state.self_lengths_B[:, None],
            kv,
            dtype=dtype,
            lora=lora,
        )
        n_B = state.num_generated_B
        logits_BV = ban_token(logits_B1V[:, 0], jnp.where(n_B < state.min_new_B, cfg.eos_token_id, -1))
        if suppress_V is not None:
            first_B1 = (n_B == 0)[:, None]
            logits_BV = ban_tokens(logits_BV, suppress_V[None, :] | (first_B1 & suppress_first_V[None, :]))
        keys = step_keys(state.seed_B, n_B)
        token_B = sample(logits_BV, keys, state.temperature_B, state.top_k_B, state.top_p_B)
        # The token after position p is forced while p + 1 is inside the slot's prefix.
        next_B1 = state.self_lengths_B[:, None] + 1
        forced_B = next_B1[:, 0] < state.prefix_len_B
        forced_token_B = jnp.take_along_axis(
            state.prefix_BX, jnp.minimum(next_B1, state.prefix_BX.shape[1] - 1), axis=1
        )[:, 0]
        token_B = jnp.where(forced_B, forced_token_B, token_B)
        emits_B = active_B & ~forced_B
        stop_B = (token_B == cfg.eos_token_id) | jnp.any(token_B[:, None] == state.stop_ids_BX, axis=-1)
        finished_B = emits_B & (stop_B | (n_B + 1 >= state.max_new_B))
        result_B = jnp.where(emits_B, token_B | jnp.where(finished_B, FINISHED_BIT, 0), -1)
        state = state.replace(
            pools=kv.pools,
            self_lengths_B=kv.self_lengths_B,
            last_token_B=jnp.where(active_B, token_B, state.last_token_B),
            num_generated_B=n_B + emits_B.astype(jnp.int32),
            active_B=active_B & ~finished_B,
        )
        results_SB = jax.lax.dynamic_update_slice(results_SB, result_B.astype(jnp.int32)[None], (i, 0))
        return state, None if window is None else kv.window, results_SB

    B = state.active_B.shape[0]
    steps = jnp.clip(jnp.asarray(steps, jnp.int32), 0, num_steps)
    results_SB = jnp.full((num_steps, B), -1, jnp.int32)
    state, _, results_SB = jax.lax.fori_loop(0, steps, body, (state, window, results_SB))
    return state, results_SB


def release_slots(state: DecodeState, release_B: jax.Array) -> DecodeState:
    """Stop the given slots (cancellation); their pages are freed by the host."""
    return state.replace(active_B=state.active_B & ~release_B)
