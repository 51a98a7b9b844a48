"""Reading a source's records: local files (JSON lines, JSON arrays, CSV/TSV, plain text, Parquet,
Arrow, a ``datasets`` save_to_disk folder) or a Hugging Face Hub dataset.

Line-oriented files (JSONL, JSON arrays, CSV/TSV, text) are read here, line by line, so that a
malformed record is reported with its file and line number and ``on_error: skip`` can skip exactly
that record; ``datasets``' JSON and CSV loaders go through pyarrow/pandas, which report neither and
reject a column whose type changes between lines. Columnar files and Hub datasets go through
``datasets`` (Parquet and Arrow streamed, so nothing is copied), with its cache in scalebio's cache
directory: nothing is ever written next to the user's data.
"""
from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path

from .formats import DataError, RecordError, is_empty, normalize

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".txt": "txt", ".parquet": "parquet", ".arrow": "arrow"}


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def source_files(cfg) -> list:
    """The files of a local source, in a stable (sorted) order."""
    p = cfg.path
    if any(c in p for c in "*?[") and not Path(p).exists():  # a glob (unless a file is really named so)
        files = sorted(Path(f) for f in glob.glob(p, recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"no data files match {p}")
        return files
    path = Path(p)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if _is_saved_dataset(path):
        return sorted(f for f in path.rglob("*") if f.is_file())
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            raise DataError(f"no data files ({', '.join(sorted(EXTENSIONS))}) in directory {path}")
        return files
    return [path]


def data_identity(cfg, hf_cache) -> dict:
    """What the cache key needs to know about the data: each file's path, size and mtime, or a
    Hub dataset's fingerprint."""
    if cfg.dataset is not None:
        ds = _load_hub(cfg, hf_cache)
        return {"dataset": cfg.dataset, "subset": cfg.subset, "split": cfg.split, "revision": cfg.revision,
                "fingerprint": ds._fingerprint}
    files = []
    for f in source_files(cfg):
        st = f.stat()
        files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"files": files, "file_type": cfg.file_type, "split": cfg.split}


def _file_type(path: Path, cfg) -> str:
    if cfg.file_type is not None:
        return cfg.file_type
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: cannot tell the file type from the extension '{path.suffix}'; set file_type "
                        f"({', '.join(sorted(set(EXTENSIONS.values())))})")
    return kind


# --------------------------------------------------------------------------- readers
# Each yields (where, record, problem): problem is None or what is wrong with the raw line. A
# JSON line is yielded unparsed (a JsonLine) and parsed by parse_item where the record is used,
# so that with worker processes the parsing happens in the workers.


class JsonLine(str):
    """One line of a JSON-lines file, not parsed yet."""

    __slots__ = ()


class _JsonFileLine(JsonLine):
    """A JSON line of a ``.json`` file (the error says how ``.json`` files are read)."""

    __slots__ = ()


def _json_msg(exc: json.JSONDecodeError) -> str:
    """The parser's message without its own dangling "at" ("Invalid control character at")."""
    return exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg


def parse_item(record, problem):
    """``(record, problem)`` of a reader's item, parsing a JsonLine."""
    if problem is None and isinstance(record, JsonLine):
        try:
            # without the line ending: a record cut short is reported at its end, not at "column 1" of
            # the line after it
            return json.loads(record.rstrip("\r\n")), None
        except json.JSONDecodeError as exc:
            hint = "; a .json file is read as an array of records or as JSON lines" \
                if isinstance(record, _JsonFileLine) else ""
            return None, f"malformed JSON ({_json_msg(exc)} at column {exc.colno}){hint}"
    return record, problem


def _decode(raw: bytes):
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start + 1} of the line)"


