"""``scalebio export --format megatron``: the mixture as a Megatron blend.

One megatron-core indexed dataset per source (``<name>.bin`` / ``<name>.idx``: the token ids of
every valid record, one sequence each), taken as they are from scalebio's tokenized cache (the
same format), and the blend that Megatron-LM, Megatron-Bridge and NeMo read:

- ``data-path.txt``: ``--data-path w1 PREFIX1 w2 PREFIX2 ... --split 100,0,0`` for Megatron-LM
  (with ``--with-validation``: ``--train-data-path ... --valid-data-path 1.0 VALIDATION``);
- ``blend.yaml``: ``dataset.blend`` (or ``blend_per_split``) of Megatron-Bridge's
  ``GPTDatasetConfig``, and ``data_prefix`` for NeMo;
- ``mixture.json``: the manifest (:mod:`.manifest`), with the blend.

Megatron's blend weights count *tokens* (a sample is a window of ``seq_length`` tokens over the
concatenated sequences), while pi counts *examples*. So the weight of source k is
``pi_k * L_k / sum_j pi_j * L_j``, L_k its mean sequence length in tokens: trained on the blend,
each source contributes examples in proportion to pi. A source with pi = 0 is left out. GPT
datasets train on every token (no prompt mask); for supervised fine-tuning with masks, export
JSONL and use your framework's SFT dataset.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from ..outputs import atomic_write
from .cache import build_store, cache_root, load_or_build
from .formats import DataError
from .manifest import MANIFEST, build_manifest, manifest_text
from .prepare import data_sets


def _blend_weights(pi: dict, tokens: dict, records: dict) -> dict:
    mass = {n: pi[n] * tokens[n] / records[n] for n in pi if pi[n] > 0}
    total = sum(mass.values())
    return {n: m / total for n, m in mass.items()}


def _write_dataset(label, name, scfg, cfg, tokenizer, chat, tmp: Path) -> tuple:
    """``tmp/<name>.bin/.idx`` from the set's cache entry (built first if needed): the same
    sequences, one document per record as Megatron's preprocess_data writes them, in Megatron's
    dtype for the vocabulary (uint16 below 65500 tokens, else int32; the cache keeps int32).
    Returns (records, tokens)."""
    import numpy as np

    from .store import indexed

    IndexedDatasetBuilder, DType, get_bin_path, get_idx_path = indexed(
        "IndexedDatasetBuilder", "DType", "get_bin_path", "get_idx_path")
    if cfg.cache:
        store, _ = load_or_build(label, scfg, cfg, tokenizer, chat)
        src = store.directory
    else:  # data.cache: false: tokenize this set on disk here, as the cache would
        src = tmp / f".build-{name}"
        src.mkdir()
        build_store(label, scfg, scfg.on_error or cfg.on_error, tokenizer, chat, src, cache_root(cfg) / "hf")
    (IndexedDataset,) = indexed("IndexedDataset")
    ids = IndexedDataset(str(src / "ids"))
    lengths = ids.sequence_lengths.astype(np.int64)
    raw = np.memmap(src / "ids.bin", dtype=np.int32, mode="r")  # the records, back to back, in order
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(str(tmp / name)), dtype=dtype)
    start = 0
    for n in lengths.tolist():
        builder.add_document(raw[start:start + n], [n])
        start += n
    builder.finalize(get_idx_path(str(tmp / name)))
    del raw, ids
    if not cfg.cache:
        shutil.rmtree(src)
    return len(lengths), int(lengths.sum())


def _fmt(w: float) -> str:
    return repr(float(w))  # the exact float, as in blend.yaml and mixture.json


def export_megatron(weights: dict, cfg, out, seed: int = 1234, with_validation: bool = False,
                    overwrite: bool = False, weights_path=None, say=print) -> dict:
    """Write the blend directory ``out``; returns the manifest."""
    from ..tokenizer import chat_template_for, load_tokenizer

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; the megatron format writes a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out} exists and is not empty; give another --out or pass --overwrite")
        if not (out / MANIFEST).is_file():  # never delete what an export did not write
            raise DataError(f"{out} is not an earlier megatron export (no {MANIFEST} there); --overwrite replaces "
                            f"only those: give another --out")
    if with_validation and cfg.validation is None:
        raise DataError("--with-validation: the data YAML has no validation set")
    tokenizer = load_tokenizer(cfg.tokenizer)
    chat = chat_template_for(tokenizer, cfg.tokenizer.chat_template)
    names = sorted(cfg.sources)
    total = sum(weights[n] for n in names)
    pi = {n: weights[n] / total for n in names}
    final = out.resolve()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        records, tokens = {}, {}
        sets = [s for s in data_sets(cfg) if s[1] in cfg.sources and pi[s[1]] > 0]
        if with_validation:
            sets.append(("validation set", "validation", cfg.validation))
        for label, name, scfg in sets:
            records[name], tokens[name] = _write_dataset(label, name, scfg, cfg, tokenizer, chat, tmp)
        train = {n: records[n] for n in names if n in records}
        blend = _blend_weights({n: pi[n] for n in train}, tokens, records)
        prefix = {n: str(final / n) for n in records}
        pairs = " ".join(f"{_fmt(blend[n])} {prefix[n]}" for n in blend)
        data_yaml = {"blend": [[prefix[n] for n in blend], [blend[n] for n in blend]], "split": "100,0,0"}
        nemo = [x for n in blend for x in (blend[n], prefix[n])]
        if with_validation:
            line = f"--train-data-path {pairs} --valid-data-path 1.0 {prefix['validation']}"
            data_yaml = {"blend_per_split": [data_yaml["blend"], [[prefix["validation"]], [1.0]], None]}
            nemo = {"train": nemo, "validation": [1.0, prefix["validation"]], "test": None}
        else:
            line = f"--data-path {pairs} --split 100,0,0"
        (tmp / "data-path.txt").write_text(line + "\n")
        (tmp / "blend.yaml").write_text(
            "# the mixture as a Megatron blend (scalebio export --format megatron; weights count tokens)\n"
            "# dataset: the `dataset` section (GPTDatasetConfig) of a Megatron-Bridge ConfigContainer YAML\n"
            "# data_prefix: NeMo's model.data.data_prefix (PreTrainingDataModule(paths=...) in NeMo 2)\n"
            + yaml.safe_dump({"dataset": data_yaml, "data_prefix": nemo}, sort_keys=False))
        outputs = sorted(p.name for p in tmp.iterdir()) + [MANIFEST]
        manifest = build_manifest(
            "megatron", cfg, weights, seed, samples={n: records.get(n, 0) for n in names},
            available={n: records.get(n) for n in names}, hf_cache=cache_root(cfg) / "hf", outputs=outputs,
            weights_path=weights_path, validation=records.get("validation"),
            megatron={"blend_weights": blend, "tokens": {n: tokens[n] for n in records},
                      "prefixes": {n: n for n in records}, "data_path": line})
        atomic_write(tmp / MANIFEST, manifest_text(manifest))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"{'source':<20} {'pi':>8} {'blend':>8} {'records':>9} {'tokens':>11}")
    for n in names:
        if n in blend:
            say(f"{n:<20} {pi[n]:>8.4f} {blend[n]:>8.4f} {records[n]:>9} {tokens[n]:>11}")
        else:
            say(f"{n:<20} {pi[n]:>8.4f} {'-':>8} {'-':>9} {'-':>11}  (pi = 0: left out)")
    if with_validation:
        say(f"+ validation set: {records['validation']} records, {tokens['validation']} tokens")
    say(f"wrote a Megatron blend of {len(blend)} sources to {out} (blend weights count tokens: pi x mean length)")
    say(f"  Megatron-LM: $(cat {out / 'data-path.txt'})   Megatron-Bridge / NeMo: {out / 'blend.yaml'}")
    return manifest
