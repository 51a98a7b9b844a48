#!/usr/bin/env python
"""Memory planner: per-GPU memory of each TP x PP x DP layout of a GPU count, and the layouts that fit (same as ``scalebio plan``: see ``scalebio plan --help``)."""
import sys

try:
    from scalebio.cli import main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(main(["plan"] + sys.argv[1:]))
