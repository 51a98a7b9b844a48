"""A tokenized source on disk (megatron-core indexed datasets plus meta.npz, info.json, key.json),
read as a :class:`TokenStore` and written by :class:`StoreWriter`; the cache around it is :mod:`.cache`."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from .entry import VERSION as ENTRY_VERSION
from .entry import DamagedEntry, verify_entry

CACHE_VERSION = ENTRY_VERSION  # 2: file sizes and checksums in key.json (see .entry), on_empty


def indexed(*names):
    """Names from megatron-core's indexed_dataset module, without the import-time warnings about
    Transformer Engine and Apex (which this module does not use)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return tuple(getattr(indexed_dataset, n) for n in names)


class TokenStore:
    """Token ids and supervision flags of a source's records (on disk or in memory)."""

    def __init__(self, lengths, n_supervised, first_target, hashes, info, ids=None, flags=None, directory=None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.n_supervised = np.asarray(n_supervised, dtype=np.int64)
        self.first_target = np.asarray(first_target, dtype=np.int64)
        self.hashes = np.asarray(hashes, dtype=np.uint64)
        self.info = info
        self._ids, self._flags = ids, flags  # IndexedDatasets, or lists of arrays
        self.directory = directory  # the cache entry, or None in memory

    def __len__(self) -> int:
        return len(self.lengths)

    def supervised_within(self, limit: int) -> np.ndarray:
        """Supervised targets of each record within its first ``limit`` tokens.

        Only truncated records need their flags read, one by one; on disk the result is kept in
        the cache entry (``supervised-<limit>.npy``), so a restart does not read them again."""
        memo = None if self.directory is None else self.directory / f"supervised-{limit}.npy"
        if memo is not None and memo.is_file():
            try:
                return np.load(memo)
            except (OSError, ValueError):
                pass
        out = self.n_supervised.copy()
        for i in np.flatnonzero(self.lengths > limit):
            out[i] = int(np.count_nonzero(self.sample(i, limit)[1][1:]))
        if memo is not None:
            tmp = memo.with_name(f".{memo.name}.tmp-{os.getpid()}")
            try:
                with open(tmp, "wb") as fh:
                    np.save(fh, out)
                os.replace(tmp, memo)
            except OSError:  # a read-only shared cache: just recompute next time
                with contextlib.suppress(OSError):  # there, even removing the (absent) file fails: EROFS
                    tmp.unlink(missing_ok=True)
        return out

    def sample(self, i: int, limit: int) -> tuple:
        """``(ids, flags)`` of record ``i``, its first ``limit`` tokens."""
        n = int(min(self.lengths[i], limit))
        if isinstance(self._ids, list):
            return self._ids[i][:n], self._flags[i][:n]
        return self._ids.get(int(i), 0, n), self._flags.get(int(i), 0, n)


class StoreWriter:
    def __init__(self, directory):
        self.directory = directory
        self.lengths, self.n_supervised, self.first_target, self.hashes = [], [], [], []
        if directory is None:
            self.ids, self.flags = [], []
        else:
            IndexedDatasetBuilder, get_bin_path = indexed("IndexedDatasetBuilder", "get_bin_path")
            self.ids = IndexedDatasetBuilder(get_bin_path(str(directory / "ids")), dtype=np.int32)
            self.flags = IndexedDatasetBuilder(get_bin_path(str(directory / "flags")), dtype=np.uint8)

    @property
    def records(self) -> int:
        return sum(len(x) for x in self.lengths)

    def add_chunk(self, chunk: dict, keep: int) -> None:
        """The first ``keep`` encoded records of a processed chunk (see :func:`process_chunk`)."""
        if keep == 0:
            return
        lengths = chunk["lengths"][:keep]
        tokens = int(lengths.sum())
        ids, flags = chunk["ids"][:tokens], chunk["flags"][:tokens]
        self.lengths.append(lengths)
        for name in ("n_supervised", "first_target", "hashes"):
            getattr(self, name).append(chunk[name][:keep])
        if self.directory is None:
            cuts = np.cumsum(lengths)[:-1]
            self.ids += np.split(ids, cuts)
            self.flags += np.split(flags, cuts)
        else:  # one write per chunk; every record is its own sequence in the index
            self.ids.add_document(ids, lengths.tolist())
            self.flags.add_document(flags, lengths.tolist())

    def finish(self, info: dict) -> TokenStore:
        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        meta = dict(n_supervised=cat(self.n_supervised, np.int64), first_target=cat(self.first_target, np.int64),
                    hashes=cat(self.hashes, np.uint64))
        if self.directory is None:
            return TokenStore(cat(self.lengths, np.int64), info=info, ids=self.ids, flags=self.flags, **meta)
        (get_idx_path,) = indexed("get_idx_path")
        self.ids.finalize(get_idx_path(str(self.directory / "ids")))
        self.flags.finalize(get_idx_path(str(self.directory / "flags")))
        np.savez(self.directory / "meta.npz", **meta)
        # info.json last: its presence marks a complete directory
        (self.directory / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        return None


def open_store(directory: Path) -> TokenStore:
    """An entry, verified against key.json; DamagedEntry if it does not match."""
    verify_entry(directory)
    (IndexedDataset,) = indexed("IndexedDataset")
    info = json.loads((directory / "info.json").read_text())
    if info.get("version") != CACHE_VERSION:
        raise DamagedEntry(f"cache version {info.get('version')}")
    meta = np.load(directory / "meta.npz")
    ids = IndexedDataset(str(directory / "ids"))
    flags = IndexedDataset(str(directory / "flags"))
    if len(ids) != len(flags) or len(ids) != len(meta["hashes"]):
        raise DamagedEntry("inconsistent cache files")
    return TokenStore(ids.sequence_lengths, meta["n_supervised"], meta["first_target"], meta["hashes"], info,
                      ids=ids, flags=flags, directory=directory)
