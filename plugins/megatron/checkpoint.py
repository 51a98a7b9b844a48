"""The scalebio Megatron checkpoint: full (unsharded) tensors under Megatron's global names.

A checkpoint directory holds

    scalebio_checkpoint.json          format marker, dtype, where it came from
    model.yaml                        the model config (``--model CKPT/model.yaml``; ``--load`` uses it)
    model-00001-of-0000N.safetensors  tensors named as megatron-core's local-spec GPTModel with
    model.safetensors.index.json      global layer numbers, full size, vocabulary not padded
    hf/config.json (optional)         the Hugging Face config it was converted from, for the way back
    tokenizer files                   copied from the source, so a run can use them (tokenizer.json, ...)

Why not megatron-core's ``dist_checkpointing``: ``dist_checkpointing.save`` takes the complete
sharded state dict of a rank at once, so a converter would hold the whole model in memory, and on
CPU it needs ``psutil`` (not a declared dependency) and forks writer processes. Here every tensor
is written as it is produced (peak memory about one tensor), and any TP/PP layout reads exactly
the rows and columns of its own shard at load time (see docs/conversion.md).

Everything here is plain torch + safetensors; megatron-core is imported only by the model loader
and saver, which run inside the backend.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from scalebio.config import ConfigError

FORMAT = "scalebio-megatron"
FORMAT_VERSION = 1
META_FILE = "scalebio_checkpoint.json"
MODEL_FILE = "model.yaml"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HF_DIR = "hf"  # Hugging Face side files kept for the way back (config.json, generation_config.json)
# files a tokenizer may consist of; copied both ways so a checkpoint carries its own tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt")
DEFAULT_SHARD_BYTES = 5 * 1024**3


class CheckpointError(ConfigError):
    """A checkpoint or Hugging Face directory that cannot be read, converted or loaded."""


# --------------------------------------------------------------------------- safetensors reading

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
    """name -> (dtype, shape) of a safetensors file, checking that its data is all there.

    A truncated download or copy is the common failure; the header states the data size, so
    compare it with the file size instead of failing later in the middle of a conversion.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 1024**2:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, "
                                      f"file of {size} bytes)")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not JSON)") from None
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        out[name] = (_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]))
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: its header describes {8 + n + end} bytes but the file has "
                              f"{size}; download or copy it again")
    return out


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


# --------------------------------------------------------------------------- atomic directories


