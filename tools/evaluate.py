#!/usr/bin/env python
"""Token-mean loss of a checkpoint per source and on validation, printed as JSON (same as ``scalebio eval``: see ``scalebio eval --help``)."""
import sys

try:
    from scalebio.cli import main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(main(["eval"] + sys.argv[1:]))
