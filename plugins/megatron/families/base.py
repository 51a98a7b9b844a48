"""What every model family adapter provides, with the defaults of a standard GPT decoder layer.

A family adapter holds everything that depends on the architecture family (``ModelConfig.family``):

- the map between a Hugging Face ``config.json`` and ModelConfig fields, both ways, and what a
  family cannot express (:meth:`Family.from_hf`, :meth:`Family.to_hf`, :meth:`Family.problems`);
- the checkpoint's tensors (megatron-core local-spec names with global layer numbers, full
  shapes) and how tensor parallelism splits them (:meth:`Family.expected_tensors`,
  :meth:`Family.tp_split_of`);
- the Hugging Face <-> Megatron tensor names and layouts (:meth:`Family.hf_names`,
  :meth:`Family.to_megatron`, :meth:`Family.from_megatron`);
- the megatron-core layer spec, local and Transformer Engine, and anything the GPTModel needs
  beyond it (:meth:`Family.layer_spec`, :meth:`Family.final_norm`, :meth:`Family.customize`);
- a tiny configuration for the parity tests (:meth:`Family.toy_config`).

Nothing here imports megatron-core at import time: conversion runs without it, and the
building blocks in ``layers.py`` are imported when a model is built.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checkpoint import CheckpointError

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
GATED = ("swiglu", "geglu_tanh")


def is_gated(activation: str) -> bool:
    return activation in GATED


def dims(model) -> tuple:
    """(query heads, key/value groups, head dimension)."""
    heads = model.num_attention_heads
    return heads, model.num_query_groups or heads, model.kv_channels or model.hidden_size // heads


def need(cfg: dict, key: str, where):
    if key not in cfg:
        raise CheckpointError(f"{where}: missing {key!r}")
    return cfg[key]


class Family:
    """The defaults describe megatron-core's standard GPT layer; subclasses override what differs."""

    name = ""
    hf_architectures: tuple = ()  # config.json "architectures" read as this family; the first is written
    model_types: tuple = ()  # "model_type" values, used when "architectures" is absent
    description = ""  # e.g. "Qwen2/Qwen2.5", for the list of supported families
    ignored_suffixes: tuple = ("rotary_emb.inv_freq",)  # non-weight tensors some checkpoints carry
    toy_tokenizer = "bpe"  # the parity tests' tokenizer: "bpe" (tokenizer.json) or "sentencepiece"
    # Transformer Engine's attention computes this family's attention (False: the local core attention
    # runs under TE too, keeping the s^2 scores; the memory planner counts them)
    te_core_attention = True

    # ------------------------------------------------------------------ config.json <-> ModelConfig

    def from_hf(self, cfg: dict, where) -> dict:
        """ModelConfig fields (megatron-core names) of a config.json; rejects, naming the field, anything
        the Megatron model would compute differently."""
        raise NotImplementedError

    def to_hf(self, model) -> dict:
        """A config.json for a ModelConfig that has none stored (e.g. a model trained from scratch)."""
        raise NotImplementedError

    def problems(self, model) -> list:
        """Why ``model`` cannot be written as this family's Hugging Face model (empty: it can)."""
        return []

    def export_config(self, cfg: dict) -> dict:
        """The config.json to write for a stored source config (a family may modernise it)."""
        return cfg

    def toy_config(self) -> dict:
        """config.json fields of the tiny random model the parity tests build with transformers: every
        feature of the family switched on, sizes that make TP2 and PP2 meaningful."""
        raise NotImplementedError

    def describe(self, model) -> str:
        """Family-specific features for the conversion summary (", ..." or "")."""
        return ""

    # ------------------------------------------------------------------ the checkpoint's tensors

    def layer_tensors(self, model) -> dict:
        """Local name -> full shape of one decoder layer's tensors."""
        h = model.hidden_size
        heads, groups, hd = dims(model)
        f = model.ffn_hidden_size
        fc1 = f * (2 if is_gated(model.activation) else 1)
        layer = {
            "input_layernorm.weight": (h,),
            "self_attention.linear_qkv.weight": ((heads + 2 * groups) * hd, h),
            "self_attention.linear_proj.weight": (h, heads * hd),
            "pre_mlp_layernorm.weight": (h,),
            "mlp.linear_fc1.weight": (fc1, h),
            "mlp.linear_fc2.weight": (h, f),
        }
        if model.normalization == "LayerNorm":
            layer.update({"input_layernorm.bias": (h,), "pre_mlp_layernorm.bias": (h,)})
        if model.add_qkv_bias or model.add_bias_linear:
            layer["self_attention.linear_qkv.bias"] = ((heads + 2 * groups) * hd,)
        if model.add_bias_linear:
            layer.update({"self_attention.linear_proj.bias": (h,), "mlp.linear_fc1.bias": (fc1,),
                          "mlp.linear_fc2.bias": (h,)})
        return layer

    def expected_tensors(self, model) -> dict:
        """Global name -> full shape of every tensor a checkpoint of ``model`` holds. The vocabulary is
        not padded; a tied output layer is not stored (it is the embedding)."""
        h = model.hidden_size
        out = {EMBEDDING: (model.vocab_size, h)}
        if model.position_embedding_type == "learned_absolute":
            out["embedding.position_embeddings.weight"] = (model.max_sequence_length, h)
        layer = self.layer_tensors(model)
        for i in range(model.num_layers):
            out.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
        out["decoder.final_layernorm.weight"] = (h,)
        if model.normalization == "LayerNorm":
            out["decoder.final_layernorm.bias"] = (h,)
        if not model.share_embeddings_and_output_weights:
            out[OUTPUT] = (model.vocab_size, h)
        return out

    def tp_split_of(self, name: str, model) -> Optional[tuple]:
        """(dim, stride) of how megatron-core splits a tensor over TP ranks, or None when replicated.

        By name, because megatron-core tags parameters with their split only when it initialises them
        itself; the same rules as ColumnParallelLinear (dim 0), RowParallelLinear (weights on dim 1,
        bias replicated) and VocabParallelEmbedding (dim 0). A gated fc1 holds [gate; up] and each
        rank keeps its part of both: stride 2. Norms are replicated.
        """
        if name in (EMBEDDING, OUTPUT):
            return (0, 1)
        if name.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")):
            return (0, 1)
        if name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
            return (0, 2 if is_gated(model.activation) else 1)
        if name.endswith(("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")):
            return (1, 1)
        return None

    # ------------------------------------------------------------------ Hugging Face tensors

    def hf_names(self, model, source_names: Optional[list] = None) -> dict:
        """Megatron name -> the Hugging Face name(s) it is made of. ``source_names`` are the names of
        the checkpoint being read (None when writing one), for families whose uploads differ."""
        raise NotImplementedError

    def hf_shapes(self, model, mname: str, mshape: tuple) -> list:
        """Shapes of the Hugging Face tensors a Megatron tensor is made of."""
        return [mshape]

    def to_megatron(self, model, mname: str, tensors: list) -> list:
        """Parts (in row-major order) of a Megatron tensor from its Hugging Face tensors."""
        return [tensors[0]]

    def from_megatron(self, model, mname: str, t: torch.Tensor) -> list:
        """The Hugging Face tensors (each as a list of row-major parts) of one Megatron tensor."""
        return [[t]]

    def ignored_hf(self, name: str) -> bool:
        return name.endswith(self.ignored_suffixes)

    # ------------------------------------------------------------------ the megatron-core model

    def layer_spec(self, model, use_te: bool):
        """megatron-core's GPT layer spec (Transformer Engine or local), with the local core attention
        where the model needs what megatron's local softmax does not do right (a sliding window that
        keeps a given mask, soft-capping), (1 + w) norms on the local path, and the parallel-residual
        layer for ``parallel_residual``."""
        from megatron.core.models.gpt import gpt_layer_specs as specs

        from . import layers

        if use_te:
            spec = specs.get_gpt_layer_with_transformer_engine_spec()
            if model.attn_logit_softcapping is not None:
                spec.submodules.self_attention.submodules.core_attention = layers.core_attention(model)
        else:
            spec = specs.get_gpt_layer_local_spec(normalization=model.normalization)
            sub = spec.submodules
            if model.window_size is not None or model.attn_logit_softcapping is not None:
                sub.self_attention.submodules.core_attention = layers.core_attention(model)
            if model.layernorm_zero_centered_gamma:
                sub.input_layernorm = sub.pre_mlp_layernorm = layers.ZeroCenteredRMSNorm
        if model.parallel_residual:  # the same submodules, read in parallel (TE: the norms fused in)
            spec.module = layers.ParallelResidualLayer
        return spec

    def final_norm(self, model, use_te: bool):
        """The final norm's module class, or None for megatron-core's default."""
        if model.layernorm_zero_centered_gamma and not use_te:
            from . import layers

            return layers.ZeroCenteredRMSNorm
        return None

    def customize(self, chunk, model) -> None:
        """Adjust a built GPTModel chunk: RoPE scaling with the configured parameters, the embedding
        multiplier and the final-logit soft-capping (as forward hooks)."""
        from . import layers

        layers.apply_rope_scaling(chunk, model)
        if model.embedding_multiplier is not None and getattr(chunk, "pre_process", False):
            chunk.embedding.register_forward_hook(layers.scale_output(model.embedding_multiplier))
        if model.final_logit_softcapping is not None and getattr(chunk, "post_process", False):
            # registered before the backend's vocabulary-padding hook, so padded logits stay -inf
            chunk.output_layer.register_forward_hook(layers.softcap_output(model.final_logit_softcapping))


