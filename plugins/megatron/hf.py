"""Hugging Face <-> scalebio Megatron checkpoints, for every model family.

What depends on the family (the config.json map, the tensor names and layouts) is the family
adapter's (plugins/megatron/families/); this module reads and writes the files. Each direction
streams: one output tensor is built from its source tensors and written before the next is read.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from . import families
from .checkpoint import (DEFAULT_SHARD_BYTES, HF_DIR, MODEL_FILE, CheckpointError, Entry, TensorDir, arch_differences,
                         atomic_dir, check_output, copy_tokenizer_files, dtype_name, expected_tensors, open_checkpoint,
                         parse_dtype, read_meta, write_meta, write_model_config, write_tensors)
from .families.base import dims, window_layers
from .families.rope import rope_summary
from .layout import split_problems

# --------------------------------------------------------------------------- config.json -> ModelConfig


def read_hf_config(hf_dir) -> tuple:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise CheckpointError(f"Hugging Face directory {hf_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None


def detect_family(cfg: dict, where) -> str:
    return families.from_hf_config(cfg, where).name


def derive_model_config(cfg: dict, where, name: Optional[str] = None) -> dict:
    """ModelConfig fields (megatron-core names) of a Hugging Face config.json. Rejects, naming the
    field, anything the Megatron model would compute differently."""
    family = families.from_hf_config(cfg, where)
    return dict(family.from_hf(cfg, where), name=name or family.name)


def build_model_config(fields: dict, where):
    from scalebio.config import ModelConfig, parse

    return parse(ModelConfig, fields, lambda p: str(where), ())


def hf_config_from_model(model) -> dict:
    """A config.json for a ModelConfig that has none stored (e.g. a model trained from scratch)."""
    return families.get(model.family).to_hf(model)


def check_representable(model) -> None:
    """Reject ModelConfigs that no supported Hugging Face class can express."""
    problems = families.get(model.family).problems(model)
    if problems:
        raise CheckpointError(f"model {model.name} (family {model.family}) cannot be written as a Hugging Face "
                              f"model: " + "; ".join(problems))


# --------------------------------------------------------------------------- hf -> megatron


def hf_to_megatron(hf_dir, out, model_name: Optional[str] = None, tp: int = 1, pp: int = 1,
                   dtype: Optional[str] = None, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   progress: bool = True, log=print) -> dict:
    """Convert a Hugging Face directory (config.json + safetensors) to a scalebio checkpoint."""
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    cfg, cfg_path = read_hf_config(hf_dir)
    check_output(out, overwrite, "checkpoint", inputs=(hf_dir,))
    fields = derive_model_config(cfg, cfg_path, name=None)
    named = None
    if model_name is not None:
        from scalebio.config import load_model

        named, named_path = load_model(model_name)
        diff = arch_differences(named, fields)
        if diff:
            lines = "; ".join(f"{k}: {a!r} in {named_path} but {b!r} from {cfg_path}" for k, a, b in diff)
            raise CheckpointError(f"--model {model_name} does not match {cfg_path}: {lines}")
    else:
        named, named_path = _matching_model(fields)
    if named is not None:  # keep the config's name and suggested settings, with the checkpoint's sizes
        fields = dict(fields, name=named.name if named.name != "unnamed" else Path(named_path).stem,
                      defaults=dict(named.defaults), hf_name=named.hf_name, max_sequence_length=named.max_sequence_length
                      if fields["position_embedding_type"] == "rope" else fields["max_sequence_length"],
                      init_method_std=named.init_method_std)
    else:
        fields["name"] = hf_dir.resolve().name
    _check_layout(fields, tp, pp, cfg_path)
    if tp > 1 or pp > 1:
        defaults = dict(fields.get("defaults") or {})
        layout_keys = ("tp", "pp", "tensor_model_parallel_size", "pipeline_model_parallel_size")
        megatron = {k: v for k, v in (defaults.get("megatron") or {}).items() if k not in layout_keys}
        defaults["megatron"] = {**megatron, "tp": tp, "pp": pp}
        fields["defaults"] = defaults
    model = build_model_config(fields, cfg_path)

    src = TensorDir(hf_dir, "Hugging Face checkpoint")
    out_dtype = None if dtype is None else parse_dtype(dtype)
    entries = _plan_hf_to_megatron(model, src, out_dtype, hf_dir)
    stored_dtype = out_dtype or _common_dtype(entries)
    with atomic_dir(out, overwrite, "checkpoint", inputs=(hf_dir,), log=log) as tmp:
        summary = write_tensors(tmp, entries, max_shard_bytes, "hf-to-megatron" if progress else None)
        write_model_config(tmp, model)
        (tmp / HF_DIR).mkdir()
        shutil.copyfile(cfg_path, tmp / HF_DIR / "config.json")
        if (hf_dir / "generation_config.json").is_file():
            shutil.copyfile(hf_dir / "generation_config.json", tmp / HF_DIR / "generation_config.json")
        tokenizer = copy_tokenizer_files(hf_dir, tmp)
        write_meta(tmp, stored_dtype, "scalebio convert hf-to-megatron", str(hf_dir.resolve()), hf_config=True)
    summary.update(out=str(out), model=model.name, family=model.family, dtype=dtype_name(stored_dtype),
                   tokenizer=tokenizer, seconds=time.perf_counter() - t0)
    log(_summary_line("hf-to-megatron", summary, model))
    return summary


def _common_dtype(entries) -> torch.dtype:
    counts = {}
    for e in entries:
        counts[e.dtype] = counts.get(e.dtype, 0) + e.nbytes
    return max(counts, key=counts.get) if counts else torch.float32


def _matching_model(fields: dict):
    """The model_configs/ entry with exactly this architecture, if there is one."""
    from scalebio.config import available_models, load_model

    for name in available_models():
        try:
            named, path = load_model(name)
        except Exception:  # a broken YAML in model_configs/ is not this conversion's problem
            continue
        if not arch_differences(named, fields):
            return named, path
    return None, None


def _check_layout(fields: dict, tp: int, pp: int, where) -> None:
    problems = split_problems(fields["num_layers"], fields["num_attention_heads"],
                              fields.get("num_query_groups") or fields["num_attention_heads"], tp, pp)
    if problems:
        raise CheckpointError(f"{where}: layout TP={tp} PP={pp} is impossible for this model: " + "; ".join(problems))


def _plan_hf_to_megatron(model, src: TensorDir, out_dtype, hf_dir) -> list:
    names = src.names()
    family = families.get(model.family)
    mapping = family.hf_names(model, names)
    expected = expected_tensors(model)
    used = set()
    entries = []
    tied = model.share_embeddings_and_output_weights
    for mname, shape in expected.items():
        sources = mapping[mname]
        shapes = family.hf_shapes(model, mname, shape)
        for s, sh in zip(sources, shapes):
            if s not in src:
                raise CheckpointError(f"Hugging Face checkpoint {hf_dir}: tensor {s} is missing (needed for {mname})")
            if src.shape(s) != tuple(sh):
                raise CheckpointError(f"Hugging Face checkpoint {hf_dir}: {s} has shape {list(src.shape(s))}, "
                                      f"config.json implies {list(sh)}")
        dtypes = {src.dtype(s) for s in sources}
        if len(dtypes) > 1:
            raise CheckpointError(f"Hugging Face checkpoint {hf_dir}: {', '.join(sources)} have different dtypes "
                                  f"({', '.join(sorted(dtype_name(d) for d in dtypes))}); they are fused into {mname}")
        used.update(sources)
        dt = out_dtype or dtypes.pop()

        def produce(mname=mname, sources=sources):
            return family.to_megatron(model, mname, [src.get(s) for s in sources])

        entries.append(Entry(mname, dt, tuple(shape), produce))
    if tied and "lm_head.weight" in src:
        # some tied checkpoints store the head anyway; it must be the embedding, or tying is wrong
        emb = mapping["embedding.word_embeddings.weight"][0]
        if not torch.equal(src.get("lm_head.weight"), src.get(emb)):
            raise CheckpointError(f"{hf_dir}: tie_word_embeddings is true but lm_head.weight differs from {emb}")
        used.add("lm_head.weight")
    unused = [n for n in names if n not in used and not family.ignored_hf(n)]
    if unused:
        raise CheckpointError(f"Hugging Face checkpoint {hf_dir}: tensors that config.json does not account for: "
                              f"{', '.join(unused[:5])}" + (f" and {len(unused) - 5} more" if len(unused) > 5 else ""))
    return entries


# --------------------------------------------------------------------------- megatron -> hf


def megatron_to_hf(ckpt, out, dtype: Optional[str] = None, overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, log=print) -> dict:
    """Convert a scalebio checkpoint to a Hugging Face directory loadable by AutoModelForCausalLM."""
    t0 = time.perf_counter()
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    check_output(out, overwrite, "huggingface", inputs=(ckpt,))
    src, model = open_checkpoint(ckpt)
    check_representable(model)
    stored_cfg = ckpt / HF_DIR / "config.json"
    if meta.get("hf_config") and stored_cfg.is_file():
        stored = json.loads(stored_cfg.read_text())
        # the stored config must still describe these weights (model.yaml is what the run used)
        derived = derive_model_config(stored, stored_cfg)
        diff = arch_differences(model, derived)
        if diff:
            lines = "; ".join(f"{k}: {a!r} in {ckpt / MODEL_FILE} but {b!r} in {stored_cfg}" for k, a, b in diff)
            raise CheckpointError(f"checkpoint {ckpt}: {lines}")
        cfg = families.get(model.family).export_config(stored)
    else:
        cfg = hf_config_from_model(model)
    out_dtype = None if dtype is None else parse_dtype(dtype)
    entries = _plan_megatron_to_hf(model, src, out_dtype)
    final_dtype = out_dtype or _common_dtype(entries)
    for key in ("torch_dtype", "dtype"):
        if key in cfg and cfg[key] != dtype_name(final_dtype):
            cfg[key] = dtype_name(final_dtype)
    if "torch_dtype" not in cfg and "dtype" not in cfg:
        cfg["torch_dtype"] = dtype_name(final_dtype)
    with atomic_dir(out, overwrite, "huggingface", inputs=(ckpt,), log=log) as tmp:
        summary = write_tensors(tmp, entries, max_shard_bytes, "megatron-to-hf" if progress else None)
        if stored_cfg.is_file() and meta.get("hf_config") and cfg == json.loads(stored_cfg.read_text()):
            shutil.copyfile(stored_cfg, tmp / "config.json")  # byte for byte what it was
        else:
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = ckpt / HF_DIR / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, tmp / "generation_config.json")
        tokenizer = copy_tokenizer_files(ckpt, tmp)
    summary.update(out=str(out), model=model.name, family=model.family, dtype=dtype_name(final_dtype),
                   tokenizer=tokenizer, seconds=time.perf_counter() - t0)
    log(_summary_line("megatron-to-hf", summary, model))
    return summary


def _plan_megatron_to_hf(model, src: TensorDir, out_dtype) -> list:
    family = families.get(model.family)
    mapping = family.hf_names(model)
    entries = []
    last = {}  # the Megatron tensor read last: q, k and v (gate and up) come one after the other from it

    def read(mname):
        if mname not in last:
            last.clear()
            last[mname] = src.get(mname)
        return last[mname]

    for mname, shape in expected_tensors(model).items():
        hf_names = mapping[mname]
        shapes = family.hf_shapes(model, mname, shape)
        dt = out_dtype or src.dtype(mname)
        for k, (hname, hshape) in enumerate(zip(hf_names, shapes)):
            def produce(mname=mname, k=k):
                return family.from_megatron(model, mname, read(mname))[k]

            entries.append(Entry(hname, dt, tuple(hshape), produce))
    return entries


def _summary_line(what: str, s: dict, model) -> str:
    heads, groups, hd = dims(model)
    gib = s["bytes"] / 1024**3
    return (f"{what}: wrote {s['tensors']} tensors ({gib:.2f} GiB, {s['dtype']}) in {s['files']} safetensors "
            f"file(s) to {s['out']} in {s['seconds']:.1f} s\n"
            f"  model {model.name}: family {model.family}, {model.num_layers} layers, hidden {model.hidden_size}, "
            f"{heads} heads / {groups} kv groups (head dim {hd}), ffn {model.ffn_hidden_size}, vocab "
            f"{model.vocab_size}, tied embeddings {model.share_embeddings_and_output_weights}"
            + rope_summary(model)
            + (f", sliding window {model.window_size[0] + 1} on {sum(window_layers(model))} of {model.num_layers} "
               f"layers" if model.window_size else "")
            + families.get(model.family).describe(model)
            + f"\n  tokenizer files: {', '.join(s['tokenizer']) or 'none'}")
