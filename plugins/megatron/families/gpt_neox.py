"""GPT-NeoX (``GPTNeoXForCausalLM``): GPT-NeoX-20B, Pythia.

What it has, and where each piece lives:
- the parallel residual ``x + attn(ln1(x)) + mlp(ln2(x))`` (``use_parallel_residual``, default
  true): ``layers.ParallelResidualLayer``; with ``use_parallel_residual: false`` it is megatron's
  standard sequential layer (HF's sequential branch computes exactly that);
- RoPE on the first 25% of each head (``rotary_pct`` / ``partial_rotary_factor``), non-interleaved
  (rotate-half), as megatron-core's ``rotary_percent`` does;
- LayerNorm with bias, biases on every linear layer (``attention_bias``; the MLP always has them),
  untied ``embed_out``, GELU: ``gelu`` (erf; Pythia) or the tanh approximation (``gelu_fast``,
  GPT-NeoX-20B; ``gelu_new``, ``gelu_pytorch_tanh``);
- the fused ``query_key_value`` is laid out per head (``view(..., heads, 3 * head_dim)``: each
  head's q, k, v), which is megatron's ``linear_qkv`` with one query head per group: no regrouping.

transformers 5 reads the head as ``lm_head`` but saves (and the Hub holds) ``embed_out``; both are
read, ``embed_out`` is written.
"""
from __future__ import annotations

from ..checkpoint import CheckpointError
from .base import EMBEDDING, OUTPUT, Family, need
from .rope import rope_fields, rope_to_hf

