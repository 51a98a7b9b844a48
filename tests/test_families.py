"""Family adapters: RoPE fields read as transformers reads them, the local core attention, the registry.

The per-family parity tests (logits against transformers at TP1/TP2/PP2/TP2xPP2, negative
controls, bilevel runs) are in tests/test_convert.py and tests/test_families_parity.py.
"""
from __future__ import annotations

import json

import pytest
import torch

import convert_helpers as ch
from scalebio_plugins.megatron import checkpoint as ck
from scalebio_plugins.megatron import families, hf

TOL = 1e-4
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 64}


def _transformers_rope(cfg: dict, tmp_path) -> dict:
    """rope_parameters as transformers resolves them from this config.json."""
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return dict(AutoConfig.from_pretrained(str(tmp_path)).rope_parameters)


ROPE_CASES = {
    # issue 11: a default rope_parameters and a legacy rope_scaling; transformers runs the legacy one,
    # with the top-level (here: default) theta, not rope_parameters' theta
    "legacy_scaling_wins": dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                rope_scaling={"type": "linear", "factor": 4.0}),
    "legacy_scaling_top_theta": dict(rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                     rope_scaling={"type": "linear", "factor": 2.0}),
    "legacy_theta_inside": dict(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 7.0}),
    "parameters_only": dict(rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    "top_level_only": dict(rope_theta=1e6),
    "nothing": dict(),
    "llama3_default_original": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "llama3_top_level_original": dict(max_position_embeddings=256, original_max_position_embeddings=32,
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_fields_are_what_transformers_applies(case, tmp_path):
    cfg = dict(LLAMA, **ROPE_CASES[case])
    want = _transformers_rope(cfg, tmp_path)
    got = hf.derive_model_config(cfg, "config.json")
    assert got["rotary_base"] == want["rope_theta"]
    kind = want["rope_type"]
    assert got["rope_scaling"] == (kind != "default")
    if kind != "default":
        assert got["rope_scaling_type"] == kind and got["rope_scaling_factor"] == want["factor"]
    if kind == "llama3":
        assert got["rope_scaling_original_max_position_embeddings"] == want["original_max_position_embeddings"]


@pytest.mark.parametrize("rope,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling rope type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "rope_parameters rope type 'longrope'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "attention_factor": 0.5}},
     r"rope_scaling.attention_factor=0.5 is not applied by scalebio for rope type 'llama3'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling of type linear needs factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported for llama"),
])
def test_rope_fields_transformers_would_apply_are_refused_by_name(rope, match):
    with pytest.raises(ck.CheckpointError, match=match):
        hf.derive_model_config(dict(LLAMA, **rope), "config.json")


def test_linear_rope_scaling_matches_transformers(tmp_path):
    """The issue-11 config.json (default rope_parameters with theta 5e5, legacy linear rope_scaling):
    the converted model computes what transformers computes, and the unscaled model it used to
    become does not."""
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    ch.build_hf("llama", hf_dir, rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "linear", "factor": 4.0}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    assert _transformers_rope(cfg, tmp_path)["rope_type"] == "linear"
    hf.hf_to_megatron(hf_dir, ckpt, progress=False, log=lambda *a: None)
    model = ck.read_model_config(ckpt)
    assert (model.rope_scaling, model.rope_scaling_type, model.rope_scaling_factor, model.rotary_base) == \
        (True, "linear", 4.0, 10000.0)
    data = ch.data_yaml(tmp_path)
    assert ch.tp1_logit_error(hf_dir, ckpt, data, tmp_path / "run") < TOL
    text = (ckpt / ck.MODEL_FILE).read_text()
    (ckpt / ck.MODEL_FILE).write_text(text.replace("rope_scaling: true", "rope_scaling: false"))
    assert ch.tp1_logit_error(hf_dir, ckpt, data, tmp_path / "unscaled") > 10 * TOL
    # and the way back writes the scaling transformers reads
    (ckpt / ck.MODEL_FILE).write_text(text)
    assert hf.hf_config_from_model(model)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


# --------------------------------------------------------------------------- the local core attention


def test_masked_softmax_keeps_the_mask_with_a_sliding_window():
    """Two packed samples in one row with a window of 3: no probability crosses the samples or the
    window. megatron-core's own local softmax replaces the mask by the window (the negative control)."""
    from scalebio_plugins.megatron import cpu_compat

    cpu_compat.install()
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    from scalebio_plugins.megatron.families.layers import MaskedSoftmax

    s = 8
    seg = torch.tensor([0] * 5 + [1] * 3)
    mask = ~(seg[:, None] == seg[None, :]).view(1, 1, s, s)  # True = masked
    scores = torch.randn(1, 2, s, s, generator=torch.Generator().manual_seed(0))
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) & (j >= i - 2) & (seg[:, None] == seg[None, :])
    probs = MaskedSoftmax(window=(2, 0), softcap=None)(scores, mask)
    assert torch.all(probs[..., ~allowed] == 0) and torch.allclose(probs.sum(-1), torch.ones(1, 2, s))
    megatron = FusedScaleMaskSoftmax(False, False, AttnMaskType.causal, False, attention_mask_func, True, None,
                                     window_size=(2, 0))(scores.clone(), mask)
    assert float(megatron[..., ~allowed].sum()) > 0.1, "megatron's local softmax keeps the mask now: simplify"


