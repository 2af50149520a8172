"""``/v1/audio/transcriptions`` and ``/translations`` on the tiny random Whisper (no downloads):
every response format against ``transcribe`` (the dense reference) window by window, and the
error cases."""

import re
import zlib

import httpx
import numpy as np
import openai
import pytest
import torch

import encdec
from encdec.engine import EngineConfig
from encdec.serving import ServerThread, build_app, serve_model
from encdec.whisper.audio import N_SAMPLES, log_mel_spectrogram
from encdec.whisper.transcribe import transcribe
from tests.whisper.test_transcribe import _tone, _wav
from tests.whisper.tiny_whisper import DE, EN, MEL_BINS, SOT

LIMIT = 20
"""The tiny model's token limit: min(40 / 2, 40 - 4)."""


@pytest.fixture(scope="module")
def whisper(tiny_ct2_dir):
    return encdec.load_pretrained(tiny_ct2_dir)


@pytest.fixture(scope="module")
def server(whisper):
    config = EngineConfig(
        num_slots=3,
        page_size=16,
        max_new_tokens=LIMIT,
        steps_per_dispatch=3,
        max_encoder_batch=4,
        max_encoder_tokens=4 * 1500,
    )
    served = serve_model(whisper, name="tiny-whisper", config=config, warmup=False)
    with ServerThread(build_app(served)) as http:
        yield http, served
    served.engine.shutdown(drain=False)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="-", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """41.5 s of tones: two 30 s windows, the second 11.5 s long."""
    samples = np.concatenate([_tone(20.0, 300, 1), _tone(21.5, 900, 2)])
    return _wav(tmp_path_factory.mktemp("audio") / "clip.wav", samples), samples


@pytest.fixture(scope="module")
def spoken(tiny_hf_model, clip):
    """The clip's language by HF's model (same weights): the likelier language token after
    ``<|startoftranscript|>`` over the first 30 s (openai-whisper's ``detect_language``)."""
    mel = torch.tensor(log_mel_spectrogram(clip[1][:N_SAMPLES], MEL_BINS)[None])
    with torch.no_grad():
        logits = tiny_hf_model(input_features=mel, decoder_input_ids=torch.tensor([[SOT]])).logits
    return "en" if logits[0, 0, EN] > logits[0, 0, DE] else "de"


@pytest.fixture(scope="module")
def expected(whisper, clip, spoken):
    """Each window transcribed alone by the dense reference: (text, tokens) per window; in
    English, translated from the spoken language, and transcribed in the spoken language."""
    _, samples = clip
    windows = [samples[i : i + N_SAMPLES] for i in range(0, len(samples), N_SAMPLES)]
    out = {}
    for key, task, language in (("transcribe", "transcribe", "en"), ("translate", "translate", spoken)):
        refs = transcribe(whisper, windows, task=task, language=language, max_new_tokens=LIMIT)
        out[key] = [(r.text, r.token_ids) for r in refs]
    refs = transcribe(whisper, windows, language=spoken, max_new_tokens=LIMIT)
    out["spoken"] = [(r.text, r.token_ids) for r in refs]
    assert out["transcribe"][0] != out["transcribe"][1] != out["translate"][1]
    return out


def _create(client, clip, **kw):
    kw.setdefault("language", "en")
    with open(clip[0], "rb") as f:
        return client.audio.transcriptions.create(file=("clip.wav", f), model="tiny-whisper", **kw)


def test_every_response_format(client, clip, expected):
    (t0, ids0), (t1, ids1) = expected["transcribe"]
    text = f"{t0} {t1}"
    assert _create(client, clip).text == text
    assert _create(client, clip, prompt="  ").text == text  # a prompt of spaces is none (no tokenizer here)
    assert _create(client, clip, response_format="text") == text + "\n"
    srt = _create(client, clip, response_format="srt")
    assert srt == f"1\n00:00:00,000 --> 00:00:30,000\n{t0}\n\n2\n00:00:30,000 --> 00:00:41,500\n{t1}\n"
    vtt = _create(client, clip, response_format="vtt")
    assert vtt == f"WEBVTT\n\n00:00:00.000 --> 00:00:30.000\n{t0}\n\n00:00:30.000 --> 00:00:41.500\n{t1}\n"
    verbose = _create(client, clip, response_format="verbose_json")
    assert (verbose.text, verbose.duration, verbose.language) == (text, 41.5, "english")
    segments = [(s.start, s.end, s.text, s.tokens) for s in verbose.segments]
    assert segments == [(0.0, 30.0, t0, ids0), (30.0, 41.5, t1, ids1)]
    assert all(s.avg_logprob < 0 for s in verbose.segments)
    for s in verbose.segments:  # openai-whisper's: UTF-8 bytes over zlib's
        utf8 = s.text.encode()
        assert s.compression_ratio == pytest.approx(len(utf8) / len(zlib.compress(utf8)))