def _read_jsonl(path: Path, data: bytes | None = None, line_type=JsonLine):
    fh = open(path, "rb") if data is None else io.BytesIO(data)
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Windows editors write one)
                raw = raw[3:]
            if lineno == 1 and raw.startswith(b"\x1f\x8b"):  # every line would be "not UTF-8": say why once
                raise DataError(f"{path} is gzip-compressed; decompress it first (gunzip -k {path})")
            line, problem = _decode(raw)
            if problem is None and not line.strip():
                continue
            yield f"{path}:{lineno}", None if problem else line_type(line), problem


def _read_json(path: Path):
    """A ``.json`` file: an array of records, or (if it does not start with ``[``) JSON lines."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    head = data.lstrip()[:1]
    if head != b"[":
        yield from _read_jsonl(path, data=data, line_type=_JsonFileLine)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None
    dec = json.JSONDecoder()

    def skip_ws(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip_ws(0) + 1
    line, counted = 1, 0
    while True:
        i = skip_ws(i)
        if i < len(text) and text[i] == "]":
            return
        try:
            rec, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            # past a broken element the array cannot be resynchronised: an error even in skip mode
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({_json_msg(exc)} at column {exc.colno}) in a JSON "
                            f"array; records after it cannot be read") from None
        line += text.count("\n", counted, i)
        counted = i
        yield f"{path}:{line}", rec, None
        i = skip_ws(end)
        if i < len(text) and text[i] == ",":
            i += 1
        elif i >= len(text) or text[i] != "]":
            line += text.count("\n", counted, i)
            raise DataError(f"{path}:{line}: malformed JSON array (expected ',' or ']')")


def _read_csv(path: Path, delimiter: str):
    csv.field_size_limit(2**31 - 1)  # long documents in one cell
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raise DataError(f"{path}:1: not valid UTF-8") from None
        line = reader.line_num
        while True:
            start = line + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise DataError(f"{path}:{start}: not valid UTF-8") from None
            except csv.Error as exc:
                raise DataError(f"{path}:{start}: malformed CSV ({exc})") from None
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                yield f"{path}:{start}", None, f"{len(row)} fields, but the header has {len(header)}"
                continue
            yield f"{path}:{start}", dict(zip(header, row)), None


def _read_txt(path: Path):
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            line, problem = _decode(raw)
            if problem is None:
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
            yield f"{path}:{lineno}", None if problem else {"text": line}, problem


def _hf_cache(hf_cache) -> dict:
    return {"cache_dir": str(hf_cache)} if hf_cache is not None else {}


def _read_columnar(path: Path, kind: str, hf_cache):
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=[str(path)], split="train", streaming=True, **_hf_cache(hf_cache))
        rows = iter(ds)
        for i, rec in enumerate(rows, 1):
            yield f"{path} row {i}", rec, None
    except DataError:
        raise
    except Exception as exc:  # pyarrow and datasets raise many kinds
        raise DataError(f"{path}: cannot read as {kind}: {type(exc).__name__}: {exc}") from None


def _read_saved(path: Path, cfg):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot load the saved dataset: {type(exc).__name__}: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise DataError(f"{path}: no split '{cfg.split}'; splits: {', '.join(ds)} (set split)")
        ds = ds[cfg.split]
    for i, rec in enumerate(ds, 1):
        yield f"{path} row {i}", rec, None


def _load_hub(cfg, hf_cache):
    import datasets

    try:
        return datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split, revision=cfg.revision,
                                     **_hf_cache(hf_cache))
    except Exception as exc:
        raise DataError(f"cannot load dataset '{cfg.dataset}' from the Hugging Face Hub ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline machine? Download it where the "
                        f"network is reachable (datasets' save_to_disk or the data files) and give its local "
                        f"'path' instead; HF_HUB_OFFLINE=1 makes this fail at once instead of after retries") from None


def _read_hub(cfg, hf_cache):
    for i, rec in enumerate(_load_hub(cfg, hf_cache), 1):
        yield f"{cfg.dataset} ({cfg.split}) row {i}", rec, None


def raw_records(cfg, hf_cache=None):
    """All ``(where, record, problem)`` of a source, file by file in sorted order."""
    if cfg.dataset is not None:
        yield from _read_hub(cfg, hf_cache)
        return
    path = Path(cfg.path)
    if _is_saved_dataset(path):
        yield from _read_saved(path, cfg)
        return
    for f in source_files(cfg):
        kind = _file_type(f, cfg)
        if kind == "jsonl":
            yield from _read_jsonl(f)
        elif kind == "json":
            yield from _read_json(f)
        elif kind in ("csv", "tsv"):
            yield from _read_csv(f, "," if kind == "csv" else "\t")
        elif kind == "txt":
            if cfg.format != "text":
                raise DataError(f"{f}: a .txt file has one text per line and needs format: text, not '{cfg.format}'")
            yield from _read_txt(f)
        else:
            yield from _read_columnar(f, kind, hf_cache)


class ProblemLog:
    """Bad records of one source: raise at the first (``on_error: error``), or count them and keep
    the first few for the report (``skip``)."""

    def __init__(self, label: str, on_error: str):
        self.label, self.on_error = label, on_error
        self.skipped = 0
        self.skip_examples: list = []

    def __call__(self, where: str, problem: str) -> None:
        if self.on_error == "error":
            raise DataError(f"{where}: {problem} ({self.label}; set on_error: skip to skip and count such records)")
        self.skipped += 1
        if len(self.skip_examples) < 3:
            self.skip_examples.append(f"{where}: {problem}")


class EmptyLog:
    """Records with an empty response (formats.is_empty) of one source: ``__call__`` returns
    whether to keep the record, counting it either way, or raises (``on_empty: error``)."""

    def __init__(self, label: str, on_empty: str):
        self.label, self.on_empty = label, on_empty
        self.count = 0
        self.examples: list = []

    def __call__(self, where: str) -> bool:
        if self.on_empty == "error":
            raise DataError(f"{where}: the response is empty, so only the end-of-sequence token would be supervised "
                            f"({self.label}; set on_empty: skip to leave such records out, or keep to train on them)")
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(where)
        return self.on_empty == "keep"


class RecordReader:
    """The valid records of a source as ``(where, raw, normalised)``, in order, at most
    ``max_samples``; bad records go to ``self.problems`` (a ProblemLog), records with an empty
    response to ``self.empties`` (an EmptyLog), as the tokenized cache treats them."""

    def __init__(self, label: str, cfg, on_error: str, hf_cache=None, on_empty: str = "skip"):
        self.label, self.cfg, self.hf_cache = label, cfg, hf_cache
        self.problems = ProblemLog(label, on_error)
        self.empties = EmptyLog(label, on_empty)
        self.count = 0

    @property
    def skipped(self) -> int:
        return self.problems.skipped

    def __iter__(self):
        cfg = self.cfg
        for where, raw, problem in raw_records(cfg, self.hf_cache):
            raw, problem = parse_item(raw, problem)
            norm = None
            if problem is None:
                try:
                    norm = normalize(raw, cfg.format, cfg.columns)
                except RecordError as exc:
                    problem = str(exc)
            if problem is not None:
                self.problems(where, problem)
                continue
            if is_empty(norm) and not self.empties(where):
                continue
            self.count += 1
            yield where, raw, norm
            if cfg.max_samples is not None and self.count >= cfg.max_samples:
                return


def describe(cfg) -> str:
    return cfg.path if cfg.dataset is None else f"dataset {cfg.dataset}"


def count_lines(cfg) -> int | None:
    """Lines in a local line-oriented source (a progress-bar total), or None."""
    if cfg.dataset is not None or _is_saved_dataset(Path(cfg.path)):
        return None
    total = 0
    for f in source_files(cfg):
        if _file_type(f, cfg) not in ("jsonl", "csv", "tsv", "txt"):
            return None
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                total += block.count(b"\n")
    return total
