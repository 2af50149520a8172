"""Tiny random Hugging Face models for parity tests: built in the test, saved, no downloads.

Each family uses non-default options (T5 buckets and distance, ``d_kv != d_model / heads``,
odd and unequal depths, unequal encoder and decoder head counts in mBART, Marian, Pegasus and
M2M100) so a wrong default in encdec cannot pass by accident.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

VOCAB = 96


def _t5(**kw):
    base = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=12,
        d_ff=48,
        num_layers=3,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=12,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        layer_norm_epsilon=1e-6,
    )
    base.update(kw)
    return base


FAMILIES = {
    "t5": lambda **kw: tf.T5ForConditionalGeneration(
        tf.T5Config(**_t5(feed_forward_proj="relu", tie_word_embeddings=True, **kw))
    ),
    "t5v1_1": lambda **kw: tf.T5ForConditionalGeneration(
        tf.T5Config(**_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **kw))
    ),
    "umt5": lambda **kw: tf.UMT5ForConditionalGeneration(
        tf.UMT5Config(**_t5(feed_forward_proj="gated-gelu", num_layers=2, num_decoder_layers=3, **kw))
    ),
    "mt5": lambda **kw: tf.MT5ForConditionalGeneration(
        tf.MT5Config(
            **_t5(
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=1, num_decoder_layers=3,
                **kw,
            )
        )
    ),
    "bart": lambda **kw: tf.BartForConditionalGeneration(
        tf.BartConfig(
            **{
                "vocab_size": VOCAB,
                "d_model": 32,
                "encoder_layers": 3,
                "decoder_layers": 2,
                "encoder_attention_heads": 4,
                "decoder_attention_heads": 4,
                "encoder_ffn_dim": 48,
                "decoder_ffn_dim": 40,
                "max_position_embeddings": 64,
                "dropout": 0.0,
                "attention_dropout": 0.0,
                "activation_dropout": 0.0,
                "init_std": 0.2,
                "scale_embedding": False,
                "pad_token_id": 1,
                "bos_token_id": 0,
                "eos_token_id": 2,
                "decoder_start_token_id": 2,
                "forced_eos_token_id": None,
                **kw,  # may override the head counts (tests/checkpoints/test_families.py)
            }
        )
    ),
    "mbart": lambda **kw: tf.MBartForConditionalGeneration(
        tf.MBartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=1,
            decoder_layers=3,
            encoder_attention_heads=2,
            decoder_attention_heads=4,
            encoder_ffn_dim=40,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            init_std=0.2,
            scale_embedding=True,
            activation_function="relu",
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
            **kw,
        )
    ),
    "marian": lambda **kw: tf.MarianMTModel(
        tf.MarianConfig(
            vocab_size=VOCAB,
            decoder_vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=3,
            encoder_attention_heads=8,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            init_std=0.2,
            scale_embedding=True,
            activation_function="swish",
            pad_token_id=VOCAB - 1,
            eos_token_id=0,
            decoder_start_token_id=VOCAB - 1,
            forced_eos_token_id=None,
            **kw,
        )
    ),
    "pegasus": lambda **kw: tf.PegasusForConditionalGeneration(
        tf.PegasusConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=3,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=4,
            encoder_ffn_dim=40,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            init_std=0.2,
            scale_embedding=True,
            activation_function="gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            forced_eos_token_id=None,
            **kw,
        )
    ),
    # NLLB-200 and M2M100 share this model type; NLLB's special ids (bos 0, pad 1, eos 2, unk 3).
    "m2m_100": lambda **kw: tf.M2M100ForConditionalGeneration(
        tf.M2M100Config(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=3,
            encoder_attention_heads=4,
            decoder_attention_heads=2,
            encoder_ffn_dim=48,
            decoder_ffn_dim=40,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            encoder_layerdrop=0.0,
            decoder_layerdrop=0.0,
            init_std=0.2,
            scale_embedding=True,
            activation_function="relu",
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            **kw,
        )
    ),
}


ENGINE_OVERRIDES = {
    "t5": {"initializer_factor": 4.0},
    "umt5": {"initializer_factor": 4.0},
    "bart": {"tie_word_embeddings": False},
    "pegasus": {"tie_word_embeddings": False},
    "m2m_100": {"tie_word_embeddings": False},
}
"""Config changes of the engine tests' fixtures, so their greedy outputs depend on the input.

With the defaults, greedy decoding of the tiny T5 repeats one token whatever the input (6
distinct outputs over 30 inputs), and the tied tiny BART mostly echoes its last token (its
residual stream carries the input embedding, which the tied head scores highest): an engine
that fed a request another's encoder output would still pass. With these, 27 (T5) and 28
(BART) of 30 outputs are distinct (``tests/engine/test_fixtures.py`` holds them to it). The
same held for the newer families: UMT5 gave 1 distinct output (all padding) and 30 with
``initializer_factor=4``; tied Pegasus 9 and M2M100 6, untied 30 each
(``tests/engine/test_engine_families.py`` holds them to it)."""


def make_hf_model(family: str, seed: int = 0, **config) -> torch.nn.Module:
    """A tiny random model of ``family`` (``config`` overrides its config fields)."""
    torch.manual_seed(seed)
    model = FAMILIES[family](**config)
    return model.eval()


def save_hf_model(family: str, directory: Path, seed: int = 0, config=None, **save_kw) -> torch.nn.Module:
    model = make_hf_model(family, seed, **(config or {}))
    model.save_pretrained(str(directory), **save_kw)
    return model


def hf_generation_config(model, max_new_tokens: int, eos_token_id: int | None):
    """Plain greedy: no forced BOS/EOS, no min length, so HF runs the algorithm encdec runs."""
    cfg = model.config
    return tf.GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_token_id,
        pad_token_id=cfg.pad_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )


def save_word_tokenizer(
    directory: Path, *, pad: str = "<pad>", eos: str = "</s>", unk: str = "<unk>"
) -> None:
    """A whitespace word-level tokenizer over ``VOCAB`` ids (``w3``, ``w4``, ...), saved in HF layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = [pad, eos, unk]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token=unk)
    fast.save_pretrained(str(directory))