def test_no_speech_prob_is_whisper_s(client, server, clip, tiny_hf_model):
    """Each segment's ``no_speech_prob``: ``<|nocaptions|>``'s probability after
    ``<|startoftranscript|>`` in HF's model (same weights) over that window, the tokens the
    model's generation config suppresses removed (openai-whisper's, where those carry nothing;
    the tiny model's suppress a third of the text tokens, and the no-speech token itself where
    a row samples)."""
    tokens = server[1].engine.engine.frontend.tokens
    assert tokens.no_speech in tokens.suppress
    banned = sorted(set(tokens.suppress + tokens.suppress_begin) - {tokens.no_speech})
    verbose = _create(client, clip, response_format="verbose_json")
    windows = [clip[1][i : i + N_SAMPLES] for i in range(0, len(clip[1]), N_SAMPLES)]
    assert len(verbose.segments) == len(windows) == 2
    for segment, window in zip(verbose.segments, windows, strict=True):
        mel = torch.tensor(log_mel_spectrogram(window, MEL_BINS)[None])
        with torch.no_grad():
            logits = tiny_hf_model(input_features=mel, decoder_input_ids=torch.tensor([[SOT]])).logits
        scores = logits[0, -1].double()
        scores[banned] = -torch.inf
        expected = torch.softmax(scores, -1)[tokens.no_speech].item()
        assert segment.no_speech_prob == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_the_language_is_detected_when_not_given(client, clip, expected, spoken):
    """No ``language``: the first 30 s decide it (as OpenAI's API does), and every window is
    transcribed in it. (The random model hears German in this clip.)"""
    verbose = _create(client, clip, response_format="verbose_json", language=openai.NOT_GIVEN)
    assert (spoken, verbose.language) == ("de", "german")
    assert [s.tokens for s in verbose.segments] == [ids for _, ids in expected["spoken"]]


def test_translation_and_language(client, server, clip, expected):
    with open(clip[0], "rb") as f:
        got = client.audio.translations.create(
            file=("clip.wav", f), model="tiny-whisper", response_format="verbose_json"
        )
    assert [s.tokens for s in got.segments] == [ids for _, ids in expected["translate"]]
    assert got.language == "english"  # a translation reports its output's language
    with open(clip[0], "rb") as f:  # the whole form on the wire: language and temperature too
        r = httpx.post(
            server[0].url + "/v1/audio/transcriptions",
            files={"file": ("clip.wav", f, "audio/wav")},
            data={"model": "tiny-whisper", "language": "de", "temperature": "0", "response_format": "json"},
        )
    assert r.status_code == 200 and r.json()["text"]


@pytest.mark.parametrize(
    "data, files, status, message",
    [
        ({"model": "tiny-whisper"}, None, 400, "file is required"),
        (
            {"model": "tiny-whisper"},
            {"file": ("notes.wav", b"not a wav file")},
            400,
            "notes.wav is not usable audio",
        ),
        ({"model": "whisper-9"}, "clip", 404, "the model 'whisper-9' does not exist"),
        (
            {"model": "tiny-whisper", "response_format": "mp3"},
            "clip",
            400,
            "response_format: Input should be",
        ),
        ({"model": "tiny-whisper", "language": "xx"}, "clip", 400, "language 'xx' is not one of"),
        ({"model": "tiny-whisper", "temperature": "-1"}, "clip", 400, "temperature must be in"),
        (
            {"model": "tiny-whisper", "temperature": "hot"},
            "clip",
            400,
            "temperature: Input should be a valid number",
        ),
        ({"model": "tiny-whisper", "prompt": "Hello."}, "clip", 400, "prompt: a text prompt"),
        ({"model": "tiny-whisper", "size": "large"}, "clip", 400, "size: is not a known parameter"),
        ({}, "clip", 400, "model: is required"),
    ],
)
def test_bad_uploads_get_named_errors(server, clip, data, files, status, message):
    http, served = server
    if files == "clip":
        files = {"file": ("clip.wav", open(clip[0], "rb").read())}
    r = httpx.post(http.url + "/v1/audio/transcriptions", data=data, files=files)
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]["message"]), r.json()
    snapshot = served.engine.snapshot()
    assert snapshot.pending == 0 and snapshot.alive


