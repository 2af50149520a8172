"""CTranslate2, the peer on CPUs: its text and Whisper runners, built the same way.

- :class:`CT2Translate`: ``Translator.translate_batch``, greedy or beam search, static batches
  (``ctranslate2`` and ``ctranslate2-int8`` in text experiments);
- :class:`CT2Whisper`: ``models.Whisper.generate``, greedy with Whisper's suppression and no
  timestamps, on encdec's log-mel features (the Whisper experiment).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encdec.bench.config import BaselineSection
from encdec.bench.machine import cpu_threads
from encdec.bench.metrics import SystemRun
from encdec.bench.static_batches import run_static_batches
from encdec.bench.workloads import Trace


def ct2_options(device: str, compute_type: str, threads: int) -> dict[str, Any]:
    """Keyword arguments of a CTranslate2 model: ``threads`` CPU threads (0: every core)."""
    return {
        "device": device,
        "compute_type": compute_type,
        "intra_threads": cpu_threads(threads) if device == "cpu" else 0,
        "inter_threads": 1,
    }


class CT2Translate:
    """CTranslate2 ``Translator.translate_batch``, greedy, on token strings of the converted vocabulary."""

    def __init__(self, name: str, ct2_path: Path, compute_type: str, options: BaselineSection):
        import ctranslate2

        from encdec.bench.shapes import ct2_vocabulary

        self.name = name
        self.compute_type = compute_type
        self.translator = ctranslate2.Translator(
            str(ct2_path), **ct2_options(options.device, compute_type, options.threads)
        )
        self.vocab = ct2_vocabulary(ct2_path)
        self.index = {tok: i for i, tok in enumerate(self.vocab)}

    def generate_batch(
        self, inputs: Sequence[Sequence[int]], length: int, beam_size: int = 1
    ) -> list[list[int]]:
        source = [[self.vocab[i] for i in x] for x in inputs]
        results = self.translator.translate_batch(
            source, max_batch_size=len(source), beam_size=beam_size, min_decoding_length=length,
            max_decoding_length=length, return_scores=False,
        )
        return [[self.index[t] for t in r.hypotheses[0]] for r in results]

    def prepare(self, trace: Trace, num_slots: int) -> None:
        pass

    def run(self, trace: Trace, num_slots: int) -> SystemRun:
        def batch(inputs, length):
            return self.generate_batch(inputs, length, trace.num_beams)

        return run_static_batches(self.name, trace, num_slots, batch)

    def close(self) -> None:
        del self.translator


class CT2Whisper:
    """CTranslate2's Whisper on encdec's features: greedy, Whisper's suppression, no timestamps."""

    def __init__(self, model_dir: Path, *, compute_type: str, threads: int, language: str, model: Any):
        import ctranslate2

        from encdec.whisper.tokens import WhisperTokens

        self.ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(str(model_dir), **ct2_options("cpu", compute_type, threads))
        self.tokens = WhisperTokens.from_dir(model_dir)
        self.prompt = self.tokens.prompt(language)
        # CTranslate2 decodes min(max_length / 2, max_length - prompt) tokens: encdec's default.
        self.max_length = model.config.max_positions
        self.n_mels = model.config.num_mel_bins
        self.tokenizer = model.tokenizer

    def __call__(self, paths: Sequence[Path]) -> list[tuple[list[int], str]]:
        from encdec.whisper.audio import features_for

        mel = np.stack([features_for(p, self.n_mels)[0][0] for p in paths])
        results = self.model.generate(
            self.ct2.StorageView.from_array(mel),
            [self.prompt] * len(paths),
            beam_size=1,
            max_length=self.max_length,
        )
        return [(r.sequences_ids[0], self.tokens.decode(self.tokenizer, r.sequences_ids[0])) for r in results]
