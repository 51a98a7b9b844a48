#!/usr/bin/env python
"""Convert Hugging Face checkpoints to scalebio Megatron checkpoints and back, docs/conversion.md (same as ``scalebio convert``: see ``scalebio convert --help``)."""
import sys

try:
    from scalebio.cli import main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(main(["convert"] + sys.argv[1:]))
