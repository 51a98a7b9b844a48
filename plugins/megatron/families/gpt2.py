"""GPT-2 (``GPT2LMHeadModel``, or bare ``GPT2Model`` names ``h.0...``): learned positions, LayerNorm
with bias, GELU, biases on every linear layer, tied head. ``Conv1D`` stores ``[in, out]``
(``y = x W + b``), Megatron's linear layers ``[out, in]``; the fused ``c_attn`` is ``[q; k; v]``
and is regrouped per head."""
from __future__ import annotations

from ..checkpoint import CheckpointError
from .base import EMBEDDING, Family, dims, need, standard_layer_problems

_TRANSPOSED = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


class GPT2(Family):
    name = "gpt2"
    hf_architectures = ("GPT2LMHeadModel",)
    model_types = ("gpt2",)
    description = "GPT-2"
    # the causal-mask buffers of older checkpoints (but not c_attn.bias, a weight)
    ignored_suffixes = (".attn.bias", ".attn.masked_bias")

    def ignored_hf(self, name):
        return name.endswith(self.ignored_suffixes) and not name.endswith("c_attn.bias")

    def from_hf(self, cfg, where):
        act = cfg.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise CheckpointError(f"{where}: activation_function={act!r} is not supported (gelu_new, gelu)")
        for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                        ("add_cross_attention", False)):
            if cfg.get(key, ok) != ok:
                raise CheckpointError(f"{where}: {key}={cfg[key]} is not supported by megatron-core's GPTModel")
        h = need(cfg, "n_embd", where)
        return dict(
            family="gpt2", num_layers=need(cfg, "n_layer", where), hidden_size=h,
            num_attention_heads=need(cfg, "n_head", where), num_query_groups=None, kv_channels=None,
            ffn_hidden_size=cfg.get("n_inner") or 4 * h, vocab_size=need(cfg, "vocab_size", where),
            max_sequence_length=need(cfg, "n_positions", where), normalization="LayerNorm",
            layernorm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)), activation=ACTIVATIONS[act],
            add_qkv_bias=False, add_bias_linear=True, position_embedding_type="learned_absolute",
            share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", True)),
        )

    def to_hf(self, model):
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": model.num_layers,
                "n_embd": model.hidden_size, "n_head": model.num_attention_heads,
                "n_inner": model.ffn_hidden_size, "vocab_size": model.vocab_size,
                "n_positions": model.max_sequence_length, "layer_norm_epsilon": model.layernorm_epsilon,
                "activation_function": {"gelu_tanh": "gelu_new", "gelu": "gelu"}[model.activation],
                "tie_word_embeddings": model.share_embeddings_and_output_weights,
                "scale_attn_weights": True, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}

    def problems(self, model):
        problems = []
        if (model.normalization, model.position_embedding_type, model.add_bias_linear) != \
                ("LayerNorm", "learned_absolute", True) or model.activation not in ("gelu", "gelu_tanh"):
            problems.append("GPT-2 needs LayerNorm, learned positions, biases and GELU")
        if model.num_query_groups not in (None, model.num_attention_heads) or model.kv_channels not in \
                (None, model.hidden_size // model.num_attention_heads):
            problems.append("GPT-2 has plain multi-head attention")
        if model.window_size is not None:
            problems.append("GPT-2 has no sliding-window attention")
        return problems + standard_layer_problems(model, "GPT-2")

    def toy_config(self):
        return dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, vocab_size=250, n_positions=64,
                    activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    bos_token_id=0, eos_token_id=0)

    # ------------------------------------------------------------------ tensors

    def hf_names(self, model, source_names=None):
        # GPT2LMHeadModel names tensors transformer.h.0..., GPT2Model h.0...; written with the prefix
        t = "" if source_names is not None and not any(n.startswith("transformer.") for n in source_names) \
            else "transformer."
        out = {EMBEDDING: [f"{t}wte.weight"], "embedding.position_embeddings.weight": [f"{t}wpe.weight"]}
        for i in range(model.num_layers):
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
        out["output_layer.weight"] = ["lm_head.weight"]
        expected = self.expected_tensors(model)
        return {k: v for k, v in out.items() if k in expected}

    def hf_shapes(self, model, mname, mshape):
        if mname.endswith(_TRANSPOSED):
            return [(mshape[1], mshape[0])]  # Conv1D: [in, out]
        return [mshape]

    def to_megatron(self, model, mname, tensors):
        heads, _, hd = dims(model)
        t = tensors[0]
        if mname.endswith(("linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")):
            return [t.t().contiguous()]
        if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            if mname.endswith("weight"):
                t = t.t().contiguous()  # [3h, h]: rows q, k, v
            h = model.hidden_size
            q, k, v = t[:h], t[h:2 * h], t[2 * h:]
            return [x[n * hd:(n + 1) * hd] for n in range(heads) for x in (q, k, v)]
        return [t]

    def from_megatron(self, model, mname, t):
        heads, _, hd = dims(model)
        if mname.endswith(("linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")):
            return [[t.t().contiguous()]]
        if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            rest = tuple(t.shape[1:])
            qkv = t.reshape((heads, 3, hd) + rest).transpose(0, 1).reshape((3 * heads * hd,) + rest)
            return [[qkv.t().contiguous() if mname.endswith("weight") else qkv.contiguous()]]
        return [[t]]


FAMILY = GPT2()
