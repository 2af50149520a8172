"""notebooks/lora.ipynb runs headless on a tiny config, saves its figures and the PEFT adapter,
and its engine outputs equal the reference with each adapter merged; its helpers
(``encdec.lora.notebook``) on hand-checkable cases. The notebook is kept without outputs."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

import encdec
from encdec.engine import Engine, EngineConfig, RequestOutput
from encdec.lora import AdapterBank, LoraConfig, init_lora, load_peft, merge_adapter, save_peft
from encdec.lora import notebook as nb
from encdec.lora.data import DataConfig
from encdec.lora.finetune import TinyT5Config, write_tiny_t5
from tests.lora import randomize_b, strict_rank_promotion  # noqa: F401 (autouse)

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "lora.ipynb"
FIGURES = ("curves.png", "engine_exact_match.png")
EOS = 1
MAX_NEW = 8 + 1  # the notebook's requests: SEQ_LEN[1] tokens + EOS


# ---- the notebook ---------------------------------------------------------------------------


def inject_parameters(nb_, params: dict) -> None:
    """As papermill does: a cell assigning ``params`` right after the cell tagged ``parameters``."""
    (index,) = [i for i, c in enumerate(nb_.cells) if "parameters" in c.metadata.get("tags", [])]
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb_.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def tiny_params(tmp_path: Path) -> dict:
    return {
        "STEPS": 12, "RANK": 2, "BATCH_SIZE": 8, "NUM_TRAIN": 64, "NUM_EVAL": 6, "EVAL_EVERY": 6,
        "TINY_MODEL": {"d_model": 16, "d_ff": 32, "num_layers": 1}, "NUM_SHOWN": 2,
        "OUT_DIR": str(tmp_path / "out"),
    }  # fmt: skip


def test_notebook_is_stored_without_outputs_and_has_a_parameters_cell():
    nb_ = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb_)
    code = [c for c in nb_.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert ["parameters" in c.metadata.get("tags", []) for c in code].count(True) == 1
    assert all(name in code[0].source for name in ("STEPS", "RANK", "NUM_TRAIN", "OUT_DIR"))


def test_notebook_trains_two_adapters_and_serves_them_in_one_engine(tmp_path):
    params = tiny_params(tmp_path)
    nb_ = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(nb_, params)
    client = nbclient.NotebookClient(
        nb_, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
    out = tmp_path / "out"
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000
    images = sum(
        "image/png" in o.get("data", {}) for c in nb_.cells if c.cell_type == "code" for o in c.outputs
    )
    assert images == len(FIGURES)
    text = "".join(
        o.get("data", {}).get("text/markdown", "") for c in nb_.cells for o in c.get("outputs", [])
    )
    assert "| input | adapter | output | follows its rule | = reference (merged) |" in text

    results = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in results["fit"].values()] == [12, 12]
    assert results["peft"]["same_weights"] and results["peft"]["hf_peft_agrees"] == 1.0
    rows = results["engine"]["requests"]
    assert [r["adapter"] for r in rows] == ["reverse", "sort", "base"] * params["NUM_EVAL"]
    assert all(r["matches_reference"] for r in rows)
    assert [s["requests"] for s in results["engine"]["summary"]] == [params["NUM_EVAL"]] * 3

    # Independently of the notebook's helpers: the base model and the saved PEFT adapter, merged
    # into the weights, generate exactly what the engine returned for the requests shown.
    model = encdec.load_pretrained(out / "base_model")
    lora, _ = load_peft(out / "adapter_reverse", model.params, model.config)
    merged = {
        "base": model,
        "reverse": dataclasses.replace(model, params=merge_adapter(model.params, lora)),
    }
    shown = rows[: 3 * params["NUM_SHOWN"]]
    for row in shown:
        if row["adapter"] in merged:
            (expected,) = encdec.reference_generate(merged[row["adapter"]], [row["input"]], MAX_NEW)
            assert row["output"] == expected.token_ids, row


# ---- the helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The notebook's tiny random T5, shrunk and saved, and one random adapter per rule (nonzero b)."""
    directory = write_tiny_t5(
        tmp_path_factory.mktemp("base"), TinyT5Config(d_model=16, d_ff=32, num_layers=1)
    )
    model = encdec.load_pretrained(directory)
    lc = LoraConfig(rank=2, target_modules=("q", "v", "wi"))
    adapters = {
        rule: randomize_b(
            init_lora(jax.random.PRNGKey(i), model.params, model.config, lc), model.params, i, 1.0
        )
        for i, rule in enumerate(nb.RULES)
    }
    return SimpleNamespace(model=model, directory=directory, lora_config=lc, adapters=adapters)


def test_tasks_label_the_same_sources_by_their_rule(small):
    data = DataConfig(num_train=40, num_eval=10, min_len=3, max_len=6, token_low=3, token_high=9)
    cfg = small.model.config
    (rev_train, rev_held), (sort_train, sort_held) = (
        nb.task_splits(r, data, cfg) for r in ("reverse", "sort")
    )
    assert [s for s, _ in rev_train] == [s for s, _ in sort_train]
    assert [s for s, _ in rev_held] == [s for s, _ in sort_held]
    assert not {tuple(s) for s, _ in rev_held} & {tuple(s) for s, _ in rev_train}
    for (src, rev), (_, srt) in zip(rev_held, sort_held, strict=True):
        assert src[-1] == EOS and rev == [*src[-2::-1], EOS] and srt == [*sorted(src[:-1]), EOS]
    assert nb.follows_rule("reverse", [5, 3, 4, EOS], [4, 3, 5, EOS], EOS)
    assert nb.follows_rule("sort", [5, 3, 4], [3, 4, 5, EOS], EOS)  # a source without EOS
    assert not nb.follows_rule("reverse", [5, 3, 4, EOS], [3, 4, 5, EOS], EOS)
    assert not nb.follows_rule("sort", [5, 3, 4, EOS], [3, 4, 5], EOS)  # no EOS: not finished
    with pytest.raises(ValueError, match="unknown task rule 'rotate'; choose from reverse, sort"):
        nb.task_splits("rotate", data, cfg)


