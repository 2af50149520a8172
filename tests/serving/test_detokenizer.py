"""Incremental detokenization: deltas that concatenate to the one-shot decode, spaces and
multi-byte characters intact, for a sentencepiece-style (Metaspace + byte fallback) and a
byte-level BPE tokenizer built here (no downloads)."""

import numpy as np
import pytest
import transformers as tf
from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, normalizers, pre_tokenizers

from encdec.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer

TEXTS = [
    "hello world",
    "café 日本 hello",
    "hello 🙂world  two  spaces",
    "naïve façade — ünïcödé ⅔ 🙂🙃 end",
]


def _sentencepiece():
    """Unigram pieces with ``▁`` word starts and byte fallback, decoded as sentencepiece does."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    pieces += [(p, -2.0) for p in ("▁hello", "▁wor", "ld", "▁", "é", "▁caf", "▁two", "▁end", "▁spa", "ces")]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def _byte_level_bpe():
    """GPT-2/BART-style byte-level BPE with few merges: most non-ASCII characters stay split."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, hello there"] * 20 + TEXTS, vocab_size=280, min_frequency=2)
    return tf.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


@pytest.fixture(scope="module", params=["sentencepiece", "byte-level-bpe"])
def tokenizer(request):
    return _sentencepiece() if request.param == "sentencepiece" else _byte_level_bpe()


def _stream(tokenizer, ids, sizes):
    detok = IncrementalDetokenizer(lambda t: tokenizer.decode(list(t), skip_special_tokens=True))
    deltas, i = [], 0
    for n in sizes:
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    deltas.append(detok.finish())
    return deltas, detok


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_of_encoded_text_are_whole_and_add_up(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert full == text  # the fixture tokenizers round-trip
    rng = np.random.default_rng(0)
    for trial in range(10):
        sizes = [1] * len(ids) if trial == 0 else rng.integers(1, 4, len(ids)).tolist()
        deltas, detok = _stream(tokenizer, ids, sizes)
        assert "".join(deltas) == full and detok.consistent
        assert not any(REPLACEMENT in d for d in deltas)
        assert deltas[-1] == ""  # nothing was left for the final decode
        # Word spacing survives streaming one token at a time: no delta loses its space.
        if trial == 0:
            assert " ".join("".join(deltas).split()) == " ".join(text.split())


def test_the_fixtures_split_characters_over_tokens(tokenizer):
    split = [t for t in TEXTS if any(REPLACEMENT in tokenizer.decode([i]) for i in tokenizer(t)["input_ids"])]
    assert len(split) >= 2


def test_random_ids_add_up_to_the_one_shot_decode(tokenizer):
    """Any ids, invalid byte sequences included: the deltas add up to the one-shot decode unless
    the decoder rewrote text already sent, which only sentencepiece's byte fallback does (a run
    of byte pieces holding an invalid sequence decodes to U+FFFD as a whole) and which the
    detokenizer reports."""
    rng = np.random.default_rng(1)
    rewrites = 0
    for _ in range(30):
        ids = rng.integers(0, len(tokenizer), int(rng.integers(1, 40))).tolist()
        deltas, detok = _stream(tokenizer, ids, rng.integers(1, 5, len(ids)).tolist())
        full = tokenizer.decode(ids, skip_special_tokens=True)
        if detok.consistent:
            assert "".join(deltas) == full
        else:
            rewrites += 1
            assert REPLACEMENT in full and isinstance(tokenizer.backend_tokenizer.decoder, decoders.Sequence)
    assert rewrites < 10


def test_no_text_without_a_decoder():
    detok = IncrementalDetokenizer(lambda ids: None)
    assert detok.add([5, 6]) == "" and detok.finish() == "" and detok.token_ids == [5, 6]


def test_a_decoder_that_rewrites_earlier_text_is_flagged():
    """Text already sent cannot be taken back: the mismatch is reported, not hidden."""
    outputs = {1: "ab", 2: "xyz"}
    detok = IncrementalDetokenizer(lambda ids: outputs.get(len(ids), "") if ids else "")
    assert detok.add([7]) == "ab"
    detok.add([8])
    assert detok.finish() == "" and not detok.consistent
