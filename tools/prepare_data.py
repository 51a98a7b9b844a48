#!/usr/bin/env python
"""Tokenize a data YAML's sources into the cache ahead of a run (same as ``scalebio prepare``: see ``scalebio prepare --help``)."""
import sys

try:
    from scalebio.cli import main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(main(["prepare"] + sys.argv[1:]))
