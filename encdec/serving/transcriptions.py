"""``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` for Whisper models.

The upload (multipart: ``file`` and the form fields) is read as a WAV file into 16 kHz
samples, cut into 30 s windows, and each window is one engine request (Whisper's prompt as
its forced prefix), as ``encdec transcribe`` does; the windows run in parallel slots. Each
window becomes one :class:`~encdec.serving.formats.Segment` (its start and end in the file),
and the requested format is rendered from the segments.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile

from encdec.engine import Request, RequestOutput, RequestStream
from encdec.serving.completions import check_output
from encdec.serving.formats import Segment, render
from encdec.serving.models import ServedModel
from encdec.serving.protocol import APIError, TranscriptionForm, parse_form
from encdec.serving.streaming import unless_disconnected
from encdec.whisper.audio import CHUNK_SECONDS, SAMPLE_RATE, AudioError, load_audio, split_windows
from encdec.whisper.frontend import AudioInput
from encdec.whisper.language import detection_request
from encdec.whisper.segments import no_speech_fields, no_speech_prob

DEFAULT_MAX_UPLOAD_BYTES = 25 * 1024 * 1024
"""OpenAI's upload limit."""


async def read_form(http: HTTPRequest, max_upload_bytes: int) -> tuple[UploadFile, TranscriptionForm]:
    """The uploaded file and the other fields, checked; 400 / 413 errors naming the problem."""
    length = http.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_upload_bytes + 64 * 1024:
        raise APIError(413, f"the upload is larger than {max_upload_bytes} bytes", param="file")
    try:
        form = await http.form(max_files=1, max_fields=32)
    except Exception as e:  # noqa: BLE001 - a malformed multipart body
        raise APIError(400, f"the body is not a readable multipart form: {e}") from None
    fields: dict[str, Any] = {}
    for key in set(form.keys()):
        values = form.getlist(key)
        name = key.removesuffix("[]")
        fields[name] = values if key.endswith("[]") else values[-1]
    upload = fields.pop("file", None)
    if not isinstance(upload, UploadFile):
        raise APIError(400, "file is required: the audio to transcribe, as a multipart upload", param="file")
    if upload.size is not None and upload.size > max_upload_bytes:
        raise APIError(
            413, f"file is {upload.size} bytes, above the {max_upload_bytes}-byte limit", param="file"
        )
    parsed = parse_form(TranscriptionForm, fields)
    assert isinstance(parsed, TranscriptionForm)
    return upload, parsed


def read_samples(upload: UploadFile) -> Any:
    """16 kHz samples of the upload (written to a temporary file: the WAV reader takes a path)."""
    upload.file.seek(0)
    fd, path = tempfile.mkstemp(suffix=".wav")
    try:
        with os.fdopen(fd, "wb") as f:
            while chunk := upload.file.read(1 << 20):
                f.write(chunk)
        return load_audio(path)
    except AudioError as e:
        name = upload.filename or "the upload"
        raise APIError(
            400, f"file: {name} is not usable audio: {e}".replace(path, name), param="file"
        ) from None
    finally:
        os.unlink(path)


def _segment(
    served: ServedModel,
    index: int,
    output: RequestOutput,
    duration: float,
    temperature: float,
    sot_index: int,
) -> Segment:
    tokens = served.engine.engine.frontend.tokens
    ids = tuple(t for t in output.token_ids if t != tokens.eot)
    text = output.text if output.text is not None else tokens.decode(None, ids)
    start = index * CHUNK_SECONDS
    avg = None if output.logprobs is None else sum(output.logprobs) / (len(ids) + 1)
    no_speech = no_speech_prob(output.prompt_logprobs, sot_index, tokens.no_speech)
    return Segment(start, min(start + CHUNK_SECONDS, duration), text, ids, temperature, avg, no_speech)


def encoded_prompt(served: ServedModel, prompt: str | None) -> tuple[int, ...]:
    """The request's text ``prompt`` as token ids (none for an empty one); a 400 naming it."""
    if prompt is None:
        return ()
    engine = served.engine.engine
    try:
        tokens, vocab = engine.frontend.tokens, engine.model.config.vocab_size
        return tokens.encode_prompt(engine.model.tokenizer, prompt, vocab)
    except ValueError as e:
        raise APIError(400, f"prompt: {e}", param="prompt") from None


