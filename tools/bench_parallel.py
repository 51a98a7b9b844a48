#!/usr/bin/env python
"""Benchmark: step time of parallel layouts against one process (same as ``scalebio bench-parallel``: see ``scalebio bench-parallel --help``)."""
import sys

try:
    from scalebio.cli import main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(main(["bench-parallel"] + sys.argv[1:]))
