"""Model family adapters, one module per architecture family, and their registry.

A family adapter (see ``base.Family``) holds the Hugging Face config and tensor maps, the
megatron-core layer spec and the toy parity configuration of one family. Adding a family means
adding one module here that defines ``FAMILY``, and listing it in ``FAMILIES``.
"""
from __future__ import annotations

from ..checkpoint import CheckpointError
from . import gemma2, gpt2, gpt_neox, llama, qwen2
from .base import Family

FAMILIES: dict = {f.name: f for f in (qwen2.FAMILY, llama.FAMILY, llama.MISTRAL, gpt2.FAMILY, gemma2.FAMILY,
                                   gpt_neox.FAMILY)}
ARCHITECTURES = {arch: f for f in FAMILIES.values() for arch in f.hf_architectures}
MODEL_TYPES = {t: f for f in FAMILIES.values() for t in f.model_types}
# architectures scalebio recognises but refuses, with what their models compute that it does not
REFUSED = {
    "GemmaForCausalLM": "Gemma (v1) has no family adapter (its layer is Llama's, not Gemma-2's sandwich-norm "
                        "layer with soft-capping)",
    "Gemma3ForCausalLM": "Gemma-3 has no family adapter (QK norms, a second RoPE base for local layers, "
                         "5 of every 6 layers windowed)",
    "Gemma3ForConditionalGeneration": "Gemma-3 (multimodal) has no family adapter",
}


def get(name: str) -> Family:
    """The adapter of a ModelConfig family name."""
    if name not in FAMILIES:
        raise CheckpointError(f"model family {name!r} is not known; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def from_hf_config(cfg: dict, where) -> Family:
    """The adapter of a Hugging Face config.json, from its architectures (or model_type)."""
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in REFUSED:
            raise CheckpointError(f"{where}: {a} is not supported: {REFUSED[a]}; supported: {supported()}")
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    model_type = cfg.get("model_type")
    if not archs and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    what = f"architecture {archs[0]}" if archs else f"model_type {model_type!r}"
    raise CheckpointError(f"{where}: unknown {what}; supported: {supported()} "
                          f"({', '.join(f.description for f in FAMILIES.values())})")
