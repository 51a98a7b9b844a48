"""From a scalebio ModelConfig to megatron-core GPTModel chunks, with layout-independent init.

What the backend needs to build a model lives here: the TransformerConfig, the layer spec
(Transformer Engine when it imports and CUDA is present, the local spec otherwise; the model
family's, see families/), vocab padding for tensor parallelism (masked out of the loss), the split
of a full tensor into this rank's shard, and a seeded initialisation that gives the same full
weights at any TP/PP layout.
"""
from __future__ import annotations

import hashlib
import importlib
import math
import re

import torch
import torch.nn.functional as F

from scalebio.config import ConfigError

from . import families
from .families.base import is_gated

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's rule: pad to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")  # a broken install fails here, not mid-run
    except Exception:
        return False
    return True


def use_transformer_engine(impl: str) -> bool:
    if impl == "local":
        return False
    if impl == "transformer_engine":
        if not te_available():
            raise ConfigError("megatron.transformer_impl=transformer_engine needs CUDA and the "
                              "transformer-engine package (pip install 'scalebio[gpu]')")
        return True
    return te_available()


def transformer_config(model, opts, layout, dtype: torch.dtype, use_te: bool):
    """The megatron-core TransformerConfig of ``model`` (scalebio.config.ModelConfig)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    activation = {"swiglu": F.silu, "silu": F.silu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh,
                  "geglu_tanh": _gelu_tanh}[model.activation]
    kw = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        layernorm_zero_centered_gamma=model.layernorm_zero_centered_gamma,
        gated_linear_unit=is_gated(model.activation),
        activation_func=activation,
        add_qkv_bias=model.add_qkv_bias,
        add_bias_linear=model.add_bias_linear,
        init_method_std=model.init_method_std,
        softmax_scale=model.softmax_scale,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # the loss function applies pi_s/N_s and alpha with global normalisers; Megatron must neither
        # divide by the number of micro-batches nor average over data-parallel ranks (see backend.py)
        calculate_per_token_loss=True,
        # batched p2p pairs up wrongly on gloo when next and previous stage are the same rank
        # (interleaved PP=2 gives silently wrong gradients); separate send/recv is always correct
        batch_p2p_comm=False,
        # megatron's own init also tags each parameter with its tensor-parallel split, which
        # init_weights_ and checkpoint loading rely on; init_weights_ then overwrites the values
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        gradient_accumulation_fusion=use_te,
        apply_rope_fusion=use_te,
        # megatron's fused GELU kernels compute the tanh approximation for F.gelu and reject any other
        # function: only the SwiGLU kernel computes what the model asks for
        bias_activation_fusion=use_te and model.activation == "swiglu",
        bias_dropout_fusion=use_te,
        masked_softmax_fusion=use_te,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # the default "full" is deprecated and warns on every build
    )
    if model.window_size is not None:  # sliding-window attention (Mistral v0.1; Gemma-2 on every other layer)
        kw["window_size"] = tuple(model.window_size)
        kw["window_attn_skip_freq"] = model.window_attn_skip_freq
    if layout.first_stage_layers is not None:
        kw["num_layers_in_first_pipeline_stage"] = layout.first_stage_layers
    if layout.last_stage_layers is not None:
        kw["num_layers_in_last_pipeline_stage"] = layout.last_stage_layers
    return TransformerConfig(**kw)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def layer_spec(model, use_te: bool):
    """The model family's megatron-core layer spec."""
    return families.get(model.family).layer_spec(model, use_te)


