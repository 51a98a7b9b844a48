"""The command line of ``tools/make_experiment_data.py``: one subcommand per experiment, and ``check``."""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from .checks import CheckError, check
from .corpora import CORPORA, LOCALE, CorpusError, catalog_items
from .generators import EXPERIMENTS


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_experiment(out: Path, name: str, sources: dict, validation: list, test: list, tokenizer: str,
                     seq_length: int, how: str, claim: dict) -> Path:
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
    (out / "experiment.json").write_text(json.dumps(
        {"experiment": name, "sources": sorted(sources), "check": claim}, indent=2, sort_keys=True) + "\n")
    return path


def _default_tokenizer() -> str:
    try:
        from scalebio.fetch import fetched_path

        path = fetched_path("smollm2-135m")
    except ImportError:
        path = None
    return str(path) if path is not None else ""


def _options(ap: argparse.ArgumentParser, name: str, corpus_kind: str) -> None:
    ap.add_argument("--out", required=True, help="output directory (data.yaml, experiment.json and one JSONL "
                                                 "file per set)")
    if corpus_kind == "items":
        ap.add_argument("--corpus", choices=sorted(CORPORA), default="wordnet", help="the text (default wordnet)")
    else:
        ap.add_argument("--languages", default="de,fr,es", help="one source per language (default de,fr,es)")
        ap.add_argument("--target", default="de", help="the language of validation and test (default de)")
        ap.add_argument("--locale-root", type=Path, default=LOCALE, help=f"the gettext catalogs (default {LOCALE})")
    if name == "noise-ladder":
        ap.add_argument("--levels", default="0,25,50,75", help="percent of words replaced per source, 4 or more "
                                                               "(default 0,25,50,75)")
    ap.add_argument("--tokenizer", default=None, metavar="CKPT_DIR",
                    help="the model's checkpoint directory, for data.tokenizer (default: the fetched "
                         "smollm2-135m, see `scalebio models fetch`)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    ap.add_argument("--train", type=int, default=1000, help="items per training source (default 1000)")
    ap.add_argument("--eval", type=int, default=200, help="items in the validation and in the test set (default 200)")
    # German and French take more of SmolLM2's tokens than English: 96 holds every multilingual item
    seq_length = 96 if corpus_kind == "catalogs" else 64
    ap.add_argument("--seq-length", type=int, default=seq_length, help=f"data.seq_length (default {seq_length})")


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tools/make_experiment_data.py", description=description)
    sub = ap.add_subparsers(dest="experiment", required=True)
    for name, (fn, corpus_kind, check_text) in EXPERIMENTS.items():
        doc = fn.__doc__
        _options(sub.add_parser(name, help=" ".join(doc.split("\n\n")[0].split()), description=doc,
                                epilog=f"check: {check_text} (tools/make_experiment_data.py check OUT RUN_DIR)",
                                formatter_class=argparse.RawDescriptionHelpFormatter), name, corpus_kind)
    ck = sub.add_parser("check", help="apply an experiment's check to learned weights: PASS or FAIL with the numbers",
                        description="Apply the check of the experiment in DATA_DIR (its experiment.json) to each "
                                    "RUN's weights.json. Exit status 0 when every run passes, 1 when one fails. "
                                    "Checks: " + "; ".join(f"{n}: {t}" for n, (_, _, t) in EXPERIMENTS.items()))
    ck.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="the experiment's --out directory")
    ck.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                    help="a run directory, a compare directory (its bilevel run) or a weights.json")
    return ap


def main(argv=None, description: str = "") -> int:
    args = parser(description).parse_args(argv)
    if args.experiment == "check":
        try:
            return check(args.data_dir, args.runs)
        except CheckError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    fn, corpus_kind, check_text = EXPERIMENTS[args.experiment]
    tokenizer = args.tokenizer or _default_tokenizer()
    if not tokenizer:
        print("error: no --tokenizer given and smollm2-135m is not fetched: run `scalebio models fetch "
              "smollm2-135m` or pass --tokenizer CKPT_DIR", file=sys.stderr)
        return 2
    # one stream for the corpus's own choices (prompt wording) and one for the experiment, so that
    # a new experiment never changes another's corpus
    corpus_name = args.corpus if corpus_kind == "items" else "catalogs"
    try:
        if corpus_kind == "items":
            corpus = CORPORA[args.corpus](random.Random(f"{args.seed}:corpus:{args.corpus}"))
        else:
            corpus = catalog_items(args.languages.split(","), args.locale_root)
        sources, val, test, claim = fn(corpus, args, random.Random(f"{args.seed}:{args.experiment}"))
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    how = "tools/make_experiment_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_experiment(Path(args.out), args.experiment, sources, val, test, str(Path(tokenizer).resolve()),
                            args.seq_length, how, {"text": check_text, **claim})
    sizes = ", ".join(f"{k} {len(v)}" for k, v in sorted(sources.items()))
    print(f"{args.experiment} ({corpus_name}, seed {args.seed}, {len(corpus)} corpus items): {sizes}, validation "
          f"{len(val)}, test {len(test)}\ndata YAML: {path}\ncheck: {claim.get('text', check_text)} "
          f"(tools/make_experiment_data.py check {args.out} RUN_DIR)")
    return 0
