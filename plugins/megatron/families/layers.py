"""megatron-core building blocks that the family specs use where megatron-core 0.16 has none.

Imported only when a model is built (conversion never needs megatron-core). Each block works in
both the local and the Transformer Engine layer specs; none allocates on a hard-coded device.

- :class:`ZeroCenteredRMSNorm`: x / rms(x) * (1 + w) in fp32 (Gemma); megatron-core's
  ``layernorm_zero_centered_gamma`` exists only for TE norms.
- :func:`core_attention`: dot-product attention with tanh soft-capping of the scores and a
  sliding window that is combined with the given mask. megatron-core's local softmax *replaces*
  the mask by the window (packed samples would see each other) and has no soft-capping.
- :class:`SandwichNormLayer`: a norm before *and* after each sublayer (Gemma-2).
- :class:`ParallelResidualLayer`: attention and MLP both read the layer input (GPT-NeoX).
- hooks for the embedding multiplier and the final-logit soft-capping, and RoPE scaling with
  the configured parameters.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import make_viewless_tensor


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm with a zero-centred weight, computed in fp32 and cast back as Gemma does:
    ``(x / sqrt(mean(x^2) + eps) * (1 + w)).to(x.dtype)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class MaskedSoftmax(torch.nn.Module):
    """softmax(cap * tanh(scores / cap) masked) in fp32, cast back to the scores' dtype.

    Masked: the future (causal), keys more than ``window[0]`` tokens back when the layer has a
    window, and whatever ``mask`` masks (True = masked, e.g. other samples of a packed row).
    """

    def __init__(self, window: Optional[tuple], softcap: Optional[float]):
        super().__init__()
        self.window = window
        self.softcap = softcap

    def forward(self, scores: torch.Tensor, mask: Optional[torch.Tensor], softmax_offset=None) -> torch.Tensor:
        if softmax_offset is not None:
            raise NotImplementedError("softmax_type other than vanilla")
        x = scores.float()
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        sq, sk = x.shape[-2:]
        q = torch.arange(sk - sq, sk, device=x.device)[:, None]
        k = torch.arange(sk, device=x.device)[None, :]
        masked = k > q
        if self.window is not None:
            masked = masked | (k < q - self.window[0])
        if mask is not None:
            masked = masked | mask.to(torch.bool)
        x = x.masked_fill(masked, torch.finfo(torch.float32).min)
        return torch.softmax(x, dim=-1).to(scores.dtype)


class CoreAttention(DotProductAttention):
    """megatron-core's local dot-product attention with :class:`MaskedSoftmax` as its softmax."""

    def __init__(self, *args, softcap: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        # megatron decided per layer (global 1-based layer number) whether this layer has the window
        self.scale_mask_softmax = MaskedSoftmax(self.scale_mask_softmax.window_size, softcap)


def core_attention(model):
    """The core-attention builder of a model: soft-capping from its config."""
    return functools.partial(CoreAttention, softcap=model.attn_logit_softcapping)


def _add_bias(output_with_bias) -> torch.Tensor:
    out, bias = output_with_bias
    return out if bias is None else out + bias


def _viewless(t: torch.Tensor) -> torch.Tensor:
    return make_viewless_tensor(inp=t, requires_grad=t.requires_grad, keep_graph=True)


@dataclass
class SandwichNormSubmodules(TransformerLayerSubmodules):
    post_attention_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


class SandwichNormLayer(TransformerLayer):
    """h = x + post_attention_norm(attn(input_norm(x))); out = h + post_mlp_norm(mlp(pre_mlp_norm(h))).

    With the Transformer Engine spec the two pre-norms are fused into ``linear_qkv`` and
    ``linear_fc1`` (``input_layernorm``/``pre_mlp_layernorm`` are then identities); the post-norms
    are separate modules in both specs. No recompute, offloading or inference cache.
    """

    def __init__(self, config, submodules: SandwichNormSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        norm = dict(config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)
        self.post_attention_layernorm = build_module(submodules.post_attention_layernorm, **norm)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm)

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, packed_seq_params=None,
                **kwargs):
        attn = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                   rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params)
        hidden_states = hidden_states + self.post_attention_layernorm(_add_bias(attn))
        mlp = self.mlp(self.pre_mlp_layernorm(hidden_states))
        return _viewless(hidden_states + self.post_mlp_layernorm(_add_bias(mlp))), None


class ParallelResidualLayer(TransformerLayer):
    """out = x + attn(input_norm(x)) + mlp(pre_mlp_norm(x)): attention and MLP both read the layer
    input (GPT-NeoX's ``use_parallel_residual``, GPT-J). megatron-core 0.16's TransformerLayer runs
    them one after the other.

    The submodules are the standard layer's, so the checkpoint names are too. With the Transformer
    Engine spec the two norms are fused into ``linear_qkv`` and ``linear_fc1`` (the norm modules are
    identities) and the same forward applies. No recompute, offloading or inference cache.
    """

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, packed_seq_params=None,
                **kwargs):
        attn = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                   rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params)
        mlp = self.mlp(self.pre_mlp_layernorm(hidden_states))
        # HF's order of the sum (mlp + attn + x), so fp32 rounding is the same
        return _viewless(_add_bias(mlp) + _add_bias(attn) + hidden_states), None


# --------------------------------------------------------------------------- GPTModel hooks


def scale_output(multiplier: float):
    """Forward hook: the module's output times ``multiplier``, rounded to fp32 and then to the
    output's dtype (as transformers' fp32 ``embed_scale`` buffer is)."""

    def hook(module, inputs, output):
        return output * torch.tensor(multiplier, dtype=torch.float32).to(output.dtype)

    return hook


def softcap_output(cap: float):
    """Forward hook on the output layer: logits -> cap * tanh(logits / cap)."""

    def hook(module, inputs, output):
        logits, bias = output
        return torch.tanh(logits / cap) * cap, bias

    return hook


def apply_rope_scaling(chunk, model) -> None:
    """RoPE scaling with the model's own parameters: transformers' ``linear`` type (frequencies
    divided by the factor) or ``llama3``. megatron-core 0.16 applies the same llama3 formula but
    hard-codes low_freq_factor=1, high_freq_factor=4 and original_max_position_embeddings=8192;
    the frequencies are recomputed with the configured values (identical when they are the
    defaults)."""
    rope = getattr(chunk, "rotary_pos_emb", None)
    if rope is None or not model.rope_scaling:
        return
    dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    if model.rotary_percent < 1.0:
        dim = int(dim * model.rotary_percent)
    base = 1.0 / (model.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    base = base.to(rope.inv_freq.device)
    if model.rope_scaling_type == "linear":
        rope.inv_freq = base / model.rope_scaling_factor
        return
    rope.inv_freq = rope._apply_scaling(
        base, factor=model.rope_scaling_factor, low_freq_factor=model.rope_scaling_low_freq_factor,
        high_freq_factor=model.rope_scaling_high_freq_factor,
        original_max_position_embeddings=model.rope_scaling_original_max_position_embeddings)
