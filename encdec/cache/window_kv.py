"""``SlotWindow`` and ``WindowKV``: paged storage, attention over a dense per-slot copy (XLA path).

XLA has no paged attention: its reference gathers every layer's pages into a dense copy on every
step, and XLA:CPU gathers at 2-3 GB/s. Opening such a copy once per dispatch still cost more
than the steps themselves on Whisper-base (16 slots of 1500 cross and 448 self positions: about
330 ms of gathers per 4-step dispatch against 35 ms of step reads, 2 cores).

So the XLA path keeps a :class:`SlotWindow` in the engine's state for as long as the engine
lives: every slot's K/V of every layer, dense and slot-major (``[B, N, K, H]``). It changes only
where the cache does:

- a request that starts gets its cross rows in its group's first slot (from the encoder output
  it was just encoded with, or gathered from the cross pages it shares; the group's other slots,
  beams or samples, read them there: :func:`cross_sources`) and zeroed self rows in every slot
  (then its prefilled prefix);
- a decode step appends each active slot's new row, as it does to the pools;
- a beam that continues another takes over that beam's self rows.

Nothing is gathered per step or per dispatch. The pools stay the store of record (cross pages
are shared by reference between beams and between requests of the same input); the window is
what attention reads. Rows past a slot's length hold zeros or finite older values, never NaN
from an earlier occupant (self rows are zeroed at start), so attention masks their logits only.

The Pallas kernel reads pages directly: the GPU path keeps :class:`~encdec.cache.paged_kv.PagedKV`
and has no window.
"""

from __future__ import annotations

import os

import flax.struct
import jax
import jax.numpy as jnp

from encdec.cache.paged_kv import store_self_row
from encdec.cache.pools import PagePools
from encdec.models.kv import replace_at
from encdec.sharding import per_head_shard
from pallas_kernels.cpu_build import unpartitioned
from pallas_kernels.paged_attention.reference import attention_over_keys
from pallas_kernels.put_rows import put_rows
from pallas_kernels.window_attention import kernel_applies, window_attention

# "xla" keeps XLA's per-slot loop where the CPU kernel would run (comparisons, debugging).
WINDOW_ATTENTION_ENV = "ENCDEC_WINDOW_ATTENTION"


