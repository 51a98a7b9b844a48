"""The backend's side of a checkpoint: which tensors a model has, and loading and saving them at
any TP x PP layout (each rank reads only its own rows and columns; saving gathers over TP and
writes one shard per pipeline stage)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from scalebio.checkpointing import CheckpointError

from .outdir import copy_tokenizer_files
from .tensorio import StreamWriter, TensorDir, read_header, shard_file_name, write_index

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
    from .checkpoint import open_checkpoint  # (the metadata module imports this one)

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
    from .checkpoint import HF_DIR, write_meta, write_model_config

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