# hidden_act -> ModelConfig.activation. gelu_fast is 0.5x(1 + tanh(0.7978845608 x (1 + 0.044715 x^2))),
# the tanh approximation with sqrt(2/pi) rounded to 10 digits (a relative difference below 1e-10)
ACTIVATIONS = {"gelu": "gelu", "gelu_fast": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
HEADS = ("embed_out.weight", "lm_head.weight")


class GPTNeoX(Family):
    name = "gpt_neox"
    hf_architectures = ("GPTNeoXForCausalLM",)
    model_types = ("gpt_neox",)
    description = "GPT-NeoX/Pythia"
    # the causal-mask buffers and rotary frequencies older checkpoints carry (a layer's weights end in
    # query_key_value.bias / dense.bias, never in attention.bias)
    ignored_suffixes = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")

    def from_hf(self, cfg, where):
        act = cfg.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise CheckpointError(f"{where}: hidden_act={act!r} is not supported for gpt_neox "
                                  f"({', '.join(ACTIVATIONS)})")
        if not cfg.get("attention_bias", True):
            raise CheckpointError(f"{where}: attention_bias=False is not supported for gpt_neox (its MLP has biases; "
                                  f"megatron-core has biases on all linear layers or on none)")
        if cfg.get("tie_word_embeddings"):
            raise CheckpointError(f"{where}: tie_word_embeddings=True is not supported for gpt_neox (a head tied "
                                  f"to embed_in is not implemented; GPT-NeoX and Pythia untie it)")
        h, heads = need(cfg, "hidden_size", where), need(cfg, "num_attention_heads", where)
        out = dict(
            family="gpt_neox", num_layers=need(cfg, "num_hidden_layers", where), hidden_size=h,
            num_attention_heads=heads, num_query_groups=None, kv_channels=None,
            ffn_hidden_size=need(cfg, "intermediate_size", where), vocab_size=need(cfg, "vocab_size", where),
            max_sequence_length=int(cfg.get("max_position_embeddings", 2048)), normalization="LayerNorm",
            layernorm_epsilon=float(cfg.get("layer_norm_eps", 1e-5)), activation=ACTIVATIONS[act],
            add_qkv_bias=False, add_bias_linear=True, position_embedding_type="rope",
            parallel_residual=bool(cfg.get("use_parallel_residual", True)),
            share_embeddings_and_output_weights=False,
        )
        # transformers' GPTNeoXConfig: theta from rope_parameters, else rotary_emb_base (10000); the
        # rotated fraction from rope_parameters, else rotary_pct (0.25)
        out.update(rope_fields(cfg, where, "gpt_neox", theta_key="rotary_emb_base", partial_key="rotary_pct",
                               default_partial=0.25, partial_supported=True))
        return out

    def to_hf(self, model):
        act = {"gelu": "gelu", "gelu_tanh": "gelu_fast"}[model.activation]
        cfg = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "num_hidden_layers": model.num_layers,
               "hidden_size": model.hidden_size, "num_attention_heads": model.num_attention_heads,
               "intermediate_size": model.ffn_hidden_size, "vocab_size": model.vocab_size,
               "max_position_embeddings": model.max_sequence_length, "layer_norm_eps": model.layernorm_epsilon,
               "hidden_act": act, "rotary_pct": model.rotary_percent, "rotary_emb_base": model.rotary_base,
               "use_parallel_residual": model.parallel_residual, "attention_bias": True,
               "tie_word_embeddings": False, "attention_dropout": 0.0, "hidden_dropout": 0.0}
        if model.rope_scaling:
            cfg["rope_scaling"] = dict(rope_to_hf(model), rope_theta=model.rotary_base,
                                       partial_rotary_factor=model.rotary_percent)
        return cfg

    def problems(self, model):
        problems = []
        if (model.normalization, model.position_embedding_type, model.add_bias_linear) != \
                ("LayerNorm", "rope", True) or model.activation not in ("gelu", "gelu_tanh"):
            problems.append("GPT-NeoX needs LayerNorm, RoPE, biases and GELU")
        if model.num_query_groups not in (None, model.num_attention_heads) or model.kv_channels not in \
                (None, model.hidden_size // model.num_attention_heads):
            problems.append("GPT-NeoX has plain multi-head attention")
        if model.share_embeddings_and_output_weights:
            problems.append("GPT-NeoX has an untied output layer")
        if model.window_size is not None:
            problems.append("GPT-NeoX has no sliding-window attention")
        if model.layernorm_zero_centered_gamma:
            problems.append("GPT-NeoX has no layernorm_zero_centered_gamma")
        for key in ("embedding_multiplier", "softmax_scale", "attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(model, key) is not None:
                problems.append(f"GPT-NeoX has no {key}")
        return problems

    def describe(self, model):
        return ", parallel residual" if model.parallel_residual else ", sequential residual"

    def toy_config(self):
        # the parallel residual and RoPE on 25% of each 16-wide head (4 dims: 2 frequencies), GPT-NeoX-20B's
        # gelu_fast, a vocabulary that is not a multiple of 128; weights drawn larger than the default
        # 0.02 so that attention is far from uniform and the rotated fraction shows in the logits
        return dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, max_position_embeddings=64, vocab_size=250, hidden_act="gelu_fast",
                    rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, layer_norm_eps=1e-5,
                    attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False, initializer_range=0.1,
                    bos_token_id=0, eos_token_id=0)

    # ------------------------------------------------------------------ tensors

    def hf_names(self, model, source_names=None):
        head = HEADS[0]
        if source_names is not None and HEADS[0] not in source_names and HEADS[1] in source_names:
            head = HEADS[1]
        out = {EMBEDDING: ["gpt_neox.embed_in.weight"]}
        for i in range(model.num_layers):
            m, h = f"decoder.layers.{i}.", f"gpt_neox.layers.{i}."
            for p in ("weight", "bias"):
                out.update({
                    m + f"input_layernorm.{p}": [h + f"input_layernorm.{p}"],
                    m + f"pre_mlp_layernorm.{p}": [h + f"post_attention_layernorm.{p}"],
                    m + f"self_attention.linear_qkv.{p}": [h + f"attention.query_key_value.{p}"],
                    m + f"self_attention.linear_proj.{p}": [h + f"attention.dense.{p}"],
                    m + f"mlp.linear_fc1.{p}": [h + f"mlp.dense_h_to_4h.{p}"],
                    m + f"mlp.linear_fc2.{p}": [h + f"mlp.dense_4h_to_h.{p}"],
                })
        out["decoder.final_layernorm.weight"] = ["gpt_neox.final_layer_norm.weight"]
        out["decoder.final_layernorm.bias"] = ["gpt_neox.final_layer_norm.bias"]
        out[OUTPUT] = [head]
        expected = self.expected_tensors(model)
        return {k: v for k, v in out.items() if k in expected}

    # query_key_value is per head [q_h; k_h; v_h] for each head h: megatron's linear_qkv with one query
    # head per group, so Family's identity maps (to_megatron, from_megatron) are the layout map; the
    # parallel residual is Family.layer_spec's (ModelConfig.parallel_residual)


FAMILY = GPTNeoX()
