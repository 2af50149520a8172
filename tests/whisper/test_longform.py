"""Long-form transcription through the engine, on tiny random Whispers (no downloads).

The random model's text means nothing, but its token sequences obey Whisper's rules only if the
engine applies the timestamp hook; fixed windows must equal the dense reference; files decoded
together must equal files decoded alone; bad files fail alone.
"""

import dataclasses
import math
import wave

import numpy as np
import pytest
import torch

import encdec
from encdec.whisper.audio import SAMPLE_RATE, features_for, log_mel_spectrogram
from encdec.whisper.longform import LongFormTranscriber
from encdec.whisper.options import LongFormOptions
from encdec.whisper.segments import Thresholds
from encdec.whisper.serving import longform_engine
from encdec.whisper.silence import chunk_recording
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import greedy_decode, transcribe
from tests.whisper.tiny_whisper import DE, EN, EOT, LONGFORM_VOCAB, MEL_BINS, SOT, TIMESTAMP_BEGIN

OFF = Thresholds(None, None, None)


@pytest.fixture(scope="module")
def model(tiny_longform_ct2_dir):
    return encdec.load_pretrained(tiny_longform_ct2_dir)


def _bursts(layout, seed=0):
    """Syllable-like tone bursts (4 Hz envelope) after 0.3 s of silence, then ``[(seconds,
    frequency or 0 for silence)]``: something with speech and silences to chunk."""
    rng = np.random.default_rng(seed)
    parts = [np.zeros(int(0.3 * SAMPLE_RATE))]
    for seconds, freq in layout:
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
        x = envelope * (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.size))
        parts.append(x if freq else 0 * t)
    return np.concatenate(parts).astype(np.float32)


def _wav(path, samples):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return str(path)


@pytest.fixture(scope="module")
def engine(model):
    """One engine for every test here (and the same shapes as ``encdec transcribe --num-slots 4``
    in test_command: the compiled steps are shared)."""
    return longform_engine(model, LongFormOptions(best_of=3), num_slots=SLOTS)


SLOTS = 4


def _run(engine, audio, **kw):
    return LongFormTranscriber(engine, LongFormOptions(**{"language": "en", **kw})).transcribe(audio)


def test_fixed_windows_without_timestamps_equal_the_dense_reference(model):
    """No timestamps, no chunking, no fallback: 30 s windows, each decoded as ``transcribe`` does
    (log-mel zero-padded, as long-form transcription pads).
    (The random model favours timestamp tokens, text-less without timestamps: they are banned.)"""
    audio = [_bursts([(31.0, 300), (6.0, 900)], 1), _bursts([(4.0, 700)], 2)]
    tokens = WhisperTokens.from_dir(model.path)
    tokens = dataclasses.replace(tokens, suppress=(*tokens.suppress, *range(TIMESTAMP_BEGIN, LONGFORM_VOCAB)))
    fixed = dict(timestamps=False, vad=False, condition_on_previous_text=False)
    engine = longform_engine(model, LongFormOptions(best_of=3), num_slots=SLOTS, tokens=tokens)  # same steps
    got = _run(engine, audio, thresholds=OFF, temperatures=(0.0,), **fixed)
    want = transcribe(model, audio, language="en", tokens=tokens, padding="features")
    assert all(w.token_ids for w in want)
    for g, w in zip(got, want, strict=True):
        assert [t for s in g.segments for t in s.tokens] == w.token_ids
        assert g.segments[0].start == 0.0
        assert g.duration == pytest.approx(w.audio_seconds)
    assert [(s.start, s.end) for s in got[0].segments] == [(0.0, 30.0), (30.0, 37.3)]


