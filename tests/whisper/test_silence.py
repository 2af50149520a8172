"""The energy detector and the chunk plan: cuts land in silences, chunks fit a window."""

import numpy as np

from encdec.whisper.audio import SAMPLE_RATE
from encdec.whisper.silence import Chunk, SilenceOptions, chunk_recording, plan_chunks, speech_regions


def _speech(layout, noise=0.0, seed=0):
    """Tone bursts (speech) and gaps (silence): ``[(seconds, is_speech), ...]``."""
    rng = np.random.default_rng(seed)
    parts = []
    for seconds, on in layout:
        n = int(seconds * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1.2 + np.sin(2 * np.pi * 3 * t)) if on else np.zeros(n)
        parts.append(x + noise * rng.standard_normal(n))
    return np.concatenate(parts).astype(np.float32)


def test_regions_are_the_bursts_across_short_dips():
    layout = [(0.5, False), (2.0, True), (0.05, False), (1.0, True), (0.6, False), (1.5, True)]
    x = _speech(layout, noise=1e-3)
    regions = [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in speech_regions(x)]
    assert len(regions) == 2  # the 50 ms dip does not split a stretch
    assert abs(regions[0][0] - 0.5) < 0.03 and abs(regions[0][1] - 3.55) < 0.03
    assert abs(regions[1][0] - 4.15) < 0.03 and abs(regions[1][1] - 5.65) < 0.03


def test_silence_and_noise_alone_have_no_speech():
    assert speech_regions(np.zeros(5 * SAMPLE_RATE, np.float32)) == []
    noise = 0.01 * np.random.default_rng(0).standard_normal(5 * SAMPLE_RATE).astype(np.float32)
    assert speech_regions(noise) == []
    assert chunk_recording(np.zeros(SAMPLE_RATE, np.float32)) == []


def test_chunks_cut_in_silences_and_fit_the_window():
    # 14 bursts of 4 s with 0.3 to 1.0 s silences: about 66 s.
    layout = [(0.2, False)]
    for i in range(14):
        layout += [(4.0, True), (0.3 + 0.05 * (i % 15), False)]
    x = _speech(layout)
    regions = speech_regions(x)
    chunks = chunk_recording(x)
    assert 3 <= len(chunks) <= 4
    for c in chunks:
        assert c.seconds <= 30.0
        # No burst is cut: every region lies inside one chunk.
    for s, e in regions:
        assert sum(c.start <= s and e <= c.end for c in chunks) == 1
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:], strict=False))


def test_a_stretch_with_no_silence_becomes_one_long_chunk():
    regions = [(0, 40 * SAMPLE_RATE), (41 * SAMPLE_RATE, 45 * SAMPLE_RATE)]
    chunks = plan_chunks(regions, 46 * SAMPLE_RATE, SilenceOptions(pad=0.0))
    assert chunks == [Chunk(0, 40 * SAMPLE_RATE), Chunk(41 * SAMPLE_RATE, 45 * SAMPLE_RATE)]
