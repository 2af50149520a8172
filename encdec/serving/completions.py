"""``POST /v1/completions``: prompts in, text out, whole or as server-sent events.

Each prompt is one engine request holding all its choices: ``n`` samples sharing one encoder
pass (``num_return_sequences``), or, at temperature 0 with ``n`` or ``best_of`` above 1, beam
search over ``best_of`` beams returning the ``n`` best (greedy decoding would return ``n``
copies). ``best_of > n`` when sampling draws ``best_of`` samples and returns the ``n`` of
highest mean token log-probability, OpenAI's rule; it cannot be streamed.

Stop strings end a choice's text before the first one. Text prompts pass them to the engine
(which stops the sequence as soon as its text holds one); token-id prompts, which the engine
gives no text, are stopped here. A streamed choice's text comes from the engine stream's
incremental deltas, held back where a stop string could begin; a non-streamed choice's text is
one decode of its final tokens, cut at the first stop string: two independent paths that the
tests hold equal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from encdec.engine import Request, RequestError, RequestOutput, RequestStream
from encdec.engine.async_engine import EngineClosed, EngineUnavailable
from encdec.engine.detokenizer import IncrementalDetokenizer
from encdec.engine.request import SequenceOutput
from encdec.serving.models import ServedModel
from encdec.serving.protocol import (
    APIError,
    CompletionRequest,
    completion_body,
    completion_choice,
    error_body,
    new_id,
    now,
    usage,
)
from encdec.serving.streaming import StopText, cut_at_stop, merged, sse_data, unless_disconnected

Event = tuple[int, str, dict[str, Any] | None, str | None]
"""``(choice index, new text, logprobs of its tokens or None, finish reason or None)``."""


def choice_counts(body: CompletionRequest) -> tuple[int, int]:
    """``(n, best_of)`` of a request (values are the engine's to check)."""
    n = 1 if body.n is None else body.n
    best_of = n if body.best_of is None else body.best_of
    if best_of < n:
        raise APIError(400, f"best_of ({best_of}) must be at least n ({n})", param="best_of")
    if body.stream and best_of > n and body.temperature != 0:  # beams (temperature 0) end with the best n
        raise APIError(
            400, "best_of > n cannot be streamed when sampling: the best n are known last", param="best_of"
        )
    return n, best_of


def engine_request(body: CompletionRequest, prompt: str | list[int], adapter_id: str | None) -> Request:
    """The engine request of one prompt; the engine checks every value."""
    n, best_of = choice_counts(body)
    temperature = 1.0 if body.temperature is None else body.temperature
    beams = temperature == 0 and best_of > 1
    logprobs = body.logprobs
    if not beams and best_of > n and logprobs is None:
        logprobs = 0  # the samples are ranked by their log-probabilities
    return Request(
        inputs=prompt,
        max_new_tokens=body.max_tokens,
        min_new_tokens=0 if body.min_tokens is None else body.min_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        seed=body.seed,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        no_repeat_ngram_size=body.no_repeat_ngram_size,
        adapter_id=adapter_id,
        num_beams=best_of if beams else 1,
        num_return_sequences=n if beams else best_of,
        logprobs=logprobs,
        stop=body.stops() if isinstance(prompt, str) else (),
    )


def check_output(output: RequestOutput) -> None:
    """A failed request fails the response (500); one cancelled by a shutdown too (503)."""
    if output.finish_reason == "error":
        raise APIError(500, f"the request failed: {output.error}", type="server_error")
    if output.finish_reason == "cancelled":
        raise EngineClosed("the request was cancelled: the server is shutting down")


class TokenLogprobs:
    """OpenAI's ``logprobs`` object for a choice's tokens: vocabulary pieces, log-probabilities,
    the top alternatives and each token's offset in the choice's text."""

    def __init__(self, tokenizer: Any, decode: Callable[[Sequence[int]], str | None]):
        self._tokenizer = tokenizer
        self._text = IncrementalDetokenizer(decode)

    def add(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        top: Sequence[dict[int, float]],
        limit: int | None,
    ) -> dict[str, Any]:
        """The object for these tokens (those starting at or after ``limit`` characters dropped)."""
        offsets = []
        for t in token_ids:
            offsets.append(len(self._text.text))
            self._text.add([t])
        keep = len(offsets) if limit is None else sum(o < limit for o in offsets)
        pieces = self._tokenizer.convert_ids_to_tokens([int(t) for t in token_ids[:keep]])
        tops = None
        if top:
            tops = [
                {self._tokenizer.convert_ids_to_tokens(int(k)): v for k, v in d.items()} for d in top[:keep]
            ]
        return {
            "tokens": pieces,
            "token_logprobs": list(logprobs[:keep]),
            "top_logprobs": tops,
            "text_offset": offsets[:keep],
        }


async def prompt_events(
    first: int,
    stream: RequestStream,
    n: int,
    stops: Sequence[str],
    logprobs: Callable[[], TokenLogprobs] | None,
) -> AsyncIterator[Event]:
    """One prompt's choices as they stream (choice ``first + j`` is its sequence ``j``)."""
    cuts = [StopText(stops) for _ in range(n)]
    tracks = [logprobs() for _ in range(n)] if logprobs is not None else None
    ended: set[int] = set()
    async for delta in stream:
        for seq in delta.sequences:
            j = seq.index
            if j >= n or j in ended:
                continue
            text = cuts[j].feed(seq.text)
            lp = (
                tracks[j].add(seq.token_ids, seq.logprobs, seq.top_logprobs, None)
                if tracks and seq.token_ids
                else None
            )
            if cuts[j].stopped:
                ended.add(j)
                yield first + j, text, lp, "stop"
            elif text or lp:
                yield first + j, text, lp, None
        if stops and len(ended) == n:
            stream.cancel()
            return
        if delta.output is not None:
            check_output(delta.output)
            for j in range(min(n, len(delta.output.sequences))):
                if j not in ended:
                    yield first + j, cuts[j].flush(), None, delta.output.sequences[j].finish_reason
            return


async def prompt_choices(
    stream: RequestStream,
    n: int,
    best_of: int,
    stops: Sequence[str],
    served: ServedModel,
    want_logprobs: bool,
) -> list[dict[str, Any]]:
    """One prompt's ``n`` choices, whole: its sequences' final tokens decoded at once."""
    cuts = [StopText(stops) for _ in range(best_of)]
    cancelled = False
    async for delta in stream:  # stop token-id requests early (the engine stops text ones)
        for seq in delta.sequences:
            if seq.index < best_of:
                cuts[seq.index].feed(seq.text)
        if stops and all(c.stopped for c in cuts) and delta.output is None and not cancelled:
            stream.cancel()
            cancelled = True
    output = stream.output
    assert output is not None
    if not (stops and all(c.stopped for c in cuts)):
        check_output(output)
    sequences = list(output.sequences)
    if best_of > n and output.sequences[0].score is None:  # samples: the n of best mean log-probability
        sequences.sort(key=lambda q: -(q.cumulative_logprob or 0.0) / max(1, len(q.token_ids)))
    return [_whole_choice(q, stops, served, want_logprobs) for q in sequences[:n]]


def _whole_choice(
    seq: SequenceOutput, stops: Sequence[str], served: ServedModel, want_logprobs: bool
) -> dict:
    text, stopped = cut_at_stop(served.decode(seq.token_ids) or "", stops)
    reason = "stop" if stopped else seq.finish_reason
    lp = None
    if want_logprobs:
        track = TokenLogprobs(served.model.tokenizer, served.decode)
        lp = track.add(
            seq.token_ids, seq.logprobs or [], seq.top_logprobs or [], len(text) if stopped else None
        )
    return {"text": text, "finish_reason": reason, "logprobs": lp}


async def create_completion(served: ServedModel, body: CompletionRequest, http: HTTPRequest) -> Response:
    adapter_id = served.resolve(body.model)
    if served.is_audio:
        raise APIError(
            400, f"{body.model!r} is a speech-recognition model: use /v1/audio/transcriptions", param="model"
        )
    bad = body.unsupported()
    if bad is not None:
        raise APIError(400, f"{bad[0]}: {bad[1]}", param=bad[0])
    if served.model.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: the completions API returns text", param="model")
    prompts, stops = body.prompts(), body.stops()
    n, best_of = choice_counts(body)
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            request = engine_request(body, prompt, adapter_id)
            try:
                streams.append(await served.engine.submit_async(request, decode=served.decode))
            except RequestError as e:  # name which prompt of a list: "inputs[2] ..." is "prompt[2] ..."
                message = str(e)
                if len(prompts) > 1 and message.startswith("inputs"):
                    raise RequestError(f"inputs[{i}]{message.removeprefix('inputs')}") from None
                raise
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    cid, created = new_id("cmpl"), now()

    def cancel_all() -> None:
        for s in streams:
            s.cancel()

    def usage_of() -> dict[str, int]:
        return usage(sum(s.prompt_tokens for s in streams), sum(s.num_tokens for s in streams))

    want_logprobs = body.logprobs is not None
    if body.stream:
        factory = (lambda: TokenLogprobs(served.model.tokenizer, served.decode)) if want_logprobs else None
        events = merged([prompt_events(p * n, s, n, stops, factory) for p, s in enumerate(streams)])
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        sse = _sse(events, cid, created, body.model, usage_of if include_usage else None, cancel_all)
        return StreamingResponse(sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def collect() -> list[dict[str, Any]]:
        per_prompt = await asyncio.gather(
            *(prompt_choices(s, n, best_of, stops, served, want_logprobs) for s in streams)
        )
        return [
            completion_choice(p * n + j, c["text"], c["finish_reason"], c["logprobs"])
            for p, cs in enumerate(per_prompt)
            for j, c in enumerate(cs)
        ]

    try:
        choices = await unless_disconnected(http, collect(), cancel_all)
    finally:
        cancel_all()
    return JSONResponse(completion_body(cid, created, body.model, choices, usage_of()))


async def _sse(
    events: AsyncIterator[Event],
    cid: str,
    created: int,
    model: str,
    usage_of: Callable[[], dict[str, int]] | None,
    cancel_all: Callable[[], None],
) -> AsyncIterator[str]:
    """OpenAI's chunks, ``data: [DONE]`` last; an error after the headers went out is one
    ``data: {"error": ...}`` event. Ending early (the client left) cancels the requests."""
    try:
        try:
            async for index, text, lp, reason in events:
                choice = completion_choice(index, text, reason, lp)
                yield sse_data(completion_body(cid, created, model, [choice], None))
            if usage_of is not None:
                yield sse_data(completion_body(cid, created, model, [], usage_of()))
        except APIError as e:
            yield sse_data(e.body())
        except EngineUnavailable as e:
            yield sse_data(error_body(str(e), "service_unavailable"))
        yield "data: [DONE]\n\n"
    finally:
        cancel_all()
