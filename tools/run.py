#!/usr/bin/env python
"""Run ScaleBiO data reweighting. With no arguments: the embedded CPU demo.

    python tools/run.py --plugins lisa,simplex --model qwen2.5-32b --data DATA.yaml
"""
import sys

try:
    from scalebio.cli import run_main
except ImportError as exc:  # a checkout that was never installed
    sys.exit(f"scalebio is not installed ({exc}). From the repository root: "
             f"pip install -c constraints-cpu.txt -e .")

if __name__ == "__main__":
    sys.exit(run_main())
