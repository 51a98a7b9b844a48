#!/usr/bin/env python
"""Write a reweighted data mixture from a run's learned weights (same as ``scalebio export``: see ``scalebio export --help``)."""
import sys

try:
    from scalebio.cli import main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(main(["export"] + sys.argv[1:]))
