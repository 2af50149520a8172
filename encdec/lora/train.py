"""Adapter training: seq2seq cross-entropy by teacher forcing, one jitted step, evaluation.

Only the adapter's ``a``/``b`` weights are differentiated and seen by the optimizer; the base
parameters are a plain (non-differentiated) argument of the step, and the adapter scales are
fixed. Gradient accumulation is a ``lax.scan`` over micro-batches inside the step, weighting
every label token equally, so ``grad_accum=k`` with batch ``b`` equals one batch of ``k*b``.

Over a ``(data, model)`` mesh (``fit(..., mesh=)``) the same step runs data and tensor parallel:
the frozen base split over ``model`` (:func:`encdec.sharding.shard_params`), the adapter and its
optimizer moments split like the weights they adapt, each batch's examples over ``data``
(:func:`shard_batch`); XLA adds the gradient all-reduce over ``data``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from encdec.checkpoints.pretrained import Model
from encdec.config import ModelConfig
from encdec.generate import reference_generate
from encdec.lora.adapters import LoraConfig, init_lora, iter_adapters, join_trainable, split_trainable
from encdec.lora.data import DataConfig, Example, make_batch, train_batch
from encdec.models import decode, encode, init_dense_kv
from encdec.sharding import DATA, adapter_shardings, shard_params


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and loop lengths."""

    steps: int = 300
    """Optimizer updates."""
    batch_size: int = 32
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per update (their gradients are averaged over all their label tokens)."""
    learning_rate: float = 3e-3
    """Peak learning rate."""
    schedule: str = "cosine"
    """``constant``, ``cosine`` or ``linear`` decay after warm-up."""
    warmup_steps: int = 10
    """Linear warm-up from 0 to ``learning_rate``."""
    end_lr_fraction: float = 0.1
    """The decayed learning rate at the last step, as a fraction of the peak."""
    optimizer: str = "adamw"
    """``adamw``, ``adam`` or ``sgd`` (with momentum 0.9)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the adapter weights."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 0
    """Seeds the adapter's initialisation and the dropout masks."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be positive, got {self.learning_rate!r}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"schedule: must be constant, cosine or linear, got {self.schedule!r}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer: must be adamw, adam or sgd, got {self.optimizer!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps: must be in [0, steps={self.steps}), got {self.warmup_steps!r}")
        if not 0 <= self.end_lr_fraction <= 1:
            raise ValueError(f"end_lr_fraction: must be in [0, 1], got {self.end_lr_fraction!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm: must be >= 0")


def make_optimizer(tc: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain (clipping, then the optimizer) and its learning-rate schedule."""
    peak, end = tc.learning_rate, tc.learning_rate * tc.end_lr_fraction
    decay_steps = tc.steps - tc.warmup_steps
    if tc.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif tc.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=tc.end_lr_fraction)
    else:
        decay = optax.linear_schedule(peak, end, decay_steps)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, peak, tc.warmup_steps), decay], [tc.warmup_steps]
    )
    if tc.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=tc.weight_decay)
    elif tc.optimizer == "adam":
        opt = optax.adam(schedule)
    else:
        opt = optax.sgd(schedule, momentum=0.9)
    if tc.max_grad_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), opt)
    return opt, schedule


@flax.struct.dataclass
class TrainState:
    """Everything training changes: checkpointed as one pytree."""

    step: jax.Array
    """Optimizer updates done (int32 scalar)."""
    weights: Any
    """The adapter's ``a``/``b`` arrays (the only differentiated values)."""
    opt_state: Any
    scales: Any
    """The adapter's fixed ``scale`` per projection."""
    rng: jax.Array
    """Base key; step ``s`` uses ``fold_in(rng, s)`` for dropout."""

    def lora(self) -> Any:
        return join_trainable(self.weights, self.scales)


def init_state(params: Mapping[str, Any], cfg: ModelConfig, lc: LoraConfig, tc: TrainConfig) -> TrainState:
    init_key, rng = jax.random.split(jax.random.PRNGKey(tc.seed))
    weights, scales = split_trainable(init_lora(init_key, params, cfg, lc), params)
    opt, _ = make_optimizer(tc)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), weights=weights, opt_state=opt.init(weights), scales=scales, rng=rng
    )
    # Committed to a device like a state restored by orbax: jit keys its cache on commitment, and
    # fresh and resumed runs then share one compiled step.
    return jax.device_put(state, jax.local_devices()[0])


