"""A tokenized cache entry on disk: the sizes and checksums that prove it complete and unchanged,
and the swap that replaces one without a moment where neither the old nor the new is usable.

The checksum of a file is BLAKE2b over the whole file up to 8 MiB, and over its first and last
MiB and 32 evenly spaced 64 KiB blocks beyond that: a few MiB read per file whatever its size, so
opening an entry stays cheap; the sizes catch a truncated or extended file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

VERSION = 2  # the cache version (store.CACHE_VERSION) whose entries carry file sizes and checksums

ENTRY_FILES = ("ids.bin", "ids.idx", "flags.bin", "flags.idx", "meta.npz", "info.json")
_WHOLE, _EDGE, _BLOCK, _BLOCKS = 8 << 20, 1 << 20, 64 << 10, 32


def file_checksum(path: Path) -> str:
    """BLAKE2b of a file, sampled beyond 8 MiB (see the module docstring)."""
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        if size <= _WHOLE:
            h.update(fh.read())
        else:
            spots = [0, size - _EDGE] + [_EDGE + (size - 2 * _EDGE - _BLOCK) * i // (_BLOCKS - 1) for i in range(_BLOCKS)]
            for at in spots:
                fh.seek(at)
                h.update(fh.read(_EDGE if at in (0, size - _EDGE) else _BLOCK))
    return h.hexdigest()


def entry_files(directory: Path) -> dict:
    """``{name: [size, checksum]}`` of an entry's files, for key.json."""
    return {name: [(directory / name).stat().st_size, file_checksum(directory / name)] for name in ENTRY_FILES}


class DamagedEntry(ValueError):
    """A cache entry that does not match its key.json (truncated, changed, from an older version)."""


def verify_entry(directory: Path) -> None:
    """Raise DamagedEntry naming the first file whose size or checksum differs from key.json."""
    try:
        key = json.loads((directory / "key.json").read_text())
    except (OSError, ValueError):
        raise DamagedEntry("key.json is missing or unreadable") from None
    if key.get("version") != VERSION or not isinstance(key.get("files"), dict):
        raise DamagedEntry(f"written by cache version {key.get('version')}, this is {VERSION}")
    for name in ENTRY_FILES:
        f = directory / name
        size, digest = key["files"].get(name, (None, None))
        if not f.is_file():
            raise DamagedEntry(f"{name} is missing")
        if f.stat().st_size != size:
            raise DamagedEntry(f"{name} has {f.stat().st_size} bytes, {size} when written (truncated or changed)")
        if file_checksum(f) != digest:
            raise DamagedEntry(f"{name} does not match its checksum (changed since written)")


def swap_in(tmp: Path, final: Path) -> None:
    """Put a complete entry in place of ``final``. The old entry is renamed aside first and removed
    only after the new one is in place; :func:`recover` restores it after a kill in between."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(tokenized: Path, key: str) -> None:
    """Under the entry's lock: restore an entry a kill left renamed aside, remove stale temporaries."""
    final = tokenized / key
    olds = sorted(tokenized.glob(f".{key}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not final.exists():
        for old in olds:
            try:
                verify_entry(old)
            except DamagedEntry:
                continue
            os.rename(old, final)
            break
    for stale in [*tokenized.glob(f".{key}.old-*"), *tokenized.glob(f".{key}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
