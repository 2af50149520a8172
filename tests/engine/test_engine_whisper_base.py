"""Whisper-base's real weights through the engine: CTranslate2's tokens on espeak-ng clips.

Apart from ``test_engine_whisper.py`` (the tiny model) so that ``scripts/test.sh`` runs them with
the real-model XLA flags, beside ``tests/whisper``'s real-weight tests.
"""

import numpy as np
import pytest

from encdec.engine import EngineConfig, Request
from encdec.whisper.serving import whisper_engine
from tests.engine.test_engine import holds_no_pages


def _ctranslate2_english(path, audio_paths, tokens, beam_size):
    """CTranslate2's English transcription of each clip on the same weights (float32, 2 threads)."""
    import ctranslate2

    from encdec.whisper.audio import features_for

    mel = np.stack([features_for(p)[0][0] for p in audio_paths])
    peer = ctranslate2.models.Whisper(str(path), device="cpu", compute_type="float32", intra_threads=2)
    prompts = [tokens.prompt("en")] * len(audio_paths)
    return peer.generate(ctranslate2.StorageView.from_array(mel), prompts, beam_size=beam_size)


@pytest.mark.slow
def test_whisper_base_engine_matches_ctranslate2(whisper_base_path, espeak_clips):
    pytest.importorskip("ctranslate2")
    from encdec.whisper.clips import wer
    from encdec.whisper.tokens import WhisperTokens
    from encdec.whisper.transcribe import load_whisper

    sentences, paths = espeak_clips
    model = load_whisper(whisper_base_path)
    engine = whisper_engine(model, EngineConfig(num_slots=3, max_new_tokens=224, max_encoder_tokens=2 * 1500))
    outputs = engine.generate([Request(inputs=p) for p in paths])

    tokens = WhisperTokens.from_dir(whisper_base_path)
    theirs = _ctranslate2_english(whisper_base_path, paths, tokens, beam_size=1)
    for sentence, mine, their in zip(sentences, outputs, theirs, strict=True):
        assert mine.finish_reason == "stop", sentence
        assert mine.token_ids == [*their.sequences_ids[0], tokens.eot], sentence
    texts = [model.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in theirs]
    assert [o.text for o in outputs] == texts
    assert wer(sentences, [o.text for o in outputs]) < 0.35
    assert holds_no_pages(engine)


@pytest.mark.slow
def test_whisper_base_beam_search_matches_ctranslate2(whisper_base_path, espeak_clips):
    """Beam 5 (faster-whisper's default) gives CTranslate2's ``beam_size=5`` tokens on every clip."""
    pytest.importorskip("ctranslate2")
    from encdec.whisper.tokens import WhisperTokens
    from encdec.whisper.transcribe import load_whisper

    sentences, paths = espeak_clips
    model = load_whisper(whisper_base_path)
    engine = whisper_engine(
        model, EngineConfig(num_slots=10, max_new_tokens=224, max_encoder_tokens=2 * 1500, max_num_beams=5)
    )
    outputs = engine.generate([Request(inputs=p, num_beams=5) for p in paths])
    tokens = WhisperTokens.from_dir(whisper_base_path)
    theirs = _ctranslate2_english(whisper_base_path, paths, tokens, beam_size=5)
    for sentence, mine, their in zip(sentences, outputs, theirs, strict=True):
        assert mine.finish_reason == "stop", sentence
        assert mine.token_ids == [*their.sequences_ids[0], tokens.eot], sentence
    stats = engine.stats()
    assert (stats.self_pages_used, stats.cross_pages_used, stats.tracked_requests) == (0, 0, 0)
