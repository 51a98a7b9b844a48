"""Safetensors files of a checkpoint directory: reading with the ``safetensors`` library, and
writing one tensor at a time.

Reading is the library's (``safe_open``: header, dtypes, shapes, slices, and its check that the
data the header describes is all there). Writing streams: the library's writers
(``save_file``, ``serialize_file``) take every tensor of a file in memory at once, which for a 5 GB
shard is 5 GB; :class:`StreamWriter` writes the header first and then each tensor as it is
produced, so only the tensor in flight is in memory. Every file it writes is read back by the
library's header check before it counts as written.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from scalebio.checkpointing import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3

# --------------------------------------------------------------------------- safetensors reading

# safetensors dtype codes (the header's) <-> torch dtypes: the writer's header needs them too
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dtype


def read_header(path: Path) -> dict:
    """name -> (dtype, shape) of a safetensors file, as the ``safetensors`` library reads it.

    The library also checks that the header's offsets cover the data exactly: a truncated download
    or copy (the common failure) is caught here, before a conversion writes anything.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            out = {}
            for name in fh.keys():
                sl = fh.get_slice(name)
                code = sl.get_dtype()
                if code not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {code!r}")
                out[name] = (_DTYPES[code], tuple(int(d) for d in sl.get_shape()))
            return out
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except SafetensorError as exc:
        msg = str(exc).replace("Error while deserializing header: ", "")
        if "not fully covered" in msg or "incomplete" in msg:
            size = path.stat().st_size
            raise CheckpointError(f"{path}: truncated or damaged: its header does not describe the {size} bytes "
                                  f"of the file ({msg}); download or copy it again") from None
        raise CheckpointError(f"{path}: not a safetensors file ({msg})") from None


class TensorDir:
    """The tensors of a directory of safetensors files: ``model.safetensors`` or shards with an index."""

    def __init__(self, folder, what: str = "checkpoint"):
        self.folder = Path(folder)
        self.what = what
        index = self.folder / INDEX_FILE
        if not self.folder.is_dir():
            raise CheckpointError(f"{what} directory {self.folder} does not exist")
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise CheckpointError(f"{what} {self.folder}: missing shard(s) listed in {INDEX_FILE}: "
                                      f"{', '.join(missing)}")
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
            hint = (f" (found {', '.join(found[:3])}: only safetensors is read; re-save with "
                    f"save_pretrained(..., safe_serialization=True))") if found else ""
            raise CheckpointError(f"{what} {self.folder}: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        self.entries: dict = {}  # name -> (file, dtype, shape)
        for f in files:
            for name, (dtype, shape) in read_header(self.folder / f).items():
                if weight_map is not None and weight_map.get(name) != f:
                    continue  # the index is authoritative when a name appears in two shards
                self.entries[name] = (f, dtype, shape)
        if weight_map is not None:
            absent = [n for n, f in weight_map.items() if n not in self.entries]
            if absent:
                raise CheckpointError(f"{what} {self.folder}: {INDEX_FILE} lists {absent[0]} in "
                                      f"{weight_map[absent[0]]}, but that file does not contain it"
                                      + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))

    def names(self) -> list:
        return list(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries

    def dtype(self, name) -> torch.dtype:
        return self.entries[name][1]

    def shape(self, name) -> tuple:
        return self.entries[name][2]

    def get(self, name) -> torch.Tensor:
        from safetensors import safe_open

        file = self.entries[name][0]
        # opened per tensor so no mapping of a multi-GB shard outlives the tensor it was read for
        with safe_open(str(self.folder / file), framework="pt") as fh:
            return fh.get_tensor(name)

    def get_rows(self, name, start: int, stop: int, dim: int = 0) -> torch.Tensor:
        """A slice ``[start:stop]`` along ``dim`` (0 or 1) without reading the rest of the tensor."""
        from safetensors import safe_open

        file = self.entries[name][0]
        with safe_open(str(self.folder / file), framework="pt") as fh:
            sl = fh.get_slice(name)
            return sl[start:stop] if dim == 0 else sl[:, start:stop]


# --------------------------------------------------------------------------- safetensors writing


@dataclass
class Entry:
    """One output tensor: its name, dtype, shape, and a function yielding its bytes in row-major
    order as one or more tensors (parts), so fused tensors are written without building them."""

    name: str
    dtype: torch.dtype
    shape: tuple
    produce: Callable[[], Iterable[torch.Tensor]] = field(repr=False)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class StreamWriter:
    """Write a safetensors file one tensor at a time: the header (all names, shapes and offsets)
    first, then each tensor's bytes as they are produced. Only one tensor is in memory at once."""

    def __init__(self, path: Path, specs: list):
        self.path = Path(path)
        self.specs = list(specs)  # [(name, dtype, shape, nbytes)]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, nbytes in self.specs:
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
        self.fh = open(self.path, "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)
        self.next = 0

    def write(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        exp_name, dtype, shape, nbytes = self.specs[self.next]
        if name != exp_name:
            raise RuntimeError(f"{self.path}: expected tensor {exp_name}, got {name}")
        written = 0
        for part in parts:
            if part.dtype != dtype:
                part = part.to(dtype)
            part = part.detach().cpu().contiguous()
            # a byte view of the tensor's own memory: nothing is copied on the way to the file
            self.fh.write(part.view(torch.uint8).reshape(-1).numpy().data if part.numel() else b"")
            written += part.numel() * part.element_size()
        if written != nbytes:
            raise RuntimeError(f"{self.path}: tensor {name} {list(shape)} needs {nbytes} bytes, got {written}")
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise RuntimeError(f"{self.path}: {len(self.specs) - self.next} tensors were not written")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        got = read_header(self.path)  # what any safetensors reader will see
        want = {name: (dtype, tuple(shape)) for name, dtype, shape, _ in self.specs}
        if got != want:
            raise RuntimeError(f"{self.path}: the safetensors library reads another header than was written")

    def abort(self) -> None:
        self.fh.close()


def plan_shards(entries: list, max_shard_bytes: int) -> list:
    """Group entries, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for e in entries:
        if current and size + e.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_index(folder: Path, weight_map: dict, total_size: int) -> None:
    index = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_tensors(folder: Path, entries: list, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  progress: Optional[str] = None) -> dict:
    """Write entries as safetensors shards plus an index; returns ``{"files", "tensors", "bytes"}``."""
    folder = Path(folder)
    shards = plan_shards(entries, max_shard_bytes)
    total = sum(e.nbytes for e in entries)
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=total, desc=progress, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                   dynamic_ncols=True)
    weight_map = {}
    try:
        for i, shard in enumerate(shards):
            fname = shard_file_name(i, len(shards))
            writer = StreamWriter(folder / fname, [(e.name, e.dtype, e.shape, e.nbytes) for e in shard])
            try:
                for e in shard:
                    writer.write(e.name, e.produce())
                    weight_map[e.name] = fname
                    if bar is not None:
                        bar.update(e.nbytes)
                writer.close()
            except BaseException:
                writer.abort()
                raise
    finally:
        if bar is not None:
            bar.close()
    write_index(folder, weight_map, total)
    return {"files": len(shards), "tensors": len(entries), "bytes": total}