def test_masked_softmax_soft_caps_before_masking():
    scores = torch.tensor([[[[3.0, 100.0], [3.0, -100.0]]]])
    from scalebio_plugins.megatron.families.layers import MaskedSoftmax

    probs = MaskedSoftmax(window=None, softcap=2.0)(scores, None)
    capped = torch.tanh(torch.tensor([3.0, -100.0]) / 2.0) * 2.0
    assert torch.allclose(probs[0, 0, 1], torch.softmax(capped, -1))
    assert probs[0, 0, 0, 1] == 0  # the future stays masked whatever its score


# --------------------------------------------------------------------------- the shipped model configs

# the architecture fields of the config.json files the Hub publishes for the model_configs/ entries
HUB_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
             "tie_word_embeddings": False}
HUB_GEMMA2 = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh",
          "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
          "final_logit_softcapping": 30.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-06,
          "rope_theta": 10000.0, "vocab_size": 256000, "attention_bias": False}
PUBLISHED_CONFIGS = {
    "yi-34b": dict(HUB_LLAMA, hidden_size=7168, intermediate_size=20480, num_attention_heads=56, num_hidden_layers=60,
                   num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-05, rope_theta=5000000.0,
                   vocab_size=64000),
    "yi-1.5-34b": dict(HUB_LLAMA, hidden_size=7168, intermediate_size=20480, num_attention_heads=56,
                       num_hidden_layers=60, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-06,
                       rope_theta=5000000.0, vocab_size=64000),
    "llama-3-70b": dict(HUB_LLAMA, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                        num_hidden_layers=80, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-05,
                        rope_theta=500000.0, vocab_size=128256),
    "llama-3.1-70b": dict(HUB_LLAMA, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                          num_hidden_layers=80, num_key_value_heads=8, max_position_embeddings=131072,
                          rms_norm_eps=1e-05, rope_theta=500000.0, vocab_size=128256,
                          rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "gemma-2-2b": dict(HUB_GEMMA2, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                       num_hidden_layers=26, num_key_value_heads=4),
    "gemma-2-9b": dict(HUB_GEMMA2, hidden_size=3584, intermediate_size=14336, num_attention_heads=16,
                       num_hidden_layers=42, num_key_value_heads=8),
    "gemma-2-27b": dict(HUB_GEMMA2, hidden_size=4608, intermediate_size=36864, num_attention_heads=32,
                        num_hidden_layers=46, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
    "gpt-neox-20b": {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_act": "gelu_fast",
                     "hidden_size": 6144, "intermediate_size": 24576, "num_attention_heads": 64,
                     "num_hidden_layers": 44, "max_position_embeddings": 2048, "layer_norm_eps": 1e-05,
                     "rotary_emb_base": 10000, "rotary_pct": 0.25, "use_parallel_residual": True,
                     "tie_word_embeddings": False, "vocab_size": 50432},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_shipped_model_configs_are_what_the_published_config_json_derives(name):
    """Each model_configs/ entry is the architecture its Hugging Face config.json converts to (the
    parameter counts are checked against the published totals in tests/test_memory_planner.py)."""
    from scalebio.config import load_model

    named, _ = load_model(name)
    assert not ck.arch_differences(named, hf.derive_model_config(PUBLISHED_CONFIGS[name], name))
    assert named.hf_name and named.defaults["megatron"]["tp"] >= 1


# --------------------------------------------------------------------------- the registry


def test_every_family_maps_its_toy_config_both_ways():
    """config.json -> ModelConfig -> config.json -> ModelConfig is the same architecture, and every
    family names its adapter's Hugging Face class."""
    from scalebio.config import ModelConfig, parse

    for name, family in families.FAMILIES.items():
        cfg = ch.hf_config(name).to_dict()
        cfg["architectures"] = [family.hf_architectures[0]]
        fields = hf.derive_model_config(cfg, f"{name} toy")
        model = parse(ModelConfig, fields)
        assert not family.problems(model), (name, family.problems(model))
        again = hf.derive_model_config(hf.hf_config_from_model(model), f"{name} synthesized")
        assert not ck.arch_differences(model, again), (name, ck.arch_differences(model, again))
        assert set(family.hf_names(model)) == set(ck.expected_tensors(model)), name


def test_unknown_family_names_the_supported_ones():
    supported = ", ".join(sorted(families.FAMILIES))
    assert "gpt2" in supported and "llama" in supported
    with pytest.raises(ck.CheckpointError, match=f"model family 'falcon' is not known; supported: {supported}$"):
        families.get("falcon")