def shard_train_state(state: TrainState, mesh: Mesh) -> TrainState:
    """The state on ``mesh``: adapter weights and optimizer moments split like the weights they
    adapt, the rest (step, scales, key, counts) replicated."""
    return jax.device_put(state, adapter_shardings(state, mesh))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A ``[grad_accum, B, ...]`` training batch with its examples split over ``data``."""
    B, data = jax.tree.leaves(batch)[0].shape[1], mesh.shape[DATA]
    if B % data:
        raise ValueError(f"batch_size={B} must be a multiple of the mesh's data axis ({data})")
    return jax.device_put(dict(batch), NamedSharding(mesh, P(None, DATA)))


def token_nll(params, cfg: ModelConfig, lora, batch: Mapping[str, jax.Array], dtype=jnp.float32):
    """Summed label cross-entropy, label tokens and correctly predicted tokens (padding excluded)."""
    source_mask = batch["source_mask"].astype(bool)
    enc_BSD = encode(params, cfg, batch["source_ids"], source_mask, dtype=dtype, lora=lora)
    dec_BT = batch["decoder_ids"]
    kv = init_dense_kv(params, cfg, enc_BSD, source_mask, dec_BT.shape[1], dtype=dtype, lora=lora)
    positions_BT = jnp.broadcast_to(jnp.arange(dec_BT.shape[1], dtype=jnp.int32), dec_BT.shape)
    logits_BTV, _ = decode(params, cfg, dec_BT, positions_BT, kv, dtype=dtype, lora=lora)
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, batch["labels"][..., None], axis=-1)[..., 0]
    mask_BT = batch["label_mask"].astype(jnp.float32)
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == batch["labels"]).astype(jnp.float32)
    return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT), jnp.sum(correct_BT * mask_BT)


def _dropout_entries(weights: Any, key: jax.Array, rate: float) -> dict:
    paths = [p for p, _ in iter_adapters(weights)]
    keys = jax.random.split(key, len(paths))
    return {
        p: {"dropout_key": k, "dropout_rate": jnp.float32(rate)} for p, k in zip(paths, keys, strict=True)
    }


def make_train_step(cfg: ModelConfig, lc: LoraConfig, tc: TrainConfig, *, dtype=jnp.float32) -> Callable:
    """``step(state, params, batch) -> (state, metrics)``, jitted, ``state`` donated.

    ``batch`` arrays are ``[grad_accum, B, ...]`` (:func:`encdec.lora.data.train_batch`). Cached on
    the (hashable) configs, so runs with the same configs share one compilation.
    """
    return _train_step(cfg, lc, tc, jnp.dtype(dtype))


@functools.lru_cache(maxsize=8)
def _train_step(cfg: ModelConfig, lc: LoraConfig, tc: TrainConfig, dtype) -> Callable:
    opt, schedule = make_optimizer(tc)

    def micro_loss(weights, scales, params, mb, key):
        extra = _dropout_entries(weights, key, lc.dropout) if lc.dropout > 0 else None
        nll, ntok, _ = token_nll(params, cfg, join_trainable(weights, scales, extra), mb, dtype)
        return nll, ntok

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state: TrainState, params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        accum = jax.tree.leaves(batch)[0].shape[0]

        def body(carry, xs):
            grads, nll_sum, tokens = carry
            mb, i = xs
            (nll, ntok), g = grad_fn(state.weights, state.scales, params, mb, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, grads, g), nll_sum + nll, tokens + ntok), None

        zeros = jax.tree.map(jnp.zeros_like, state.weights)
        (grads, nll_sum, tokens), _ = jax.lax.scan(
            body, (zeros, jnp.float32(0), jnp.float32(0)), (batch, jnp.arange(accum))
        )
        tokens = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        updates, opt_state = opt.update(grads, state.opt_state, state.weights)
        new = state.replace(
            step=state.step + 1, weights=optax.apply_updates(state.weights, updates), opt_state=opt_state
        )
        metrics = {
            "loss": nll_sum / tokens,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
        }
        return new, metrics

    return step


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _eval_batch(params, cfg: ModelConfig, lora, batch, *, dtype):
    return token_nll(params, cfg, lora, batch, dtype)


def eval_loss(
    params,
    cfg: ModelConfig,
    lora,
    examples: Sequence[Example],
    data: DataConfig,
    batch_size: int,
    dtype=jnp.float32,
) -> dict[str, float]:
    """Mean label cross-entropy and token accuracy on ``examples`` (fixed-shape batches)."""
    nll = tokens = correct = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        batch = make_batch(chunk, cfg, data.max_source_len, data.max_target_len)
        if len(chunk) < batch_size:  # pad with rows whose labels are all masked
            batch = {
                k: np.concatenate([v, np.zeros((batch_size - len(chunk), *v.shape[1:]), v.dtype)])
                for k, v in batch.items()
            }
        n, t, c = _eval_batch(params, cfg, lora, batch, dtype=dtype)
        nll, tokens, correct = nll + float(n), tokens + float(t), correct + float(c)
    tokens = max(tokens, 1.0)
    return {"eval_loss": nll / tokens, "token_accuracy": correct / tokens}


def exact_match(model: Model, lora, examples: Sequence[Example], *, batch_size: int = 256) -> float:
    """Fraction of examples whose greedy generation equals the target (EOS included)."""
    if not examples:
        return float("nan")
    max_new = max(len(t) for _, t in examples)
    hits = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        outs = reference_generate(model, [s for s, _ in chunk], max_new, lora=lora)
        hits += sum(out.token_ids == list(t) for out, (_, t) in zip(outs, chunk, strict=True))
    return hits / len(examples)


@dataclasses.dataclass
class FitResult:
    state: TrainState
    history: list[dict[str, float]]
    """One row per logged step: ``step``, ``loss``, ``lr``, ``grad_norm`` and, at evaluations,
    ``eval_loss``, ``token_accuracy``, ``exact_match``."""
    stopped_early: bool = False


def fit(
    model: Model,
    lc: LoraConfig,
    tc: TrainConfig,
    data: DataConfig,
    train_examples: Sequence[Example],
    eval_examples: Sequence[Example] = (),
    *,
    eval_every: int = 0,
    checkpointer=None,
    stop_after: int | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    mesh: Mesh | None = None,
) -> FitResult:
    """Train an adapter for ``tc.steps`` updates, resuming from ``checkpointer`` when it holds one.

    Evaluates at step 0, every ``eval_every`` steps and at the end (when there are held-out
    examples); saves through ``checkpointer`` (an :class:`~encdec.lora.checkpoint.AdapterCheckpointer`)
    as it decides. ``stop_after`` ends the run after that many updates in this call (an
    interruption, for tests); the state is checkpointed first. ``mesh``: train data and tensor
    parallel over it (see the module doc).
    """
    if mesh is not None:
        model = dataclasses.replace(model, params=shard_params(model.params, mesh))
    cfg, params = model.config, model.params
    state = init_state(params, cfg, lc, tc)
    history: list[dict[str, float]] = []
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, history = checkpointer.restore(state)
    if mesh is not None:
        state = shard_train_state(state, mesh)
    step_fn = make_train_step(cfg, lc, tc, dtype=model.dtype)

    def evaluate(row):
        lora = state.lora()
        row.update(eval_loss(params, cfg, lora, eval_examples, data, tc.batch_size, model.dtype))
        row["exact_match"] = exact_match(model, lora, eval_examples)

    start = int(state.step)
    if start == 0 and eval_examples:
        row = {"step": 0}
        evaluate(row)
        history.append(row)
        if on_step:
            on_step(row)
    done_here = 0
    for step in range(start, tc.steps):
        batch = train_batch(train_examples, cfg, data, step, tc.batch_size, tc.grad_accum)
        if mesh is not None:
            batch = shard_batch(batch, mesh)
        state, metrics = step_fn(state, params, batch)
        row = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
        last = step + 1 == tc.steps
        if eval_examples and (last or (eval_every and (step + 1) % eval_every == 0)):
            evaluate(row)
        history.append(row)
        if on_step:
            on_step(row)
        done_here += 1
        interrupted = stop_after is not None and done_here >= stop_after and not last
        if checkpointer is not None:
            checkpointer.save(state, history, force=last or interrupted)
        if interrupted:
            return FitResult(state, history, stopped_early=True)
    return FitResult(state, history)