@flax.struct.dataclass
class SlotWindow:
    """Every slot's K/V, one dense array per layer (no slicing of a stacked array on a step's
    read path: XLA:CPU would copy the slice), slot-major so one slot's rows are contiguous."""

    self_k_BNKH: tuple[jax.Array, ...]
    self_v_BNKH: tuple[jax.Array, ...]
    cross_k_BNSH: tuple[jax.Array, ...]
    cross_v_BNSH: tuple[jax.Array, ...]

    def take_self_rows(self, parent_B: jax.Array) -> SlotWindow:
        """Slot ``b``'s self rows become slot ``parent_B[b]``'s (beams continuing another beam).

        Copied in place, one moved slot at a time: a gather of the whole window moved 176 MB a
        beam step at 16 Whisper-base slots. A slot copied from must not be copied to
        (``beam._places`` keeps every continued beam in its own slot).
        """

        def one(b, rows):
            return tuple(
                jax.lax.dynamic_update_slice_in_dim(x, jax.lax.dynamic_slice_in_dim(x, parent_B[b], 1), b, 0)
                for x in rows
            )

        L = len(self.self_k_BNKH)
        moved_B = parent_B != jnp.arange(parent_B.shape[0])
        rows = for_each_slot(moved_B, one, (*self.self_k_BNKH, *self.self_v_BNKH))
        return self.replace(self_k_BNKH=rows[:L], self_v_BNKH=rows[L:])

    def start_self_rows(self, slot_X: jax.Array) -> SlotWindow:
        """Zero the self rows of starting slots (``slot_X``; ``B`` and beyond: none)."""

        def zero(x):
            return x.at[slot_X].set(jnp.zeros((), x.dtype), mode="drop")

        return self.replace(
            self_k_BNKH=tuple(map(zero, self.self_k_BNKH)), self_v_BNKH=tuple(map(zero, self.self_v_BNKH))
        )

    def write_self_rows(
        self, slot_X: jax.Array, k_LXNWH: jax.Array, v_LXNWH: jax.Array
    ) -> SlotWindow:
        """Store positions ``0 .. W - 1`` of slots ``slot_X`` (a prefilled prefix; the positions
        past a slot's prefix are overwritten as it decodes)."""
        W = k_LXNWH.shape[3]

        def put(rows, new_XNWH):
            return rows.at[slot_X, :, :W].set(as_rows(new_XNWH, rows), mode="drop")

        return self.replace(
            self_k_BNKH=tuple(put(x, k_LXNWH[i]) for i, x in enumerate(self.self_k_BNKH)),
            self_v_BNKH=tuple(put(x, v_LXNWH[i]) for i, x in enumerate(self.self_v_BNKH)),
        )

    def write_cross_rows(self, slot_X: jax.Array, k_LXSNH: jax.Array, v_LXSNH: jax.Array) -> SlotWindow:
        """Store the cross K/V of slots ``slot_X`` (``project_cross_kv``'s layout): the encoder
        positions, then zeros up to the window's width."""
        S, S_max = k_LXSNH.shape[2], self.cross_k_BNSH[0].shape[2]

        def put(rows, new_XSNH):
            new_XNSH = jnp.pad(jnp.swapaxes(new_XSNH, 1, 2), ((0, 0), (0, 0), (0, S_max - S), (0, 0)))
            return rows.at[slot_X].set(as_rows(new_XNSH, rows), mode="drop")

        return self.replace(
            cross_k_BNSH=tuple(put(x, k_LXSNH[i]) for i, x in enumerate(self.cross_k_BNSH)),
            cross_v_BNSH=tuple(put(x, v_LXSNH[i]) for i, x in enumerate(self.cross_v_BNSH)),
        )

    def gather_cross_rows(self, pools: PagePools, slot_X: jax.Array, pages_XM: jax.Array) -> SlotWindow:
        """Copy the cross pages ``pages_XM`` into slots ``slot_X`` (starts on shared pages)."""
        X, M = pages_XM.shape

        def put(rows, pool_LNPGH, layer):
            _, N, _, G, H = pool_LNPGH.shape
            pages_NXMGH = pool_LNPGH[layer][:, pages_XM]
            new_XNSH = jnp.swapaxes(pages_NXMGH.reshape(N, X, M * G, H), 0, 1)
            return rows.at[slot_X].set(as_rows(new_XNSH, rows), mode="drop")

        return self.replace(
            cross_k_BNSH=tuple(put(x, pools.cross_k_LNPGH, i) for i, x in enumerate(self.cross_k_BNSH)),
            cross_v_BNSH=tuple(put(x, pools.cross_v_LNPGH, i) for i, x in enumerate(self.cross_v_BNSH)),
        )


def init_window(
    pools: PagePools, num_slots: int, self_pages: int, cross_pages: int, dtype: str | None = None
) -> SlotWindow:
    """A zeroed window for ``num_slots`` slots whose page tables hold ``self_pages`` and
    ``cross_pages`` pages (the pools' layers, heads and page size), in ``dtype`` (default the
    pools'). A bfloat16 window beside float32 pools halves the bytes decode attention reads; the
    pools keep the float32 values."""
    L, N, _, G, H = pools.self_k_LNPGH.shape
    dtype = jnp.dtype(dtype or pools.self_k_LNPGH.dtype)
    dtype = jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 else dtype

    def rows(positions):  # a fresh buffer per layer: donated buffers must not alias
        return tuple(jnp.zeros((num_slots, N, positions, H), dtype) for _ in range(L))

    return SlotWindow(
        self_k_BNKH=rows(self_pages * G),
        self_v_BNKH=rows(self_pages * G),
        cross_k_BNSH=rows(cross_pages * G),
        cross_v_BNSH=rows(cross_pages * G),
    )


