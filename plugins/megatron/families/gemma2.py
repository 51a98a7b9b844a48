"""Gemma-2 (``Gemma2ForCausalLM``): 2B, 9B, 27B.

What it has beyond a Llama-style decoder, and where each piece lives:
- a norm before *and* after each sublayer (``SandwichNormLayer``); Hugging Face's
  ``post_attention_layernorm`` is the norm *after* attention, not Llama's pre-MLP norm;
- RMSNorm with (1 + w), weights starting at 0 (``ZeroCenteredRMSNorm`` locally, TE's
  ``zero_centered_gamma`` under Transformer Engine);
- tanh soft-capping of the attention scores (``attn_logit_softcapping``, 50) in the local core
  attention, used under Transformer Engine too (TE's attention has no soft-capping), and of the
  final logits (``final_logit_softcapping``, 30) as a hook on the output layer;
- the embedding output times sqrt(hidden_size), rounded to fp32 as transformers does;
- scores scaled by ``query_pre_attn_scalar ** -0.5`` (27B: 144, not its head dim 128);
- a sliding window of 4096 on every other layer (``layer_types``; the first is windowed), as
  megatron-core's ``window_size=[W-1, 0]`` with ``window_attn_skip_freq`` 2 (or a per-layer list);
- GeGLU with tanh GELU, head dim 256 (2B/9B) set apart from hidden / heads, tied embeddings.
"""
from __future__ import annotations

import dataclasses
import math

from ..checkpoint import CheckpointError
from .base import LlamaStyle, dims, need, window_layers
from .rope import rope_fields, rope_to_hf

TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
# Gemma2Config's defaults (transformers 5) for fields a config.json may leave out
DEFAULTS = dict(num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
SLIDING, FULL = "sliding_attention", "full_attention"


def default_layer_types(n: int) -> list:
    return [SLIDING if (i + 1) % 2 else FULL for i in range(n)]


class Gemma2(LlamaStyle):
    name = "gemma2"
    hf_architectures = ("Gemma2ForCausalLM",)
    model_types = ("gemma2",)
    description = "Gemma-2"
    layer_norms = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
                   "pre_feedforward_layernorm": "pre_mlp_layernorm",
                   "post_feedforward_layernorm": "post_mlp_layernorm"}
    te_core_attention = False

    def from_hf(self, cfg, where):
        def get(key):
            return cfg.get(key, DEFAULTS.get(key))

        act = get("hidden_activation")
        if act not in TANH_GELU:
            raise CheckpointError(f"{where}: hidden_activation={act!r} is not supported for gemma2 (tanh GELU: "
                                  f"{', '.join(TANH_GELU)})")
        for key in ("attention_bias", "use_bidirectional_attention"):
            if cfg.get(key):
                raise CheckpointError(f"{where}: {key}={cfg[key]} is not supported for gemma2")
        h, heads = need(cfg, "hidden_size", where), need(cfg, "num_attention_heads", where)
        n = need(cfg, "num_hidden_layers", where)
        head_dim = get("head_dim")
        types = cfg.get("layer_types") or default_layer_types(n)
        if len(types) != n or set(types) - {SLIDING, FULL}:
            raise CheckpointError(f"{where}: layer_types must give {SLIDING} or {FULL} for each of the {n} layers, "
                                  f"got {types}")
        window, freq = None, None
        if SLIDING in types:
            if get("sliding_window") is None:
                raise CheckpointError(f"{where}: layer_types has {SLIDING} layers but sliding_window is null")
            window = (int(get("sliding_window")) - 1, 0)  # a query sees itself and the W-1 tokens before it
            if FULL in types:
                freq = 2 if types == default_layer_types(n) else [int(t == SLIDING) for t in types]
        out = dict(
            family="gemma2", num_layers=n, hidden_size=h, num_attention_heads=heads,
            num_query_groups=get("num_key_value_heads"), kv_channels=head_dim if head_dim != h // heads else None,
            ffn_hidden_size=need(cfg, "intermediate_size", where), vocab_size=need(cfg, "vocab_size", where),
            max_sequence_length=int(get("max_position_embeddings")), normalization="RMSNorm",
            layernorm_epsilon=float(get("rms_norm_eps")), layernorm_zero_centered_gamma=True,
            activation="geglu_tanh", add_qkv_bias=False, add_bias_linear=False, position_embedding_type="rope",
            share_embeddings_and_output_weights=bool(get("tie_word_embeddings")),
            embedding_multiplier=math.sqrt(h), softmax_scale=float(get("query_pre_attn_scalar")) ** -0.5,
            window_size=window, window_attn_skip_freq=freq,
            attn_logit_softcapping=_float_or_none(get("attn_logit_softcapping")),
            final_logit_softcapping=_float_or_none(get("final_logit_softcapping")),
        )
        out.update(rope_fields(cfg, where, "gemma2", default_max_positions=DEFAULTS["max_position_embeddings"]))
        return out

    def to_hf(self, model):
        heads, groups, hd = dims(model)
        scalar = (model.softmax_scale if model.softmax_scale is not None else hd ** -0.5) ** -2
        cfg = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "num_hidden_layers": model.num_layers,
               "hidden_size": model.hidden_size, "num_attention_heads": heads, "num_key_value_heads": groups,
               "head_dim": hd, "intermediate_size": model.ffn_hidden_size, "vocab_size": model.vocab_size,
               "max_position_embeddings": model.max_sequence_length, "rms_norm_eps": model.layernorm_epsilon,
               "hidden_activation": "gelu_pytorch_tanh", "rope_theta": model.rotary_base,
               "query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
               "sliding_window": None if model.window_size is None else model.window_size[0] + 1,
               "layer_types": self._layer_types(model),
               "attn_logit_softcapping": model.attn_logit_softcapping,
               "final_logit_softcapping": model.final_logit_softcapping,
               "tie_word_embeddings": model.share_embeddings_and_output_weights,
               "attention_bias": False, "attention_dropout": 0.0}
        if model.rope_scaling:
            cfg["rope_scaling"] = rope_to_hf(model)
        return cfg

    @staticmethod
    def _layer_types(model) -> list:
        return [SLIDING if w else FULL for w in window_layers(model)]

    def problems(self, model):
        problems = []
        if (model.normalization, model.activation, model.position_embedding_type) != ("RMSNorm", "geglu_tanh", "rope"):
            problems.append("Gemma-2 needs RMSNorm, GeGLU with tanh GELU (geglu_tanh) and RoPE")
        if not model.layernorm_zero_centered_gamma:
            problems.append("Gemma-2's norms are (1 + w): layernorm_zero_centered_gamma true")
        if model.embedding_multiplier is None or not math.isclose(model.embedding_multiplier,
                                                                  math.sqrt(model.hidden_size), rel_tol=1e-12):
            problems.append("Gemma-2 multiplies the embeddings by sqrt(hidden_size) (embedding_multiplier)")
        if model.add_qkv_bias or model.add_bias_linear or model.parallel_residual or model.rotary_percent != 1.0:
            problems.append("Gemma-2 has no biases, no parallel residual and rotates the whole head")
        return problems

    def describe(self, model):
        caps = f", soft-capping attention {model.attn_logit_softcapping} / final {model.final_logit_softcapping}"
        return caps + f", attention scale {model.softmax_scale:g}"

    # ------------------------------------------------------------------ tensors and spec

    def layer_tensors(self, model):
        h = model.hidden_size
        return dict(super().layer_tensors(model), **{"post_attention_layernorm.weight": (h,),
                                                     "post_mlp_layernorm.weight": (h,)})

    def layer_spec(self, model, use_te):
        from scalebio.config import ConfigError

        from . import layers

        if model.parallel_residual:
            raise ConfigError("model.parallel_residual=true: Gemma-2's sandwich-norm layer has no parallel residual",
                              keys=("parallel_residual",))
        spec = super().layer_spec(model, use_te)
        if use_te:
            from megatron.core.extensions.transformer_engine import TENorm as post_norm
        else:
            post_norm = layers.ZeroCenteredRMSNorm
        sub = spec.submodules
        fields = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)}
        spec.module = layers.SandwichNormLayer
        spec.submodules = layers.SandwichNormSubmodules(**fields, post_attention_layernorm=post_norm,
                                                        post_mlp_layernorm=post_norm)
        return spec

    def toy_config(self):
        # every Gemma-2 feature where it bites: a window (8) shorter than the test sequences on every
        # other layer of 6 (so a pipeline stage of 3 layers starts on a full-attention layer), caps small
        # enough that tanh saturates, query_pre_attn_scalar (20) apart from the head dim (24), and that head
        # dim apart from hidden / heads (16); weights drawn larger than Gemma's default so the caps bite
        return dict(model_type="gemma2", hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
                    max_position_embeddings=64, attention_dropout=0.0, vocab_size=250, sliding_window=8,
                    attn_logit_softcapping=1.0, final_logit_softcapping=2.0, rms_norm_eps=1e-6,
                    rope_theta=10000.0, initializer_range=0.1, tie_word_embeddings=True,
                    pad_token_id=0, bos_token_id=2, eos_token_id=1)


def _float_or_none(v):
    return None if v is None else float(v)


FAMILY = Gemma2()
