"""LoRA on Whisper: training on accented clips, adapters in the engine, HF export + PEFT, bad input.

Tiny random Whisper (tests/whisper/tiny_whisper.py) everywhere but the last test, which checks
HF + PEFT parity on the real Whisper-base weights.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers.generation.utils import GenerationMixin

import encdec
from encdec.checkpoints.export import export_hf
from encdec.engine import Request
from encdec.experiment_config import build
from encdec.lora import AdapterBank, AdapterError, LoraConfig, init_lora, load_peft, merge_adapter, save_peft
from encdec.models.transformer import encoder_layers
from encdec.models.whisper import encode_audio
from encdec.whisper import AudioInput, log_mel_spectrogram, whisper_engine
from encdec.whisper.accent import AccentDataConfig, fortune_sayings, group_verses, split_groups
from encdec.whisper.clips import espeak_available, wer
from encdec.whisper.finetune import (
    DECODER_TARGETS,
    ENCODER_TARGETS,
    EncoderAdapterSection,
    WhisperLoraExperiment,
    adapter_config,
    decoder_nll,
    finetune_whisper,
    first_adapted_block,
)
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import greedy_decode
from tests.whisper.tiny_whisper import PROMPT, add_word_tokenizer, hf_greedy_config, tiny_lora_experiment

MAX_NEW = 8


@pytest.fixture(scope="module")
def tiny_dir(tiny_ct2_dir, tmp_path_factory):
    return add_word_tokenizer(tiny_ct2_dir, tmp_path_factory.mktemp("tiny_lora") / "model")


@pytest.fixture(scope="module")
def model(tiny_dir):
    return encdec.load_pretrained(tiny_dir)


def _adapter(model, seed, rank, targets=DECODER_TARGETS, stacks=("decoder",)):
    """A random adapter with nonzero B (a fresh one changes nothing and proves nothing)."""
    config = LoraConfig(rank=rank, alpha=2.0 * rank, target_modules=targets, stacks=stacks)
    lora = init_lora(jax.random.PRNGKey(seed), model.params, model.config, config)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 1000))
    return jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * 0.5 if x.ndim >= 2 else x, lora)


def _audio(n):
    rng = np.random.default_rng(7)
    return [(rng.standard_normal(16000 * (1 + i)) * 0.1).astype(np.float32) for i in range(n)]


# ---- data --------------------------------------------------------------------------------------


def test_held_out_verses_are_never_trained_on():
    verses = [f"verse {i} " + "word " * (i % 5) for i in range(60)] + ["verse 3 ", "verse 7 word word "]
    groups = group_verses(verses, 6)
    assert all(sum(len(v.split()) for v in g) >= 6 for g in groups)
    train, held = split_groups(groups, 4, 100, seed=1)
    assert (train, held) == split_groups(groups, 4, 100, seed=1)  # deterministic
    held_verses = {v for g in held for v in g}
    assert len(held) == 4 and train and not held_verses.intersection(v for g in train for v in g)
    assert split_groups(groups, 4, 100, seed=2)[1] != held


def test_fortune_sayings_keep_plain_prose_and_cut_attributions(tmp_path):
    entries = [
        "Avoid reality at all costs.",
        "A lifetime isn't nearly long enough to figure out\nwhat it's all about.\n\t\t-- Lew Col",
        'A man said to the Universe:\n\t"Sir, I exist!"',  # dialogue: indented
        "Bank error in your favor.  Collect $200.",  # digits and a symbol
        "NASA will call you back tomorrow.",  # an acronym espeak spells out
        "Too short.",
        "Caf\u00e9 au lait for everyone today.",  # not ASCII
    ]
    (tmp_path / "sayings").write_text("\n%\n".join(entries) + "\n%\n")
    assert fortune_sayings([str(tmp_path / "sayings")]) == [
        "Avoid reality at all costs.",
        "A lifetime isn't nearly long enough to figure out what it's all about.",
    ]
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        fortune_sayings(["no_such_file"], directory=str(tmp_path))
    with pytest.raises(ValueError, match="source"):
        AccentDataConfig(source="wikipedia")


# ---- training ------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not espeak_available(), reason="espeak-ng is not installed (apt-get install -y espeak-ng)"
)
def test_finetune_smoke_run_writes_results_and_resumes(model, tiny_dir, tmp_path):
    config = build(WhisperLoraExperiment, tiny_lora_experiment(tiny_dir, tmp_path))
    out = tmp_path / "run"
    first = finetune_whisper(config, out, stop_after=2, progress=False, log=lambda _: None)
    assert (first["steps"], first["finished"]) == (2, False)
    summary = finetune_whisper(config, out, progress=False, log=lambda _: None)  # resumes at step 2
    assert (summary["steps"], summary["finished"], summary["train_clips"]) == (3, True, 6)
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["step"] for r in history] == [0, 1, 2, 3]
    assert [r["step"] for r in history if "wer_target" in r] == [0, 2, 3]
    assert history[1]["loss"] > 0 and (out / "curve.png").stat().st_size > 0
    transcripts = json.loads((out / "transcripts.json").read_text())  # the step-3 evaluation's
    assert transcripts["step"] == 3 and len(transcripts["clips"]) == 2 * summary["eval_clips_per_voice"]
    for voice, key in (("fr", "wer_target"), ("en-us", "wer_control")):
        clips = [c for c in transcripts["clips"] if c["voice"] == voice]
        refs, hyps = [c["reference"] for c in clips], [c["transcript"] for c in clips]
        assert clips and wer(refs, hyps) == summary["last"][key]
    lora, lora_config = load_peft(out / "adapter", model.params, model.config)
    assert lora_config.stacks == ("decoder",) and lora_config.rank == 2
    assert "encoder" not in lora and any(np.abs(np.asarray(a["b"])).max() > 0 for a in _leaves(lora))


@pytest.mark.skipif(
    not espeak_available(), reason="espeak-ng is not installed (apt-get install -y espeak-ng)"
)
def test_finetune_adapts_the_top_encoder_blocks_over_the_cached_stream_below(model, tiny_dir, tmp_path):
    top = {
        "encoder": {"layers": 1, "target_modules": ["fc1", "fc2"]},
        "train_dtype": "bfloat16",
        "eval_every": 3,
    }
    config = build(WhisperLoraExperiment, tiny_lora_experiment(tiny_dir, tmp_path, **top))
    lc = adapter_config(config, model.config)
    last = model.config.encoder_layers - 1
    assert first_adapted_block(model.config, lc) == 2 * last + 1  # the top layer's feed-forward
    summary = finetune_whisper(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert summary["finished"]
    lora, lora_config = load_peft(tmp_path / "run" / "adapter", model.params, model.config)
    assert lora_config.stacks == ("encoder", "decoder")
    trained = {path for path, a in _paths(lora) if np.abs(np.asarray(a["b"])).max() > 0}
    encoder = {p for p in trained if p[0] == "encoder"}
    assert encoder == {("encoder", "layers", last, "ffn", "wi"), ("encoder", "layers", last, "ffn", "wo")}
    assert {p for p in trained if p[0] == "decoder"} == {p for p, _ in _paths(lora) if p[0] == "decoder"}
    with pytest.raises(ValueError, match="more than the model's"):
        adapter_config(dataclasses.replace(config, encoder=EncoderAdapterSection(layers=9)), model.config)
    cross_only = EncoderAdapterSection(layers=1, target_modules=("encoder_attn.q_proj",))  # a decoder module
    with pytest.raises(ValueError, match="adapt no encoder layer"):
        adapter_config(dataclasses.replace(config, encoder=cross_only), model.config)
    with pytest.raises(ValueError, match="train_dtype"):
        build(WhisperLoraExperiment, tiny_lora_experiment(tiny_dir, tmp_path, train_dtype="float16"))


def test_cached_encoder_blocks_give_the_full_encoder(model):
    """The cached stream below a block, run on through the blocks above it (with their adapters),
    is the whole encoder's output: whatever block the cache ends at."""
    lc = LoraConfig(rank=2, target_modules=ENCODER_TARGETS, stacks=("encoder",))
    lora = _adapter(model, 5, 2, ENCODER_TARGETS, ("encoder",))
    mel = np.stack([log_mel_spectrogram(a, model.config.num_mel_bins) for a in _audio(2)])
    full = np.asarray(encode_audio(model.params, model.config, jnp.asarray(mel), lora=lora))
    enc, enc_lora = model.params["encoder"], lora["encoder"]
    for first in range(2 * model.config.encoder_layers + 1):
        below = encode_audio(
            model.params, model.config, jnp.asarray(mel), lora=lora, blocks=slice(0, first), final_norm=False
        )
        ones = jnp.ones(below.shape[:2], bool)
        out = encoder_layers(enc, model.config, below, ones, lora=enc_lora, blocks=slice(first, None))
        np.testing.assert_allclose(np.asarray(out), full, rtol=1e-5, atol=1e-5, err_msg=f"block {first}")
    assert first_adapted_block(model.config, lc) == 0


