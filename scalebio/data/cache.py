"""Tokenized sources on disk, in megatron-core's indexed dataset format.

One directory per (data, tokenizer, settings) under ``<cache>/tokenized/<key>/``:

- ``ids.bin/.idx``: token ids (int32), one sequence per record, untruncated (so changing
  ``seq_length`` does not retokenize);
- ``flags.bin/.idx``: per-token supervision flags (uint8, 1 = supervised target);
- ``meta.npz``: per record the number of supervised targets, the position of the first one, and
  a 64-bit hash of the normalised record (for the validation overlap check);
- ``info.json``: counts and skipped records; ``key.json``: what the key was made of, and the size
  and a checksum of every file above (checked each time the entry is opened).

The key hashes the data's identity (each file's resolved path, size and modification time; a Hub
dataset's fingerprint), the format and its settings, the tokenizer file's bytes and special
tokens, and the chat template for chat formats: a changed input gets a new key. A build goes
to a temporary directory renamed into place when complete, so a kill never leaves a half-written
cache, and a file lock makes concurrent processes (data-parallel ranks) wait for one build. A
rebuild (``prepare --force``, or a damaged entry) keeps the old entry until the new one is
complete; a kill between the two renames of the swap leaves the old entry, restored at the next
start. How an entry is verified and swapped: :mod:`.entry`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from .entry import DamagedEntry, entry_files, recover, swap_in
from .formats import DataError, RecordError, encode, is_empty, normalize, record_hash
from .sources import EmptyLog, ProblemLog, count_lines, data_identity, describe, parse_item, raw_records
from .store import CACHE_VERSION, StoreWriter, indexed, open_store

CHUNK = 256  # records per task with worker processes


def cache_root(data_cfg) -> Path:
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    env = os.environ.get("SCALEBIO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scalebio"


def tokenizer_identity(tokenizer) -> dict:
    """What the cache key needs to know about a tokenizer: its file's bytes and special tokens."""
    digest = hashlib.sha256(Path(tokenizer.path).read_bytes()).hexdigest()
    return {"kind": type(tokenizer).__name__, "file": digest, "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "add_bos": bool(tokenizer.add_bos), "add_eos": bool(tokenizer.add_eos)}


def source_key(cfg, on_error: str, tokenizer, chat, hf_cache, on_empty: str = "skip") -> tuple:
    """``(key, identity)`` of a tokenized source."""
    ident = {"version": CACHE_VERSION, "data": data_identity(cfg, hf_cache), "format": cfg.format,
             "columns": dict(sorted(cfg.columns.items())), "max_samples": cfg.max_samples, "on_error": on_error,
             "on_empty": on_empty, "tokenizer": tokenizer_identity(tokenizer)}
    if cfg.format in ("sharegpt", "messages"):
        ident["chat_template"] = chat.source if chat is not None else "plain"
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return key, ident


# --------------------------------------------------------------------------- building

_worker = {}


def _worker_init(tokenizer_cfg) -> None:
    from ..tokenizer import chat_template_for, load_tokenizer

    tok = load_tokenizer(tokenizer_cfg)
    _worker["tok"], _worker["chat"] = tok, chat_template_for(tok, tokenizer_cfg.chat_template)


def process_chunk(items: list, fmt: str, columns: dict, tokenizer, chat, on_empty: str = "keep") -> dict:
    """Parse, check, normalise, hash and encode raw items (``(record, problem)`` pairs from a
    reader), in a worker or in-process. Returns the problems by position, the positions of records
    with an empty response (``empty``: not encoded unless ``on_empty`` is keep), and the encoded
    records (those without a problem, in order) as concatenated arrays."""
    from ..tokenizer import ChatTemplateError

    problems, empty, ids, flags, lengths, n_sup, first, hashes = {}, [], [], [], [], [], [], []
    for j, (record, problem) in enumerate(items):
        record, problem = parse_item(record, problem)
        if problem is None:
            try:
                norm = normalize(record, fmt, columns)
                if is_empty(norm):
                    empty.append(j)
                    if on_empty != "keep":
                        continue
                a, f = encode(norm, tokenizer, chat)
            except (RecordError, ChatTemplateError) as exc:  # a template may reject one conversation
                problem = str(exc)
        if problem is not None:
            problems[j] = problem
            continue
        targets = np.flatnonzero(f[1:])
        ids.append(a)
        flags.append(f)
        lengths.append(len(a))
        n_sup.append(len(targets))
        first.append(int(targets[0]) + 1 if len(targets) else -1)
        hashes.append(record_hash(norm))
    return {"problems": problems, "empty": empty,
            "ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
            "flags": np.concatenate(flags) if flags else np.zeros(0, np.uint8),
            "lengths": np.asarray(lengths, np.int64), "n_supervised": np.asarray(n_sup, np.int64),
            "first_target": np.asarray(first, np.int64), "hashes": np.asarray(hashes, np.uint64)}


def _worker_chunk(items: list, fmt: str, columns: dict, on_empty: str) -> dict:
    return process_chunk(items, fmt, columns, _worker["tok"], _worker["chat"], on_empty)


def _progress(label: str, total, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"tokenizing {label}", unit=" records", disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)


def worker_pool(workers: int, tokenizer_cfg):
    """Tokenizer processes for :func:`load_or_build` (``pool=``); ``shutdown()`` it when done.

    A ProcessPoolExecutor, not a multiprocessing.Pool: a worker that dies (or fails to start)
    breaks the executor with an error, where a Pool would replace it forever and hang."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent may hold threads (torch, tokenizers) that fork would copy in a bad state
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(tokenizer_cfg,))
    pool.workers = workers
    return pool


def _chunks(cfg, hf_cache):
    """``(wheres, items)`` of CHUNK raw items at a time; JSON lines stay unparsed."""
    wheres, items = [], []
    for where, record, problem in raw_records(cfg, hf_cache):
        wheres.append(where)
        items.append((record, problem))
        if len(items) == CHUNK:
            yield wheres, items
            wheres, items = [], []
    if items:
        yield wheres, items


def build_store(label: str, cfg, on_error: str, tokenizer, chat, directory, hf_cache=None, pool=None,
                progress: bool = False, on_empty: str = "skip"):
    """Tokenize a source into ``directory`` (None: in memory, returned), in this process or with
    a :func:`worker_pool`. The main process only reads lines and writes results; parsing,
    checking and tokenizing happen in the workers, in order-preserving chunks. Raises DataError
    for an empty source, a malformed record (unless skipping) or an empty response (with
    ``on_empty: error``)."""
    start = time.perf_counter()
    problems = ProblemLog(label, on_error)
    empties = EmptyLog(label, on_empty)
    writer = StoreWriter(directory)
    limit = cfg.max_samples
    bar = _progress(label, count_lines(cfg) if progress else None, progress)
    count = 0

    def consume(wheres, chunk) -> bool:
        """Apply one processed chunk in order; True once max_samples is reached."""
        nonlocal count
        keep, done = 0, False
        empty = set(chunk["empty"])
        for j, where in enumerate(wheres):
            if limit is not None and count >= limit:
                done = True
                break
            if j in chunk["problems"]:
                problems(where, chunk["problems"][j])
                continue
            if j in empty and not empties(where):
                continue
            count += 1
            keep += 1
        writer.add_chunk(chunk, keep)
        bar.update(len(wheres))
        return done or (limit is not None and count >= limit)

    try:
        if pool is None:
            for wheres, items in _chunks(cfg, hf_cache):
                if consume(wheres, process_chunk(items, cfg.format, cfg.columns, tokenizer, chat, on_empty)):
                    break
        else:
            pending = deque()
            done = False
            for wheres, items in _chunks(cfg, hf_cache):
                pending.append((wheres, pool.submit(_worker_chunk, items, cfg.format, cfg.columns, on_empty)))
                while len(pending) > 4 * pool.workers or (pending and pending[0][1].done()):
                    wheres0, result = pending.popleft()  # in order: errors and max_samples apply as in one process
                    if consume(wheres0, result.result()):
                        done = True
                        break
                if done:
                    break
            while pending and not done:
                wheres0, result = pending.popleft()
                done = consume(wheres0, result.result())
    except BrokenProcessPool as exc:
        raise DataError(f"{label}: a tokenizer worker process stopped ({exc}); run with --workers 1 to see the "
                        f"error in this process") from None
    finally:
        bar.close()
    records = writer.records
    if records == 0:
        skipped = f"; {problems.skipped} malformed records skipped, e.g. {problems.skip_examples[0]}" \
            if problems.skipped else ""
        if empties.count:
            skipped += f"; {empties.count} records with an empty response skipped, e.g. {empties.examples[0]}"
        raise DataError(f"{label} ({describe(cfg)}) has no samples{skipped}")
    info = {"version": CACHE_VERSION, "label": label, "source": describe(cfg), "records": records,
            "tokens": int(sum(int(x.sum()) for x in writer.lengths)), "skipped": problems.skipped,
            "skip_examples": problems.skip_examples, "empty": empties.count, "on_empty": on_empty,
            "empty_examples": empties.examples, "seconds": round(time.perf_counter() - start, 3)}
    return writer.finish(info), info


class _Lock:
    """An exclusive lock on a file (fcntl): one process builds a cache entry, the others wait. In a
    cache that cannot be written (a prepared cache shared read-only) there is no lock, and none is
    needed: nothing can change there."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import fcntl

        try:
            self.fh = open(self.path, "a")
        except OSError:
            self.fh = None
            return self
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


def _say_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_or_build(label: str, cfg, data_cfg, tokenizer, chat, progress: bool = False, pool=None,
                  force: bool = False, say=_say_stderr) -> tuple:
    """``(store, status)``: the cached tokenized source, built first if needed. ``status`` has
    ``cached`` (bool), ``key``, ``seconds`` (of this call), the build's info, and ``rebuilt`` (why
    a damaged entry was rebuilt, or None). ``say`` gets the message about a damaged entry."""
    if data_cfg.cache:
        indexed("IndexedDataset")  # import megatron-core once, outside the reported time
    start = time.perf_counter()
    on_error = cfg.on_error or data_cfg.on_error
    on_empty = cfg.on_empty or data_cfg.on_empty
    root = cache_root(data_cfg)
    hf_cache = root / "hf"
    if not data_cfg.cache:
        store, info = build_store(label, cfg, on_error, tokenizer, chat, None, hf_cache, pool, progress, on_empty)
        return store, {"cached": False, "key": None, "seconds": time.perf_counter() - start, "rebuilt": None, **info}
    key, ident = source_key(cfg, on_error, tokenizer, chat, hf_cache, on_empty)
    tokenized = root / "tokenized"
    try:
        tokenized.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache directory {tokenized} ({exc.strerror}); set data.cache_dir or "
                        f"$SCALEBIO_CACHE to a writable place, or data.cache: false") from None
    final = tokenized / key
    rebuilt = None
    with _Lock(tokenized / f"{key}.lock") as lock:
        if lock.fh is not None:
            recover(tokenized, key)  # builds hold the lock: anything aside is left by a killed process
        if final.exists() and not force:
            try:
                store = open_store(final)
                return store, {"cached": True, "key": key, "seconds": time.perf_counter() - start, "rebuilt": None,
                               **store.info}
            except Exception as exc:  # DamagedEntry, or files megatron-core cannot read
                rebuilt = str(exc) if isinstance(exc, DamagedEntry) else f"{type(exc).__name__}: {exc}"
                say(f"{label}: the cache entry {final} is damaged ({rebuilt}); rebuilding it")
        tmp = tokenized / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            _, info = build_store(label, cfg, on_error, tokenizer, chat, tmp, hf_cache, pool, progress, on_empty)
            (tmp / "key.json").write_text(json.dumps({**ident, "files": entry_files(tmp)}, indent=1) + "\n")
            for f in tmp.iterdir():  # on disk before the rename, so that even a power cut cannot expose a torn entry
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            swap_in(tmp, final)  # the old entry (--force, or a damaged one) stays until the new one is complete
        except OSError as exc:
            if exc.filename and not str(exc.filename).startswith(str(tokenized)):  # reading the data
                raise DataError(f"{label}: cannot read {exc.filename} ({exc.strerror})") from None
            raise DataError(f"{label}: cannot write its tokenized cache entry in {tokenized} ({exc.strerror}); free "
                            f"some space, set data.cache_dir or $SCALEBIO_CACHE to a writable place, or set "
                            f"data.cache: false") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    store = open_store(final)
    return store, {"cached": False, "key": key, "seconds": time.perf_counter() - start, "rebuilt": rebuilt,
                   **store.info}
