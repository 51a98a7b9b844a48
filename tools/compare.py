#!/usr/bin/env python
"""Learn weights, fine-tune on them and on the baselines over seeds, and tabulate the test loss (same as ``scalebio compare``: see ``scalebio compare --help``)."""
import sys

try:
    from scalebio.cli import main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(main(["compare"] + sys.argv[1:]))