def test_engine_run_is_checked_request_by_request(small):
    model, adapters = small.model, small.adapters
    bank = AdapterBank(model.params, model.config, capacity=2, max_rank=2, target_modules=("q", "v", "wi"))
    config = EngineConfig(
        num_slots=4,
        page_size=4,
        max_encoder_len=8,
        max_new_tokens=6,
        encoder_buckets=(8,),
        attention_impl="xla",
    )
    engine = Engine(model, config, adapters=bank)
    for name, lora in adapters.items():
        engine.load_adapter(name, lora)
    sources = [[5, 9, 4, EOS], [7, 3, 8, EOS], [4, 4, 6, EOS]]  # one length: one compile
    requests = nb.mixed_requests(sources, ["reverse", "sort", None], 6)
    assert [(r.inputs, r.adapter_id) for r in requests[:4]] == [
        (sources[0], "reverse"), (sources[0], "sort"), (sources[0], None), (sources[1], "reverse"),
    ]  # fmt: skip
    outputs = engine.generate(requests)
    rows = nb.check_engine_run(model, adapters, requests, outputs)
    assert [r["adapter"] for r in rows] == ["reverse", "sort", "base"] * 3
    assert all(r["matches_reference"] for r in rows)
    for i, adapter in enumerate(["reverse", "sort", None]):  # the adapter applied unmerged: the same
        expected = encdec.reference_generate(model, sources, 6, lora=adapters.get(adapter))
        assert [r["reference"] for r in rows[i::3]] == [e.token_ids for e in expected]
    assert any(rows[i]["output"] != rows[i + 2]["output"] for i in range(0, 9, 3))  # adapters matter
    assert rows[2]["follows_rule"] is None

    wrong = [dataclasses.replace(outputs[0], token_ids=[*outputs[0].token_ids, 30]), *outputs[1:]]
    assert not nb.check_engine_run(model, adapters, requests, wrong)[0]["matches_reference"]
    reversed_ = [RequestOutput(request_id=0, token_ids=[4, 9, 5, EOS], finish_reason="stop")]
    (row,) = nb.check_engine_run(model, adapters, requests[:1], reversed_)
    assert row["follows_rule"] and row["follows reverse"] and not row["follows sort"]
    assert nb.shown_rows([row], 5) == [
        {"input": "5 9 4 1", "adapter": "reverse", "output": "4 9 5 1", "follows its rule": "yes",
         "= reference (merged)": "yes" if row["matches_reference"] else "no"},
    ]  # fmt: skip


def test_summary_counts_rules_per_adapter_by_hand():
    rows = [
        {"adapter": "reverse", "matches_reference": True, "follows reverse": True, "follows sort": False},
        {"adapter": "reverse", "matches_reference": True, "follows reverse": False, "follows sort": False},
        {"adapter": "base", "matches_reference": False, "follows reverse": False, "follows sort": True},
    ]
    summary = nb.engine_summary(rows, ["reverse", "sort"])
    assert summary == [
        {
            "adapter": "reverse",
            "requests": 2,
            "follows reverse": 0.5,
            "follows sort": 0.0,
            "matches reference": 1.0,
        },
        {
            "adapter": "base",
            "requests": 1,
            "follows reverse": 0.0,
            "follows sort": 1.0,
            "matches reference": 0.0,
        },
    ]
    fig, ax = plt.subplots()
    nb.plot_engine_summary(summary, ["reverse", "sort"], ax)
    assert [[bar.get_height() for bar in bars] for bars in ax.containers] == [[0.5, 0.0], [0.0, 1.0]]
    plt.close(fig)


def test_plot_histories_draws_what_fit_recorded():
    history = [
        {"step": 0, "eval_loss": 4.0, "exact_match": 0.0},
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0, "eval_loss": 2.5, "exact_match": 0.5},
    ]
    fig, (ax_loss, ax_em) = plt.subplots(1, 2)
    nb.plot_histories({"reverse": history, "sort": history[:2]}, ax_loss, ax_em)
    lines = {line.get_label(): line for line in [*ax_loss.lines, *ax_em.lines]}
    assert lines["reverse: train"].get_xydata().tolist() == [[1, 3.0], [2, 2.0]]
    assert list(lines["reverse: held-out"].get_ydata()) == [4.0, 2.5]
    assert list(lines["reverse"].get_ydata()) == [0.0, 0.5] and list(lines["sort"].get_ydata()) == [0.0]
    plt.close(fig)


def test_peft_generate_applies_the_saved_adapter(small, tmp_path):
    pytest.importorskip("peft")
    model, lora = small.model, small.adapters["sort"]
    save_peft(tmp_path / "adapter", lora, model.config, lora_config=small.lora_config)
    sources = [[5, 9, 4, EOS], [7, 3, 3, 8, 6, EOS], [4, 4, EOS]]
    theirs = nb.peft_generate(small.directory, tmp_path / "adapter", sources, 6)
    ours = [o.token_ids for o in encdec.reference_generate(model, sources, 6, lora=lora)]
    base = [o.token_ids for o in encdec.reference_generate(model, sources, 6)]
    assert theirs == ours and theirs != base
