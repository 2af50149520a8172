"""A tiny random Whisper, saved in Hugging Face and in CTranslate2 layout: no downloads.

The vocabulary puts Whisper's special tokens at small ids (``<|endoftext|>`` 80, ...), the mel
width (16) and depths (2 encoder, 3 decoder layers) differ from any default. The encoder keeps
1,500 positions so it reads real 30 s log-mel windows.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import transformers as tf

VOCAB = 96
EOT, SOT, EN, DE, TRANSLATE, TRANSCRIBE = 80, 81, 82, 83, 84, 85
NO_TIMESTAMPS = 89
SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|de|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
TIMESTAMP_BEGIN = EOT + len(SPECIALS)


def vocabulary(vocab_size: int = VOCAB) -> list[str]:
    """Text tokens, the specials, then timestamps ``<|0.00|>``, ``<|0.02|>``... up to ``vocab_size``."""
    timestamps = vocab_size - TIMESTAMP_BEGIN
    return [f"t{i}" for i in range(EOT)] + SPECIALS + [f"<|{0.02 * i:.2f}|>" for i in range(timestamps)]


VOCABULARY = vocabulary()
LONGFORM_VOCAB = TIMESTAMP_BEGIN + 1501
"""A vocabulary with all of Whisper's timestamps (0 to 30 s): for long-form tests."""
# A third of the text tokens, some the random model favours, and the task tokens; token 2 (its
# favourite first token) only at the first step. Suppression then changes the greedy output.
SUPPRESS = sorted({*range(0, EOT, 3), 53, 92, SOT, TRANSLATE, TRANSCRIBE, 86, 87, 88})
SUPPRESS_BEGIN = [2, EOT]
MEL_BINS = 16
PROMPT = [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]


def make_tiny_whisper(seed: int = 0, vocab_size: int = VOCAB) -> tf.WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = tf.WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=MEL_BINS,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=40,
        max_source_positions=1500,
        max_target_positions=40,
        pad_token_id=EOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        decoder_start_token_id=SOT,
        suppress_tokens=SUPPRESS,
        begin_suppress_tokens=SUPPRESS_BEGIN,
    )
    model = tf.WhisperForConditionalGeneration(config).eval()
    # Wider weights than HF's init: greedy output then varies with the audio and the step.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_positions.weight") and ".encoder." in name:
                continue  # keep Whisper's sinusoids
            if p.dim() > 1 or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    gen = model.generation_config
    gen.suppress_tokens, gen.begin_suppress_tokens = SUPPRESS, SUPPRESS_BEGIN
    gen.lang_to_id = {"<|en|>": EN, "<|de|>": DE}
    gen.task_to_id = {"translate": TRANSLATE, "transcribe": TRANSCRIBE}
    gen.no_timestamps_token_id = NO_TIMESTAMPS
    gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id = SOT, EOT, EOT
    return model


def save_hf(model: tf.WhisperForConditionalGeneration, directory: Path) -> Path:
    model.save_pretrained(str(directory))
    return directory


class _Vocab:
    """What CTranslate2's Whisper converter reads from a tokenizer."""

    additional_special_tokens: list[str] = []

    def __init__(self, vocab_size: int):
        self.tokens = vocabulary(vocab_size)

    def get_vocab(self) -> dict[str, int]:
        return {tok: i for i, tok in enumerate(self.tokens)}


def save_ct2(
    model: tf.WhisperForConditionalGeneration, directory: Path, quantization: str | None = None
) -> Path:
    """Convert with CTranslate2's own converter (the format's writer), float32 unless asked otherwise."""
    from ctranslate2.converters.transformers import WhisperLoader

    # The converter's spec holds the model's own tensors and quantizes them in place: convert a copy.
    spec = WhisperLoader()(copy.deepcopy(model), _Vocab(model.config.vocab_size))
    spec.validate()
    spec.optimize(quantization=quantization)
    directory.mkdir(parents=True, exist_ok=True)
    spec.save(str(directory))
    return directory


def random_mel(batch: int, seed: int = 0) -> np.ndarray:
    """Log-mel-like features in Whisper's range."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.5, (batch, MEL_BINS, 3000)).astype(np.float32)


def hf_greedy_config(max_new_tokens: int) -> tf.GenerationConfig:
    """Plain greedy with Whisper's suppression, for ``GenerationMixin.generate``."""
    return tf.GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=EOT,
        pad_token_id=EOT,
        decoder_start_token_id=SOT,
        suppress_tokens=SUPPRESS,
        begin_suppress_tokens=SUPPRESS_BEGIN,
    )


def add_word_tokenizer(ct2_dir: Path, out: Path) -> Path:
    """A copy of the tiny CTranslate2 model with a word-level ``tokenizer.json`` over its
    ``t0 t1 ...`` vocabulary, so text such as ``"t5 t17"`` tokenizes (for training on text)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    shutil.copytree(ct2_dir, out)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCABULARY)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    return out


def tiny_lora_experiment(model_dir: Path, work: Path, **top) -> dict:
    """A tiny ``experiments/whisper_lora.yaml``: 14 "verses" of tiny-vocabulary words read by
    espeak-ng, 4 training and 2 held-out clips, 3 steps of rank-2 LoRA."""
    verses = work / "verses.txt"
    verses.write_text("\n".join(" ".join(f"t{(7 * i + j) % 40 + 1}" for j in range(3)) for i in range(14)))
    return {
        "kind": "whisper_lora",
        "model": {"path": str(model_dir)},
        "data": {
            "verses_file": str(verses), "clip_words": 6, "num_eval": 2, "num_train": 4,
            "control_fraction": 0.5, "cache_dir": str(work / "clips"),
        },
        "lora": {"rank": 2, "alpha": 4.0, "stacks": ["decoder"],
                 "target_modules": ["self_attn.q_proj", "encoder_attn.q_proj", "fc2"]},
        "train": {"steps": 3, "batch_size": 2, "warmup_steps": 1},
        "max_target_len": 16, "eval_every": 2, "eval_max_new_tokens": 4, "num_slots": 2,
        "checkpoint_every": 1,
        **top,
    }  # fmt: skip
