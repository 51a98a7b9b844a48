"""Hugging Face <-> scalebio Megatron checkpoints, per model family.

Families: Qwen2/Qwen2.5 (``Qwen2ForCausalLM``), Llama-2/3/3.1 (``LlamaForCausalLM``, including the
``llama3`` RoPE scaling), Mistral (``MistralForCausalLM``, including sliding-window attention) and
GPT-2 (``GPT2LMHeadModel``). Gemma, Gemma-2 and Gemma-3 are rejected with the features megatron-core's
GPTModel does not have. Each direction streams: one output tensor is built from its source tensors
and written before the next is read.

Layouts (megatron-core local spec, full tensors):
- ``linear_qkv`` is grouped per query group: for each of the ``g`` groups, its ``h/g`` query heads,
  then its key head, then its value head (rows of ``head_dim`` each);
- ``linear_fc1`` of SwiGLU is ``[gate; up]``;
- GPT-2's ``Conv1D`` stores ``[in, out]`` (``y = x W + b``); Megatron's linear layers ``[out, in]``.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import (DEFAULT_SHARD_BYTES, HF_DIR, MODEL_FILE, CheckpointError, Entry, TensorDir, arch_differences,
                         atomic_dir, copy_tokenizer_files, dtype_name, expected_tensors, open_checkpoint,
                         parse_dtype, read_meta, write_meta, write_model_config, write_tensors)
from .layout import split_problems

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "GPT2LMHeadModel": "gpt2"}
HF_CLASS = {family: arch for arch, family in ARCHITECTURES.items()}
MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama", "mistral": "mistral", "gpt2": "gpt2"}
# tensors some checkpoints carry that are not weights (rotary tables, GPT-2's causal-mask buffers)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


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


def _gemma_rejection(cfg: dict, where) -> str:
    feats = []
    if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
        feats.append(f"logit soft-capping (attention {cfg.get('attn_logit_softcapping')}, final "
                     f"{cfg.get('final_logit_softcapping')})")
    if cfg.get("sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
        feats.append(f"sliding-window attention on alternating layers (window {cfg.get('sliding_window')})")
    if cfg.get("model_type") in ("gemma2", "gemma3", "gemma3_text"):
        feats.append("extra post-attention and post-feedforward norms on every layer")
    if cfg.get("query_pre_attn_scalar"):
        feats.append(f"attention scale 1/sqrt(query_pre_attn_scalar={cfg.get('query_pre_attn_scalar')})")
    feats += ["RMSNorm with (1 + weight)", "embeddings scaled by sqrt(hidden_size)"]
    return (f"{where}: {cfg.get('architectures', [cfg.get('model_type')])[0]} is not supported: megatron-core's "
            f"GPTModel has no " + "; no ".join(feats) + ". Converting it would give a model that loads but computes "
            f"something else, so scalebio refuses. Supported: {', '.join(sorted(ARCHITECTURES))}")


def detect_family(cfg: dict, where) -> str:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if any(a.startswith("Gemma") for a in archs) or (model_type or "").startswith("gemma"):
        raise CheckpointError(_gemma_rejection(cfg, where))
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    if not archs and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    what = f"architecture {archs[0]}" if archs else f"model_type {model_type!r}"
    raise CheckpointError(f"{where}: unknown {what}; supported: {', '.join(sorted(ARCHITECTURES))} "
                          f"(Qwen2/Qwen2.5, Llama-2/3/3.1, Mistral, GPT-2)")


def _rope(cfg: dict, where) -> dict:
    """RoPE fields from either config.json style: legacy ``rope_theta`` + ``rope_scaling``, or
    ``rope_parameters`` (transformers 5)."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    out = {"rotary_base": float(theta), "rope_scaling": False}
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{where}: partial_rotary_factor={partial} is not supported (Llama-style models "
                              f"rotate the whole head)")
    if kind == "default":
        return out
    if kind == "llama3":
        try:
            out.update(rope_scaling=True, rope_scaling_factor=float(params["factor"]),
                       rope_scaling_low_freq_factor=float(params["low_freq_factor"]),
                       rope_scaling_high_freq_factor=float(params["high_freq_factor"]),
                       rope_scaling_original_max_position_embeddings=int(params["original_max_position_embeddings"]))
        except KeyError as exc:
            raise CheckpointError(f"{where}: rope scaling of type llama3 needs {exc.args[0]}") from None
        return out
    raise CheckpointError(f"{where}: rope scaling type {kind!r} is not supported (supported: default, llama3)")