def window_prefix(
    served: ServedModel, prompt_ids: Sequence[int], language: str, task: str
) -> list[int] | None:
    """Every window's decoder prompt with ``prompt_ids`` as its previous text
    (``<|startofprev|>``, as faster-whisper's batched chunks each get its ``initial_prompt``),
    its first tokens dropped past what the engine's ``max_decoder_prefix`` holds; None without
    one (the front end's default prompt)."""
    if not prompt_ids:
        return None
    engine = served.engine.engine
    tokens = engine.frontend.tokens
    room = engine.max_prefix - len(tokens.prompt()) - 1  # <|startofprev|>, the text, the prompt
    if room <= 0:
        raise APIError(
            400,
            f"prompt: this server's engine takes no text prompt (max_decoder_prefix={engine.max_prefix}); "
            "start it with --engine max_decoder_prefix=N",
            param="prompt",
        )
    try:
        return tokens.prompt(language, task, previous=prompt_ids[-room:])
    except ValueError as e:  # an unknown language
        raise APIError(400, str(e), param="language") from None


def sot_index(served: ServedModel, prefix: Sequence[int] | None, language: str, task: str) -> int:
    """Where ``<|startoftranscript|>`` is in a window's prefix (:func:`window_prefix`): after
    the previous text, if any."""
    if prefix is None:
        return 0
    return len(prefix) - len(served.engine.engine.frontend.tokens.prompt(language, task))


async def _finished(stream: RequestStream) -> RequestOutput:
    """The stream's output once its request is done."""
    async for _ in stream:
        pass
    assert stream.output is not None
    return stream.output


async def detect_language(
    served: ServedModel, http: HTTPRequest, samples: Any, adapter_id: str | None
) -> str:
    """The spoken language of the first 30 s (openai-whisper's ``detect_language``: one decode
    step over the language tokens), for a request that names none; English-only models: ``en``."""
    tokens = served.engine.engine.frontend.tokens
    if not tokens.languages:
        return "en"
    request = dataclasses.replace(detection_request(tokens, samples, top=0), adapter_id=adapter_id)
    stream = await served.engine.submit_async(request)
    try:
        out = await unless_disconnected(http, _finished(stream), stream.cancel)
    finally:
        stream.cancel()
    check_output(out)
    return tokens.language_of(out.token_ids[0])


async def create_transcription(
    served: ServedModel, http: HTTPRequest, *, task: str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
) -> Response:
    upload, form = await read_form(http, max_upload_bytes)
    adapter_id = served.resolve(form.model)
    if not served.is_audio:
        raise APIError(400, f"{form.model!r} is not a speech-recognition model", param="model")
    if "word" in (form.timestamp_granularities or ()):
        raise APIError(
            400, "timestamp_granularities: word timestamps are not supported", param="timestamp_granularities"
        )
    prompt_ids = encoded_prompt(served, form.prompt)
    samples = await asyncio.to_thread(read_samples, upload)
    duration = samples.size / SAMPLE_RATE
    language = form.language
    if language is None:
        language = await detect_language(served, http, samples, adapter_id)
    prefix = window_prefix(served, prompt_ids, language, task)
    tokens = served.engine.engine.frontend.tokens
    sot = sot_index(served, prefix, language, task)
    streams: list[RequestStream] = []
    try:
        for window in split_windows(samples):
            request = Request(
                AudioInput(window, language=language, task=task),
                decoder_prefix=prefix,
                temperature=form.temperature,
                logprobs=0,
                adapter_id=adapter_id,
                **no_speech_fields(sot, tokens.no_speech),
            )
            streams.append(await served.engine.submit_async(request))
    except BaseException:
        for s in streams:
            s.cancel()
        raise

    async def outputs() -> list[RequestOutput]:
        return list(await asyncio.gather(*(_finished(s) for s in streams)))

    def cancel_all() -> None:
        for s in streams:
            s.cancel()

    try:
        results = await unless_disconnected(http, outputs(), cancel_all)
    finally:
        cancel_all()
    for output in results:
        check_output(output)  # a failed window fails the request (500), a shutdown cancels it (503)
    segments = [_segment(served, i, o, duration, form.temperature, sot) for i, o in enumerate(results)]
    body, media_type = render(form.response_format, segments, task=task, language=language, duration=duration)
    if isinstance(body, dict):
        return JSONResponse(body)
    return PlainTextResponse(body, media_type=media_type)