def _paths(lora):
    from encdec.lora.adapters import iter_adapters

    return list(iter_adapters(lora))


def _leaves(lora):
    from encdec.lora.adapters import iter_adapters

    return [a for _, a in iter_adapters(lora)]


# ---- serving: base and two adapters in one engine ---------------------------------------------------


def test_mixed_adapters_in_one_engine_equal_each_adapter_merged(model, tiny_dir):
    adapters = {
        "fr": _adapter(model, 1, 4),
        "de": _adapter(model, 2, 2, ("q_proj", "fc2"), ("encoder", "decoder")),
    }
    bank = AdapterBank.for_adapters(model.params, model.config, list(adapters.values()))
    assert bank.max_rank == 4
    engine = whisper_engine(model, adapters=bank, num_slots=3, encoder_batch=2)
    engine.load_adapter("fr", adapters["fr"])
    warm = engine.warmup()
    engine.load_adapter("de", adapters["de"])  # after compiling: nothing recompiles
    audio = _audio(4)
    ids = [None, "fr", "de"]
    requests = [
        Request(AudioInput(a), max_new_tokens=MAX_NEW, adapter_id=ids[i % 3])
        for i, a in enumerate(audio + audio[:2])
    ]
    outputs = engine.generate(requests)
    assert engine.compile_counts() == warm
    tokens = WhisperTokens.from_dir(tiny_dir)
    mel = np.stack([log_mel_spectrogram(a, model.config.num_mel_bins) for a in audio + audio[:2]])
    references = {}
    for name in ids:
        merged = (
            model
            if name is None
            else dataclasses.replace(model, params=merge_adapter(model.params, adapters[name]))
        )
        references[name] = greedy_decode(merged, mel, tokens, PROMPT, max_new_tokens=MAX_NEW)[0]
    for i, (req, out) in enumerate(zip(requests, outputs, strict=True)):
        expected = references[req.adapter_id][i]
        assert [t for t in out.token_ids if t != tokens.eot] == expected, (i, req.adapter_id)
    assert references["fr"] != references[None] and references["de"] != references[None]


