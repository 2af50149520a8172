"""Decode-step time and tokens/s on paper, from bytes per step, HBM and NVLink bandwidth.

    python scripts/tp_estimate.py

A decode step of an encoder-decoder reads every decoder weight once and each slot's self and
cross K/V once; under tensor parallelism each GPU reads its 1/TP of both and the step adds one
all-reduce of the ``[slots, d_model]`` activations after each attention output and MLP down
projection, plus the embedding and vocabulary reductions. The encoder runs once per request
(compute bound). Printed for flan-t5-xxl on 8 H100s at TP 8 and TP 4 x DP 2, and, to calibrate,
for the two models TensorRT-LLM publishes enc-dec figures for (one H100, batch 128). Every
hardware figure is an assumption stated below (spec sheets), not a measurement.
"""

from __future__ import annotations

import dataclasses

HBM_BYTES_PER_S = 3.35e12
"""H100 SXM5 HBM3, spec."""
NVLINK_BYTES_PER_S = 450e9
"""NVLink 4: 900 GB/s per GPU both directions together, 450 GB/s each way (spec)."""
ALL_REDUCE_LATENCY_S = 10e-6
"""Per all-reduce start-up on NVSwitch (assumed: decode all-reduces are latency bound)."""
BF16_FLOPS = 989e12 * 0.5
"""Dense bf16 peak, at an assumed 50% utilisation for the encoder's large matrix products."""
BYTES = 2  # bfloat16 weights and KV

# TensorRT-LLM's published enc-dec benchmark (H100, bf16, greedy, batch 128): inputs 260-440
# tokens, outputs up to 128 (docs/source/models/encoder-decoder.md).
INPUT_TOKENS = 350
OUTPUT_TOKENS = 128
MEAN_SELF_TOKENS = OUTPUT_TOKENS // 2


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    heads: int
    head_dim: int
    d_ff: int
    layers: int
    vocab: int
    gated: bool
    tied: bool

    def attention(self) -> int:
        return 4 * self.d_model * self.heads * self.head_dim

    def ffn(self) -> int:
        return (3 if self.gated else 2) * self.d_model * self.d_ff

    def decoder_step_params(self) -> int:
        """Weights one decode step reads: every decoder layer and the LM head."""
        return self.layers * (2 * self.attention() + self.ffn()) + self.vocab * self.d_model

    def encoder_flops(self, tokens: int) -> float:
        """One request's encoder pass plus its cross K/V projections."""
        cross_kv = self.layers * 2 * self.d_model * self.heads * self.head_dim
        return 2.0 * (self.layers * (self.attention() + self.ffn()) + cross_kv) * tokens

    def kv_bytes_per_token(self) -> int:
        """K and V of one position in every decoder layer."""
        return self.layers * 2 * self.heads * self.head_dim * BYTES


FLAN_T5_XXL = Shape("flan-t5-xxl", 4096, 64, 64, 10240, 24, 32128, gated=True, tied=False)
FLAN_T5_XL = Shape("flan-t5-xl", 2048, 32, 64, 5120, 24, 32128, gated=True, tied=False)
BART_LARGE = Shape("bart-large-cnn", 1024, 16, 64, 4096, 12, 50272, gated=False, tied=True)


def estimate(shape: Shape, tp: int, dp: int, slots: int) -> dict[str, float]:
    """Per-step and per-wave figures for ``slots`` sequences over ``dp`` groups of ``tp`` GPUs."""
    group_slots = slots // dp
    weights = shape.decoder_step_params() * BYTES / tp
    kv = group_slots * (INPUT_TOKENS + MEAN_SELF_TOKENS) * shape.kv_bytes_per_token() / tp
    memory_s = (weights + kv) / HBM_BYTES_PER_S
    all_reduces = 3 * shape.layers + 2 if tp > 1 else 0
    message = group_slots * shape.d_model * BYTES
    ring = 2 * (tp - 1) / tp * message / NVLINK_BYTES_PER_S
    comm_s = all_reduces * (ALL_REDUCE_LATENCY_S + ring)
    step_s = memory_s + comm_s
    encode_s = slots * shape.encoder_flops(INPUT_TOKENS) / (tp * dp * BF16_FLOPS)
    wave_s = OUTPUT_TOKENS * step_s + encode_s
    return {
        "weights_gb": weights / 1e9,
        "kv_gb": kv / 1e9,
        "memory_ms": memory_s * 1e3,
        "all_reduces": all_reduces,
        "message_kb": message / 1e3,
        "comm_ms": comm_s * 1e3,
        "step_ms": step_s * 1e3,
        "decode_tok_s": slots / step_s,
        "encode_ms": encode_s * 1e3,
        "tok_s": slots * OUTPUT_TOKENS / wave_s,
    }


ROWS = [
    (FLAN_T5_XXL, 8, 1, 128, None),
    (FLAN_T5_XXL, 4, 2, 128, None),
    (FLAN_T5_XXL, 8, 1, 256, None),
    (FLAN_T5_XXL, 4, 2, 256, None),
    (FLAN_T5_XL, 1, 1, 128, 4768),
    (BART_LARGE, 1, 1, 128, 31544),
]


def main() -> None:
    head = (
        "| model | GPUs | TP x DP | slots | weights GB/GPU | KV GB/GPU | HBM ms | all-reduces x KB "
        "| NVLink ms | step ms | decode tok/s | encoder ms/wave | tok/s (decode + encode) "
        "| TensorRT-LLM tok/s |"
    )
    print(head)
    print("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
    for shape, tp, dp, slots, published in ROWS:
        e = estimate(shape, tp, dp, slots)
        reduces = f"{e['all_reduces']} x {e['message_kb']:.0f}" if tp > 1 else "-"
        print(
            f"| {shape.name} | {tp * dp} | {tp} x {dp} | {slots} | {e['weights_gb']:.2f} "
            f"| {e['kv_gb']:.2f} | {e['memory_ms']:.2f} | {reduces} | {e['comm_ms']:.2f} | "
            f"{e['step_ms']:.2f} | {e['decode_tok_s']:,.0f} | {e['encode_ms']:.0f} | {e['tok_s']:,.0f} | "
            f"{'' if published is None else f'{published:,}'} |"
        )


if __name__ == "__main__":
    main()
