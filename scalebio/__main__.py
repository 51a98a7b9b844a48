"""``python -m scalebio ...`` is ``scalebio ...`` (and ``torchrun --nproc-per-node 8 -m scalebio run ...``)."""
import sys

from .cli import main

sys.exit(main())