# ---- export: HF + PEFT ------------------------------------------------------------------------------


def test_hf_export_round_trips_and_peft_gives_encdec_tokens(model, tiny_hf_model, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    hf_dir = export_hf(model, tmp_path / "hf")
    written = load_file(str(hf_dir / "model.safetensors"))
    original = {k: v.numpy() for k, v in tiny_hf_model.state_dict().items()}
    assert set(written) == set(original) - {"proj_out.weight"}  # tied to the embeddings
    for name, array in written.items():
        np.testing.assert_array_equal(array, original[name], err_msg=name)
    reloaded = encdec.load_pretrained(hf_dir)
    assert WhisperTokens.from_dir(hf_dir) == WhisperTokens.from_dir(tiny_dir)

    # Every decoder projection, and the top encoder layer's feed-forward (the shipped experiment's shape).
    top = {"encoder": {"layers": 1, "target_modules": ["fc1", "fc2"]}}
    top["lora"] = {"rank": 4, "alpha": 8.0, "stacks": ["decoder"], "target_modules": "all-linear"}
    lc = adapter_config(
        build(WhisperLoraExperiment, tiny_lora_experiment(tiny_dir, tmp_path, **top)), model.config
    )
    lora = _adapter(model, 3, 4, lc.target_modules, lc.stacks)
    save_peft(tmp_path / "adapter", lora, model.config, lora_config=lc)
    hf = PeftModel.from_pretrained(
        WhisperForConditionalGeneration.from_pretrained(hf_dir).eval(), tmp_path / "adapter"
    )
    mel = np.stack([log_mel_spectrogram(a, model.config.num_mel_bins) for a in _audio(3)])
    with torch.no_grad():
        hf_tokens = GenerationMixin.generate(
            hf.base_model.model,
            input_features=torch.tensor(mel),
            decoder_input_ids=torch.tensor([PROMPT] * 3),
            generation_config=hf_greedy_config(MAX_NEW),
        ).numpy()[:, len(PROMPT) :]
    merged = dataclasses.replace(reloaded, params=merge_adapter(reloaded.params, lora))
    ours = greedy_decode(merged, mel, WhisperTokens.from_dir(hf_dir), PROMPT, max_new_tokens=MAX_NEW)[0]
    base = greedy_decode(reloaded, mel, WhisperTokens.from_dir(hf_dir), PROMPT, max_new_tokens=MAX_NEW)[0]
    for row, (theirs, mine) in enumerate(zip(hf_tokens.tolist(), ours, strict=True)):
        assert theirs[: len(mine)] == mine, row
    assert ours != base and all(ours)  # the adapter matters; every row has tokens to compare

    # The training loss (the adapted blocks over the cached stream below them, adapter unmerged)
    # is HF + PEFT's.
    ids_BT = np.asarray([[*PROMPT, *row] for row in hf_tokens.tolist()], np.int32)
    mask_BT = np.zeros(ids_BT[:, 1:].shape, np.int32)
    mask_BT[:, len(PROMPT) - 1 :] = 1
    first = first_adapted_block(reloaded.config, lc)
    below = encode_audio(
        reloaded.params, reloaded.config, jnp.asarray(mel), blocks=slice(0, first), final_norm=False
    )
    batch = {"encoder": below, "decoder_ids": ids_BT[:, :-1], "labels": ids_BT[:, 1:]}
    batch["label_mask"] = mask_BT
    nll, count = decoder_nll(reloaded.params, reloaded.config, lora, batch, first_block=first)
    with torch.no_grad():
        logits = hf.base_model.model(
            input_features=torch.tensor(mel), decoder_input_ids=torch.tensor(ids_BT[:, :-1])
        ).logits
    nll_BT = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids_BT[:, 1:, None]).long())[..., 0]
    hf_nll = float((nll_BT * torch.tensor(mask_BT)).sum())
    assert int(count) == mask_BT.sum() and abs(float(nll) - hf_nll) < 1e-4 * max(1.0, hf_nll)