@contextmanager
def atomic_dir(target, overwrite: bool = False):
    """Yield a temporary directory next to ``target``; rename it to ``target`` when the block ends
    without error, remove it otherwise. A failed conversion leaves nothing behind."""
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise CheckpointError(f"output {target} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise CheckpointError(f"output directory {target} exists and is not empty; choose another --out "
                                  f"or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists() and any(target.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
    elif target.exists():
        target.rmdir()
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer_files(src: Path, dst: Path) -> list:
    """Copy whatever tokenizer files ``src`` has (a directory, or a sentencepiece .model file)."""
    src, copied = Path(src), []
    if src.is_file():  # a bare sentencepiece model
        shutil.copyfile(src, Path(dst) / ("tokenizer.model" if src.suffix == ".model" else src.name))
        return [src.name]
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, Path(dst) / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------- the model's tensors


def expected_tensors(model) -> dict:
    """Global name -> full shape of every tensor a checkpoint of ``model`` (ModelConfig) holds.

    Names are megatron-core's local layer spec (the Transformer Engine spec fuses the two norms
    into the following linear layer; :func:`canonical_name` maps those back). The vocabulary is
    not padded; a tied output layer is not stored (it is the embedding). Which tensors a layer has
    is the model family's (plugins/megatron/families/).
    """
    from .families import get

    return get(model.family).expected_tensors(model)


# Transformer Engine's layer spec fuses each norm into the linear layer after it
_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def canonical_name(global_name: str, model) -> str:
    """The checkpoint name of a model parameter (global layer numbers, local-spec norm names)."""
    for te, local in _TE_NAMES.items():
        if global_name.endswith("." + te):
            return global_name[: -len(te)] + local
    if global_name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"  # the last pipeline stage's copy of a tied embedding
    return global_name


def tp_split_of(name: str, model) -> Optional[tuple]:
    """(dim, stride) of how megatron-core splits a tensor over TP ranks, or None when replicated
    (the model family's rule, ``Family.tp_split_of``)."""
    from .families import get

    return get(model.family).tp_split_of(name, model)


def is_vocab_tensor(name: str) -> bool:
    return name in ("embedding.word_embeddings.weight", "output_layer.weight")


def read_shard(src: TensorDir, name: str, split, rank: int, world: int, padded_rows: Optional[int] = None):
    """This TP rank's part of a stored full tensor, reading only that part from disk.

    Equals ``model.shard(full, split, rank, world)`` of the full tensor (zero-padded to
    ``padded_rows`` rows for the vocabulary), piece by piece: with stride s the split dimension is
    cut into ``s * world`` equal pieces and rank r takes pieces r, r + world, ...
    """
    shape = src.shape(name)
    if split is None or world == 1:
        full = src.get(name)
        return _pad_rows(full, padded_rows)
    dim, stride = split
    size = padded_rows if padded_rows is not None else shape[dim]
    n = stride * world
    if size % n:
        raise CheckpointError(f"{name}: dimension {dim} of size {size} cannot be split in {n} equal pieces "
                              f"(TP={world})")
    piece = size // n
    parts = []
    for j in range(rank, n, world):
        start = j * piece
        stop = min(start + piece, shape[dim])  # rows past the stored ones are vocabulary padding
        part = src.get_rows(name, min(start, stop), stop, dim)
        if part.shape[dim] < piece:
            pad_shape = list(part.shape)
            pad_shape[dim] = piece - part.shape[dim]
            part = torch.cat([part, torch.zeros(pad_shape, dtype=part.dtype)], dim=dim)
        parts.append(part)
    return torch.cat(parts, dim=dim)


def _pad_rows(t: torch.Tensor, rows: Optional[int]) -> torch.Tensor:
    if rows is None or rows == t.shape[0]:
        return t
    return torch.cat([t, torch.zeros((rows - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)])


# --------------------------------------------------------------------------- checkpoint metadata


def model_fields(model) -> dict:
    from scalebio.config import to_dict

    return to_dict(model)


# Fields that decide the weights and the numerics; a checkpoint and a run must agree on all of them.
ARCH_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
               "ffn_hidden_size", "vocab_size", "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma",
               "activation", "add_qkv_bias", "add_bias_linear", "parallel_residual", "position_embedding_type",
               "rotary_base", "rotary_percent", "share_embeddings_and_output_weights", "embedding_multiplier",
               "rope_scaling", "rope_scaling_type", "rope_scaling_factor", "rope_scaling_low_freq_factor",
               "rope_scaling_high_freq_factor", "rope_scaling_original_max_position_embeddings", "softmax_scale",
               "window_size", "window_attn_skip_freq", "attn_logit_softcapping", "final_logit_softcapping")


def arch_values(model) -> dict:
    """Architecture fields with defaults made explicit, so equal models compare equal."""
    if isinstance(model, dict):  # derived fields: what is not given is the ModelConfig default
        import dataclasses

        from scalebio.config import ModelConfig

        d = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
        d.update(model)
    else:
        d = model_fields(model)
    heads = d["num_attention_heads"]
    d["num_query_groups"] = d.get("num_query_groups") or heads
    d["kv_channels"] = d.get("kv_channels") or d["hidden_size"] // heads
    d["add_qkv_bias"] = bool(d.get("add_qkv_bias")) or bool(d.get("add_bias_linear"))
    if d.get("softmax_scale") is None:
        d["softmax_scale"] = d["kv_channels"] ** -0.5
    if d.get("window_size") is not None:
        d["window_size"] = tuple(d["window_size"])
        freq = d.get("window_attn_skip_freq")
        if isinstance(freq, (list, tuple)):  # a list that says what an integer frequency says is that frequency
            n = d["num_layers"]
            same = [k for k in range(1, n + 1) if [int((i + 1) % k != 0) for i in range(n)] == list(freq)]
            d["window_attn_skip_freq"] = same[0] if same else (None if all(freq) else tuple(freq))
    else:
        d["window_attn_skip_freq"] = None
    if not d.get("rope_scaling"):
        for k in ("rope_scaling_type", "rope_scaling_factor", "rope_scaling_low_freq_factor",
                  "rope_scaling_high_freq_factor", "rope_scaling_original_max_position_embeddings"):
            d[k] = None
    elif d.get("rope_scaling_type") == "linear":  # linear scaling reads the factor only
        for k in ("rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
                  "rope_scaling_original_max_position_embeddings"):
            d[k] = None
    if d.get("position_embedding_type") != "rope":
        d["rotary_base"] = d["rotary_percent"] = None
    keys = ARCH_FIELDS + (("max_sequence_length",) if d.get("position_embedding_type") == "learned_absolute" else ())
    return {k: d.get(k) for k in keys}


def arch_differences(a, b) -> list:
    """[(field, value in a, value in b)] where two model configs disagree on the architecture."""
    va, vb = arch_values(a), arch_values(b)
    raw = [a if isinstance(a, dict) else model_fields(a), b if isinstance(b, dict) else model_fields(b)]
    out = []
    for k in va:
        if k in ("num_query_groups", "kv_channels") and all(r.get(k) is None for r in raw):
            continue  # both follow from num_attention_heads / hidden_size, whose difference is reported
        x, y = va[k], vb.get(k)
        if isinstance(x, float) or isinstance(y, float):
            same = x is not None and y is not None and float(x) == float(y)
        else:
            same = x == y
        if not same:
            out.append((k, x, y))
    return out


def read_meta(ckpt) -> dict:
    ckpt = Path(ckpt)
    meta_path = ckpt / META_FILE
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt} does not exist")
    if not meta_path.is_file():
        hint = " (it looks like a Hugging Face checkpoint: convert it first with scalebio convert hf-to-megatron)" \
            if (ckpt / "config.json").is_file() else ""
        raise CheckpointError(f"{ckpt} is not a scalebio checkpoint: no {META_FILE}{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
                              f"scalebio reads {FORMAT!r} version {FORMAT_VERSION}")
    return meta


