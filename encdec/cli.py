"""``encdec generate | run | finetune | transcribe | export | serve`` — thin wrappers over the library.

Each subcommand parses its arguments and calls one library function; the logic lives there.
"""

from __future__ import annotations

import argparse
import sys

from encdec.models.quant import SCHEMES


def _generate(args: argparse.Namespace) -> int:
    import encdec

    model = encdec.load_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)
    if args.ids:
        inputs = [[int(t) for t in s.split()] for s in args.input]
    else:
        inputs = list(args.input)
    outputs = encdec.reference_generate(
        model,
        inputs,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    for out in outputs:
        print(out.text if out.text is not None else " ".join(map(str, out.token_ids)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from encdec.bench.run import run_experiment_cli

    return run_experiment_cli(args.experiment, overrides=args.set, out=args.out)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _finetune(args: argparse.Namespace) -> int:
    from encdec.experiment_config import read_yaml

    kw = {"overrides": args.set, "out": args.out, "stop_after": args.stop_after}
    if (read_yaml(args.experiment) or {}).get("kind") == "whisper_lora":
        from encdec.whisper.finetune import finetune_whisper_cli

        return finetune_whisper_cli(args.experiment, **kw)
    from encdec.lora.finetune import finetune_cli

    return finetune_cli(args.experiment, **kw)


def _transcribe(args: argparse.Namespace) -> int:
    from encdec.whisper.command import transcribe_cli

    return transcribe_cli(args)


def _export(args: argparse.Namespace) -> int:
    from encdec.checkpoints.export import export_hf
    from encdec.checkpoints.pretrained import load_pretrained

    if args.format != "hf":
        raise ValueError(f"--format {args.format!r}: only hf is supported")
    if args.model is None:
        from encdec.whisper.weights import whisper_base_dir

        args.model = str(whisper_base_dir())
    model = load_pretrained(args.model)
    written = export_hf(model, args.out)
    print(f"wrote {model.config.model_type} from {args.model} to {written}")
    return 0


DEFAULT_SERVE_SHAPE = "t5-small"
"""What ``encdec serve`` serves without ``--model``: the quickstart's random-weight t5-small checkpoint."""


def _serve(args: argparse.Namespace) -> int:
    from encdec.serving.server import serve_cli

    model, name = args.model, args.served_model_name
    if model is None:  # the embedded default: written once into the shape cache
        from encdec.bench.shapes import write_shape

        model, name = write_shape(DEFAULT_SERVE_SHAPE), name or DEFAULT_SERVE_SHAPE
    return serve_cli(
        model,
        name=name,
        adapters=args.adapter,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        num_slots=args.num_slots,
        engine_options=args.engine,
        max_pending=args.max_pending,
        dtype=args.dtype,
        quantize=args.quantize,
        warmup=not args.no_warmup,
        log_level=args.log_level,
    )


QUANTIZE_HELP = (
    "int8: int8 weights, float32 activations (int8 CTranslate2 files load as int8 anyway); "
    "bfloat16: bfloat16 weights and products summed in float32 (~1.5x faster matmuls on AVX512-BF16 CPUs)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="encdec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate with the reference generator from a local HF checkpoint")
    gen.add_argument("--model", required=True, help="directory in Hugging Face layout")
    gen.add_argument("--input", action="append", required=True, help="input text (repeat for a batch)")
    gen.add_argument("--ids", action="store_true", help="inputs are space-separated token ids")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--quantize", default=None, choices=list(SCHEMES), help=QUANTIZE_HELP)
    gen.set_defaults(func=_generate)

    for name, func, help_ in (
        ("run", _run, "run an experiment config (benchmarks)"),
        ("finetune", _finetune, "fine-tune a LoRA adapter from an experiment config"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("experiment", help="experiments/<name>.yaml")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
        )
        p.add_argument("--out", default=None, help="output folder (default: results/<name>)")
        if name == "finetune":
            p.add_argument(
                "--stop-after", type=_positive_int, default=None, metavar="N",
                help="stop (checkpointed) after N steps in this call; running again resumes",
            )  # fmt: skip
        p.set_defaults(func=func)

    tr = sub.add_parser("transcribe", help="transcribe audio files with Whisper (text, srt, vtt, json)")
    tr.add_argument("files", nargs="+", help="audio files (wav, mp3, flac, ogg, m4a, ...)")
    tr.add_argument("--model", default=None, help="HF or CTranslate2 Whisper directory (default: base)")
    tr.add_argument("--language", default="auto", help="spoken language code, or auto: detected per file")
    tr.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    tr.add_argument("--beam-size", type=int, default=5, help="beams (1: greedy); 5 as faster-whisper")
    formats = ["txt", "srt", "vtt", "json"]
    tr.add_argument("--output-format", default=None, choices=formats, help="write DIR/<name>.<format>")
    tr.add_argument("--output-dir", default=None, help="where to write transcripts (default: .)")
    tr.add_argument("--no-vad", action="store_true", help="do not cut files at silences")
    tr.add_argument("--no-condition-on-previous-text", action="store_true", help="no previous-text prompts")
    tr.add_argument(
        "--initial-prompt",
        default=None,
        help="text before each file's first window (spellings, names, a style), as faster-whisper's",
    )
    tr.add_argument(
        "--temperature-increment-on-fallback",
        type=float,
        default=0.2,
        help="temperature step of each retry of a failed window, up to 1 (0: no retries)",
    )
    tr.add_argument("--num-slots", type=int, default=16, help="windows decoded together")
    tr.add_argument("--quantize", default=None, choices=list(SCHEMES), help=QUANTIZE_HELP)
    tr.add_argument(
        "--adapter", default=None, metavar="DIR", help="a PEFT LoRA adapter applied to every window"
    )
    tr.set_defaults(func=_transcribe)

    ex = sub.add_parser("export", help="write a model as a Hugging Face checkpoint directory")
    ex.add_argument(
        "--model", default=None, help="HF or CTranslate2 Whisper directory (default: Whisper-base)"
    )
    ex.add_argument("--format", default="hf", choices=["hf"], help="hf: WhisperForConditionalGeneration")
    ex.add_argument("--out", required=True, help="directory to write")
    ex.set_defaults(func=_export)

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    sv.add_argument(
        "--model",
        default=None,
        help="HF or CTranslate2 model directory, or whisper-base (default: a random-weight t5-small)",
    )
    sv.add_argument("--served-model-name", default=None, help="the base model's name in requests")
    sv.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR", help="a PEFT LoRA adapter (repeatable)"
    )
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    sv.add_argument("--num-slots", type=int, default=None, help="decode slots (default: the engine's)")
    sv.add_argument(
        "--engine", action="append", default=[], metavar="KEY=VALUE", help="EngineConfig field (repeatable)"
    )
    sv.add_argument("--max-pending", type=int, default=256, help="unfinished requests before 429")
    sv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sv.add_argument("--quantize", default=None, choices=list(SCHEMES), help=QUANTIZE_HELP)
    sv.add_argument("--no-warmup", action="store_true", help="compile on first use instead of up front")
    sv.add_argument("--log-level", default="info")
    sv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"encdec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
