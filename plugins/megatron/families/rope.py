"""Rotary position embeddings in a Hugging Face config.json: the RoPE types scalebio applies
(default, linear, llama3), read as transformers reads them (``rope_parameters`` or the legacy
``rope_scaling``) and written back; any other type is refused by name."""
from __future__ import annotations

from typing import Optional

from ..checkpoint import CheckpointError


# the RoPE types scalebio applies, and the rope_parameters fields each one reads (as transformers does)
ROPE_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_fields(cfg: dict, where, family: str, theta_key: str = "rope_theta",
                partial_key: str = "partial_rotary_factor", default_partial: Optional[float] = None,
                partial_supported: bool = False, default_max_positions: int = 2048) -> dict:
    """ModelConfig RoPE fields, read from config.json exactly as transformers 5 reads them.

    A non-empty legacy ``rope_scaling`` replaces ``rope_parameters`` entirely (transformers'
    ``convert_rope_params_to_dict``): with ``rope_parameters`` {default, theta 5e5} and
    ``rope_scaling`` {linear, factor 4}, transformers runs linear scaling with theta from
    ``rope_scaling`` or the top-level ``theta_key``. Every field transformers applies is either
    applied here or refused by name.
    """
    legacy = cfg.get("rope_scaling")
    source = "rope_scaling" if legacy else "rope_parameters"
    params = dict(legacy or cfg.get("rope_parameters") or {})
    kind = params.pop("rope_type", None) or params.get("type") or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = cfg.get(theta_key, 10000.0)
    partial = params.pop("partial_rotary_factor", None)
    if partial is None:
        partial = cfg.get(partial_key, default_partial)
    if kind not in ROPE_FIELDS:
        raise CheckpointError(f"{where}: {source} rope type {kind!r} is not supported (supported: "
                              f"{', '.join(ROPE_FIELDS)}); transformers would scale positions in a way the "
                              f"converted model would not")
    out = {"rotary_base": float(theta), "rope_scaling": False}
    if partial not in (None, 1, 1.0):
        if not partial_supported:
            raise CheckpointError(f"{where}: partial_rotary_factor={partial} is not supported for {family} (it "
                                  f"rotates the whole head)")
        out["rotary_percent"] = float(partial)
    elif partial_supported:
        out["rotary_percent"] = 1.0
    if kind == "llama3":  # (a top-level original_max_position_embeddings counts only for config classes
        # that declare it, as Phi-3's does; none of these families does)
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings",
                                                                      default_max_positions))
    values = {}
    for key in ROPE_FIELDS[kind]:
        if params.get(key) is None:
            raise CheckpointError(f"{where}: {source} of type {kind} needs {key}")
        values[key] = params.pop(key)
    rest = {k: v for k, v in params.items() if v is not None}
    if rest:
        key, value = next(iter(rest.items()))
        raise CheckpointError(f"{where}: {source}.{key}={value!r} is not applied by scalebio for rope type "
                              f"{kind!r} (it reads {', '.join(('rope_theta',) + ROPE_FIELDS[kind])})")
    if kind == "linear":
        out.update(rope_scaling=True, rope_scaling_type="linear", rope_scaling_factor=float(values["factor"]))
    elif kind == "llama3":
        out.update(rope_scaling=True, rope_scaling_type="llama3", rope_scaling_factor=float(values["factor"]),
                   rope_scaling_low_freq_factor=float(values["low_freq_factor"]),
                   rope_scaling_high_freq_factor=float(values["high_freq_factor"]),
                   rope_scaling_original_max_position_embeddings=int(values["original_max_position_embeddings"]))
    return out


def rope_to_hf(model) -> Optional[dict]:
    """The legacy ``rope_scaling`` entry of a ModelConfig's RoPE scaling (None without scaling)."""
    if not model.rope_scaling:
        return None
    if model.rope_scaling_type == "linear":
        return {"rope_type": "linear", "factor": model.rope_scaling_factor}
    return {"rope_type": "llama3", "factor": model.rope_scaling_factor,
            "low_freq_factor": model.rope_scaling_low_freq_factor,
            "high_freq_factor": model.rope_scaling_high_freq_factor,
            "original_max_position_embeddings": model.rope_scaling_original_max_position_embeddings}


def rope_summary(model) -> str:
    if model.position_embedding_type != "rope":
        return ""
    out = f", rope theta {model.rotary_base:g}"
    if model.rotary_percent != 1.0:
        out += f" on {model.rotary_percent:g} of each head"
    if model.rope_scaling:
        out += f", {model.rope_scaling_type} rope scaling x{model.rope_scaling_factor:g}"
    return out
