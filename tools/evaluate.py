#!/usr/bin/env python
"""Token-mean loss of a checkpoint per source and on validation, printed as JSON (``scalebio eval``).

    python tools/evaluate.py --load CKPT_DIR --data DATA.yaml [--set megatron.tp=2 ...]
"""
import sys

try:
    from scalebio.evaluate import eval_main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(eval_main(prog="tools/evaluate.py"))
