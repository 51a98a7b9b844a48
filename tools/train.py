#!/usr/bin/env python
"""Fine-tune one model on a mixture (same as ``scalebio train``: see ``scalebio train --help``)."""
import sys

try:
    from scalebio.cli import main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))
