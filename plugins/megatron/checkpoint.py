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

Where things are: this module holds the metadata (``scalebio_checkpoint.json``, ``model.yaml``) and
the check of a checkpoint against a model; ``tensorio.py`` the safetensors files, ``outdir.py`` the
output directories of a conversion, ``weights.py`` loading and saving at a TP x PP layout. Everything
is plain torch + safetensors; megatron-core is imported only by the loader and saver, which run
inside the backend.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from scalebio.checkpointing import CheckpointError

# the pieces, re-exported here: callers read and write checkpoints through this module
from .outdir import TOKENIZER_FILES, atomic_dir, check_output, copy_tokenizer_files
from .tensorio import (DEFAULT_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, Entry, StreamWriter, TensorDir, dtype_name,
                       parse_dtype, plan_shards, read_header, shard_file_name, write_index, write_tensors)
from .weights import (canonical_name, expected_tensors, finish_checkpoint, is_vocab_tensor, load_weights_,
                      read_shard, save_weights, tp_split_of)

__all__ = ["CheckpointError", "TOKENIZER_FILES", "atomic_dir", "check_output", "copy_tokenizer_files",
           "DEFAULT_SHARD_BYTES", "INDEX_FILE", "SINGLE_FILE", "Entry", "StreamWriter", "TensorDir", "dtype_name",
           "parse_dtype", "plan_shards", "read_header", "shard_file_name", "write_index", "write_tensors",
           "canonical_name", "expected_tensors", "finish_checkpoint", "is_vocab_tensor", "load_weights_",
           "read_shard", "save_weights", "tp_split_of"]

FORMAT = "scalebio-megatron"
FORMAT_VERSION = 1
META_FILE = "scalebio_checkpoint.json"
MODEL_FILE = "model.yaml"
HF_DIR = "hf"  # Hugging Face side files kept for the way back (config.json, generation_config.json)


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