def build_chunks(model, config, spec, padded_vocab: int, vpp: int | None, use_te: bool = False):
    """This rank's GPTModel chunk(s): one, or ``vpp`` for the interleaved schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    family = families.get(model.family)
    final_norm = family.final_norm(model, use_te)
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        block = spec
        if final_norm is not None:  # a block spec, to name the final norm's module
            block = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=stage),
                                               layer_norm=final_norm)
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=padded_vocab,
            max_sequence_length=model.max_sequence_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type,
            rotary_base=model.rotary_base,
            rotary_percent=model.rotary_percent,
            # megatron-core's own scaling is llama3's; every type is recomputed by the family below
            rope_scaling=model.rope_scaling and model.rope_scaling_type == "llama3",
            rope_scaling_factor=model.rope_scaling_factor,
            vp_stage=stage,
        )
        family.customize(chunk, model)
        chunk.vp_stage = stage
        chunks.append(chunk)
    return chunks


# --------------------------------------------------------------------------- names and shards


def global_names(chunk) -> dict:
    """Local parameter name -> layout-independent name (decoder layer indices made global)."""
    layer_ids = {}
    if hasattr(chunk, "decoder"):
        layer_ids = {j: layer.layer_number - 1 for j, layer in enumerate(chunk.decoder.layers)}
    out = {}
    for name, _ in chunk.named_parameters():
        m = _LAYER_RE.match(name)
        out[name] = f"decoder.layers.{layer_ids[int(m.group(1))]}.{name[m.end():]}" if m else name
    return out


def layer_index(global_name: str):
    """Global decoder-layer index of a parameter, or None for embeddings, final norm, output."""
    m = _LAYER_RE.match(global_name)
    return int(m.group(1)) if m else None


def tp_split(param) -> tuple:
    """(partition_dim, stride) of a tensor-parallel parameter, or None when replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return param.partition_dim, getattr(param, "partition_stride", 1)
    return None


def shard(full: torch.Tensor, split, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a full tensor, exactly as megatron-core splits it at init.

    With stride s the dimension is cut in ``s * world`` equal pieces and rank r takes pieces
    r, r + world, ... (SwiGLU's fc1 holds [gate; up] with stride 2; QKV is grouped per query
    group so contiguous pieces are whole groups).
    """
    if split is None or world == 1:
        return full
    dim, stride = split
    pieces = torch.chunk(full, stride * world, dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def full_shape(param, world: int) -> tuple:
    split = tp_split(param)
    shape = list(param.shape)
    if split is not None:
        shape[split[0]] *= world
    return tuple(shape)


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_weights_(chunks, model, seed: int, tp_rank: int, tp_world: int) -> None:
    """Seeded init, the same full tensors at every layout.

    Each parameter's full tensor is drawn from a generator seeded by (seed, global name) on the
    parameter's device and this rank keeps its shard (the same on every layout of one device type;
    CPU and CUDA generators differ). Distributions follow megatron-core's defaults: N(0, std) for
    weights and embeddings, N(0, std / sqrt(2 * num_layers)) for the two output projections
    of each layer, ones for norm weights (zeros for (1 + w) norms), zeros for biases.
    """
    std = model.init_method_std
    scaled = std / math.sqrt(2.0 * model.num_layers)
    for chunk in chunks:
        names = global_names(chunk)
        for local, param in chunk.named_parameters():
            name = names[local]
            if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                name = "embedding.word_embeddings.weight"  # the last stage's copy of a tied embedding
            shape = full_shape(param, tp_world)
            leaf = name.rsplit(".", 1)[-1]
            dev = param.device  # draw where the parameter lives: a GPU draws its own shards fast
            if "layernorm" in name or leaf.startswith("layer_norm"):  # local spec / TE fused norms
                one = leaf.endswith("weight") and not model.layernorm_zero_centered_gamma
                full = torch.ones(shape, device=dev) if one else torch.zeros(shape, device=dev)
            elif name.endswith("bias"):
                full = torch.zeros(shape, device=dev)
            else:
                gen = torch.Generator(device=dev).manual_seed(_seed_for(seed, name))
                s = scaled if ("linear_proj" in name or "linear_fc2" in name) else std
                vocab_rows = name in ("embedding.word_embeddings.weight", "output_layer.weight")
                # draw the real vocabulary only: padding (which depends on TP) must not change the draw
                drawn = (model.vocab_size,) + shape[1:] if vocab_rows else shape
                full = torch.empty(drawn, device=dev).normal_(0.0, s, generator=gen)
                if drawn != shape:
                    full = torch.cat([full, full.new_zeros((shape[0] - drawn[0],) + shape[1:])])
            param.copy_(shard(full, tp_split(param), tp_rank, tp_world).to(param.dtype))


def mask_vocab_padding(chunk, vocab_size: int, padded: int, tp_rank: int, tp_world: int) -> None:
    """Give padded vocabulary entries a logit of -inf, so they carry no probability and no loss."""
    if padded == vocab_size or not getattr(chunk, "post_process", False):
        return
    per_rank = padded // tp_world
    ids = torch.arange(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    pad = ids >= vocab_size
    if not bool(pad.any()):
        return

    def hook(module, inputs, output):
        logits, bias = output
        return logits.masked_fill(pad.to(logits.device), float("-inf")), bias

    chunk.output_layer.register_forward_hook(hook)
