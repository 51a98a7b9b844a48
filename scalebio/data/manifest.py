"""``mixture.json``: what an exported mixture is made of, so that it can be rebuilt and checked.

Every export format writes the same manifest: the scalebio version, the format and output files,
the weights (normalised pi by source), the seed, the examples of each source in the output and
how many the source has, each source's identity (every file's path, size and SHA-256; a Hub
dataset's name, revision and fingerprint) and settings, the tokenizer (its file's SHA-256 and
special tokens), and the weights file it came from. The same inputs give the same manifest.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import __version__
from .sources import data_identity, source_files

MANIFEST = "mixture.json"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_identity(scfg, hf_cache) -> dict:
    """A source's files with their sizes and hashes (or a Hub dataset's fingerprint) and the
    settings that decide which examples it yields."""
    settings = {"format": scfg.format, "columns": dict(sorted(scfg.columns.items())), "max_samples": scfg.max_samples,
                "on_error": scfg.on_error}
    if scfg.dataset is not None:
        return {**data_identity(scfg, hf_cache), **settings}
    files = [{"path": str(f.resolve()), "bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in source_files(scfg)]
    return {"files": files, "file_type": scfg.file_type, "split": scfg.split, **settings}


def tokenizer_identity_of(cfg):
    """The data YAML's tokenizer (path, file hash, special tokens), or None when it names none.
    A JSONL or Parquet export does not tokenize, so a tokenizer it cannot read is recorded as
    such (``"readable": false``) rather than stopping the export."""
    if cfg.tokenizer is None or not cfg.tokenizer.path:
        return None
    from ..config import ConfigError
    from ..tokenizer import load_tokenizer
    from .cache import tokenizer_identity

    path = str(Path(cfg.tokenizer.path).resolve())
    try:
        return {"path": path, **tokenizer_identity(load_tokenizer(cfg.tokenizer))}
    except (ConfigError, OSError, RuntimeError):
        return {"path": path, "readable": False}


def build_manifest(fmt: str, cfg, weights: dict, seed: int, samples: dict, available: dict, hf_cache, outputs: list,
                   weights_path=None, size=None, validation=None, **extra) -> dict:
    """The manifest of an export; ``samples`` and ``available`` are by source name, ``outputs``
    the files written (names relative to the manifest), ``validation`` the appended held-out
    examples (or None)."""
    names = sorted(cfg.sources)
    total = sum(weights[n] for n in names)
    manifest = {
        "scalebio_version": __version__,
        "format": fmt,
        "outputs": outputs,
        "seed": seed,
        "size": size,
        "weights": {n: weights[n] / total for n in names},
        "samples": {n: samples[n] for n in names},
        "available": {n: available.get(n) for n in names},
        "validation": validation,
        "sources": {n: source_identity(cfg.sources[n], hf_cache) for n in names},
        "validation_source": source_identity(cfg.validation, hf_cache) if validation is not None else None,
        "tokenizer": tokenizer_identity_of(cfg),
        "weights_file": None if weights_path is None else {"path": str(Path(weights_path).resolve()),
                                                           "sha256": file_sha256(weights_path)},
    }
    manifest.update(extra)
    return manifest


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