def read_model_config(ckpt):
    """The ModelConfig stored in a checkpoint (its model.yaml)."""
    from scalebio.config import ModelConfig, load_yaml, parse

    path = Path(ckpt) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt}: {MODEL_FILE} is missing")
    data = load_yaml(path)
    return parse(ModelConfig, data, lambda p: str(path), ())


def write_model_config(folder: Path, model) -> None:
    import yaml

    d = model_fields(model)
    text = ("# written by scalebio: the architecture of this checkpoint (megatron-core TransformerConfig names)\n"
            + yaml.safe_dump(d, sort_keys=False))
    (Path(folder) / MODEL_FILE).write_text(text)


def write_meta(folder: Path, dtype: torch.dtype, created_by: str, source: str, hf_config: bool) -> None:
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype_name(dtype), "created_by": created_by,
            "source": source, "hf_config": f"{HF_DIR}/config.json" if hf_config else None}
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def open_checkpoint(ckpt, model=None, where: Optional[Callable[[str], str]] = None):
    """Check a checkpoint against ``model`` (the run's ModelConfig) and return its tensors.

    The stored tensors must be exactly those :func:`expected_tensors` lists, with those shapes;
    the architecture fields must agree. Errors name the field, the tensor and the files;
    ``where(field)`` says where the run's value of a field came from.
    """
    ckpt = Path(ckpt)
    read_meta(ckpt)
    stored = read_model_config(ckpt)
    if model is not None:
        diff = arch_differences(model, stored)
        if diff:
            where = where or (lambda k: "the run's model config")
            lines = "; ".join(f"{k}: {a!r} in {where(k)} but {b!r} in {ckpt / MODEL_FILE}" for k, a, b in diff)
            raise CheckpointError(f"the model does not match checkpoint {ckpt}: {lines} (--load without --model "
                                  f"uses the checkpoint's {MODEL_FILE})")
    tensors = TensorDir(ckpt, "checkpoint")
    expected = expected_tensors(stored)
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors.names() if n not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if extra:
            parts.append(f"unexpected {extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
        raise CheckpointError(f"checkpoint {ckpt} does not fit its {MODEL_FILE}: " + "; ".join(parts))
    for name, shape in expected.items():
        if tensors.shape(name) != tuple(shape):
            raise CheckpointError(f"checkpoint {ckpt}: {name} has shape {list(tensors.shape(name))}, "
                                  f"{MODEL_FILE} implies {list(shape)}")
    return tensors, stored


# --------------------------------------------------------------------------- backend: load and save


def _local_names(chunks) -> list:
    """[(chunk, local name, parameter, global name)] of every parameter of this rank."""
    from . import model as mdl

    out = []
    for chunk in chunks:
        glob = mdl.global_names(chunk)
        for local, p in chunk.named_parameters():
            out.append((chunk, local, p, glob[local]))
    return out


@torch.no_grad()
def load_weights_(chunks, ckpt, model, tp_rank: int, tp_world: int, padded_vocab: int,
                  where: Optional[Callable[[str], str]] = None) -> None:
    """Fill this rank's model chunks from a checkpoint at any TP/PP layout (reads only its shards)."""
    tensors, _ = open_checkpoint(ckpt, model, where)
    for _, local, param, glob in _local_names(chunks):
        name = canonical_name(glob, model)
        if name not in tensors:
            raise CheckpointError(f"checkpoint {ckpt} has no tensor for model parameter {glob} (looked for {name})")
        split = tp_split_of(name, model)
        _check_split(param, split, glob)
        padded = padded_vocab if is_vocab_tensor(name) else None
        part = read_shard(tensors, name, split, tp_rank, tp_world, padded)
        if tuple(part.shape) != tuple(param.shape):
            raise CheckpointError(f"checkpoint {ckpt}: {name} gives this rank a {list(part.shape)} shard but "
                                  f"parameter {glob} is {list(param.shape)} (TP={tp_world})")
        param.copy_(part.to(param.dtype))


def _check_split(param, split, name) -> None:
    """Where megatron-core did tag the parameter, its split must be the one the name implies."""
    if getattr(param, "tensor_model_parallel", False):
        tagged = (param.partition_dim, getattr(param, "partition_stride", 1))
        if split is None or tuple(split) != tagged:
            raise RuntimeError(f"{name}: megatron-core splits it as (dim, stride)={tagged}, the checkpoint code "
                               f"expects {split}; update tp_split_of for this megatron-core version")


def _gather_full(param, split, group, world: int) -> torch.Tensor:
    """The full tensor of a TP-split parameter (the inverse of ``model.shard``)."""
    import torch.distributed as dist

    if split is None or world == 1:
        return param.detach()
    dim, stride = split
    shards = [torch.empty_like(param) for _ in range(world)]
    dist.all_gather(shards, param.detach().contiguous(), group=group)
    pieces = [None] * (stride * world)
    for r, s in enumerate(shards):
        for j, piece in enumerate(torch.chunk(s, stride, dim=dim)):
            pieces[j * world + r] = piece
    return torch.cat(pieces, dim=dim)


@torch.no_grad()
def save_weights(chunks, folder, model, tp_rank: int, tp_world: int, dp_rank: int, pp_rank: int, pp_world: int,
                 tp_group=None) -> dict:
    """Collective over the whole world: write this pipeline stage's full tensors to one shard.

    Every TP rank takes part in gathering; the rank with TP rank 0 and DP rank 0 of each stage
    writes ``model-<stage>-of-<PP>.safetensors``. Returns ``{name: file}`` of what it wrote.
    """
    folder = Path(folder)
    writer_rank = tp_rank == 0 and dp_rank == 0
    items = []
    for _, _, param, glob in _local_names(chunks):
        if glob == "output_layer.weight" and model.share_embeddings_and_output_weights:
            continue  # the last stage's copy of the tied embedding: the first stage writes it
        name = canonical_name(glob, model)
        split = tp_split_of(name, model)
        shape = list(param.shape)
        if split is not None:
            shape[split[0]] *= tp_world
        if is_vocab_tensor(name):
            shape[0] = model.vocab_size  # strip the vocabulary padding
        items.append((name, param, split, tuple(shape)))
    items.sort(key=lambda it: it[0])
    fname = shard_file_name(pp_rank, pp_world)
    writer = None
    if writer_rank:
        folder.mkdir(parents=True, exist_ok=True)
        itemsize = {p.dtype: p.element_size() for _, p, _, _ in items}
        specs = [(n, p.dtype, s, _numel(s) * itemsize[p.dtype]) for n, p, _, s in items]
        writer = StreamWriter(folder / fname, specs)
    try:
        for name, param, split, shape in items:
            full = _gather_full(param, split, tp_group, tp_world)
            if writer is not None:
                writer.write(name, [full[: shape[0]] if is_vocab_tensor(name) else full])
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return {name: fname for name, _, _, _ in items} if writer_rank else {}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def finish_checkpoint(folder, model, weight_map: dict, dtype: torch.dtype, created_by: str, source: str,
                      tokenizer_path: Optional[str] = None, loaded_from: Optional[str] = None) -> None:
    """Write the index, model.yaml, metadata, tokenizer and Hugging Face side files of a checkpoint."""
    folder = Path(folder)
    expected = expected_tensors(model)
    if set(weight_map) != set(expected):
        missing = sorted(set(expected) - set(weight_map))
        raise RuntimeError(f"checkpoint {folder}: tensors not written: {missing[:3]}")
    total = 0
    for fname in sorted(set(weight_map.values())):
        for dt, shape in read_header(folder / fname).values():
            total += _numel(shape) * torch.empty((), dtype=dt).element_size()
    write_index(folder, weight_map, total)
    write_model_config(folder, model)
    hf_config = False
    if loaded_from is not None and (Path(loaded_from) / HF_DIR).is_dir():
        shutil.copytree(Path(loaded_from) / HF_DIR, folder / HF_DIR, dirs_exist_ok=True)
        hf_config = (folder / HF_DIR / "config.json").is_file()
    if tokenizer_path:
        copy_tokenizer_files(Path(tokenizer_path), folder)
    write_meta(folder, dtype, created_by, source, hf_config)
