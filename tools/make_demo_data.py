#!/usr/bin/env python
"""Rebuild the embedded demo data in scalebio/demo/ from real English text on any machine.

The text is the prose of Python's own documentation: the pydoc topics shipped with CPython
(``pydoc_data.topics``) and the docstrings of the standard library. Each sentence becomes a
prompt/response pair (the first ~40% of its words, and the rest). Sources:

- ``clean``: pairs as they are;
- ``shuffled``: the response's words in random order (fluent words, broken language);
- ``typos``: half of the response's words get a character-level edit (a noisy copy);
- ``validation``: held-out clean pairs, the target distribution.

The sentences of each file are disjoint. A sentencepiece tokenizer (2048 pieces, byte fallback)
is trained on the training sources. The output is committed, so the demo never depends on the
Python version that runs it; this script documents where it came from.

    python tools/make_demo_data.py [--out scalebio/demo]
"""
from __future__ import annotations

import argparse
import inspect
import json
import random
import re
import sys
from pathlib import Path

from experiment_data.corpora import stdlib_modules  # tools/ is on sys.path when run as a script

SIZES = {"clean": 2000, "shuffled": 700, "typos": 700, "validation": 400}
_GOOD = re.compile(r"[A-Z][A-Za-z0-9 ,.;:'()\-\"]+[.]")


def _sentences(text: str) -> list:
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        if 8 <= len(s.split()) <= 32 and _GOOD.fullmatch(s):
            out.append(s)
    return out


def collect() -> list:
    from pydoc_data.topics import topics

    found = [s for text in topics.values() for s in _sentences(text)]
    for name, mod in stdlib_modules():
        docs = [inspect.getdoc(mod) or ""]
        for obj in vars(mod).values():
            if getattr(obj, "__module__", None) == name and (inspect.isfunction(obj) or inspect.isclass(obj)):
                docs.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    docs += [inspect.getdoc(f) or "" for f in vars(obj).values() if inspect.isfunction(f)]
        for d in docs:
            found += _sentences(d)
    return sorted(set(found))


def split(sentence: str) -> dict:
    words = sentence.split()
    cut = max(3, round(0.4 * len(words)))
    return {"prompt": " ".join(words[:cut]), "response": " ".join(words[cut:])}


def shuffle_words(rec: dict, rng: random.Random) -> dict:
    words = rec["response"].split()
    rng.shuffle(words)
    return {"prompt": rec["prompt"], "response": " ".join(words)}


def typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word + rng.choice("aeiou")
    i = rng.randrange(len(word) - 1)
    op = rng.randrange(4)
    if op == 0:  # swap neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:  # drop a letter
        return word[:i] + word[i + 1:]
    if op == 2:  # insert a letter
        return word[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[i:]
    return word[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[i + 1:]  # substitute


def add_typos(rec: dict, rng: random.Random) -> dict:
    words = [typo(w, rng) if rng.random() < 0.5 else w for w in rec["response"].split()]
    return {"prompt": rec["prompt"], "response": " ".join(words)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "scalebio" / "demo"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    sentences = collect()
    need = sum(SIZES.values())
    if len(sentences) < need:
        sys.exit(f"only {len(sentences)} usable sentences found, need {need}")
    rng.shuffle(sentences)
    parts, start = {}, 0
    for name, n in SIZES.items():
        parts[name] = [split(s) for s in sentences[start:start + n]]
        start += n
    parts["shuffled"] = [shuffle_words(r, rng) for r in parts["shuffled"]]
    parts["typos"] = [add_typos(r, rng) for r in parts["typos"]]
    for name, recs in parts.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")
    import sentencepiece as spm

    text = [f"{r['prompt']} {r['response']}" for name in ("clean", "shuffled", "typos") for r in parts[name]]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(out / "tokenizer"), vocab_size=2048, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    print(f"wrote {', '.join(f'{k}={len(v)}' for k, v in parts.items())} pairs and tokenizer.model to {out}")


if __name__ == "__main__":
    main()