def derive_model_config(cfg: dict, where, name: Optional[str] = None) -> dict:
    """ModelConfig fields (megatron-core names) of a Hugging Face config.json. Rejects, naming the
    field, anything the Megatron model would compute differently."""
    family = detect_family(cfg, where)

    def need(key):
        if key not in cfg:
            raise CheckpointError(f"{where}: missing {key!r}")
        return cfg[key]

    if family == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
        if act not in acts:
            raise CheckpointError(f"{where}: activation_function={act!r} is not supported (gelu_new, gelu)")
        for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                        ("add_cross_attention", False)):
            if cfg.get(key, ok) != ok:
                raise CheckpointError(f"{where}: {key}={cfg[key]} is not supported by megatron-core's GPTModel")
        h = need("n_embd")
        return dict(
            name=name or "gpt2", family="gpt2", num_layers=need("n_layer"), hidden_size=h,
            num_attention_heads=need("n_head"), num_query_groups=None, kv_channels=None,
            ffn_hidden_size=cfg.get("n_inner") or 4 * h, vocab_size=need("vocab_size"),
            max_sequence_length=need("n_positions"), normalization="LayerNorm",
            layernorm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)), activation=acts[act],
            add_qkv_bias=False, add_bias_linear=True, position_embedding_type="learned_absolute",
            share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", True)),
        )

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported for {family} (silu: SwiGLU)")
    h, heads = need("hidden_size"), need("num_attention_heads")
    groups = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    if family == "qwen2":
        qkv_bias, bias_linear = True, False
        if cfg.get("use_sliding_window"):
            raise CheckpointError(f"{where}: use_sliding_window=true (sliding window on layers from "
                                  f"max_window_layers={cfg.get('max_window_layers')}) is not supported")
    else:
        attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise CheckpointError(f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                                  f"(megatron-core has biases on all linear layers or on none)")
        qkv_bias, bias_linear = False, attn_bias
    window = None
    if family == "mistral" and cfg.get("sliding_window") is not None:
        window = (int(cfg["sliding_window"]) - 1, 0)  # HF: a query sees itself and the W-1 tokens before it
    if family != "mistral" and "sliding_attention" in (cfg.get("layer_types") or []):
        raise CheckpointError(f"{where}: layer_types has sliding_attention layers; not supported for {family}")
    out = dict(
        name=name or family, family=family, num_layers=need("num_hidden_layers"), hidden_size=h,
        num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim if head_dim != h // heads else None,
        ffn_hidden_size=need("intermediate_size"), vocab_size=need("vocab_size"),
        max_sequence_length=int(cfg.get("max_position_embeddings", 2048)), normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)), activation="swiglu", add_qkv_bias=qkv_bias,
        add_bias_linear=bias_linear, position_embedding_type="rope", rotary_percent=1.0,
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)), window_size=window,
    )
    out.update(_rope(cfg, where))
    return out


def build_model_config(fields: dict, where):
    from scalebio.config import ModelConfig, parse

    return parse(ModelConfig, fields, lambda p: str(where), ())


def hf_config_from_model(model) -> dict:
    """A config.json for a ModelConfig that has none stored (e.g. a model trained from scratch)."""
    family = model.family
    if family not in HF_CLASS:
        raise CheckpointError(f"model family {family!r} has no Hugging Face mapping; supported: "
                              f"{', '.join(sorted(HF_CLASS))}")
    if family == "gpt2":
        cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": model.num_layers,
               "n_embd": model.hidden_size, "n_head": model.num_attention_heads,
               "n_inner": model.ffn_hidden_size, "vocab_size": model.vocab_size,
               "n_positions": model.max_sequence_length, "layer_norm_epsilon": model.layernorm_epsilon,
               "activation_function": {"gelu_tanh": "gelu_new", "gelu": "gelu"}[model.activation],
               "tie_word_embeddings": model.share_embeddings_and_output_weights,
               "scale_attn_weights": True, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
        return cfg
    heads = model.num_attention_heads
    cfg = {"architectures": [HF_CLASS[family]], "model_type": family, "num_hidden_layers": model.num_layers,
           "hidden_size": model.hidden_size, "num_attention_heads": heads,
           "num_key_value_heads": model.num_query_groups or heads,
           "head_dim": model.kv_channels or model.hidden_size // heads, "intermediate_size": model.ffn_hidden_size,
           "vocab_size": model.vocab_size, "max_position_embeddings": model.max_sequence_length,
           "rms_norm_eps": model.layernorm_epsilon, "hidden_act": "silu", "rope_theta": model.rotary_base,
           "tie_word_embeddings": model.share_embeddings_and_output_weights, "attention_dropout": 0.0}
    if family in ("llama", "mistral"):
        cfg.update(attention_bias=model.add_bias_linear, mlp_bias=model.add_bias_linear)
    if family == "mistral":
        cfg["sliding_window"] = None if model.window_size is None else model.window_size[0] + 1
    if family == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None)
    if model.rope_scaling:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": model.rope_scaling_factor,
                               "low_freq_factor": model.rope_scaling_low_freq_factor,
                               "high_freq_factor": model.rope_scaling_high_freq_factor,
                               "original_max_position_embeddings":
                                   model.rope_scaling_original_max_position_embeddings}
    return cfg


