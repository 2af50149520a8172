"""GPU check of the engine: Pallas vs XLA paged attention vs the reference, then throughput.

    python scripts/gpu_engine_check.py [--quick] [--out FILE.json]

1. Correctness: small float32 T5 and BART models with head_dim 64 (the kernel's real tiling,
   no padding); every request's greedy tokens from the engine with ``attention_impl="pallas"``
   and ``"xla"`` must equal ``reference_generate`` alone.
2. Throughput: a flan-t5-base-shaped random model in bfloat16, a mixed workload with forced
   output lengths, in-flight vs static engine (Pallas) vs in-flight (XLA) vs HF ``generate``
   (PyTorch, static padded batches of the slot count) on the same device.
``--quick`` shrinks everything so it runs on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
import transformers as tf

import encdec
from encdec.engine import Engine, EngineConfig, Request


def _save(model, directory):
    model.save_pretrained(directory)
    return directory


def small_models(tmp):
    torch.manual_seed(0)
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(
            vocab_size=512,
            d_model=128,
            d_kv=64,
            d_ff=256,
            num_layers=2,
            num_decoder_layers=3,
            num_heads=2,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=64,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            dropout_rate=0.0,
            decoder_start_token_id=0,
        )
    )
    bart = tf.BartForConditionalGeneration(
        tf.BartConfig(
            vocab_size=512,
            d_model=128,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=256,
            decoder_ffn_dim=256,
            max_position_embeddings=1024,
            init_std=0.2,
            dropout=0.0,
            forced_eos_token_id=None,
        )
    )
    return {name: _save(m.eval(), f"{tmp}/{name}") for name, m in (("t5", t5), ("bart", bart))}


def workload(n, max_in, max_new, vocab, seed=0, forced=False, few_shapes=False):
    """Random requests; ``few_shapes`` draws lengths from 3 values so the reference compiles little."""
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(n):
        s = int(rng.choice([1, max_in // 3, max_in]) if few_shapes else rng.integers(1, max_in + 1))
        m = int(rng.choice([1, max_new // 2, max_new]) if few_shapes else rng.integers(1, max_new + 1))
        reqs.append(
            Request(
                inputs=rng.integers(3, vocab - 1, s).tolist(),
                max_new_tokens=m,
                min_new_tokens=m if forced else 0,
            )
        )
    return reqs


def correctness(dirs, quick, impls=("pallas", "xla")):
    report = {}
    for name, d in dirs.items():
        model = encdec.load_pretrained(d)
        reqs = workload(12 if quick else 32, 100, 40, 512, seed=1, few_shapes=True)
        refs = [encdec.reference_generate(model, [r.inputs], r.max_new_tokens)[0].token_ids for r in reqs]
        for impl in ("xla",) if quick else impls:
            cfg = EngineConfig(
                num_slots=8,
                page_size=16,
                max_encoder_len=128,
                max_new_tokens=48,
                encoder_buckets=(32, 64, 128),
                steps_per_dispatch=4,
                attention_impl=impl,
            )
            outs = Engine(model, cfg).generate(reqs)
            same = sum(o.token_ids == r for o, r in zip(outs, refs, strict=True))
            report[f"{name}-{impl}"] = f"{same}/{len(reqs)}"
            print(
                f"correctness {name} {impl}: {same}/{len(reqs)} requests equal reference_generate", flush=True
            )
    return report


def base_shape(tmp, quick):
    torch.manual_seed(0)
    if quick:
        cfg = tf.T5Config(
            vocab_size=1024,
            d_model=128,
            d_kv=64,
            d_ff=256,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
        )
    else:  # flan-t5-base
        cfg = tf.T5Config(
            vocab_size=32128,
            d_model=768,
            d_kv=64,
            d_ff=2048,
            num_layers=12,
            num_heads=12,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
        )
    return _save(tf.T5ForConditionalGeneration(cfg).eval(), f"{tmp}/base"), cfg


def hf_throughput(directory, reqs, batch, device, dtype):
    model = tf.T5ForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(device).eval()
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(reqs), batch):
        group = reqs[i : i + batch]
        S = max(len(r.inputs) for r in group)
        ids = torch.zeros((len(group), S), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(group):
            ids[j, : len(r.inputs)] = torch.tensor(r.inputs)
            mask[j, : len(r.inputs)] = 1
        n = max(r.max_new_tokens for r in group)
        gc = tf.GenerationConfig(
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            num_beams=1,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        with torch.no_grad():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)
        tokens += sum(r.max_new_tokens for r in group)  # useful tokens only
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


def throughput(tmp, quick, runs=None, hf=True):
    """``runs``: ``mode:impl[:overhead]`` strings (overhead: ``EngineConfig.dispatch_overhead_steps``,
    default the backend's)."""
    import jax

    directory, _ = base_shape(tmp, quick)
    dtype = "float32" if quick else "bfloat16"
    model = encdec.load_pretrained(directory, dtype=dtype)
    n, slots = (24, 8) if quick else (384, 64)
    reqs = workload(n, 64 if quick else 512, 32 if quick else 128, 1000, seed=2, forced=True)
    on_gpu = jax.default_backend() == "gpu"
    if runs is None:
        runs = ["inflight:auto", "static:auto"] + (["inflight:xla"] if on_gpu else [])
    results = {}
    for run in runs:
        mode, impl, *rest = run.split(":")
        overhead = float(rest[0]) if rest else None
        cfg = EngineConfig(
            num_slots=slots,
            page_size=16,
            max_encoder_len=64 if quick else 512,
            max_new_tokens=32 if quick else 128,
            encoder_buckets=(128, 512),
            max_encoder_batch=8,
            max_encoder_tokens=8192,
            steps_per_dispatch=8,
            attention_impl=impl,
            mode=mode,
            dispatch_overhead_steps=overhead,
        )
        engine = Engine(model, cfg)
        t0 = time.perf_counter()
        engine.warmup()  # compile every encode variant and the decode step
        print(f"{run} warmup {time.perf_counter() - t0:.1f}s", flush=True)
        t0 = time.perf_counter()
        outs = engine.generate(reqs)
        wall = time.perf_counter() - t0
        toks = sum(len(o.token_ids) for o in outs)
        lat = sorted(o.timings["done"] - t0 for o in outs)
        stats = engine.stats()
        key = f"encdec-{run}"
        results[key] = {
            "output_tokens_per_s": toks / wall,
            "wall_s": wall,
            "p50_latency_s": lat[len(lat) // 2],
            "dispatches": stats.dispatches,
            "decode_steps": stats.decode_steps,
            "encode_batches": stats.encode_batches,
            "mean_busy_slots": stats.mean_busy_slots,
            "compiled": engine.compile_counts(),
        }
        print(key, json.dumps(results[key]), flush=True)
    if hf:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        hf_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        hf_tps = hf_throughput(directory, reqs, slots, device, hf_dtype)
        results["hf-generate"] = {"output_tokens_per_s": hf_tps}
        print("hf-generate", hf_tps, flush=True)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--impls", default="pallas,xla", help="correctness: attention implementations")
    parser.add_argument("--runs", default=None, help="throughput: comma-separated mode:impl[:overhead]")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    import jax

    print("devices", jax.devices(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = {"devices": [str(d) for d in jax.devices()]}
        if not args.skip_correctness:
            report["correctness"] = correctness(small_models(tmp), args.quick, args.impls.split(","))
        runs = None if args.runs is None else args.runs.split(",")
        report["throughput"] = throughput(tmp, args.quick, runs, hf=not args.skip_hf)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
