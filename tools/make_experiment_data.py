#!/usr/bin/env python
"""Experiment data from real text that is already on the machine (no download), one subcommand
per experiment (docs/data.md, "Experiment data").

The text is a *corpus* of instruction items, each a (key, prompt, response) triple:

- ``wordnet`` (default): "Define the word X." -> X's first-sense WordNet gloss, for the words
  WordNet's SemCor counts attest (Debian: ``apt-get install wordnet-base``, /usr/share/wordnet);
- ``pydoc``: "What does the Python function F do?" -> the first sentence of F's docstring, from
  the standard library of the Python that runs this script (always available).

An experiment turns the items into sources, a validation set and a test set (each a ``messages``
JSONL file, so a run renders them with the model's own chat template) and a data YAML whose
tokenizer is the model's checkpoint directory. Every file is a function of the corpus and
``--seed``: the same command writes the same bytes. Items are split by key, so no word or function
appears in two files.

    python tools/make_experiment_data.py denoising --out data/denoising [--corpus wordnet]
        [--tokenizer CKPT_DIR] [--seed 0] [--train 1000] [--eval 200] [--seq-length 64]

Adding an experiment is one function ``name(items, args, rng) -> (sources, validation, test)``
registered in ``EXPERIMENTS`` (and, if it needs options, a line in ``_options``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import random
import re
import sys
import warnings
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
_WORD = re.compile(r"[a-z]{3,}")
_POS_NAME = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
_WORD_PROMPTS = ('Define the word "{w}".', 'What does "{w}" mean?', "Give a short definition of {w}.",
                 'What is the meaning of the {pos} "{w}"?')


class CorpusError(RuntimeError):
    pass


# --------------------------------------------------------------------------- corpora


def wordnet_items(rng: random.Random, root: Path = WORDNET) -> list:
    """(word, prompt, definition) for single lowercase words with a SemCor-attested first sense."""
    if not (root / "index.noun").is_file():
        raise CorpusError(f"WordNet is not installed ({root}/index.noun missing): apt-get install wordnet-base, "
                          f"or use --corpus pydoc")
    seen, items = set(), []
    for pos in ("noun", "verb", "adj", "adv"):  # a word in several parts of speech keeps the first
        data = (root / f"data.{pos}").read_bytes()
        for line in (root / f"index.{pos}").read_text().splitlines():
            if line.startswith(" "):  # the license header
                continue
            f = line.split()
            lemma, p_cnt = f[0], int(f[3])
            tagsense_cnt, offsets = int(f[5 + p_cnt]), f[6 + p_cnt:]
            if lemma in seen or not _WORD.fullmatch(lemma) or tagsense_cnt < 1:
                continue
            start = int(offsets[0])  # senses are ordered by frequency: the first is the common one
            record = data[start:data.index(b"\n", start)].decode()
            gloss = record.split(" | ", 1)[1].split('; "', 1)[0].strip().rstrip(";").strip()
            if not 4 <= len(gloss.split()) <= 20 or '"' in gloss:
                continue
            seen.add(lemma)
            prompt = rng.choice(_WORD_PROMPTS).format(w=lemma, pos=_POS_NAME[pos])
            items.append((lemma, prompt, gloss[0].upper() + gloss[1:] + "."))
    return items


_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc"}
_SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-]+\.")


def pydoc_items(rng: random.Random) -> list:
    """(qualified name, prompt, first docstring sentence) for public standard-library functions."""
    warnings.filterwarnings("ignore")
    items, seen = [], set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                mod = importlib.import_module(name)
        except Exception:
            continue
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            first = re.sub(r"\s+", " ", doc.split("\n\n", 1)[0]).strip()
            m = re.match(r"(.+?\.)(\s|$)", first)
            summary = m.group(1) if m else ""
            key = f"{name}.{attr}"
            if key in seen or not _SENTENCE.fullmatch(summary) or not 4 <= len(summary.split()) <= 25:
                continue
            seen.add(key)
            items.append((key, f"What does the Python function {key} do?", summary))
    return items


CORPORA = {"wordnet": wordnet_items, "pydoc": pydoc_items}


# --------------------------------------------------------------------------- helpers for experiments


def split(items: list, sizes: list, rng: random.Random) -> list:
    """Disjoint random subsets of ``items`` (by key) of the given sizes."""
    need = sum(sizes)
    if need > len(items):
        raise CorpusError(f"the corpus has {len(items)} items but the experiment needs {need}; lower --train/--eval")
    order = list(items)
    rng.shuffle(order)
    out, at = [], 0
    for n in sizes:
        out.append(order[at:at + n])
        at += n
    return out


def chat(prompt: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def shuffle_words(text: str, rng: random.Random) -> str:
    """The same words in another order (the sentence's period stays at the end)."""
    words = text.rstrip(".").split()
    for _ in range(10):
        rng.shuffle(words)
        out = " ".join(words) + "."
        if out != text:
            return out
    return out


# --------------------------------------------------------------------------- experiments


def denoising(items: list, args, rng: random.Random):
    """One clean source and two corrupted ones; clean held-out validation and test sets.

    - ``clean``: the right response;
    - ``wrong``: the response of another item of the same source (a definition of another word);
    - ``shuffled``: the right response's words in random order.
    """
    clean, wrong, shuffled, val, test = split(items, [args.train] * 3 + [args.eval] * 2, rng)
    answers = [r for _, _, r in wrong]
    answers = answers[1:] + answers[:1]  # a cyclic shift: every response belongs to another item
    sources = {
        "clean": [chat(p, r) for _, p, r in clean],
        "wrong": [chat(p, a) for (_, p, _), a in zip(wrong, answers)],
        "shuffled": [chat(p, shuffle_words(r, rng)) for _, p, r in shuffled],
    }
    return sources, [chat(p, r) for _, p, r in val], [chat(p, r) for _, p, r in test]


EXPERIMENTS = {"denoising": denoising}


# --------------------------------------------------------------------------- output


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_experiment(out: Path, name: str, sources: dict, validation: list, test: list, tokenizer: str,
                     seq_length: int, how: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for src, records in sources.items():
        write_jsonl(out / f"{src}.jsonl", records)
    write_jsonl(out / "validation.jsonl", validation)
    write_jsonl(out / "test.jsonl", test)
    lines = [f"# {name} experiment, written by: {how}", f"seq_length: {seq_length}",
             f"tokenizer: {{path: {json.dumps(tokenizer)}}}", "sources:"]
    lines += [f"  {src}: {{path: {src}.jsonl, format: messages}}" for src in sorted(sources)]
    lines += ["validation: {path: validation.jsonl, format: messages}",
              "test: {path: test.jsonl, format: messages}"]
    path = out / "data.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _default_tokenizer() -> str:
    try:
        from scalebio.fetch import fetched_path

        path = fetched_path("smollm2-135m")
    except ImportError:
        path = None
    return str(path) if path is not None else ""


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", required=True, help="output directory (data.yaml and one JSONL file per set)")
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="wordnet", help="the text (default wordnet)")
    ap.add_argument("--tokenizer", default=None, metavar="CKPT_DIR",
                    help="the model's checkpoint directory, for data.tokenizer (default: the fetched "
                         "smollm2-135m, see `scalebio models fetch`)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    ap.add_argument("--train", type=int, default=1000, help="items per training source (default 1000)")
    ap.add_argument("--eval", type=int, default=200, help="items in the validation and in the test set (default 200)")
    ap.add_argument("--seq-length", type=int, default=64, help="data.seq_length (default 64)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/make_experiment_data.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="experiment", required=True)
    for name, fn in EXPERIMENTS.items():
        _options(sub.add_parser(name, help=fn.__doc__.split("\n")[0]))
    args = ap.parse_args(argv)
    tokenizer = args.tokenizer or _default_tokenizer()
    if not tokenizer:
        print("error: no --tokenizer given and smollm2-135m is not fetched: run `scalebio models fetch "
              "smollm2-135m` or pass --tokenizer CKPT_DIR", file=sys.stderr)
        return 2
    # one stream for the corpus's own choices (prompt wording) and one for the experiment, so that
    # a new experiment never changes another's corpus
    try:
        items = CORPORA[args.corpus](random.Random(f"{args.seed}:corpus:{args.corpus}"))
        sources, val, test = EXPERIMENTS[args.experiment](items, args, random.Random(f"{args.seed}:{args.experiment}"))
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    how = "tools/make_experiment_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_experiment(Path(args.out), args.experiment, sources, val, test, str(Path(tokenizer).resolve()),
                            args.seq_length, how)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in sorted(sources.items()))
    print(f"{args.experiment} ({args.corpus}, seed {args.seed}, {len(items)} corpus items): {sizes}, validation "
          f"{len(val)}, test {len(test)}\ndata YAML: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