@pytest.mark.parametrize("condition", [False, True])
def test_initial_prompt_is_each_streams_first_previous_text(model, condition):
    """faster-whisper's ``initial_prompt``: the first window's previous text; later windows keep
    it (with the text decoded since, its first tokens dropped past the limit) only while
    conditioning on previous text. Fixed windows, against the dense reference's decodes."""
    audio = _bursts([(31.0, 300), (6.0, 900)], 1)
    tokens = WhisperTokens.from_dir(model.path)
    tokens = dataclasses.replace(tokens, suppress=(*tokens.suppress, *range(TIMESTAMP_BEGIN, LONGFORM_VOCAB)))
    engine = longform_engine(model, LongFormOptions(best_of=3), num_slots=SLOTS, tokens=tokens)  # same steps
    initial = [5, 9, 17, 23, 31, 40, 41, 42, 43, 44, 45, 46, 47]
    fixed = dict(timestamps=False, vad=False, condition_on_previous_text=condition, thresholds=OFF)
    options = LongFormOptions(language="en", temperatures=(0.0,), initial_prompt=initial, **fixed)
    (got,) = LongFormTranscriber(engine, options).transcribe([audio])
    (plain,) = _run(engine, [audio], temperatures=(0.0,), **fixed)

    mel, _ = features_for(audio, MEL_BINS, padding="features")
    most = options.prompt_tokens(model.config.max_positions)
    first, _ = greedy_decode(model, mel[:1], tokens, tokens.prompt("en", previous=initial[-most:]))
    previous = (initial + first[0])[-most:] if condition else []
    second, _ = greedy_decode(model, mel[1:], tokens, tokens.prompt("en", previous=previous))
    assert [s.tokens for s in got.segments] == [first[0], second[0]]
    assert got.segments[0].tokens != plain.segments[0].tokens  # the prompt changed what was heard
    assert len(initial + first[0]) > most  # the second window's prompt dropped its first tokens


def test_a_bad_initial_prompt_is_refused_by_name(engine):
    with pytest.raises(ValueError, match="initial_prompt must be text or token ids"):
        LongFormOptions(initial_prompt=[3, -1])
    for bad in (7, b"hi", {3: 4}):
        with pytest.raises(ValueError, match="initial_prompt must be text or token ids"):
            LongFormOptions(initial_prompt=bad)
    with pytest.raises(ValueError, match="initial_prompt needs max_prompt_tokens > 0"):
        LongFormOptions(initial_prompt=[3], max_prompt_tokens=0)
    with pytest.raises(ValueError, match="the prompt has ids outside the vocabulary"):
        LongFormTranscriber(engine, LongFormOptions(initial_prompt=[3, LONGFORM_VOCAB]))
    with pytest.raises(ValueError, match="a text prompt needs the model's tokenizer; this model has none"):
        LongFormTranscriber(engine, LongFormOptions(initial_prompt="Jehoshaphat"))


def test_windows_obey_the_timestamp_rules_and_files_do_not_mix(engine, tmp_path):
    audio = [
        _bursts([(0.3, 0), (8.0, 400), (0.8, 0), (9.0, 650), (1.0, 0), (20.0, 500), (0.5, 0)], 3),
        _wav(tmp_path / "b.wav", _bursts([(1.0, 0), (5.0, 800), (0.2, 0)], 4)),
        _bursts([(6.0, 350), (0.4, 0), (6.0, 700)], 5),
    ]
    together = _run(engine, audio, thresholds=OFF, temperatures=(0.0,))
    alone = [_run(engine, [a], thresholds=OFF, temperatures=(0.0,))[0] for a in audio]
    for t, a in zip(together, alone, strict=True):
        assert [(s.start, s.end, s.tokens) for s in t.segments] == [
            (s.start, s.end, s.tokens) for s in a.segments
        ]
    for t in together:
        assert t.error is None and t.segments
        starts = [s.start for s in t.segments]
        assert starts == sorted(starts) and all(0 <= s.start < s.end <= t.duration + 0.02 for s in t.segments)
        for s in t.segments:  # <|t0|> text... <|t1|>, text in between, times rising
            stamps = [x for x in s.tokens if x >= TIMESTAMP_BEGIN]
            assert s.tokens[0] >= TIMESTAMP_BEGIN and stamps == sorted(stamps)
            assert all(x < EOT for x in s.tokens[1:-1] if x not in stamps[-1:])
    assert together[0].windows >= 2  # two chunks (8 + 9 s, 20 s): the 30 s limit cuts at a silence


def test_language_detection_equals_the_hf_model(engine, tiny_longform_hf_model):
    audio = [_bursts([(6.0, 300)], 6), _bursts([(3.0, 2500)], 7)]
    got = _run(engine, audio, language=None, thresholds=OFF, temperatures=(0.0,))
    for g, a in zip(got, audio, strict=True):
        start = chunk_recording(a)[0].start  # from the first speech on
        mel = torch.tensor(log_mel_spectrogram(a[start : start + 30 * SAMPLE_RATE], MEL_BINS)[None])
        with torch.no_grad():
            sot = torch.tensor([[SOT]])
            logits = tiny_longform_hf_model(input_features=mel, decoder_input_ids=sot).logits
        p = torch.softmax(logits[0, 0, [EN, DE]], dim=-1).numpy()
        want = {"en": float(p[0]), "de": float(p[1])}
        assert g.language == max(want, key=want.get)
        assert g.language_probs == pytest.approx(want, abs=1e-4)
        assert list(g.language_probs) == sorted(want, key=want.get, reverse=True)


