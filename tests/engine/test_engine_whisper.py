"""Whisper through the engine: audio requests equal ``transcribe``'s greedy tokens.

The tiny random model (no downloads) checks the audio path against ``transcribe`` (the dense
reference), the per-request failures, the compile count and the pages; ``test_engine_whisper_base.py``
checks the real Whisper-base weights against CTranslate2.
"""

import dataclasses

import numpy as np
import pytest

import encdec
from encdec.engine import Engine, EngineConfig, Request, RequestError
from encdec.whisper import AudioInput
from encdec.whisper.audio import SAMPLE_RATE, resample
from encdec.whisper.serving import transcribe_with_engine, whisper_engine
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import transcribe
from tests.engine.test_engine import holds_no_pages
from tests.whisper.test_transcribe import _tone, _wav
from tests.whisper.tiny_whisper import DE, EN, EOT, NO_TIMESTAMPS, SOT, TRANSCRIBE

LIMIT = 20
"""The tiny model's token limit: min(40 / 2, 40 - 4)."""


@pytest.fixture(scope="module")
def model(tiny_ct2_dir):
    return encdec.load_pretrained(tiny_ct2_dir)


def _config(**kw):
    base = dict(
        num_slots=3,
        page_size=16,
        max_new_tokens=LIMIT,
        steps_per_dispatch=3,
        attention_impl="xla",
        max_encoder_batch=4,
        max_encoder_tokens=4 * 1500,
    )
    return EngineConfig(**{**base, **kw})


def _generated(out):
    """An engine output's tokens as ``transcribe`` reports them (no ``<|endoftext|>``)."""
    return out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids


_REFERENCE: dict = {}


def _reference(model, key, audio, max_new, language="en"):
    """``transcribe`` of one clip alone (memoized: greedy tokens for fewer steps are a prefix)."""
    if (key, language) not in _REFERENCE:
        _REFERENCE[(key, language)] = transcribe(model, [audio], language=language, max_new_tokens=LIMIT)[0]
    ref = _REFERENCE[(key, language)]
    tokens = ref.token_ids[:max_new]
    stopped = ref.finish_reason == "stop" and len(ref.token_ids) < max_new
    return tokens, stopped


def _clips(tmp_path):
    """Arrays, WAV paths and an 8 kHz array: (key, request inputs, reference audio)."""
    out = []
    for i, (seconds, freq) in enumerate([(2.0, 300), (5.0, 900), (1.0, 2000), (12.0, 450), (0.5, 3100)]):
        samples = _tone(seconds, freq, i)
        if i % 2:
            path = _wav(tmp_path / f"clip{i}.wav", samples)
            out.append((f"wav{i}", path, path))
        else:
            out.append((f"array{i}", samples, samples))
    low = _tone(3.0, 700, 9)[::2].copy()  # 8 kHz
    out.append(("8khz", AudioInput(low, sample_rate=8000), resample(low, 8000, SAMPLE_RATE)))
    return out


def test_audio_requests_through_fewer_slots_equal_transcribe(model, tmp_path):
    clips = _clips(tmp_path)
    requests, expected = [], []
    for j, (key, inputs, audio) in enumerate(clips * 2):
        max_new = None if j % 3 == 0 else [LIMIT, 7, 3][j % 3]
        requests.append(Request(inputs=inputs, max_new_tokens=max_new))
        expected.append(_reference(model, key, audio, max_new or LIMIT))
    # Another language through the default prompt, and an explicit decoder prefix.
    key, inputs, audio = clips[1]
    requests.append(Request(inputs=AudioInput(audio, language="de")))
    expected.append(_reference(model, key, audio, LIMIT, language="de"))
    requests.append(Request(inputs=audio, decoder_prefix=[SOT, DE, TRANSCRIBE, NO_TIMESTAMPS]))
    expected.append(expected[-1])
    engine = whisper_engine(model, _config())
    outputs = engine.generate(requests)
    for req, out, (tokens, stopped) in zip(requests, outputs, expected, strict=True):
        assert _generated(out) == tokens, req
        assert out.finish_reason == ("stop" if stopped else "length")
        assert out.text is None  # the tiny model has no tokenizer
        t = out.timings
        assert t["arrival"] <= t["admitted"] <= t["first_token"] <= t["done"]
    assert len({tuple(o.token_ids) for o in outputs}) > 3  # different audio, different tokens
    assert [o.audio_seconds for o in outputs[:6]] == [2.0, 5.0, 1.0, 12.0, 0.5, 3.0]
    stats = engine.stats()
    assert stats.self_pages_used == 0 and stats.cross_pages_used == 0
    assert min(stats.slot_fills) >= 3
    assert stats.cross_pages_total == 3 * 94  # num_slots requests of 1,500 positions
    engine.self_alloc.check_invariants()
    engine.cross_alloc.check_invariants()


