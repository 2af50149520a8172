"""Whisper's long-form rules on token sequences (no model): segments, seeking, fallback, silence."""

import pytest

from encdec.whisper.segments import (
    Thresholds,
    average_logprob,
    compression_ratio,
    is_silent,
    needs_fallback,
    split_window,
)

TB = 1000  # <|0.00|>; <|t|> is TB + t / 0.02


def ts(seconds):
    return TB + round(seconds / 0.02)


def test_pairs_split_segments_and_a_single_final_timestamp_ends_the_window():
    tokens = [ts(0.0), 1, 2, ts(2.0), ts(2.0), 3, ts(4.5), ts(5.0), 4, 5, ts(7.0)]
    split = split_window(tokens, TB, content_frames=2_000)
    assert [(s, e) for s, e, _ in split.segments] == [(0.0, 2.0), (2.0, 4.5), (5.0, 7.0)]
    assert [p for _, _, p in split.segments] == [tokens[:4], tokens[4:7], tokens[7:]]
    assert split.complete and split.seek_frames == 2_000  # the whole window is done


def test_an_unfinished_last_segment_is_decoded_again():
    """Text after the last pair (cut by the window's end) is dropped; the next window starts where
    the last finished segment ends, so the cut sentence is decoded whole there."""
    tokens = [ts(0.0), 1, 2, ts(12.0), ts(12.5), 3, 4, 5]
    split = split_window(tokens, TB, content_frames=3_000)
    assert [(s, e) for s, e, _ in split.segments] == [(0.0, 12.0)]
    assert not split.complete and split.seek_frames == 1200
    # Ending on a pair: the new segment opened by it has no text yet; resume there as well.
    split = split_window([ts(0.0), 1, ts(3.0), ts(3.0)], TB, content_frames=3_000)
    assert [(s, e) for s, e, _ in split.segments] == [(0.0, 3.0)] and split.seek_frames == 300


def test_without_pairs_the_window_is_one_segment():
    assert split_window([1, 2, 3], TB, 1_500).segments == [(0.0, 15.0, [1, 2, 3])]
    split = split_window([ts(0.0), 1, 2, ts(6.0)], TB, 3_000)  # one segment, its end stated
    assert [(s, e) for s, e, _ in split.segments] == [(0.0, 6.0)] and split.seek_frames == 3_000
    assert split_window([], TB, 700).seek_frames == 700


def test_times_past_the_audio_are_clipped_and_segments_after_it_dropped():
    tokens = [ts(0.0), 1, ts(9.0), ts(9.0), 2, ts(12.0), ts(12.5), 3, ts(14.0)]
    split = split_window(tokens, TB, content_frames=1_000)  # 10 s of audio in the window
    assert [(s, e) for s, e, _ in split.segments] == [(0.0, 9.0), (9.0, 10.0)]
    assert split.seek_frames == 1_000


def test_no_progress_still_moves_on():
    split = split_window([ts(0.0), ts(0.0), 5], TB, 3_000)  # a sequence the rules never allow
    assert split.seek_frames == 3_000


def test_compression_ratio_flags_loops():
    assert compression_ratio("") == 0.0
    assert compression_ratio("The quick brown fox jumps over the lazy dog.") < 1.5
    assert compression_ratio("thank you " * 40) > 2.4


def test_fallback_and_silence_follow_openai_whisper():
    th = Thresholds()
    assert not needs_fallback(1.5, -0.3, 0.1, th)
    assert needs_fallback(3.0, -0.3, 0.1, th)  # a loop
    assert needs_fallback(1.5, -1.5, 0.1, th)  # improbable
    assert not needs_fallback(1.5, -1.5, 0.9, th)  # improbable because silent: no retry
    assert is_silent(0.9, -1.5, th) and not is_silent(0.9, -0.5, th) and not is_silent(0.3, -1.5, th)
    off = Thresholds(None, None, None)
    assert not needs_fallback(9.0, -9.0, 1.0, off) and not is_silent(1.0, -9.0, off)
    assert average_logprob([-1.0, -2.0, -3.0], 2) == pytest.approx(-2.0)  # EOT's included, over 2 + 1