def as_rows(new: jax.Array, rows: jax.Array) -> jax.Array:
    """``new`` in the window's storage: its dtype, or bfloat16 bits in uint16. A bfloat16 window is
    stored as uint16 because XLA:CPU scatters into bfloat16 by converting the whole array to
    float32 and back (24 conversions of ~140 us a t5-small step); into uint16 it writes the rows."""
    if rows.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), jnp.uint16)
    return new.astype(rows.dtype)


def row_values(rows: jax.Array) -> jax.Array:
    """The window's rows as values (uint16 storage read as the bfloat16 it holds)."""
    return jax.lax.bitcast_convert_type(rows, jnp.bfloat16) if rows.dtype == jnp.uint16 else rows


def attend_slots(
    q_BNH: jax.Array,
    k_BNKH: jax.Array,
    v_BNKH: jax.Array,
    lengths_B: jax.Array,
    source_B: jax.Array | None = None,
    **kw,
) -> jax.Array:
    """:func:`attention_over_keys` over the window for slots with keys (``lengths_B > 0``);
    slots without keys get zeros. ``source_B``: the slot whose rows each slot reads (default its
    own; a beam group's cross rows are its first slot's).

    Float32 on a CPU with AVX-512: the window attention kernel, which reads each slot's first
    ``lengths_B`` rows in place. Elsewhere (or ``ENCDEC_WINDOW_ATTENTION=xla``) XLA, one slot at
    a time: a step reads the rows of the slots that decode, not of all ``B`` (on 2 cores, as fast
    as one batched product when all are busy; half the time at half), but XLA:CPU copies each
    slot's rows out of the window before its products."""
    choice = os.environ.get(WINDOW_ATTENTION_ENV, "auto")
    if choice not in ("auto", "xla"):
        raise ValueError(f"{WINDOW_ATTENTION_ENV}={choice!r}: expected 'auto' or 'xla'")
    if choice == "auto" and kernel_applies(q_BNH, k_BNKH, v_BNKH):
        bias_NR = kw.pop("bias_NR", None)

        def heads(q_BNH, k_BNKH, v_BNKH, source_B, lengths_B, bias_NR):
            return window_attention(
                q_BNH, k_BNKH, v_BNKH, lengths_B, bias_NR=bias_NR, source_B=source_B,
                implementation="kernel", **kw,
            )

        # On a mesh whose model axis splits the heads: one kernel per head shard.
        sharded = per_head_shard(heads, q_BNH.shape[1], has_bias=bias_NR is not None)
        if sharded is not heads or unpartitioned():
            if source_B is None:
                source_B = jnp.arange(q_BNH.shape[0], dtype=jnp.int32)
            return sharded(q_BNH, k_BNKH, v_BNKH, source_B, lengths_B, bias_NR)
        kw["bias_NR"] = bias_NR

    def one(b, out_BNH):
        def row(x, b=b):
            return jax.lax.dynamic_slice_in_dim(x, b, 1, axis=0)

        src = b if source_B is None else source_B[b]
        out_1NH = attention_over_keys(
            row(q_BNH), row(k_BNKH, src), row(v_BNKH, src), row(lengths_B), stale_v=False, slots_first=True,
            **kw,
        )
        return jax.lax.dynamic_update_slice_in_dim(out_BNH, out_1NH, b, axis=0)

    return for_each_slot(lengths_B > 0, one, jnp.zeros_like(q_BNH))


def cross_sources(group_BK: jax.Array) -> jax.Array:
    """The slot holding each slot's cross rows: its group's first (the encode step writes a
    request's cross rows there only; a group's slots are released together), else its own."""
    leader_B = group_BK[:, 0]
    return jnp.where(leader_B >= 0, leader_B, jnp.arange(group_BK.shape[0], dtype=leader_B.dtype))