def test_fallback_retries_at_higher_temperatures_reproducibly(engine):
    """The random model's text is improbable: every window falls back; the seed fixes the draws."""
    audio = [_bursts([(5.0, 300)], 8)]
    kw = dict(
        thresholds=Thresholds(compression_ratio=None, logprob=-0.01, no_speech=None),
        temperatures=(0.0, 0.5, 1.0),
        best_of=3,
    )
    first, second = _run(engine, audio, **kw)[0], _run(engine, audio, **kw)[0]
    assert first.windows >= 3 and first.windows % 3 == 0  # every window three times
    assert [s.tokens for s in first.segments] == [s.tokens for s in second.segments]
    assert all(s.temperature == 1.0 for s in first.segments)  # the last one tried
    assert all(s.avg_logprob is not None and math.isfinite(s.avg_logprob) for s in first.segments)


def test_beam_search_windows(engine):
    """Beams through the same engine: the best hypothesis's tokens obey the rules and carry its
    log-probabilities, and a file decodes the same with or without another beside it."""
    audio = [_bursts([(5.0, 300), (0.5, 0), (4.0, 800)], 10), _bursts([(3.0, 650)], 11)]
    beams = _run(engine, audio, beam_size=3, temperatures=(0.0,), thresholds=Thresholds(no_speech=None))
    for b in beams:
        assert b.error is None and b.segments
        assert all(s.avg_logprob is not None and math.isfinite(s.avg_logprob) for s in b.segments)
        assert all(s.tokens[0] >= TIMESTAMP_BEGIN for s in b.segments)
    alone = _run(engine, audio[1:], beam_size=3, temperatures=(0.0,), thresholds=Thresholds(no_speech=None))
    assert [s.tokens for s in alone[0].segments] == [s.tokens for s in beams[1].segments]


def test_bad_files_fail_alone(engine, tmp_path):
    (tmp_path / "text.mp3").write_text("not audio at all\n" * 20)
    (tmp_path / "empty.wav").write_bytes(b"")
    silent = _wav(tmp_path / "silent.wav", np.zeros(3 * SAMPLE_RATE))
    good = _bursts([(4.0, 600)], 9)
    text, empty, missing = (str(tmp_path / n) for n in ("text.mp3", "empty.wav", "none.wav"))
    audio = [text, good, empty, silent, missing]
    got = _run(engine, audio, thresholds=OFF, temperatures=(0.0,))
    assert "cannot decode" in got[0].error and "empty (0 bytes)" in got[2].error
    assert "is silent: no speech found in 3.0 s" in got[3].error and "does not exist" in got[4].error
    assert got[1].error is None and got[1].segments
    assert all(not g.segments for g in got[:1] + got[2:])
    with pytest.raises(ValueError, match="language 'xx' is not one of the model's: de, en"):
        _run(engine, [good], language="xx")



@pytest.mark.parametrize("logprob", [-0.6, -0.3], ids=["a-middle-temperature-passes", "none-passes"])
def test_fallback_temperatures_decoded_side_by_side_choose_as_in_turn(engine, logprob):
    """With nothing else to decode, a window's later temperatures run beside the current one;
    the decode kept is the one trying them in turn keeps, and those not needed are cancelled.
    (At -0.6 the random model's second file passes at 0.2, at -0.3 no temperature passes.)"""
    audio = [_bursts([(5.0, 300)], 8), _bursts([(12.0, 500), (0.5, 0), (9.0, 300)], 3)]
    options = LongFormOptions(
        language="en",
        thresholds=Thresholds(compression_ratio=None, logprob=logprob, no_speech=None),
        temperatures=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        best_of=3,
    )
    in_turn = LongFormTranscriber(engine, options)
    in_turn._speculate = False
    side_by_side = LongFormTranscriber(engine, options)
    want, got = in_turn.transcribe(audio), side_by_side.transcribe(audio)
    assert in_turn.speculative_decodes == 0 and side_by_side.speculative_decodes > 0
    for w, g in zip(want, got, strict=True):
        assert [(s.start, s.end, s.tokens, s.temperature) for s in g.segments] == [
            (s.start, s.end, s.tokens, s.temperature) for s in w.segments
        ]
    temperatures = {s.temperature for t in got for s in t.segments}
    assert temperatures == ({0.0, 0.2} if logprob == -0.6 else {1.0})
    assert engine.stats().tracked_requests == 0  # cancelled decodes were handed over, not left behind
