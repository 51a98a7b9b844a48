#!/usr/bin/env python
"""Experiment data from real text that is already on the machine (no download), one subcommand
per experiment of SPEC §5, and ``check`` to apply an experiment's check to learned weights
(docs/data.md, "Experiment data"; docs/results.md, "Experiments").

Corpora (the code: tools/experiment_data/):

- ``wordnet`` (default): "Define the word X." -> X's first-sense WordNet gloss, for the words
  WordNet's SemCor counts attest (Debian: ``apt-get install wordnet-base``, /usr/share/wordnet);
- ``pydoc``: "What does the Python function F do?" -> the first sentence of F's docstring, from
  the standard library of the Python that runs this script (always available);
- the multilingual experiment's own: "Translate into German: <an English software message>" ->
  its translation, from the installed packages' gettext catalogs (/usr/share/locale/*/LC_MESSAGES).

An experiment turns the items into sources, a validation set and a test set (each a ``messages``
JSONL file, so a run renders them with the model's own chat template), a data YAML whose
tokenizer is the model's checkpoint directory, and ``experiment.json``, the claim its check tests.
Every file is a function of the corpus and ``--seed``: the same command writes the same bytes.
Items are split by key, so no word, function or message appears in two files.

    python tools/make_experiment_data.py EXPERIMENT --out DIR [--corpus wordnet] [--tokenizer CKPT_DIR]
        [--seed 0] [--train 1000] [--eval 200] [--seq-length 64]
    python tools/make_experiment_data.py check DIR RUN_DIR [RUN_DIR ...]

Experiments and their checks: denoising (the corrupted sources get < 0.1 in total), multilingual
(the validation language on top), instruction-quality (the high-quality source on top),
noise-ladder (Spearman(pi, noise) < -0.8).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_data.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n\n")[0]))
