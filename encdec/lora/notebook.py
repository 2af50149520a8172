"""Helpers behind ``notebooks/lora.ipynb``; the notebook only calls these.

- :data:`RULES`, :func:`task_splits`, :func:`follows_rule`: synthetic tasks that label the same
  random sources by different rules (``reverse``, ``sort``), so one held-out split is unseen by
  every adapter;
- :func:`plot_histories`: loss and held-out exact match of several :func:`~encdec.lora.train.fit` runs;
- :func:`mixed_requests`, :func:`check_engine_run`, :func:`engine_summary`,
  :func:`plot_engine_summary`: one engine run serving several adapters and the base model,
  checked request by request against ``reference_generate`` with that adapter merged;
- :func:`peft_generate`: greedy generation by Hugging Face ``peft`` from a saved adapter.

Plot functions draw on given matplotlib ``Axes`` and leave figures and files to the caller.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encdec.checkpoints.pretrained import Model
from encdec.config import ModelConfig
from encdec.engine.request import Request, RequestOutput
from encdec.generate import reference_generate
from encdec.lora.adapters import merge_adapter
from encdec.lora.data import DataConfig, Example, load_splits

RULES: dict[str, Callable[[Sequence[int]], list[int]]] = {
    "reverse": lambda seq: list(reversed(seq)),
    "sort": sorted,
}
"""Synthetic tasks by name: the target ids (before EOS) for source ids (before EOS)."""

BASE = "base"
"""How tables name requests without an adapter."""


def _rule(name: str) -> Callable[[Sequence[int]], list[int]]:
    if name not in RULES:
        raise ValueError(f"unknown task rule {name!r}; choose from {', '.join(RULES)}")
    return RULES[name]


def task_splits(rule: str, data: DataConfig, cfg: ModelConfig) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)`` of ``rule`` on the sources of ``data``'s synthetic task.

    The sources are those of ``task: reverse`` (distinct random sequences, seeded), whatever the
    rule, so every rule labels the same inputs and the held-out sources are unseen by all.
    """
    fn = _rule(rule)
    train, held = load_splits(dataclasses.replace(data, task="reverse"), cfg)

    def relabel(examples):
        return [(src, [*fn(src[:-1]), cfg.eos_token_id]) for src, _ in examples]

    return relabel(train), relabel(held)


def follows_rule(rule: str, source: Sequence[int], output: Sequence[int], eos: int) -> bool:
    """Whether ``output`` is ``rule`` applied to ``source`` (each without / with a final EOS)."""
    seq = list(source[:-1]) if source and source[-1] == eos else list(source)
    return list(output) == [*_rule(rule)(seq), eos]


def plot_histories(histories: Mapping[str, Sequence[Mapping[str, float]]], ax_loss, ax_em) -> None:
    """Train loss (thin) and held-out loss (dots) on ``ax_loss``, held-out exact match on ``ax_em``,
    one colour per run (``name -> FitResult.history``)."""
    for i, (name, history) in enumerate(histories.items()):
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in history if "loss" in r]
        evals = [r for r in history if "exact_match" in r]
        if train:
            ax_loss.plot(*zip(*train, strict=True), color=color, lw=0.8, alpha=0.6, label=f"{name}: train")
        if evals:
            steps = [r["step"] for r in evals]
            ax_loss.plot(
                steps, [r["eval_loss"] for r in evals], "o-", color=color, ms=3, label=f"{name}: held-out"
            )
            ax_em.plot(steps, [r["exact_match"] for r in evals], "o-", color=color, ms=3, label=name)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log", title="loss")
    ax_em.set(xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02), title="held-out exact match")
    ax_loss.legend(fontsize="small")
    ax_em.legend(fontsize="small", loc="lower right")


def mixed_requests(
    sources: Sequence[Sequence[int]], adapter_ids: Sequence[str | None], max_new_tokens: int
) -> list[Request]:
    """Every source with every adapter (None: the base model), interleaved source by source."""
    return [
        Request(inputs=list(src), max_new_tokens=max_new_tokens, adapter_id=adapter)
        for src in sources
        for adapter in adapter_ids
    ]


