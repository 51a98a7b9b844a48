#!/usr/bin/env python
"""Convert Hugging Face checkpoints to scalebio Megatron checkpoints and back (docs/conversion.md).

    python tools/convert.py hf-to-megatron --hf HF_DIR --out CKPT_DIR [--model NAME] [--tp T --pp P]
    python tools/convert.py megatron-to-hf --ckpt CKPT_DIR --out HF_DIR [--dtype bfloat16]

Both stream tensor by tensor (peak memory about the largest tensor) and write into a temporary
directory next to --out that is renamed when complete, so a failure leaves no partial output.
"""
import argparse
import sys

try:
    from scalebio.config import ConfigError
    from scalebio_plugins.megatron import hf
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: pip install -c constraints-cpu.txt -e .")


def _size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/convert.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="a Hugging Face directory (config.json + safetensors) to a checkpoint")
    a.add_argument("--hf", required=True, metavar="HF_DIR")
    a.add_argument("--out", required=True, metavar="CKPT_DIR")
    a.add_argument("--model", default=None, metavar="NAME",
                   help="a model in model_configs/ (or a YAML) that config.json must match; default: derived "
                        "from config.json (named after a model_configs/ entry with the same architecture)")
    a.add_argument("--tp", type=int, default=1, help="check that this TP size fits and suggest it in model.yaml")
    a.add_argument("--pp", type=int, default=1, help="check that this PP size fits and suggest it in model.yaml")
    b = sub.add_parser("megatron-to-hf", help="a checkpoint (converted or saved by a run) to a Hugging Face directory")
    b.add_argument("--ckpt", required=True, metavar="CKPT_DIR")
    b.add_argument("--out", required=True, metavar="HF_DIR")
    for p in (a, b):
        p.add_argument("--dtype", default=None, help="cast tensors (float32, bfloat16, float16); default: keep")
        p.add_argument("--max-shard-size", default="5G", help="largest safetensors file (default 5G)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    common = dict(dtype=args.dtype, overwrite=args.overwrite, max_shard_bytes=_size(args.max_shard_size),
                  progress=not args.no_progress)
    try:
        if args.command == "hf-to-megatron":
            hf.hf_to_megatron(args.hf, args.out, model_name=args.model, tp=args.tp, pp=args.pp, **common)
        else:
            hf.megatron_to_hf(args.ckpt, args.out, **common)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
