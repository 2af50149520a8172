"""Is a random-weight benchmark shape numerically well conditioned? HF float32 vs float64 logits.

    python scripts/random_model_conditioning.py flan-t5-large [--len 400]

A chaotic model (float32 rounding alone flips greedy tokens) cannot be used to check that two
systems produce the same outputs; see docs/PERFORMANCE.md.
"""

import argparse

import numpy as np
import torch
import transformers as tf

from encdec.bench.shapes import write_shape


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shape")
    parser.add_argument("--len", type=int, default=400)
    args = parser.parse_args()
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(str(write_shape(args.shape))).eval()
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(3, 32000, (2, args.len)))
    dec = torch.tensor(np.concatenate([np.zeros((2, 1), np.int64), rng.integers(3, 32000, (2, 3))], axis=1))
    with torch.no_grad():
        f32 = model(input_ids=ids, decoder_input_ids=dec).logits.numpy()
        f64 = model.double()(input_ids=ids, decoder_input_ids=dec).logits.numpy()
    print(
        f"{args.shape}: float32 vs float64 max |logit diff| {np.abs(f32 - f64).max():.3g}, logit std "
        f"{f64.std():.3g}, greedy tokens agree {(f32.argmax(-1) == f64.argmax(-1)).mean():.0%}"
    )


if __name__ == "__main__":
    main()
