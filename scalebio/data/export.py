"""``scalebio export``: a reweighted mixture from a run's ``weights.json``.

Source k gets round(N * pi_k) examples, adjusted by largest remainders so that the total is
exactly N. Examples are drawn without replacement while a source lasts: a source asked for more
than it has gives every example once per full pass and a random subset for the rest. The mixture
is shuffled with a fixed seed, the validation set optionally appended, and the records written as
they are in the sources (same keys, same format), as JSONL or Parquet, with the manifest
``<stem>.mixture.json`` next to them (:mod:`.manifest`). ``--format megatron`` writes a Megatron
blend instead (:mod:`.megatron_export`).
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np

from ..outputs import atomic_write, check_output_path, write_error
from .cache import cache_root
from .formats import DataError
from .manifest import build_manifest, manifest_text
from .prepare import data_sets
from .sources import EXTENSIONS, RecordReader, source_files

FORMATS = ("jsonl", "parquet", "megatron")


def read_weights(path) -> dict:
    path = Path(path)
    try:
        weights = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark from a Windows editor
    except OSError as exc:
        hint = f" (give {path / 'weights.json'})" if path.is_dir() else ""
        raise DataError(f"cannot read weights file {path}: {exc.strerror}{hint}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a weights.json (not valid UTF-8 at byte {exc.start + 1})") from None
    if not isinstance(weights, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in weights.values()):
        raise DataError(f"{path}: expected an object of source name -> weight, as a run's weights.json")
    bad = {k: v for k, v in weights.items() if not math.isfinite(v) or v < 0}
    if bad:
        raise DataError(f"{path}: weights must be finite and non-negative, got {bad}")
    if sum(weights.values()) <= 0:
        raise DataError(f"{path}: the weights add up to 0")
    return weights


def mixture_counts(weights: dict, size: int) -> dict:
    """round(size * pi_k) per source (pi normalised), then +-1 by largest remainder until the
    total is ``size``. Ties go to the source first in sorted order."""
    names = sorted(weights)
    total = sum(weights[n] for n in names)
    exact = np.array([size * weights[n] / total for n in names])
    counts = np.floor(exact + 0.5).astype(np.int64)
    remainder = exact - counts
    while counts.sum() < size:
        i = max(range(len(names)), key=lambda j: (remainder[j], -j))
        counts[i] += 1
        remainder[i] -= 1
    while counts.sum() > size:
        i = min((j for j in range(len(names)) if counts[j] > 0), key=lambda j: (remainder[j], j))
        counts[i] -= 1
        remainder[i] += 1
    return {n: int(c) for n, c in zip(names, counts)}


def _draw(available: int, n: int, rng) -> np.ndarray:
    """``n`` indices into ``available`` records: full passes (each record once), then a random part."""
    passes, rest = divmod(n, available)
    parts = [rng.permutation(available) for _ in range(passes)] + [rng.permutation(available)[:rest]]
    return np.concatenate(parts)


def _reader(label, scfg, cfg) -> RecordReader:
    """The records the run trained on: on_error and on_empty as in the tokenized cache."""
    return RecordReader(label, scfg, scfg.on_error or cfg.on_error, cache_root(cfg) / "hf",
                        scfg.on_empty or cfg.on_empty)


def _records(label, scfg, cfg, wanted: Counter | None = None):
    """All valid records of a source in order (``wanted`` = None), or those whose position is in
    ``wanted``, as a dict position -> record."""
    reader = _reader(label, scfg, cfg)
    if wanted is None:
        return [raw for _, raw, _ in reader], reader
    out = {}
    for i, (_, raw, _) in enumerate(reader):
        if i in wanted:
            out[i] = raw
    return out, reader


def _jsonable(value):
    if isinstance(value, (bytes, bytearray)):
        raise DataError("a record holds binary data, which JSONL cannot carry; write Parquet instead")
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_records(records: list, out: Path, fmt: str) -> None:
    """JSONL or Parquet, written to a temporary file and renamed into place."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as fh:
                for rec in records:
                    fh.write(json.dumps(rec, ensure_ascii=False, default=_jsonable) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            # every key of every record (from_pylist would keep only the first record's keys)
            keys = list(dict.fromkeys(k for rec in records for k in rec))
            try:
                table = pa.Table.from_pydict({k: [rec.get(k) for rec in records] for k in keys})
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise DataError(f"the sources' records do not fit one Parquet table ({exc}); write JSONL instead "
                                f"(--out with a .jsonl name)") from None
            pq.write_table(table, tmp)
        os.replace(tmp, out)
    except OSError as exc:  # a full disk, a read-only place: the temporary file goes (finally), the message stays
        raise write_error(out, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # a hard link, a bind mount
    except OSError:
        return False


def check_not_an_input(out: Path, cfg, inputs=()) -> None:
    """Refuse an --out that is one of the export's own inputs (``inputs``: the weights file, the data
    YAML; every file of every source, the validation and the test set), or that lies inside a
    source's directory or matches its glob, so that the next run would read the mixture as data."""
    for path in inputs:
        if _same_file(out, Path(path)):
            raise DataError(f"--out {out} is the export's own input {path}; give another --out (--overwrite "
                            f"never replaces an input)")
    resolved = out.resolve()
    for label, _, scfg in data_sets(cfg):
        if scfg.path is None:
            continue
        root = Path(scfg.path)
        if any(c in scfg.path for c in "*?[") and not root.exists():  # a glob, as sources.source_files reads it
            if fnmatch.fnmatch(str(resolved), str(root.absolute())):
                raise DataError(f"--out {out} matches the files of {label} ({scfg.path}): a run would read the "
                                f"mixture as that source; give another --out")
        elif root.is_dir() and resolved.is_relative_to(root.resolve()):
            raise DataError(f"--out {out} lies inside the directory of {label} ({scfg.path}): a run would read "
                            f"the mixture as part of that source; give another --out")
        try:
            files = source_files(scfg)
        except DataError:  # a missing source is reported when it is read
            files = []
        for f in files:
            if _same_file(out, f):
                raise DataError(f"--out {out} is a data file of {label} ({f}); give another --out (--overwrite "
                                f"never replaces an input)")


def manifest_path(out: Path) -> Path:
    """The manifest next to a JSONL or Parquet mixture: ``mix.jsonl`` -> ``mix.mixture.json``."""
    return out.with_name(f"{out.stem}.mixture.json")


def _check_names(weights: dict, cfg) -> None:
    names = sorted(cfg.sources)
    missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
    if missing or extra:
        problems = ([f"no weight for {', '.join(missing)}"] if missing else []) + \
            ([f"weights for unknown sources {', '.join(extra)}"] if extra else [])
        raise DataError(f"the weights do not match the data YAML's sources: {'; '.join(problems)} "
                        f"(sources: {', '.join(names)}; weights: {', '.join(sorted(weights))})")


def export_mixture(weights: dict, cfg, size: int | None, out, seed: int = 1234, with_validation: bool = False,
                   fmt: str | None = None, overwrite: bool = False, say=print, weights_path=None,
                   inputs=()) -> dict:
    """Write the mixture and its manifest; returns the number of examples per source (and
    ``validation``). ``weights_path`` (the weights.json read) goes into the manifest; ``inputs`` are
    further files the export reads (the weights file, the data YAML), which --out must not name.
    Every check on --out happens before any data is read."""
    out = Path(out)
    suffix = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}.get(out.suffix.lower())
    if fmt is None:
        fmt = suffix or "jsonl"
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if fmt != "megatron" and suffix is not None and suffix != fmt:  # a run would read the file by its extension
        raise DataError(f"--format {fmt} does not match --out {out} (a {suffix} name); give an --out ending in "
                        f"{'.parquet' if fmt == 'parquet' else '.jsonl'}, or leave --format out")
    read_as = EXTENSIONS.get(out.suffix.lower())
    if fmt != "megatron" and suffix is None and read_as is not None:  # mix.txt: a run would read JSON as text lines
        raise DataError(f"--out {out}: a run reads a {out.suffix} file as {read_as}, not {fmt}; give an --out "
                        f"ending in {'.parquet' if fmt == 'parquet' else '.jsonl'}")
    if not 0 <= seed < 2**32:
        raise DataError(f"--seed must be in [0, 2**32), got {seed}")
    check_not_an_input(out, cfg, inputs)
    _check_names(weights, cfg)
    if fmt == "megatron":
        from .megatron_export import export_megatron

        if size is not None:
            say(f"note: --size {size} is not used by the megatron format: the blend holds every example, and "
                f"Megatron's --train-samples (or train_iters x global batch) decides how many are drawn")
        manifest = export_megatron(weights, cfg, out, seed=seed, with_validation=with_validation, overwrite=overwrite,
                                   weights_path=weights_path, say=say)
        return dict(manifest["samples"], **({"validation": manifest["validation"]} if with_validation else {}))
    if size is None or size < 1:
        raise DataError(f"--size must be at least 1, got {size}" if size is not None else
                        f"--size is needed for the {fmt} format (examples in the mixture)")
    manifest_file = manifest_path(out)
    for path in (out, manifest_file):
        if path.exists() and not overwrite:
            raise DataError(f"{path} exists; give another --out or pass --overwrite")
    check_output_path(out, "--out")
    names = sorted(cfg.sources)
    counts = mixture_counts(weights, size)
    total_pi = sum(weights.values())
    if abs(total_pi - 1.0) > 1e-6:  # a run's weights.json adds up to 1: these were made or edited by hand
        say(f"warning: the weights add up to {total_pi:.6g}, not 1; the mixture uses them normalised "
            f"(each divided by {total_pi:.6g})")
    picked, rows = [], []
    for k, (label, name, scfg) in enumerate(s for s in data_sets(cfg) if s[1] in cfg.sources):
        n = counts[name]
        if n == 0:
            rows.append((name, weights[name] / total_pi, 0, None))
            continue
        # pass 1 counts the valid records, pass 2 keeps only the drawn ones: a large source never sits in memory
        reader = _reader(label, scfg, cfg)
        available = sum(1 for _ in reader)
        if available == 0:
            raise DataError(f"{label} ({scfg.path or scfg.dataset}) has no valid records to draw from")
        idx = _draw(available, n, np.random.default_rng([seed, k]))
        wanted = Counter(idx.tolist())
        by_pos, _ = _records(label, scfg, cfg, wanted)
        picked += [by_pos[int(i)] for i in idx]
        rows.append((name, weights[name] / total_pi, n, available))
    order = np.random.default_rng([seed, len(names)]).permutation(len(picked))
    records = [picked[i] for i in order]
    result = dict(counts)
    if with_validation:
        if cfg.validation is None:
            raise DataError("--with-validation: the data YAML has no validation set")
        val, _ = _records("validation set", cfg.validation, cfg)
        records += val
        result["validation"] = len(val)
    write_records(records, out, fmt)
    manifest = build_manifest(fmt, cfg, weights, seed, samples=counts,
                              available={name: available for name, _, _, available in rows},
                              hf_cache=cache_root(cfg) / "hf", outputs=[out.name], weights_path=weights_path,
                              size=size, validation=result.get("validation"))
    atomic_write(manifest_file, manifest_text(manifest))
    say(f"{'source':<20} {'pi':>8} {'examples':>9} {'available':>10}  note")
    for name, pi, n, available in rows:
        note = "" if available is None or n <= available else f"{n / available:.2f} passes over the source"
        say(f"{name:<20} {pi:>8.4f} {n:>9} {available if available is not None else '-':>10}  {note}")
    say(f"{'total':<20} {'':>8} {size:>9}")
    if with_validation:
        say(f"+ validation set appended: {result['validation']} examples")
    say(f"wrote {len(records)} records to {out} ({fmt}, shuffled with seed {seed}) and the manifest {manifest_file}")
    return result