# --------------------------------------------------------------------------- Llama-style tensors


class LlamaStyle(Family):
    """Hugging Face ``model.layers.N.self_attn.{q,k,v,o}_proj`` / ``mlp.{gate,up,down}_proj`` names
    (Llama, Mistral, Qwen2, Gemma-2). ``linear_qkv`` is grouped per query group: for each of the
    ``g`` groups its ``h/g`` query heads, then its key head, then its value head; a gated
    ``linear_fc1`` is ``[gate; up]``."""

    # Hugging Face norm name -> Megatron norm name within a layer
    layer_norms = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "pre_mlp_layernorm"}

    def hf_names(self, model, source_names=None) -> dict:
        out = {EMBEDDING: ["model.embed_tokens.weight"]}
        for i in range(model.num_layers):
            m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            a = h + "self_attn."
            out.update({m + f"{meg}.weight": [h + f"{hf}.weight"] for hf, meg in self.layer_norms.items()})
            out.update({
                m + "self_attention.linear_qkv.weight": [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                m + "self_attention.linear_qkv.bias": [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"],
                m + "self_attention.linear_proj.weight": [a + "o_proj.weight"],
                m + "self_attention.linear_proj.bias": [a + "o_proj.bias"],
                m + "mlp.linear_fc1.weight": [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
                m + "mlp.linear_fc1.bias": [h + "mlp.gate_proj.bias", h + "mlp.up_proj.bias"],
                m + "mlp.linear_fc2.weight": [h + "mlp.down_proj.weight"],
                m + "mlp.linear_fc2.bias": [h + "mlp.down_proj.bias"],
            })
        out["decoder.final_layernorm.weight"] = ["model.norm.weight"]
        out[OUTPUT] = ["lm_head.weight"]
        expected = self.expected_tensors(model)
        return {k: v for k, v in out.items() if k in expected}

    def hf_shapes(self, model, mname, mshape):
        heads, groups, hd = dims(model)
        if mname.endswith("linear_qkv.weight"):
            return [(heads * hd, mshape[1]), (groups * hd, mshape[1]), (groups * hd, mshape[1])]
        if mname.endswith("linear_qkv.bias"):
            return [(heads * hd,), (groups * hd,), (groups * hd,)]
        if mname.endswith("linear_fc1.weight"):
            return [(model.ffn_hidden_size, mshape[1])] * 2
        if mname.endswith("linear_fc1.bias"):
            return [(model.ffn_hidden_size,)] * 2
        return [mshape]

    def to_megatron(self, model, mname, tensors):
        if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            heads, groups, hd = dims(model)
            qpg = heads // groups
            parts = []
            for g in range(groups):
                parts += [tensors[0][g * qpg * hd:(g + 1) * qpg * hd], tensors[1][g * hd:(g + 1) * hd],
                          tensors[2][g * hd:(g + 1) * hd]]
            return parts
        if mname.endswith(("linear_fc1.weight", "linear_fc1.bias")):
            return list(tensors)  # [gate; up]
        return [tensors[0]]

    def from_megatron(self, model, mname, t):
        if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            heads, groups, hd = dims(model)
            qpg = heads // groups
            per_group = (qpg + 2) * hd  # rows of group g sit at offset g * (q rows + 2 * hd)
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


def swiglu_decoder_problems(model, family: str) -> list:
    """What a Llama-style Hugging Face class (RMSNorm, SwiGLU, RoPE over the whole head) cannot express."""
    problems = []
    if (model.normalization, model.activation, model.position_embedding_type) != ("RMSNorm", "swiglu", "rope"):
        problems.append(f"{family} needs RMSNorm, SwiGLU and RoPE")
    if model.rotary_percent != 1.0:
        problems.append("rotary_percent must be 1.0")
    problems += standard_layer_problems(model, family)
    return problems


def standard_layer_problems(model, family: str) -> list:
    """Features of the other families that a standard pre-norm layer does not have."""
    problems = []
    for key in ("layernorm_zero_centered_gamma", "parallel_residual"):
        if getattr(model, key):
            problems.append(f"{family} has no {key}")
    for key in ("embedding_multiplier", "softmax_scale", "attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(model, key) is not None:
            problems.append(f"{family} has no {key}")
    return problems


def window_layers(model) -> list:
    """For each layer (0-based), whether it has the sliding window: megatron-core's
    ``is_layer_window_attention`` on 1-based layer numbers."""
    freq = model.window_attn_skip_freq
    if model.window_size is None:
        return [False] * model.num_layers
    if freq is None:
        return [True] * model.num_layers
    if isinstance(freq, int):
        return [(i + 1) % freq != 0 for i in range(model.num_layers)]
    return [bool(f) for f in freq]
