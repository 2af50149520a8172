"""HF transformers + PEFT vs encdec on Whisper-base with a trained adapter, on the held-out clips.

Exports Whisper-base (CTranslate2 weights) as an HF ``WhisperForConditionalGeneration``
directory (``encdec export --format hf``), loads it with ``transformers`` and the adapter with
``peft``, and decodes every held-out clip of ``experiments/whisper_lora.yaml`` (both voices)
greedily in float32 with Whisper's suppression, from the same log-mel features; encdec decodes
the same clips through its engine with the adapter from the bank. Prints how many token
sequences are identical (and the first difference otherwise). Run:

    python scripts/whisper_lora_parity.py --adapter results/whisper_lora/adapter \
        --hf-dir results/whisper_base_hf
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapter", required=True, help="PEFT adapter directory (encdec finetune's OUT/adapter)"
    )
    parser.add_argument("--hf-dir", required=True, help="where to export Whisper-base in HF layout (reused)")
    parser.add_argument("--experiment", default="experiments/whisper_lora.yaml")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--limit", type=int, default=None, help="first N held-out clips per voice")
    args = parser.parse_args(argv)

    import torch
    from peft import PeftModel
    from transformers import GenerationConfig, WhisperForConditionalGeneration
    from transformers.generation.utils import GenerationMixin

    from encdec.checkpoints.export import export_hf
    from encdec.engine import Request
    from encdec.lora import AdapterBank, load_peft
    from encdec.whisper import AudioInput, load_audio, log_mel_spectrogram, whisper_engine
    from encdec.whisper.accent import build_split
    from encdec.whisper.finetune import load_config
    from encdec.whisper.tokens import WhisperTokens
    from encdec.whisper.transcribe import load_whisper

    config = load_config(args.experiment)
    model = load_whisper(config.model.path)
    tokens = WhisperTokens.from_dir(model.path)
    hf_dir = Path(args.hf_dir)
    if not (hf_dir / "model.safetensors").exists():
        t = time.perf_counter()
        export_hf(model, hf_dir)
        print(f"exported to {hf_dir} in {time.perf_counter() - t:.1f} s")
    split = build_split(config.data)
    clips = list(split.eval_target[: args.limit]) + list(split.eval_control[: args.limit])
    prompt = tokens.prompt("en", "transcribe")

    lora, _ = load_peft(args.adapter, model.params, model.config)
    engine = whisper_engine(model, adapters=AdapterBank.for_adapters(model.params, model.config, [lora]))
    engine.load_adapter("adapter", lora)
    requests = [
        Request(AudioInput(str(c.path)), max_new_tokens=args.max_new_tokens, adapter_id="adapter")
        for c in clips
    ]
    t = time.perf_counter()
    ours = [[x for x in o.token_ids if x != tokens.eot] for o in engine.generate(requests)]
    print(f"encdec engine: {len(clips)} clips in {time.perf_counter() - t:.1f} s")

    hf = PeftModel.from_pretrained(
        WhisperForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.float32).eval(),
        args.adapter,
    )
    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=tokens.eot,
        pad_token_id=tokens.eot,
        decoder_start_token_id=tokens.sot,
        suppress_tokens=list(tokens.suppress),
        begin_suppress_tokens=list(tokens.suppress_begin),
    )
    same, t = 0, time.perf_counter()
    for clip, mine in zip(clips, ours, strict=True):
        mel = log_mel_spectrogram(load_audio(clip.path), model.config.num_mel_bins)[None]
        with torch.no_grad():
            out = GenerationMixin.generate(
                hf.base_model.model,
                input_features=torch.tensor(mel),
                decoder_input_ids=torch.tensor([prompt]),
                generation_config=generation,
            )[0, len(prompt) :].tolist()
        theirs = out[: out.index(tokens.eot)] if tokens.eot in out else out
        if theirs == mine:
            same += 1
        else:
            k = next((i for i, (a, b) in enumerate(zip(theirs, mine, strict=False)) if a != b), None)
            name = f"{clip.voice} {clip.path.name}"
            print(f"differs: {name} at token {k} (hf {len(theirs)}, encdec {len(mine)} tokens)")
    print(f"HF + PEFT: {len(clips)} clips in {time.perf_counter() - t:.1f} s")
    print(f"identical greedy tokens (float32): {same} of {len(clips)} held-out clips")
    return 0 if same == len(clips) else 1


if __name__ == "__main__":
    sys.exit(main())
