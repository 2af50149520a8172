"""WER of Whisper-base with and without an adapter on text unlike the training text.

The held-out clips of ``experiments/whisper_lora.yaml`` are sayings like its training text; this
reads the project's own modern English sentences (``encdec/whisper/sentences.txt``, joined into
~25-word clips, never trained on) in the target and the control voice and transcribes them
through one engine, base and adapter, greedy: what the adapter learned of the voice, apart from
the text. (An adapter trained on KJV Proverbs improved its own held-out verses and made these
worse: it had learned the archaic spelling.) Run:

    python scripts/whisper_lora_other_text.py --adapter results/whisper_lora/adapter
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="PEFT adapter (finetune's OUT/adapter)")
    parser.add_argument("--experiment", default="experiments/whisper_lora.yaml")
    parser.add_argument(
        "--words", type=int, default=25, help="sentences joined until a clip has this many words"
    )
    args = parser.parse_args(argv)

    from encdec.engine import Request
    from encdec.lora import AdapterBank, load_peft
    from encdec.whisper import AudioInput, whisper_engine
    from encdec.whisper.accent import cache_dir, group_verses
    from encdec.whisper.clips import load_sentences, synthesize, wer
    from encdec.whisper.finetune import load_config
    from encdec.whisper.transcribe import load_whisper

    config = load_config(args.experiment)
    model = load_whisper(config.model.path)
    lora, _ = load_peft(args.adapter, model.params, model.config)
    engine = whisper_engine(model, adapters=AdapterBank.for_adapters(model.params, model.config, [lora]))
    engine.load_adapter("adapter", lora)
    texts = [" ".join(g) for g in group_verses(load_sentences(), args.words)]
    print(f"{len(texts)} clips of modern sentences per voice")
    print("| voice | base WER | adapter WER |\n|---|---|---|")
    for voice in (config.data.voice, config.data.control_voice):
        paths = synthesize(
            texts, cache_dir(config.data) / f"other-{voice}", voice=voice, speed=config.data.speed
        )
        row = []
        for adapter in (None, "adapter"):
            requests = [
                Request(AudioInput(str(p)), max_new_tokens=config.eval_max_new_tokens, adapter_id=adapter)
                for p in paths
            ]
            row.append(wer(texts, [o.text or "" for o in engine.generate(requests)]))
        print(f"| {voice} | {100 * row[0]:.1f}% | {100 * row[1]:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
