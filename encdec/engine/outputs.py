"""From what the device reported to what a request returns: sequences, log-probabilities, stop strings."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from encdec.engine.request import FinishReason, Request, RequestOutput, SequenceOutput


def top_dict(res: Any, s: int, slot: int, n: int, token: int, watched: int | None = None) -> dict[int, float]:
    """The ``n`` most likely tokens at step ``s`` of a dispatch's results, the reported one, and
    the slot's ``watched`` token (its ``SlotParams.watched_id``) if given."""
    ids, lps = res.top_ids_SBX[s, slot, :n], res.top_logprobs_SBX[s, slot, :n]
    out = {int(t): float(lp) for t, lp in zip(ids, lps, strict=True)}
    out.setdefault(token, float(res.logprob_SB[s, slot]))
    if watched is not None:
        out.setdefault(watched, float(res.watched_logprob_SB[s, slot]))
    return out


@dataclasses.dataclass
class SequenceState:
    """One sequence as its tokens arrive (or as a beam hypothesis once its group finished)."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[dict[int, float]] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    score: float | None = None
    skip: int = 0
    """Tokens to ignore: a resumed sample's repeats of what it already produced."""

    def append(self, token: int, logprob: float, n_top: int | None, res: Any, s: int, slot: int) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if n_top:
            self.top.append(top_dict(res, s, slot, n_top, token))


def cut_at_stop(text: str | None, stops: Sequence[str]) -> tuple[str | None, bool]:
    """``text`` up to its first stop string (excluded), and whether one was found."""
    if text is None or not stops:
        return text, False
    hits = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def request_output(
    rid: int,
    request: Request,
    seqs: Sequence[SequenceState],
    texts: Sequence[str | None],
    reason: FinishReason,
    **fields: Any,
) -> RequestOutput:
    """The output of a request whose sequences ended (``reason``: how the request ended)."""
    want_lp = request.logprobs is not None
    sequences = []
    for seq, text in zip(seqs, texts, strict=True):
        text, stopped = cut_at_stop(text, request.stop)
        sequences.append(
            SequenceOutput(
                token_ids=list(seq.tokens),
                finish_reason="stop" if stopped else (seq.finish_reason or reason),
                text=text,
                logprobs=list(seq.logprobs) if want_lp else None,
                top_logprobs=list(seq.top) if want_lp and request.logprobs and seq.score is None else None,
                cumulative_logprob=float(sum(seq.logprobs)) if want_lp else None,
                score=seq.score,
            )
        )
    best = sequences[0]
    if reason in ("cancelled", "error"):
        finish = reason
    else:
        finish = best.finish_reason
    return RequestOutput(
        rid,
        best.token_ids,
        finish,
        best.text,
        logprobs=best.logprobs,
        top_logprobs=best.top_logprobs,
        cumulative_logprob=best.cumulative_logprob,
        sequences=sequences,
        **fields,
    )
