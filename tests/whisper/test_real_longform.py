"""Real Whisper-base weights: long-form transcription against faster-whisper, language detection.

Skipped, with the reason, only where the weights cannot be fetched or espeak-ng / the ``bible``
program are missing.
"""

import numpy as np
import pytest

from encdec.bench.whisper_longform import lost_verses, word_error_rate
from encdec.whisper.audio import load_audio, log_mel_spectrogram
from encdec.whisper.clips import synthesize
from encdec.whisper.language import detect_languages
from encdec.whisper.longform import LongFormTranscriber
from encdec.whisper.options import LongFormOptions
from encdec.whisper.recordings import long_recordings
from encdec.whisper.serving import longform_engine
from encdec.whisper.transcribe import load_whisper

pytestmark = pytest.mark.slow

SPOKEN = {  # espeak-ng voice -> (Whisper's code, sentences written for this test)
    "es": ("es", "Mi hermana trabaja en un hospital cerca del centro. Mañana vamos a ver a los abuelos."),
    "it": ("it", "La biblioteca resta aperta fino alle otto di sera. Ieri abbiamo mangiato una pizza."),
    "pt": ("pt", "O café da esquina abre muito cedo todos os dias. Eles viajaram para o norte nas férias."),
    "pl": ("pl", "Pociąg do Warszawy odjeżdża o ósmej rano. Jutro idziemy na targ z dziećmi."),
    "en-us": ("en", "The museum opens at nine in the morning. Remember to water the plants while I am away."),
    # Whisper-base hears espeak-ng's French as Thai and its German as Yiddish (CTranslate2 too):
    "fr-fr": ("th", "Le marché du village ouvre tous les samedis matin. Les enfants jouent près de l'eau."),
    "de": ("yi", "Der Zug nach Berlin fährt heute etwas später ab. Wir sind am Sonntag spazieren gegangen."),
}


@pytest.fixture(scope="module")
def model(whisper_base_path):
    return load_whisper(whisper_base_path)


@pytest.fixture(scope="module")
def greedy(model):
    options = LongFormOptions(language="en")
    return LongFormTranscriber(longform_engine(model, options, num_slots=8), options)


def test_long_recording_keeps_every_verse_like_faster_whisper(model, greedy, tmp_path_factory):
    pytest.importorskip("jiwer")
    faster_whisper = pytest.importorskip("faster_whisper")
    from encdec.whisper.clips import SynthesisError

    try:
        (recording,) = long_recordings([50.0], tmp_path_factory.mktemp("kjv"))  # two chunks
    except SynthesisError as e:
        pytest.skip(str(e))
    (got,) = greedy.transcribe([str(recording.path)])
    assert got.error is None and got.language == "en"
    starts = [s.start for s in got.segments]
    assert starts == sorted(starts) and all(0 <= s.start < s.end <= got.duration for s in got.segments)
    assert lost_verses(recording, got.text) == []
    peer = faster_whisper.WhisperModel(str(model.path), device="cpu", compute_type="float32", cpu_threads=2)
    segments, _ = peer.transcribe(str(recording.path), language="en", beam_size=1)
    theirs = " ".join(s.text.strip() for s in segments)
    ours_wer = word_error_rate([recording.text], [got.text])
    their_wer = word_error_rate([recording.text], [theirs])
    assert ours_wer <= their_wer + 0.02, (ours_wer, their_wer)


def test_language_detection_on_espeak_voices_equals_ctranslate2(model, greedy, tmp_path_factory):
    """Right for the five voices Whisper-base understands; the same distribution as CTranslate2's
    ``detect_language`` for every voice, the two it mistakes included."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    out = tmp_path_factory.mktemp("languages")
    paths = [synthesize([text], out, voice=voice)[0] for voice, (_, text) in SPOKEN.items()]
    detected = detect_languages(greedy.engine, [str(p) for p in paths])
    peer = ctranslate2.models.Whisper(str(model.path), device="cpu", compute_type="float32", intra_threads=2)
    mel = np.stack([log_mel_spectrogram(load_audio(p)) for p in paths])
    theirs = peer.detect_language(ctranslate2.StorageView.from_array(mel))
    for (voice, (code, _)), probs, their in zip(SPOKEN.items(), detected, theirs, strict=True):
        assert next(iter(probs)) == code, (voice, probs)
        assert list(probs) == [t[2:-2] for t, _ in their[: len(probs)]]
        np.testing.assert_allclose(list(probs.values()), [p for _, p in their[: len(probs)]], atol=1e-4)


def test_initial_prompt_gives_faster_whispers_tokens(model, greedy, espeak_clips):
    """``initial_prompt`` text (encoded as faster-whisper encodes it) before each clip: the
    tokens faster-whisper decodes with the same prompt, and on the first clip not the unprompted
    ones ("dumps" becomes "jumps"). Fixed windows without timestamps on both sides."""
    faster_whisper = pytest.importorskip("faster_whisper")
    prompt = "the quick brown fox jumps, the weather is nice and sunny"
    fixed = dict(language="en", temperatures=(0.0,), timestamps=False, vad=False)
    prompted = LongFormTranscriber(greedy.engine, LongFormOptions(initial_prompt=prompt, **fixed))
    plain = LongFormTranscriber(greedy.engine, LongFormOptions(**fixed))
    _, paths = espeak_clips
    ours = prompted.transcribe([str(p) for p in paths])
    unprompted = plain.transcribe([str(paths[0])])[0]
    peer = faster_whisper.WhisperModel(str(model.path), device="cpu", compute_type="float32", cpu_threads=2)
    for path, got in zip(paths, ours, strict=True):
        segments, _ = peer.transcribe(
            str(path), language="en", beam_size=1, temperature=0.0, initial_prompt=prompt,
            without_timestamps=True, vad_filter=False,
        )
        theirs = [t for s in segments for t in s.tokens]
        assert [t for s in got.segments for t in s.tokens] == theirs, (path, got.text)
    assert ours[0].text != unprompted.text
    with pytest.raises(ValueError, match=r"the prompt's text spells special tokens \['<\|endoftext\|>'\]"):
        LongFormTranscriber(greedy.engine, LongFormOptions(initial_prompt="the end<|endoftext|>", **fixed))