# ---- bad input ------------------------------------------------------------------------------------


def test_bad_adapters_get_clear_errors(model, tmp_path):
    lora = _adapter(model, 4, 4)
    # An adapter trained for another base: a decoder projection of another width.
    site = lora["decoder"]["layers"][0]["attn"]["q"]
    wrong = {**site, "a": np.zeros((64, 4), np.float32)}
    other = jax.tree.map(lambda x: x, lora)
    other["decoder"]["layers"][0]["attn"]["q"] = wrong
    save_peft(tmp_path / "other_base", other, model.config)
    with pytest.raises(AdapterError, match=r"self_attn\.q_proj has lora_A \(4, 64\).*needs \(4, 32\)"):
        load_peft(tmp_path / "other_base", model.params, model.config)
    # A rank above the bank's maximum.
    bank = AdapterBank(model.params, model.config, capacity=1, max_rank=2, target_modules=DECODER_TARGETS)
    with pytest.raises(AdapterError, match="rank 4 .* above the bank's max_rank 2"):
        bank.load("big", lora)
    assert len(bank) == 0
    # A PEFT file naming a module the model lacks (a fourth decoder layer; the tiny model has 3).
    save_peft(tmp_path / "extra", lora, model.config)
    tensors = load_file(str(tmp_path / "extra" / "adapter_model.safetensors"))
    tensors["base_model.model.model.decoder.layers.3.fc1.lora_A.weight"] = np.zeros((4, 32), np.float32)
    save_file(tensors, str(tmp_path / "extra" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="model.decoder.layers.3.fc1.*does not have"):
        load_peft(tmp_path / "extra", model.params, model.config)
    with pytest.raises(ValueError, match="stacks"):
        LoraConfig(stacks=("middle",))
