"""``encdec finetune EXPERIMENT.yaml``: train a LoRA adapter from an experiment config.

The config is a tree of frozen dataclasses, one docstring per field; the YAML file only chooses
values. Unknown keys and bad values are errors that name the key (``lora.rank: must be ...``).
The output folder gets ``config.yaml`` (resolved), ``metrics.csv``/``metrics.json``, ``curve.png``,
the adapter in PEFT format (``adapter/``) and orbax checkpoints (``checkpoints/``); running the
same command again resumes from the newest checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from encdec.experiment_config import ConfigError, build, plain, read_yaml
from encdec.lora.adapters import LoraConfig
from encdec.lora.data import DataConfig
from encdec.lora.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The frozen base model."""

    path: str | None = None
    """A local Hugging Face directory; ``null`` uses the embedded tiny random T5 (``tiny_model``)."""
    dtype: str = "float32"
    """Activation and parameter dtype: ``float32`` or ``bfloat16``."""

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: must be float32 or bfloat16, got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class TinyT5Config:
    """The embedded tiny random T5, written once as an HF checkpoint into ``<out>/base_model``."""

    vocab_size: int = 32
    d_model: int = 64
    d_kv: int = 16
    num_heads: int = 4
    d_ff: int = 128
    num_layers: int = 2
    """Encoder and decoder layers each."""
    relative_bias_std: float = 3.0
    """Init scale of the relative-position bias; trained T5s have biases of several units, and a
    sharp bias gives the frozen model positions an adapter can use (HF's init, ``d_model**-0.5``,
    leaves them nearly invisible)."""
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name != "seed" and not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name}: must be positive, got {getattr(self, f.name)!r}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One fine-tuning experiment."""

    name: str = "lora_finetune"
    """Names the default output folder ``results/<name>``."""
    model: ModelSection = ModelSection()
    tiny_model: TinyT5Config = TinyT5Config()
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval_every: int = 100
    """Evaluate held-out loss and exact match every this many steps (and at the start and end)."""
    checkpoint_every: int = 100
    """Save adapter + optimizer state every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""

    def __post_init__(self):
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)!r}")


# ---- loading -------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML file and apply ``--set`` overrides."""
    return build(ExperimentConfig, read_yaml(path), overrides)


# ---- the embedded tiny model ----------------------------------------------------------------


