"""Llama-2/3/3.1/3.2 and Yi (``LlamaForCausalLM``), Mistral (``MistralForCausalLM``): grouped-query
attention, SwiGLU, RMSNorm, RoPE with ``linear`` or ``llama3`` scaling, Mistral v0.1's sliding window.

The original Yi uploads (``YiForCausalLM``, model_type ``Yi``, remote code) are Llama with the two
layer norms named ``ln1``/``ln2``; they convert, and come back as ``LlamaForCausalLM`` (the class
the Yi repositories ship today, which transformers loads without remote code).
"""
from __future__ import annotations

from ..checkpoint import CheckpointError
from .base import LlamaStyle, need, swiglu_decoder_problems
from .rope import rope_fields, rope_to_hf

YI_ARCH = "YiForCausalLM"
YI_NORMS = {"ln1": "input_layernorm", "ln2": "pre_mlp_layernorm"}


class Llama(LlamaStyle):
    name = "llama"
    hf_architectures = ("LlamaForCausalLM", YI_ARCH)
    model_types = ("llama", "Yi")
    description = "Llama-2/3/3.1, Yi"
    toy_tokenizer = "sentencepiece"
    default_max_positions = 2048

    def from_hf(self, cfg, where):
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{where}: hidden_act={act!r} is not supported for {self.name} (silu: SwiGLU)")
        attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise CheckpointError(f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                                  f"(megatron-core has biases on all linear layers or on none)")
        h, heads = need(cfg, "hidden_size", where), need(cfg, "num_attention_heads", where)
        head_dim = cfg.get("head_dim") or h // heads
        out = dict(
            family=self.name, num_layers=need(cfg, "num_hidden_layers", where), hidden_size=h,
            num_attention_heads=heads, num_query_groups=cfg.get("num_key_value_heads") or heads,
            kv_channels=head_dim if head_dim != h // heads else None,
            ffn_hidden_size=need(cfg, "intermediate_size", where), vocab_size=need(cfg, "vocab_size", where),
            max_sequence_length=int(cfg.get("max_position_embeddings", self.default_max_positions)),
            normalization="RMSNorm", layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)), activation="swiglu",
            add_qkv_bias=False, add_bias_linear=attn_bias, position_embedding_type="rope",
            share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
            window_size=self._window(cfg, where),
        )
        out.update(rope_fields(cfg, where, self.name, default_max_positions=self.default_max_positions))
        return out

    def _window(self, cfg, where):
        if "sliding_attention" in (cfg.get("layer_types") or []):
            raise CheckpointError(f"{where}: layer_types has sliding_attention layers; not supported for {self.name}")
        return None

    def to_hf(self, model):
        heads = model.num_attention_heads
        cfg = {"architectures": [self.hf_architectures[0]], "model_type": self.name,
               "num_hidden_layers": model.num_layers, "hidden_size": model.hidden_size, "num_attention_heads": heads,
               "num_key_value_heads": model.num_query_groups or heads,
               "head_dim": model.kv_channels or model.hidden_size // heads,
               "intermediate_size": model.ffn_hidden_size, "vocab_size": model.vocab_size,
               "max_position_embeddings": model.max_sequence_length, "rms_norm_eps": model.layernorm_epsilon,
               "hidden_act": "silu", "rope_theta": model.rotary_base,
               "tie_word_embeddings": model.share_embeddings_and_output_weights, "attention_dropout": 0.0,
               "attention_bias": model.add_bias_linear, "mlp_bias": model.add_bias_linear}
        if model.rope_scaling:
            cfg["rope_scaling"] = rope_to_hf(model)
        return cfg

    def problems(self, model):
        problems = swiglu_decoder_problems(model, self.name)
        if model.add_qkv_bias and not model.add_bias_linear:
            problems.append(f"{self.name} has no Q/K/V-only bias")
        if model.window_size is not None:
            problems.append("only Mistral has sliding-window attention")
        return problems

    def export_config(self, cfg):
        if YI_ARCH not in (cfg.get("architectures") or []) and cfg.get("model_type") != "Yi":
            return cfg
        out = {k: v for k, v in cfg.items() if k != "auto_map"}
        return dict(out, architectures=["LlamaForCausalLM"], model_type="llama")

    def hf_names(self, model, source_names=None):
        out = super().hf_names(model, source_names)
        if source_names is not None and "model.layers.0.ln1.weight" in source_names:  # an original Yi upload
            for i in range(model.num_layers):
                for yi, meg in YI_NORMS.items():
                    out[f"decoder.layers.{i}.{meg}.weight"] = [f"model.layers.{i}.{yi}.weight"]
        return out

    def toy_config(self):
        # Llama-3.1: llama3 rope scaling with a non-default original context, which megatron-core's
        # hard-coded 8192 would get wrong
        return dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
                    vocab_size=2050, rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


class Mistral(Llama):
    name = "mistral"
    hf_architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)
    description = "Mistral"
    default_max_positions = 4096 * 32

    def _window(self, cfg, where):
        # transformers' Mistral ignores layer_types: the window, if any, is on every layer
        if cfg.get("sliding_window") is None:
            return None
        return (int(cfg["sliding_window"]) - 1, 0)  # HF: a query sees itself and the W-1 tokens before it

    def to_hf(self, model):
        cfg = super().to_hf(model)
        cfg["sliding_window"] = None if model.window_size is None else model.window_size[0] + 1
        return cfg

    def problems(self, model):
        problems = swiglu_decoder_problems(model, self.name)
        if model.add_qkv_bias and not model.add_bias_linear:
            problems.append(f"{self.name} has no Q/K/V-only bias")
        if model.window_attn_skip_freq is not None:
            problems.append("Mistral has the sliding window on every layer (window_attn_skip_freq null)")
        return problems

    def toy_config(self):
        # Mistral v0.1: a sliding window shorter than the test sequences
        return dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
                    vocab_size=2050, sliding_window=8, rope_theta=10000.0)


FAMILY = Llama()
MISTRAL = Mistral()
