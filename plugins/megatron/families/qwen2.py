"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): grouped-query attention with a bias on Q, K and V only,
SwiGLU, RMSNorm, RoPE (theta 1e6), tied embeddings on the small sizes."""
from __future__ import annotations

from ..checkpoint import CheckpointError
from .base import LlamaStyle, need, swiglu_decoder_problems
from .rope import rope_fields, rope_to_hf


class Qwen2(LlamaStyle):
    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
    description = "Qwen2/Qwen2.5"

    def from_hf(self, cfg, where):
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{where}: hidden_act={act!r} is not supported for qwen2 (silu: SwiGLU)")
        if cfg.get("use_sliding_window"):
            raise CheckpointError(f"{where}: use_sliding_window=true (sliding window on layers from "
                                  f"max_window_layers={cfg.get('max_window_layers')}) is not supported")
        h, heads = need(cfg, "hidden_size", where), need(cfg, "num_attention_heads", where)
        head_dim = cfg.get("head_dim") or h // heads
        out = dict(
            family="qwen2", num_layers=need(cfg, "num_hidden_layers", where), hidden_size=h,
            num_attention_heads=heads, num_query_groups=cfg.get("num_key_value_heads") or heads,
            kv_channels=head_dim if head_dim != h // heads else None,
            ffn_hidden_size=need(cfg, "intermediate_size", where), vocab_size=need(cfg, "vocab_size", where),
            max_sequence_length=int(cfg.get("max_position_embeddings", 32768)), normalization="RMSNorm",
            layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)), activation="swiglu", add_qkv_bias=True,
            add_bias_linear=False, position_embedding_type="rope",
            share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)), window_size=None,
        )
        out.update(rope_fields(cfg, where, "qwen2"))
        return out

    def to_hf(self, model):
        heads = model.num_attention_heads
        cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": model.num_layers,
               "hidden_size": model.hidden_size, "num_attention_heads": heads,
               "num_key_value_heads": model.num_query_groups or heads,
               "head_dim": model.kv_channels or model.hidden_size // heads,
               "intermediate_size": model.ffn_hidden_size, "vocab_size": model.vocab_size,
               "max_position_embeddings": model.max_sequence_length, "rms_norm_eps": model.layernorm_epsilon,
               "hidden_act": "silu", "rope_theta": model.rotary_base,
               "tie_word_embeddings": model.share_embeddings_and_output_weights, "attention_dropout": 0.0,
               "use_sliding_window": False, "sliding_window": None}
        if model.rope_scaling:
            cfg["rope_scaling"] = rope_to_hf(model)
        return cfg

    def problems(self, model):
        problems = swiglu_decoder_problems(model, "qwen2")
        if not model.add_qkv_bias or model.add_bias_linear:
            problems.append("Qwen2 has biases on Q, K, V only (add_qkv_bias true, add_bias_linear false)")
        if model.window_size is not None:
            problems.append("scalebio writes Qwen2 without sliding-window attention")
        return problems

    def toy_config(self):
        # Qwen2.5 small sizes: QKV bias, GQA, rope theta 1e6, tied embeddings
        return dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
                    vocab_size=250, rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)


FAMILY = Qwen2()