def write_tiny_t5(directory: str | Path, tiny: TinyT5Config) -> Path:
    """Write a random T5 (HF ``config.json`` + ``model.safetensors``) unless one is already there.

    Initialised like HF's T5 (``q`` by ``(d_model*d_kv)**-0.5``, ``k``/``v``/``wi`` by
    ``d_model**-0.5``, ``o`` and ``wo`` by their input width) except for the relative bias.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    t = tiny
    rng = np.random.default_rng(t.seed)

    def normal(std, *shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    inner, D = t.num_heads * t.d_kv, t.d_model
    tensors = {"shared.weight": normal(1.0, t.vocab_size, D)}
    for stack in ("encoder", "decoder"):
        tensors[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = normal(
            t.relative_bias_std, 32, t.num_heads
        )
        for i in range(t.num_layers):
            attns = [("0", "SelfAttention")] + ([("1", "EncDecAttention")] if stack == "decoder" else [])
            for idx, name in attns:
                prefix = f"{stack}.block.{i}.layer.{idx}"
                tensors[f"{prefix}.{name}.q.weight"] = normal((D * t.d_kv) ** -0.5, inner, D)
                tensors[f"{prefix}.{name}.k.weight"] = normal(D**-0.5, inner, D)
                tensors[f"{prefix}.{name}.v.weight"] = normal(D**-0.5, inner, D)
                tensors[f"{prefix}.{name}.o.weight"] = normal(inner**-0.5, D, inner)
                tensors[f"{prefix}.layer_norm.weight"] = np.ones(D, np.float32)
            prefix = f"{stack}.block.{i}.layer.{len(attns)}"
            tensors[f"{prefix}.DenseReluDense.wi.weight"] = normal(D**-0.5, t.d_ff, D)
            tensors[f"{prefix}.DenseReluDense.wo.weight"] = normal(t.d_ff**-0.5, D, t.d_ff)
            tensors[f"{prefix}.layer_norm.weight"] = np.ones(D, np.float32)
        tensors[f"{stack}.final_layer_norm.weight"] = np.ones(D, np.float32)
    config = {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "is_encoder_decoder": True,
        "vocab_size": t.vocab_size,
        "d_model": D,
        "d_kv": t.d_kv,
        "d_ff": t.d_ff,
        "num_layers": t.num_layers,
        "num_decoder_layers": t.num_layers,
        "num_heads": t.num_heads,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "relu",
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


# ---- running --------------------------------------------------------------------------------

_COLUMNS = ("step", "loss", "lr", "grad_norm", "eval_loss", "token_accuracy", "exact_match")


def write_metrics(out: Path, history: list[dict[str, float]], summary: dict) -> None:
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow(row)
    (out / "metrics.json").write_text(json.dumps({"summary": summary, "history": history}, indent=2))


def plot_curves(out: Path, history: list[dict[str, float]], title: str) -> Path:
    # Figure objects, not pyplot: a notebook's inline backend is left alone.
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [r for r in history if "exact_match" in r]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_em = fig.subplots(1, 2)
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
        ax_em.plot([r["step"] for r in evals], [r["exact_match"] for r in evals], "o-", color="C2")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log", title="loss")
    ax_loss.legend()
    ax_em.set(xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02), title="held-out exact match")
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "curve.png"
    fig.savefig(path, dpi=100)
    return path


def finetune(
    config: ExperimentConfig, out: str | Path, *, stop_after: int | None = None, progress: bool = True
) -> dict:
    """Run (or resume) the experiment into ``out``; return the summary written to ``metrics.json``."""
    from tqdm.auto import tqdm

    import encdec
    from encdec.lora.checkpoint import AdapterCheckpointer
    from encdec.lora.data import load_splits
    from encdec.lora.peft import save_peft
    from encdec.lora.train import fit

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = plain(dataclasses.asdict(config))
    config_file = out / "config.yaml"
    if config_file.exists() and (out / "checkpoints").exists():
        previous = yaml.safe_load(config_file.read_text())
        if previous != resolved:
            message = f"{out} holds a run with a different config; choose another --out or delete it"
            raise ConfigError("", message)
    config_file.write_text(yaml.safe_dump(resolved, sort_keys=False))

    model_dir = (
        Path(config.model.path) if config.model.path else write_tiny_t5(out / "base_model", config.tiny_model)
    )
    model = encdec.load_pretrained(model_dir, dtype=config.model.dtype)
    train_examples, eval_examples = load_splits(config.data, model.config, model.tokenizer)

    bar = tqdm(total=config.train.steps, desc=config.name, disable=not progress, dynamic_ncols=True)

    def on_step(row):
        bar.n = row["step"]
        shown = {k: f"{row[k]:.3g}" for k in ("loss", "eval_loss", "exact_match") if k in row}
        if shown:
            bar.set_postfix(shown, refresh=False)
        bar.refresh()

    with AdapterCheckpointer(
        out / "checkpoints", every=config.checkpoint_every, max_to_keep=config.keep_checkpoints
    ) as ckpt:
        result = fit(
            model,
            config.lora,
            config.train,
            config.data,
            train_examples,
            eval_examples,
            eval_every=config.eval_every,
            checkpointer=ckpt,
            stop_after=stop_after,
            on_step=on_step,
        )
    bar.close()
    history = result.history
    evals = [r for r in history if "exact_match" in r]
    summary = {
        "name": config.name,
        "model": str(model_dir),
        "steps": int(result.state.step),
        "finished": not result.stopped_early,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "first": {k: evals[0][k] for k in ("eval_loss", "exact_match")} if evals else None,
        "last": {k: evals[-1][k] for k in ("eval_loss", "exact_match")} if evals else None,
        "final_train_loss": next((r["loss"] for r in reversed(history) if "loss" in r), None),
    }
    write_metrics(out, history, summary)
    plot_curves(out, history, f"{config.name}: LoRA r={config.lora.rank} on {model.config.model_type}")
    save_peft(
        out / "adapter",
        result.state.lora(),
        model.config,
        lora_config=config.lora,
        base_model_name_or_path=str(model_dir),
    )
    return summary


def finetune_cli(
    experiment_path: str, overrides: list[str], out: str | None, stop_after: int | None = None
) -> int:
    try:
        config = load_config(experiment_path, overrides)
        out_dir = Path(out) if out else Path("results") / config.name
        summary = finetune(config, out_dir, stop_after=stop_after)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, AdapterError, bad data: the message says what
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = summary["last"] or {}
    em, loss = last.get("exact_match", float("nan")), last.get("eval_loss", float("nan"))
    print(f"{summary['name']}: {summary['steps']} steps; held-out exact match {em:.3f}, loss {loss:.4f}")
    print(f"results in {out_dir}")
    return 0
