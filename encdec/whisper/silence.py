"""Where the speech is: an energy detector, and a long recording cut at silences into chunks.

Chunks are what makes one long file parallel: each chunk is transcribed on its own (its windows
seek one after another), so a file's chunks fill many decode slots at once, where openai-whisper
and faster-whisper's sequential mode walk a file one 30 s window at a time.

The detector works on 20 ms frames: a frame is speech when its RMS level is above a threshold set
from the recording itself (``range_db`` below its loud frames, ``floor_db`` above its quiet
ones, never below ``min_dbfs``), speech stretches closer than ``min_silence`` are merged and each
is padded by ``pad``. Stationary sound (a hum, steady noise) with no quieter moment reads as
silence: there is nothing to tell speech from it by energy.

Cuts go in the middle of the silences between stretches, so no word is cut: the longest silence
in the last fifth of a chunk's allowed length, else the last one; a stretch with no silence for
longer than ``max_chunk`` becomes one longer chunk, decoded window by window.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from encdec.whisper.audio import SAMPLE_RATE

FRAME = SAMPLE_RATE // 50
"""Samples per detector frame (20 ms)."""


@dataclasses.dataclass(frozen=True)
class SilenceOptions:
    """How the energy detector finds speech and where chunks may be cut."""

    max_chunk: float = 30.0
    """Longest chunk in seconds, where the speech has a silence to cut at (Whisper's window)."""
    min_silence: float = 0.15
    """Shortest silence, in seconds, that separates two stretches of speech (a place to cut)."""
    pad: float = 0.1
    """Seconds of audio kept before and after each stretch of speech."""
    range_db: float = 45.0
    """A frame more than this many dB below the recording's loud frames (99th percentile) is silence."""
    floor_db: float = 12.0
    """A frame less than this many dB above the recording's quiet frames (1st percentile) is silence."""
    min_dbfs: float = -70.0
    """A frame below this level (dB relative to full scale) is silence whatever the recording."""


def frame_levels(samples: np.ndarray) -> np.ndarray:
    """RMS level of each 20 ms frame in dBFS (digital silence: -120)."""
    n = len(samples) // FRAME
    frames = np.asarray(samples[: n * FRAME], np.float64).reshape(n, FRAME)
    power = np.mean(frames**2, axis=1)
    return 10.0 * np.log10(np.maximum(power, 1e-12))


def speech_frames(samples: np.ndarray, opts: SilenceOptions = SilenceOptions()) -> np.ndarray:
    """A boolean per 20 ms frame: above the recording's speech threshold."""
    levels = frame_levels(samples)
    if levels.size == 0:
        return np.zeros(0, bool)
    loud, quiet = np.percentile(levels, [99, 1])
    threshold = max(loud - opts.range_db, quiet + opts.floor_db, opts.min_dbfs)
    return levels > threshold


def speech_regions(samples: np.ndarray, opts: SilenceOptions = SilenceOptions()) -> list[tuple[int, int]]:
    """Stretches of speech ``[(start, end)]`` in samples, merged across short silences, unpadded."""
    frames = speech_frames(samples, opts)
    idx = np.flatnonzero(frames)
    if idx.size == 0:
        return []
    gap = max(1, int(round(opts.min_silence * 50)))
    breaks = np.flatnonzero(np.diff(idx) > gap)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    return [(int(s) * FRAME, min(int(e) * FRAME, len(samples))) for s, e in zip(starts, ends, strict=True)]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of a recording transcribed on its own: samples ``[start, end)``."""

    start: int
    end: int

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


def plan_chunks(
    regions: list[tuple[int, int]], num_samples: int, opts: SilenceOptions = SilenceOptions()
) -> list[Chunk]:
    """Group speech stretches (sorted, disjoint) into chunks cut in silences (see the module doc)."""
    pad, limit = int(opts.pad * SAMPLE_RATE), int(opts.max_chunk * SAMPLE_RATE)
    n = len(regions)

    def end_after(j: int) -> int:  # a chunk ending with region j: padded, never past the next cut
        end = min(num_samples, regions[j][1] + pad)
        return min(end, (regions[j][1] + regions[j + 1][0]) // 2) if j + 1 < n else end

    chunks: list[Chunk] = []
    i = 0
    while i < n:
        start = max(0, regions[i][0] - pad, chunks[-1].end if chunks else 0)
        fits = i
        while fits < n and end_after(fits) - start <= limit:
            fits += 1
        if fits == i or fits == n:
            last = fits - 1 if fits == n else i  # all the rest fits, or region i alone is too long
        else:
            late = [j for j in range(i, fits) if end_after(j) - start >= 0.8 * limit]
            last = max(late, key=lambda j: (regions[j + 1][0] - regions[j][1], j)) if late else fits - 1
        chunks.append(Chunk(start, end_after(last)))
        i = last + 1
    return chunks


def chunk_recording(samples: np.ndarray, opts: SilenceOptions = SilenceOptions()) -> list[Chunk]:
    """:func:`plan_chunks` over :func:`speech_regions`; empty for a recording with no speech."""
    return plan_chunks(speech_regions(samples, opts), len(samples), opts)
