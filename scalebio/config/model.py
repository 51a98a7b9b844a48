"""The ``model:`` section (field names as megatron-core's TransformerConfig) and the model YAMLs
shipped in ``model_configs/``."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .layers import ConfigError, load_yaml, parse


@dataclass
class ModelConfig:
    """``model:`` the architecture, named as megatron-core's TransformerConfig / GPTModel arguments."""

    name: str = "unnamed"
    # the architecture family (plugins/megatron/families/): qwen2, llama, mistral, gpt2, gemma2, gpt_neox
    family: str = "qwen2"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention
    kv_channels: Optional[int] = None  # None: hidden_size / num_attention_heads
    ffn_hidden_size: int = 256
    vocab_size: int = 256  # the tokenizer's vocabulary; padding for TP is the backend's job
    max_sequence_length: int = 2048
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    # norms compute x / rms(x) * (1 + weight), weights starting at 0 (Gemma)
    layernorm_zero_centered_gamma: bool = False
    # swiglu / geglu_tanh: gated (SiLU / tanh-GELU of the gate times the up projection)
    activation: Literal["swiglu", "geglu_tanh", "gelu", "gelu_tanh", "silu"] = "swiglu"
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    # attention and MLP both read the layer input: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX, GPT-J)
    parallel_residual: bool = False
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    share_embeddings_and_output_weights: bool = False
    # the embedding output is multiplied by this (Gemma: sqrt(hidden_size)); null = 1
    embedding_multiplier: Optional[float] = None
    # RoPE scaling: megatron-core's GPTModel args (its llama3 type) plus transformers' linear type and
    # the three llama3 parameters megatron-core hard-codes (1, 4, 8192), which the backend applies as given
    rope_scaling: bool = False
    rope_scaling_type: Literal["llama3", "linear"] = "llama3"
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    # attention scores are q.k * softmax_scale; null = 1/sqrt(head dim) (Gemma-2: query_pre_attn_scalar^-0.5)
    softmax_scale: Optional[float] = None
    # sliding-window attention: (left, right) tokens each query sees, as megatron-core's
    # TransformerConfig.window_size; null = full causal attention
    window_size: Optional[tuple[int, int]] = None
    # which layers use the window, as megatron-core's window_attn_skip_freq: null = every layer; N = all
    # but every N-th layer (1-based); a list of 1 (window) / 0 (full) per layer
    window_attn_skip_freq: Optional[Union[int, list[int]]] = None
    # tanh soft-capping cap * tanh(x / cap) of the attention scores and of the final logits (Gemma-2)
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    init_method_std: float = 0.02
    # the published checkpoint this config describes (e.g. Qwen/Qwen2.5-32B): a run then needs --load
    hf_name: Optional[str] = None
    # run-configuration defaults for this model, by section: run, optim, data, or a plugin's name
    # (e.g. the default parallel layout, suggested LISA settings, a micro-batch that fits)
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                     "ffn_hidden_size", "vocab_size", "max_sequence_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {value}", keys=(name,))
        for name in ("layernorm_epsilon", "rotary_base", "init_method_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"model.{name} must be a positive number, got {value}", keys=(name,))
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"model.rotary_percent must be in (0, 1], got {self.rotary_percent}",
                              keys=("rotary_percent",))
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_query_groups={groups}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                              f"{self.num_attention_heads}; set kv_channels")
        if self.rope_scaling and self.rope_scaling_type == "llama3" and \
                self.rope_scaling_high_freq_factor <= self.rope_scaling_low_freq_factor:
            raise ConfigError(f"rope_scaling_high_freq_factor={self.rope_scaling_high_freq_factor} must be larger "
                              f"than rope_scaling_low_freq_factor={self.rope_scaling_low_freq_factor}")
        if self.window_size is not None and (self.window_size[0] < 0 or self.window_size[1] != 0):
            raise ConfigError(f"window_size={list(self.window_size)}: give [left, 0] with left >= 0 "
                              f"(causal attention sees no token to the right)")
        freq = self.window_attn_skip_freq
        if isinstance(freq, list) and (len(freq) != self.num_layers or set(freq) - {0, 1}):
            raise ConfigError(f"window_attn_skip_freq={freq}: give one 1 (window) or 0 (full attention) per "
                              f"layer, {self.num_layers} in all")
        if isinstance(freq, int) and freq < 1:
            raise ConfigError(f"window_attn_skip_freq={freq} must be at least 1")
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "softmax_scale", "embedding_multiplier"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be positive (or null)")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"rotary_percent={self.rotary_percent} must be in (0, 1]")


# --------------------------------------------------------------------------- model lookup


def model_configs_dir() -> Path:
    from .. import model_configs  # the repository's model_configs/ folder, shipped in the package

    return Path(model_configs.__path__[0])


def available_models() -> list:
    return sorted(p.stem for p in model_configs_dir().glob("*.yaml"))


def find_model(name: str) -> Path:
    """A path to a model YAML, or the name of one in model_configs/."""
    p = Path(name)
    candidate = model_configs_dir() / f"{name}.yaml"
    if p.is_dir() and not candidate.exists():  # often a converted checkpoint, which --load takes
        if (p / "model.yaml").is_file():
            raise ConfigError(f"--model {name}: a checkpoint directory; start from it with --load {name} (its "
                              f"model.yaml is then the model)")
        raise ConfigError(f"--model {name}: a directory, not a model YAML file")
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    if candidate.exists():
        return candidate
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:  # meant as a path
        raise ConfigError(f"--model {name}: the file does not exist (a model YAML path, or a name from "
                          f"`scalebio models`: {', '.join(available_models())})")
    hint = difflib.get_close_matches(name, available_models(), n=1)
    hint = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ConfigError(f"unknown model '{name}'{hint}: not a YAML file and not in {model_configs_dir()}. "
                      f"Available: {', '.join(available_models())}")


def load_model(name: str) -> tuple:
    """(ModelConfig, path) of a model in model_configs/ or a model YAML file; its name defaults
    to the file's stem."""
    path = find_model(name)
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    return parse(ModelConfig, data, lambda p: str(path), ("model",)), path