def check_engine_run(
    model: Model,
    adapters: Mapping[str, Any],
    requests: Sequence[Request],
    outputs: Sequence[RequestOutput],
) -> list[dict[str, Any]]:
    """One row per request: ``adapter`` (:data:`BASE` for none), ``input``, ``output``,
    ``reference`` (``reference_generate`` with that adapter merged into the weights),
    ``matches_reference``, ``follows_rule`` (its adapter's rule; None for the base model) and
    ``follows <rule>`` for every adapter's rule. Adapter ids must name :data:`RULES`."""
    eos = model.config.eos_token_id
    reference: dict[int, list[int]] = {}
    groups: dict[tuple[str | None, int], list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault((req.adapter_id, req.max_new_tokens), []).append(i)
    for (adapter, max_new), members in groups.items():
        merged = model
        if adapter is not None:
            merged = dataclasses.replace(model, params=merge_adapter(model.params, adapters[adapter]))
        outs = reference_generate(merged, [list(requests[i].inputs) for i in members], max_new)
        reference.update((i, out.token_ids) for i, out in zip(members, outs, strict=True))
    rows = []
    for i, (req, out) in enumerate(zip(requests, outputs, strict=True)):
        src = list(req.inputs)
        row = {
            "adapter": req.adapter_id or BASE,
            "input": src,
            "output": list(out.token_ids),
            "reference": reference[i],
            "matches_reference": list(out.token_ids) == reference[i],
            "follows_rule": None
            if req.adapter_id is None
            else follows_rule(req.adapter_id, src, out.token_ids, eos),
        }
        row.update({f"follows {rule}": follows_rule(rule, src, out.token_ids, eos) for rule in adapters})
        rows.append(row)
    return rows


def engine_summary(rows: Sequence[Mapping[str, Any]], rules: Sequence[str]) -> list[dict[str, Any]]:
    """Per adapter (in order of first appearance): requests, the fraction of outputs that follow
    each rule (the adapter's own rule: its exact match) and the fraction equal to the reference."""
    out = []
    for adapter in dict.fromkeys(r["adapter"] for r in rows):
        mine = [r for r in rows if r["adapter"] == adapter]
        summary: dict[str, Any] = {"adapter": adapter, "requests": len(mine)}
        summary.update(
            {f"follows {rule}": float(np.mean([r[f"follows {rule}"] for r in mine])) for rule in rules}
        )
        summary["matches reference"] = float(np.mean([r["matches_reference"] for r in mine]))
        out.append(summary)
    return out


def plot_engine_summary(summary: Sequence[Mapping[str, Any]], rules: Sequence[str], ax) -> None:
    """Grouped bars: for each adapter served, the fraction of its outputs following each rule."""
    width = 0.8 / len(rules)
    x = np.arange(len(summary))
    for j, rule in enumerate(rules):
        values = [s[f"follows {rule}"] for s in summary]
        bars = ax.bar(
            x + (j - (len(rules) - 1) / 2) * width, values, width, label=f"follows {rule}", color=f"C{j}"
        )
        ax.bar_label(bars, fmt="%.2f", fontsize="small")
    ax.set_xticks(x, [s["adapter"] for s in summary])
    ax.set(
        xlabel="adapter used", ylabel="fraction of outputs", ylim=(0, 1.05), title="engine outputs by rule"
    )
    ax.legend(fontsize="small", loc="upper right")


def ids_text(ids: Sequence[int]) -> str:
    """Token ids as a short string for tables."""
    return " ".join(map(str, ids))


def shown_rows(rows: Sequence[Mapping[str, Any]], count: int) -> list[dict[str, str]]:
    """The first ``count`` rows of :func:`check_engine_run` as table cells."""

    def yes_no(value):
        return "-" if value is None else ("yes" if value else "no")

    return [
        {
            "input": ids_text(r["input"]),
            "adapter": r["adapter"],
            "output": ids_text(r["output"]),
            "follows its rule": yes_no(r["follows_rule"]),
            "= reference (merged)": yes_no(r["matches_reference"]),
        }
        for r in rows[:count]
    ]


def peft_generate(
    base_dir: str | Path, adapter_dir: str | Path, sources: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy outputs of Hugging Face's model with ``peft`` applying the adapter in ``adapter_dir``,
    as ``reference_generate`` returns them (no start token; through EOS, or ``max_new_tokens``)."""
    with warnings.catch_warnings():  # deprecation notices from inside transformers and peft
        warnings.simplefilter("ignore")
        import peft
        import torch
        import transformers

        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            base = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(base_dir))
            model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
            cfg = base.config
            width = max(len(s) for s in sources)
            ids = torch.full((len(sources), width), cfg.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(sources), width), dtype=torch.long)
            for i, src in enumerate(sources):
                ids[i, : len(src)] = torch.tensor(list(src))
                mask[i, : len(src)] = 1
            with torch.no_grad():
                generated = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
    outputs = []
    for row in generated[:, 1:].tolist():  # drop the decoder start token
        if cfg.eos_token_id in row:
            row = row[: row.index(cfg.eos_token_id) + 1]
        outputs.append(row)
    return outputs