def test_a_prompt_keeps_its_last_tokens_that_fit(whisper, server):
    """Every window's prefix: ``<|startofprev|>``, the prompt's last tokens that the engine's
    ``max_decoder_prefix`` leaves room for, Whisper's prompt; no room: a 400 naming it."""
    from encdec.serving.protocol import APIError
    from encdec.serving.transcriptions import sot_index, window_prefix

    tokens = server[1].engine.engine.frontend.tokens
    with pytest.raises(APIError, match=r"engine takes no text prompt \(max_decoder_prefix=4\)"):
        window_prefix(server[1], [5, 6], "en", "transcribe")
    config = EngineConfig(max_decoder_prefix=9, max_new_tokens=LIMIT)  # room: 9 - 4 - 1 prompt tokens
    served = serve_model(whisper, name="tiny-whisper", config=config, warmup=False)
    try:
        prefix = window_prefix(served, [5, 6, 7, 8, 9, 10], "de", "translate")
        assert prefix == [tokens.sot_prev, 7, 8, 9, 10, *tokens.prompt("de", "translate")]
        assert sot_index(served, prefix, "de", "translate") == 5
        assert window_prefix(served, [], "en", "transcribe") is None
        assert sot_index(served, None, "en", "transcribe") == 0
    finally:
        served.engine.shutdown(drain=False)


def test_completions_are_refused_by_a_whisper_model(client):
    with pytest.raises(openai.BadRequestError, match="speech-recognition model"):
        client.completions.create(model="tiny-whisper", prompt="hello")


@pytest.mark.slow
def test_whisper_base_prompt_is_every_windows_previous_text(whisper_base_path, espeak_clips):
    """``prompt`` through the official client, on the real weights: each window decodes as
    CTranslate2 does after ``<|startofprev|>`` and the prompt (encoded as faster-whisper encodes
    an ``initial_prompt``), and the prompt changes what is heard ("dumps" becomes "jumps")."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    import tokenizers

    from encdec.serving.server import engine_config
    from encdec.whisper.audio import features_for
    from encdec.whisper.tokens import WhisperTokens
    from encdec.whisper.transcribe import load_whisper

    model = load_whisper(whisper_base_path)
    prompt = "the quick brown fox jumps, the weather is nice and sunny"
    paths = espeak_clips[1][:3]
    config = engine_config(model, num_slots=2, options={})  # encdec serve's: prompts fit
    served = serve_model(model, name="base", config=config, warmup=False)
    with ServerThread(build_app(served)) as http:
        client = openai.OpenAI(base_url=http.url + "/v1", api_key="-", max_retries=0, timeout=300)
        got = []
        for path in paths:
            with open(path, "rb") as f:
                got.append(
                    client.audio.transcriptions.create(
                        file=(path.name, f), model="base", prompt=prompt, response_format="verbose_json"
                    )
                )
        with open(paths[0], "rb") as f:
            plain = client.audio.transcriptions.create(file=(paths[0].name, f), model="base")
        with open(paths[0], "rb") as f, pytest.raises(openai.BadRequestError, match="spells special tokens"):
            client.audio.transcriptions.create(file=(paths[0].name, f), model="base", prompt="<|fr|> hi")
    served.engine.shutdown(drain=False)

    encoded = tokenizers.Tokenizer.from_file(str(whisper_base_path / "tokenizer.json"))
    ids = encoded.encode(" " + prompt.strip(), add_special_tokens=False).ids
    tokens = WhisperTokens.from_dir(whisper_base_path)
    mel = np.stack([features_for(p)[0][0] for p in paths])
    peer = ctranslate2.models.Whisper(
        str(whisper_base_path), device="cpu", compute_type="float32", intra_threads=2
    )
    prompts = [[tokens.sot_prev, *ids, *tokens.prompt("en")]] * len(paths)
    theirs = peer.generate(ctranslate2.StorageView.from_array(mel), prompts, beam_size=1)
    for mine, their in zip(got, theirs, strict=True):
        assert [t for s in mine.segments for t in s.tokens] == their.sequences_ids[0], mine.text
    assert got[0].text != plain.text