def check_representable(model) -> None:
    """Reject ModelConfigs that no supported Hugging Face class can express."""
    problems = []
    if model.family == "gpt2":
        if (model.normalization, model.position_embedding_type, model.add_bias_linear) != \
                ("LayerNorm", "learned_absolute", True) or model.activation not in ("gelu", "gelu_tanh"):
            problems.append("GPT-2 needs LayerNorm, learned positions, biases and GELU")
        if model.num_query_groups not in (None, model.num_attention_heads) or model.kv_channels not in \
                (None, model.hidden_size // model.num_attention_heads):
            problems.append("GPT-2 has plain multi-head attention")
    else:
        if (model.normalization, model.activation, model.position_embedding_type) != ("RMSNorm", "swiglu", "rope"):
            problems.append(f"{model.family} needs RMSNorm, SwiGLU and RoPE")
        if model.family == "qwen2" and (not model.add_qkv_bias or model.add_bias_linear):
            problems.append("Qwen2 has biases on Q, K, V only (add_qkv_bias true, add_bias_linear false)")
        if model.family in ("llama", "mistral") and model.add_qkv_bias and not model.add_bias_linear:
            problems.append(f"{model.family} has no Q/K/V-only bias")
        if model.rotary_percent != 1.0:
            problems.append("rotary_percent must be 1.0")
        if model.window_size is not None and model.family != "mistral":
            problems.append("only Mistral has sliding-window attention")
    if model.window_size is not None and model.family == "gpt2":
        problems.append("GPT-2 has no sliding-window attention")
    if problems:
        raise CheckpointError(f"model {model.name} (family {model.family}) cannot be written as a Hugging Face "
                              f"model: " + "; ".join(problems))


# --------------------------------------------------------------------------- tensor maps


def _dims(model):
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    hd = model.kv_channels or model.hidden_size // heads
    return heads, groups, hd


def _hf_names(model, prefix: str) -> dict:
    """Megatron name -> the Hugging Face name(s) it is made of, for one family."""
    L = model.num_layers
    out = {}
    if model.family == "gpt2":
        t = prefix
        out["embedding.word_embeddings.weight"] = [f"{t}wte.weight"]
        out["embedding.position_embeddings.weight"] = [f"{t}wpe.weight"]
        for i in range(L):
            m, h = f"decoder.layers.{i}.", f"{t}h.{i}."
            out.update({
                m + "input_layernorm.weight": [h + "ln_1.weight"], m + "input_layernorm.bias": [h + "ln_1.bias"],
                m + "self_attention.linear_qkv.weight": [h + "attn.c_attn.weight"],
                m + "self_attention.linear_qkv.bias": [h + "attn.c_attn.bias"],
                m + "self_attention.linear_proj.weight": [h + "attn.c_proj.weight"],
                m + "self_attention.linear_proj.bias": [h + "attn.c_proj.bias"],
                m + "pre_mlp_layernorm.weight": [h + "ln_2.weight"], m + "pre_mlp_layernorm.bias": [h + "ln_2.bias"],
                m + "mlp.linear_fc1.weight": [h + "mlp.c_fc.weight"], m + "mlp.linear_fc1.bias": [h + "mlp.c_fc.bias"],
                m + "mlp.linear_fc2.weight": [h + "mlp.c_proj.weight"],
                m + "mlp.linear_fc2.bias": [h + "mlp.c_proj.bias"],
            })
        out["decoder.final_layernorm.weight"] = [f"{t}ln_f.weight"]
        out["decoder.final_layernorm.bias"] = [f"{t}ln_f.bias"]
    else:
        out["embedding.word_embeddings.weight"] = ["model.embed_tokens.weight"]
        for i in range(L):
            m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            a = h + "self_attn."
            out.update({
                m + "input_layernorm.weight": [h + "input_layernorm.weight"],
                m + "self_attention.linear_qkv.weight": [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                m + "self_attention.linear_qkv.bias": [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"],
                m + "self_attention.linear_proj.weight": [a + "o_proj.weight"],
                m + "self_attention.linear_proj.bias": [a + "o_proj.bias"],
                m + "pre_mlp_layernorm.weight": [h + "post_attention_layernorm.weight"],
                m + "mlp.linear_fc1.weight": [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
                m + "mlp.linear_fc1.bias": [h + "mlp.gate_proj.bias", h + "mlp.up_proj.bias"],
                m + "mlp.linear_fc2.weight": [h + "mlp.down_proj.weight"],
                m + "mlp.linear_fc2.bias": [h + "mlp.down_proj.bias"],
            })
        out["decoder.final_layernorm.weight"] = ["model.norm.weight"]
    out["output_layer.weight"] = ["lm_head.weight"]
    expected = expected_tensors(model)
    return {k: v for k, v in out.items() if k in expected}


def _hf_shapes(model, mname: str, mshape: tuple) -> list:
    """Shapes of the Hugging Face tensors a Megatron tensor is made of."""
    heads, groups, hd = _dims(model)
    if model.family == "gpt2":
        if mname.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")):
            return [(mshape[1], mshape[0])]  # Conv1D: [in, out]
        return [mshape]
    if mname.endswith("linear_qkv.weight"):
        return [(heads * hd, mshape[1]), (groups * hd, mshape[1]), (groups * hd, mshape[1])]
    if mname.endswith("linear_qkv.bias"):
        return [(heads * hd,), (groups * hd,), (groups * hd,)]
    if mname.endswith("linear_fc1.weight"):
        return [(model.ffn_hidden_size, mshape[1])] * 2
    if mname.endswith("linear_fc1.bias"):
        return [(model.ffn_hidden_size,)] * 2
    return [mshape]


def _group_rows(model):
    """(which of q/k/v, start, stop) row ranges, in Megatron's grouped QKV order."""
    heads, groups, hd = _dims(model)
    qpg = heads // groups
    for g in range(groups):
        yield 0, g * qpg * hd, (g + 1) * qpg * hd
        yield 1, g * hd, (g + 1) * hd
        yield 2, g * hd, (g + 1) * hd


def _to_megatron(model, mname: str, tensors: list) -> list:
    """Parts (in row-major order) of a Megatron tensor from its Hugging Face tensors."""
    heads, groups, hd = _dims(model)
    if model.family == "gpt2":
        t = tensors[0]
        if mname.endswith(("linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")):
            return [t.t().contiguous()]
        if mname.endswith("linear_qkv.weight") or mname.endswith("linear_qkv.bias"):
            if mname.endswith("weight"):
                t = t.t().contiguous()  # [3h, h]: rows q, k, v
            h = model.hidden_size
            q, k, v = t[:h], t[h:2 * h], t[2 * h:]
            return [x[n * hd:(n + 1) * hd] for n in range(heads) for x in (q, k, v)]
        return [t]
    if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return [tensors[which][a:b] for which, a, b in _group_rows(model)]
    if mname.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return list(tensors)  # [gate; up]
    return [tensors[0]]


def _from_megatron(model, mname: str, t: torch.Tensor) -> list:
    """The Hugging Face tensors (each as a list of row-major parts) of one Megatron tensor."""
    heads, groups, hd = _dims(model)
    if model.family == "gpt2":
        if mname.endswith(("linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")):
            return [[t.t().contiguous()]]
        if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            rest = tuple(t.shape[1:])
            qkv = t.reshape((heads, 3, hd) + rest).transpose(0, 1).reshape((3 * heads * hd,) + rest)
            return [[qkv.t().contiguous() if mname.endswith("weight") else qkv.contiguous()]]
        return [[t]]
    if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        # rows of group g sit at offset g * (q rows + 2 * hd) in the fused tensor
        qpg = heads // groups
        per_group = (qpg + 2) * hd
        out = [[], [], []]
        for g in range(groups):
            base = g * per_group
            out[0].append(t[base: base + qpg * hd])
            out[1].append(t[base + qpg * hd: base + (qpg + 1) * hd])
            out[2].append(t[base + (qpg + 1) * hd: base + per_group])
        return out
    if mname.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        n = model.ffn_hidden_size
        return [[t[:n]], [t[n:]]]
    return [[t]]


def _prefix_of(names: list) -> str:
    """GPT-2 checkpoints name tensors ``transformer.h.0...`` (GPT2LMHeadModel) or ``h.0...`` (GPT2Model)."""
    return "transformer." if any(n.startswith("transformer.") for n in names) else ""


def _ignored(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) and not name.endswith("c_attn.bias")


# --------------------------------------------------------------------------- hf -> megatron


def hf_to_megatron(hf_dir, out, model_name: Optional[str] = None, tp: int = 1, pp: int = 1,
                   dtype: Optional[str] = None, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   progress: bool = True, log=print) -> dict:
    """Convert a Hugging Face directory (config.json + safetensors) to a scalebio checkpoint."""
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    cfg, cfg_path = read_hf_config(hf_dir)
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
    with atomic_dir(out, overwrite) as tmp:
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
    prefix = _prefix_of(names) if model.family == "gpt2" else ""
    mapping = _hf_names(model, prefix)
    expected = expected_tensors(model)
    used = set()
    entries = []
    tied = model.share_embeddings_and_output_weights
    for mname, shape in expected.items():
        sources = mapping[mname]
        shapes = _hf_shapes(model, mname, shape)
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
            return _to_megatron(model, mname, [src.get(s) for s in sources])

        entries.append(Entry(mname, dt, tuple(shape), produce))
    if tied and "lm_head.weight" in src:
        # some tied checkpoints store the head anyway; it must be the embedding, or tying is wrong
        emb = "model.embed_tokens.weight" if model.family != "gpt2" else f"{prefix}wte.weight"
        if not torch.equal(src.get("lm_head.weight"), src.get(emb)):
            raise CheckpointError(f"{hf_dir}: tie_word_embeddings is true but lm_head.weight differs from {emb}")
        used.add("lm_head.weight")
    unused = [n for n in names if n not in used and not _ignored(n)]
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
    src, model = open_checkpoint(ckpt)
    check_representable(model)
    stored_cfg = ckpt / HF_DIR / "config.json"
    if meta.get("hf_config") and stored_cfg.is_file():
        cfg = json.loads(stored_cfg.read_text())
        # the stored config must still describe these weights (model.yaml is what the run used)
        derived = derive_model_config(cfg, stored_cfg)
        diff = arch_differences(model, derived)
        if diff:
            lines = "; ".join(f"{k}: {a!r} in {ckpt / MODEL_FILE} but {b!r} in {stored_cfg}" for k, a, b in diff)
            raise CheckpointError(f"checkpoint {ckpt}: {lines}")
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
    with atomic_dir(out, overwrite) as tmp:
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
    mapping = _hf_names(model, "transformer." if model.family == "gpt2" else "")
    entries = []
    last = {}  # the Megatron tensor read last: q, k and v (gate and up) come one after the other from it

    def read(mname):
        if mname not in last:
            last.clear()
            last[mname] = src.get(mname)
        return last[mname]

    for mname, shape in expected_tensors(model).items():
        hf_names = mapping[mname]
        shapes = _hf_shapes(model, mname, shape)
        dt = out_dtype or src.dtype(mname)
        for k, (hname, hshape) in enumerate(zip(hf_names, shapes)):
            def produce(mname=mname, k=k):
                return _from_megatron(model, mname, read(mname))[k]

            entries.append(Entry(hname, dt, tuple(hshape), produce))
    return entries


def _summary_line(what: str, s: dict, model) -> str:
    heads, groups, hd = _dims(model)
    gib = s["bytes"] / 1024**3
    return (f"{what}: wrote {s['tensors']} tensors ({gib:.2f} GiB, {s['dtype']}) in {s['files']} safetensors "
            f"file(s) to {s['out']} in {s['seconds']:.1f} s\n"
            f"  model {model.name}: family {model.family}, {model.num_layers} layers, hidden {model.hidden_size}, "
            f"{heads} heads / {groups} kv groups (head dim {hd}), ffn {model.ffn_hidden_size}, vocab "
            f"{model.vocab_size}, tied embeddings {model.share_embeddings_and_output_weights}"
            + (f", rope theta {model.rotary_base:g}" if model.position_embedding_type == "rope" else "")
            + (f", llama3 rope scaling x{model.rope_scaling_factor:g}" if model.rope_scaling else "")
            + (f", sliding window {model.window_size[0] + 1}" if model.window_size else "")
            + f"\n  tokenizer files: {', '.join(s['tokenizer']) or 'none'}")
