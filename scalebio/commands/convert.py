"""``scalebio convert``: Hugging Face checkpoints to scalebio Megatron checkpoints and back
(docs/conversion.md; ``tools/convert.py`` is the same command).

    scalebio convert hf-to-megatron --hf HF_DIR --out CKPT_DIR [--model NAME] [--tp T --pp P]
    scalebio convert megatron-to-hf --ckpt CKPT_DIR --out HF_DIR [--dtype bfloat16]
    scalebio convert verify --hf HF_DIR --ckpt CKPT_DIR [--tp T --pp P]   (needs the hf extra)

The conversions stream tensor by tensor (peak memory about the largest tensor) and write into a temporary
directory next to --out that is renamed when complete, so a failure leaves no partial output.
"""
from __future__ import annotations

import argparse

from . import fail, guarded

HELP = "convert Hugging Face checkpoints to scalebio (Megatron) checkpoints and back"


def parse_size(text: str) -> int:
    """``5G``, ``500M``, ``2048`` (bytes) -> bytes."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    raw = text
    text = text.strip().upper().rstrip("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{raw}' is not a size (bytes, or a number with K, M or G)") from None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    sub = ap.add_subparsers(dest="direction", required=True, metavar="{hf-to-megatron,megatron-to-hf,verify}")
    a = sub.add_parser("hf-to-megatron", help="a Hugging Face directory (config.json + safetensors) to a checkpoint")
    a.add_argument("--hf", required=True, metavar="HF_DIR")
    a.add_argument("--out", required=True, metavar="CKPT_DIR")
    a.add_argument("--model", default=None, metavar="NAME",
                   help="a model in model_configs/ (or a YAML) that config.json must match; default: derived "
                        "from config.json (named after a model_configs/ entry with the same architecture)")
    a.add_argument("--tp", type=int, default=1, help="check that this TP size fits and suggest it in model.yaml")
    a.add_argument("--pp", type=int, default=1, help="check that this PP size fits and suggest it in model.yaml")
    a.add_argument("--verify", action="store_true",
                   help="then run `convert verify` on the result at --tp/--pp (needs the hf extra)")
    b = sub.add_parser("megatron-to-hf", help="a checkpoint (converted or saved by a run) to a Hugging Face directory")
    b.add_argument("--ckpt", required=True, metavar="CKPT_DIR")
    b.add_argument("--out", required=True, metavar="HF_DIR")
    for p in (a, b):
        p.add_argument("--dtype", default=None, help="cast tensors (float32, bfloat16, float16); default: keep")
        p.add_argument("--max-shard-size", default="5G", type=parse_size,
                       help="largest safetensors file (default 5G)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    v = sub.add_parser("verify", help="check a checkpoint against its Hugging Face model: tensors round-trip "
                                      "exactly, logits agree within a tolerance (docs/conversion.md)")
    v.add_argument("--hf", required=True, metavar="HF_DIR")
    v.add_argument("--ckpt", required=True, metavar="CKPT_DIR")
    v.add_argument("--tp", type=int, default=1, help="run the megatron model at this TP size (local processes)")
    v.add_argument("--pp", type=int, default=1, help="run the megatron model at this PP size (local processes)")
    for p in (a, v):
        p.add_argument("--tolerance", type=float, default=None,
                       help="largest max |logit difference| / max |logit| that passes (default 1e-4)")


def main(args) -> int:
    if args.direction == "verify":
        return _verify(args.hf, args.ckpt, args.tp, args.pp, args.tolerance)
    if args.max_shard_size < 1:
        return fail(f"--max-shard-size must be positive, got {args.max_shard_size} bytes")
    common = dict(dtype=args.dtype, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
                  progress=not args.no_progress)

    def action():
        from scalebio_plugins.megatron import hf

        if args.direction == "hf-to-megatron":
            hf.hf_to_megatron(args.hf, args.out, model_name=args.model, tp=args.tp, pp=args.pp, **common)
        else:
            hf.megatron_to_hf(args.ckpt, args.out, **common)

    rc = guarded(action, "interrupted; no output was left behind")
    if rc == 0 and args.direction == "hf-to-megatron" and args.verify:
        return _verify(args.hf, args.out, args.tp, args.pp, args.tolerance)
    return rc


def _verify(hf_dir, ckpt, tp: int, pp: int, tolerance) -> int:
    """0 when both checks pass, 1 when one fails (the table says which), 2 on bad input."""
    result = {}

    def action():
        from scalebio_plugins.megatron import verify

        tol = verify.DEFAULT_TOLERANCE if tolerance is None else tolerance
        result.update(verify.verify(hf_dir, ckpt, tp=tp, pp=pp, tolerance=tol))

    rc = guarded(action, "interrupted")
    if rc:
        return rc
    if not result["ok"]:
        return fail("verification failed: see the table above", code=1)
    return 0