def for_each_slot(mask_B: jax.Array, body, init):
    """``body(b, carry)`` for each slot ``b`` where ``mask_B`` holds, in slot order; a loop of
    as many iterations as there are such slots, not ``B``."""
    order_B = jnp.argsort(~mask_B, stable=True)  # the slots that hold first
    return jax.lax.fori_loop(0, jnp.sum(mask_B), lambda i, carry: body(order_B[i], carry), init)


@flax.struct.dataclass
class WindowKV:
    """Like :class:`~encdec.cache.paged_kv.PagedKV` (one token per step, per-slot positions), but
    attention reads ``window``; new rows go to both the window and the pools."""

    pools: PagePools
    window: SlotWindow
    self_page_table_BM: jax.Array
    self_lengths_B: jax.Array
    """Tokens already stored per slot: the position of the token being decoded."""
    cross_lengths_B: jax.Array
    active_B: jax.Array
    cross_source_B: jax.Array | None = None
    """The slot whose cross rows each slot reads (:func:`cross_sources`); None: its own."""

    def self_attention(self, layer, q_BTNH, k_BTNH, v_BTNH, positions_BT, *, scale, bias_NR, max_distance):
        """Store the new K/V row at ``self_lengths`` (pools and window); attend over ``self_lengths + 1``."""
        if k_BTNH.shape[1] != 1:
            raise ValueError(f"WindowKV decodes one token per step; got T={k_BTNH.shape[1]}")
        pools, writes_B = store_self_row(
            self.pools, layer, self.self_page_table_BM, self.self_lengths_B, self.active_B,
            k_BTNH[:, 0], v_BTNH[:, 0],
        )
        B, K = self.self_page_table_BM.shape[0], self.window.self_k_BNKH[layer].shape[2]
        pos_B = self.self_lengths_B.astype(jnp.int32)
        row_B = jnp.where(writes_B, pos_B, K)  # out of range: dropped
        slot_B = jnp.arange(B, dtype=jnp.int32)

        def append(rows_BNKH, new_BNH):  # in place (the row writer's kernel on CPU)
            return put_rows(rows_BNKH, as_rows(new_BNH, rows_BNKH), slot_B, row_B)

        k_BNKH = append(self.window.self_k_BNKH[layer], k_BTNH[:, 0])
        v_BNKH = append(self.window.self_v_BNKH[layer], v_BTNH[:, 0])
        out_BNH = attend_slots(
            q_BTNH[:, 0], row_values(k_BNKH), row_values(v_BNKH), jnp.where(self.active_B, pos_B + 1, 0),
            scale=scale, bias_NR=bias_NR, max_distance=max_distance,
        )
        window = self.window.replace(
            self_k_BNKH=replace_at(self.window.self_k_BNKH, layer, k_BNKH),
            self_v_BNKH=replace_at(self.window.self_v_BNKH, layer, v_BNKH),
        )
        return out_BNH[:, None], self.replace(pools=pools, window=window)

    def cross_attention(self, layer, q_BTNH, *, scale):
        """Attend over this layer's encoder positions (``cross_lengths``; none for inactive slots)."""
        lengths_B = jnp.where(self.active_B, self.cross_lengths_B.astype(jnp.int32), 0)
        k_BNSH, v_BNSH = self.window.cross_k_BNSH[layer], self.window.cross_v_BNSH[layer]
        out_BNH = attend_slots(
            q_BTNH[:, 0], row_values(k_BNSH), row_values(v_BNSH), lengths_B, self.cross_source_B, scale=scale,
        )
        return out_BNH[:, None]

    def advance(self, num_tokens):
        if num_tokens != 1:
            raise ValueError(f"WindowKV decodes one token per step; got {num_tokens}")
        step_B = self.active_B.astype(self.self_lengths_B.dtype)
        return self.replace(self_lengths_B=self.self_lengths_B + step_B)
