#!/usr/bin/env python
"""Benchmark: the cost of ScaleBiO against plain fine-tuning, and LISA's trainable-state memory (same as ``scalebio bench``: see ``scalebio bench --help``)."""
import sys

try:
    from scalebio.cli import main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(main(["bench"] + sys.argv[1:]))