def test_suppression_at_every_and_at_the_first_step(model):
    """Tones never make the tiny model start with a ``begin_suppress`` token: ban its favourites."""
    tokens = WhisperTokens.from_dir(model.path)
    tokens = dataclasses.replace(tokens, suppress_begin=(4, 83, EOT), suppress=(*tokens.suppress, 68))
    clips = [_tone(2.0, 300, 0), _tone(5.0, 900, 1), _tone(12.0, 450, 3)]
    engine = whisper_engine(model, _config(), tokens=tokens)
    outputs = engine.generate([Request(inputs=c) for c in clips])
    expected = transcribe(model, clips, tokens=tokens, max_new_tokens=LIMIT)
    assert [_generated(o) for o in outputs] == [t.token_ids for t in expected]
    default = [t.token_ids for t in transcribe(model, clips, max_new_tokens=LIMIT)]
    assert all(o.token_ids[0] != d[0] for o, d in zip(outputs, default, strict=True))
    assert all(68 not in o.token_ids for o in outputs) and any(68 in d for d in default)


def test_bad_audio_requests_fail_alone(model, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not a wav file")
    bad = {
        "empty": (Request(inputs=np.zeros(0, np.float32)), "is empty"),
        "missing": (Request(inputs=str(tmp_path / "missing.wav")), "does not exist"),
        "unreadable": (Request(inputs=tmp_path / "bad.wav"), "cannot decode .*bad.wav as audio"),
        "too long": (Request(inputs=_tone(31.0, 300)), "longer than one 30 s Whisper window"),
        "token ids": (Request(inputs=[5, 6, 7]), "this model reads audio"),
        "language": (Request(inputs=AudioInput(_tone(1.0, 300), language="xx")), "language 'xx'"),
        "prefix": (Request(inputs=_tone(1.0, 300), decoder_prefix=[SOT, EN, EN, EN, EN]), "decoder_prefix"),
        "nan": (Request(inputs=np.full(100, np.nan, np.float32)), "non-finite"),
    }
    engine = whisper_engine(model, _config(num_slots=2))
    for request, message in bad.values():
        with pytest.raises(RequestError, match=message):
            engine.submit(request)
    good = [_tone(2.0, 300, 0), _tone(1.0, 2000, 2), _tone(0.5, 3100, 4)]
    requests = [Request(inputs=good[0]), *[r for r, _ in bad.values()], *map(Request, good[1:])]
    outputs = engine.generate(requests)
    for out, (_, message) in zip(outputs[1:-2], bad.values(), strict=True):
        assert out.finish_reason == "error" and message.split()[0] in out.error
    for key, audio, out in zip(["array0", "array2", "array4"], good, outputs[:1] + outputs[-2:], strict=True):
        assert _generated(out) == _reference(model, key, audio, LIMIT)[0]
    assert holds_no_pages(engine)


def test_no_recompilation_after_warmup(model):
    engine = whisper_engine(model, _config(num_slots=4, steps_per_dispatch=2))  # its own jitted steps
    warm = engine.warmup()
    # One decode; the one audio bucket compiles one encode per batch size 1, 2, 4. (``release``
    # is one jitted function for every engine: its count includes other tests' state shapes.)
    assert (warm["decode"], warm["encode"]) == (1, 3)
    rng = np.random.default_rng(0)
    requests = [
        Request(
            inputs=_tone(float(rng.uniform(0.2, 30.0)), float(rng.uniform(100, 4000)), i),
            max_new_tokens=int(rng.integers(1, LIMIT + 1)),
            arrival_time=float(rng.uniform(0, 0.5)),
        )
        for i in range(24)
    ]
    outputs = engine.generate(requests)
    assert all(o.finish_reason in ("stop", "length") for o in outputs)
    assert engine.compile_counts() == warm
    assert holds_no_pages(engine)


def test_transcribe_with_engine_joins_windows_like_transcribe(model, tmp_path):
    long = np.concatenate([_tone(30.0, 300, 1), _tone(7.0, 900, 2)])
    audio = [long, _wav(tmp_path / "a.wav", _tone(2.0, 440)), str(tmp_path / "missing.wav")]
    engine = whisper_engine(model, num_slots=2, encoder_batch=2, steps_per_dispatch=3)
    got = transcribe_with_engine(engine, audio, max_new_tokens=10)
    want = transcribe(model, audio[:2], max_new_tokens=10)
    for g, w in zip(got[:2], want, strict=True):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        assert g.audio_seconds == pytest.approx(w.audio_seconds)
        assert g.timings["arrival"] <= g.timings["first_token"] <= g.timings["done"]
    assert got[2].finish_reason == "error" and "does not exist" in got[2].error
    with pytest.raises(ValueError, match="language 'xx'"):
        transcribe_with_engine(engine, audio[:1], language="xx")


def test_text_inputs_and_positions_are_checked(model, tiny_models):
    with pytest.raises(ValueError, match="exceed the model's 40 positions"):
        whisper_engine(model, _config(max_new_tokens=38))
    text_engine = Engine(tiny_models["t5"], EngineConfig(num_slots=2, max_encoder_len=16, encoder_buckets=()))
    with pytest.raises(RequestError, match="has no audio encoder"):
        text_engine.submit(Request(inputs=AudioInput(_tone(1.0, 300))))


def test_long_audio_is_refused_from_its_length_before_decoding(model, tmp_path, monkeypatch):
    """A 10-minute 44.1 kHz WAV (and array) is refused from its header / shape, never decoded
    or resampled (that took seconds and hundreds of MB before)."""
    import wave

    import encdec.whisper.audio as audio

    path = tmp_path / "ten_minutes.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(44_100)
        f.writeframes(bytes(2 * 44_100 * 600))

    def forbidden(*args, **kwargs):
        raise AssertionError("long audio was decoded before it was refused")

    monkeypatch.setattr(audio, "_pcm_to_float", forbidden)
    monkeypatch.setattr(audio, "resample", forbidden)
    engine = whisper_engine(model, _config(num_slots=1))
    for inputs in (path, AudioInput(np.zeros(44_100 * 600, np.float32), sample_rate=44_100)):
        with pytest.raises(RequestError, match="audio is 600.00 s, longer than one 30 s Whisper window"):
            engine.submit(Request(inputs=inputs))


@pytest.mark.parametrize(
    ("audio_input", "message"),
    [
        (dict(sample_rate=0), "AudioInput.sample_rate must be in"),
        (dict(sample_rate=16000.0), "AudioInput.sample_rate must be an integer"),
        (dict(task="summarize"), "AudioInput.task must be one of"),
        (dict(language=None), "AudioInput.language must be a string"),
    ],
)
def test_audio_input_fields_are_checked(model, audio_input, message):
    engine = whisper_engine(model, _config(num_slots=1))
    with pytest.raises(RequestError, match=message):
        engine.submit(Request(inputs=AudioInput(_tone(1.0, 300), **audio_input)))
    assert engine.stats().tracked_requests == 0


def test_a_fifo_is_refused_not_opened(model, tmp_path):
    import os

    os.mkfifo(tmp_path / "clip.wav")  # reading it would block forever
    engine = whisper_engine(model, _config(num_slots=1))
    with pytest.raises(RequestError, match="is not a regular file|does not exist as a regular file"):
        engine.submit(Request(inputs=tmp_path / "clip.wav"))
