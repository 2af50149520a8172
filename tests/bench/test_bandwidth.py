"""The bench's K/V bytes per decode step against a step-by-step count."""

from types import SimpleNamespace

import pytest

from encdec.bench.bandwidth import decode_kv_bytes, floor_ms


def test_kv_bytes_count_every_active_request_at_every_step():
    cfg = SimpleNamespace(decoder_layers=3, decoder_heads=4, head_dim=8)
    inputs, outputs = [5, 11, 2], [4, 1, 7]
    per_position = 3 * 2 * 4 * 8 * 2  # layers, K and V, heads, head width, bfloat16 bytes
    total = 0
    for t in range(max(outputs)):
        for s, n in zip(inputs, outputs, strict=True):
            if t < n:  # still decoding: its cross positions and self positions 0 .. t
                total += (s + t + 1) * per_position
    assert decode_kv_bytes(cfg, 2, inputs, outputs) == pytest.approx(total / max(outputs))
    assert decode_kv_bytes(cfg, 2, [], []) == 0


def test_floor_is_bytes_over_bandwidth():
    assert floor_ms(2_000_000, 20.0) == pytest.approx(0.1)


def test_the_probe_reads_huge_page_memory_where_engines_keep_their_weights(monkeypatch):
    """The floor's probe streams an array held as an engine's packed weights are (2 MB pages
    where usable), and records XLA's 4 KB-page read beside it."""
    import encdec.bench.bandwidth as bandwidth
    from encdec.models import huge_pages

    advised = []
    real_total = bandwidth._total

    def total(x):
        advised.append(huge_pages.in_huge_page_memory(x))
        return real_total(x)

    monkeypatch.setattr(bandwidth, "_total", total)
    got = bandwidth.measure_bandwidth(8 << 20, 1)
    assert set(got) == {"jax_read_GBps", "jax_read_4k_GBps", "numpy_copy_GBps"}
    assert all(v > 0 for v in got.values())
    assert advised[0] is huge_pages.huge_pages_usable()  # the floor's read
    assert set(bandwidth.measure_bandwidth(8 << 20, 1, numpy_copy=False)) == {"jax_read_GBps"}
