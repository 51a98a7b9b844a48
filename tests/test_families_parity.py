"""Gemma-2, GPT-NeoX and Yi against transformers: what tests/test_convert.py checks for every family
(TP1 and TP2 x PP2 logits, round trips), plus TP2 and PP2 on their own, the negative controls that
must fail, the config variants each family handles or refuses, bf16, and bilevel LISA runs.

The toy models come from each family's ``toy_config`` (plugins/megatron/families/): Gemma-2 with a
window of 8 on every other layer of 32-token sequences, caps small enough that tanh saturates and
norm weights moved off zero; GPT-NeoX with the parallel residual and rotary on 25% of each head.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import convert_helpers as ch
from distributed import run_ranks
from scalebio.runner import open_run, prepare
from scalebio_plugins.megatron import checkpoint as ck
from scalebio_plugins.megatron import hf

TOL = 1e-4
NEW = ("gemma2", "gpt_neox")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in NEW:
        hf_dir, ckpt = ch.toy_checkpoint(family, root)
        out[family] = (hf_dir, ckpt, ch.data_yaml(root))
    return out


def _edit_model_yaml(ckpt: Path, copy: Path, good: str, bad: str) -> Path:
    shutil.copytree(ckpt, copy)
    text = (copy / ck.MODEL_FILE).read_text()
    assert good in text, (good, text)
    (copy / ck.MODEL_FILE).write_text(text.replace(good, bad))
    return copy


# --------------------------------------------------------------------------- parity at TP2 and PP2


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_logits_and_losses_at_tp2_and_pp2(converted, tmp_path, tp, pp):
    cases = {f: (str(ckpt), str(data), ch.vocab(f)) for f, (_, ckpt, data) in converted.items()}
    results = run_ranks(ch.parallel_case, 2, cases, tp, pp, str(tmp_path), timeout=600)
    last = results[1]
    for family, (hf_dir, ckpt, data) in converted.items():
        err = (last[family]["logits"] - ch.hf_logits(hf_dir, ch.tokens(ch.vocab(family)))).abs().max().item()
        assert err < TOL, f"{family} at TP{tp} PP{pp}: max |logit error| {err:.2e}"
        expected = ch.hf_losses(hf_dir, ckpt, data, tmp_path)
        for name, loss in last[family]["losses"].items():
            assert abs(loss - expected[name]) < TOL, (family, name, loss, expected[name])


# --------------------------------------------------------------------------- negative controls

# (family, what, text in model.yaml, the wrong text): each loads without error and must fail parity
YAML_CONTROLS = [
    ("gemma2", "attention cap off", "attn_logit_softcapping: 1.0", "attn_logit_softcapping: null"),
    ("gemma2", "final cap off", "final_logit_softcapping: 2.0", "final_logit_softcapping: null"),
    ("gemma2", "window on the wrong layers", "window_attn_skip_freq: 2",
     "window_attn_skip_freq: [0, 1, 0, 1, 0, 1]"),
    ("gemma2", "window off by one", "window_size:\n- 7\n- 0", "window_size:\n- 8\n- 0"),
    ("gemma2", "no (1 + w)", "layernorm_zero_centered_gamma: true", "layernorm_zero_centered_gamma: false"),
    ("gemma2", "no embedding multiplier", "embedding_multiplier: 8.0", "embedding_multiplier: null"),
    ("gemma2", "head-dim scale", "softmax_scale: 0.22360679774997896", "softmax_scale: null"),
    ("gpt_neox", "sequential residual", "parallel_residual: true", "parallel_residual: false"),
    ("gpt_neox", "full rotary", "rotary_percent: 0.25", "rotary_percent: 1.0"),
]


@pytest.mark.parametrize("family,what,good,bad", YAML_CONTROLS, ids=[c[1] for c in YAML_CONTROLS])
def test_negative_controls_fail_the_parity_check(converted, tmp_path, family, what, good, bad):
    hf_dir, ckpt, data = converted[family]
    broken = _edit_model_yaml(ckpt, tmp_path / "broken", good, bad)
    err = ch.tp1_logit_error(hf_dir, broken, data, tmp_path / "run")
    assert err > 10 * TOL, f"{family} with {what} still matches transformers (error {err:.2e})"


def test_gemma2_with_llamas_norm_mapping_fails_the_parity_check(converted, tmp_path):
    """NeMo's exporter mapped Gemma-2's post_attention_layernorm as Llama's pre-MLP norm: a checkpoint
    with that mapping (pre_feedforward_layernorm in the post-attention slot) must not match."""
    from safetensors.torch import load_file, save_file

    hf_dir, ckpt, data = converted["gemma2"]
    copy = tmp_path / "llama-mapping"
    shutil.copytree(ckpt, copy)
    for f in copy.glob("*.safetensors"):
        t = load_file(str(f))
        for i in range(6):
            a, b = f"decoder.layers.{i}.pre_mlp_layernorm.weight", f"decoder.layers.{i}.post_attention_layernorm.weight"
            if a in t:
                t[a], t[b] = t[b], t[a]
        save_file(t, str(f), metadata={"format": "pt"})
    err = ch.tp1_logit_error(hf_dir, copy, data, tmp_path / "run")
    assert err > 10 * TOL, f"the Llama norm mapping still matches transformers (error {err:.2e})"


def test_the_toy_caps_and_window_bite(converted):
    """The toy is one where the features matter: transformers itself changes its logits by far more
    than the tolerance when each feature is switched off."""
    from transformers import AutoModelForCausalLM

    hf_dir = converted["gemma2"][0]
    toks = ch.tokens(ch.vocab("gemma2"))
    base = ch.hf_logits(hf_dir, toks)
    for over in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None}, {"sliding_window": 64}):
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager",
                                                     **over).eval()
        with torch.no_grad():
            assert (model(input_ids=toks).logits - base).abs().max() > 100 * TOL, over


# --------------------------------------------------------------------------- variants: handled or refused


def test_gemma2_without_attention_cap_keeps_the_final_cap(tmp_path):
    """attn_logit_softcapping null with final_logit_softcapping set: converted, parity-tested."""
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    ch.build_hf("gemma2", hf_dir, attn_logit_softcapping=None)
    hf.hf_to_megatron(hf_dir, ckpt, progress=False, log=lambda *a: None)
    model = ck.read_model_config(ckpt)
    assert (model.attn_logit_softcapping, model.final_logit_softcapping) == (None, 2.0)
    data = ch.data_yaml(tmp_path)
    assert ch.tp1_logit_error(hf_dir, ckpt, data, tmp_path / "run") < TOL
    capped = _edit_model_yaml(ckpt, tmp_path / "capped", "attn_logit_softcapping: null",
                              "attn_logit_softcapping: 1.0")
    assert ch.tp1_logit_error(hf_dir, capped, data, tmp_path / "run-capped") > 10 * TOL


def test_gemma2_custom_layer_types(tmp_path):
    """A layer_types list that is not the alternation becomes a per-layer window list."""
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "full_attention",
             "sliding_attention"]
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    ch.build_hf("gemma2", hf_dir, layer_types=types)
    hf.hf_to_megatron(hf_dir, ckpt, progress=False, log=lambda *a: None)
    assert ck.read_model_config(ckpt).window_attn_skip_freq == [0, 1, 1, 0, 0, 1]
    assert ch.tp1_logit_error(hf_dir, ckpt, ch.data_yaml(tmp_path), tmp_path / "run") < TOL


def test_yi_uploads_with_ln1_ln2_convert_and_come_back_as_llama(tmp_path):
    """The original YiForCausalLM uploads: Llama with norms named ln1/ln2 and model_type Yi."""
    from safetensors.torch import load_file, save_file

    llama_dir, yi_dir = tmp_path / "llama", tmp_path / "yi"
    ch.build_hf("llama", llama_dir, rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 5e6})
    shutil.copytree(llama_dir, yi_dir)
    tensors = load_file(str(yi_dir / "model.safetensors"))
    renamed = {k.replace("input_layernorm", "ln1").replace("post_attention_layernorm", "ln2"): v
               for k, v in tensors.items()}
    (yi_dir / "model.safetensors").unlink()
    save_file(renamed, str(yi_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((yi_dir / "config.json").read_text())
    cfg.update(architectures=["YiForCausalLM"], model_type="Yi", auto_map={
        "AutoConfig": "configuration_yi.YiConfig", "AutoModelForCausalLM": "modeling_yi.YiForCausalLM"})
    (yi_dir / "config.json").write_text(json.dumps(cfg))
    ckpt = tmp_path / "ckpt"
    hf.hf_to_megatron(yi_dir, ckpt, progress=False, log=lambda *a: None)
    assert ck.read_model_config(ckpt).family == "llama"
    data = ch.data_yaml(tmp_path)
    assert ch.tp1_logit_error(llama_dir, ckpt, data, tmp_path / "run") < TOL
    back = tmp_path / "back"
    hf.megatron_to_hf(ckpt, back, progress=False, log=lambda *a: None)
    out_cfg = json.loads((back / "config.json").read_text())
    assert (out_cfg["architectures"], out_cfg["model_type"], "auto_map" in out_cfg) == (["LlamaForCausalLM"], "llama",
                                                                                       False)
    toks = ch.tokens(ch.vocab("llama"))
    assert torch.equal(ch.hf_logits(back, toks), ch.hf_logits(llama_dir, toks))


def test_gpt_neox_with_the_sequential_residual_converts_and_matches(tmp_path):
    """use_parallel_residual false: transformers' sequential branch is megatron's standard layer; with
    Pythia's erf GELU, half the head rotated and linear rope scaling of the rotated part."""
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    ch.build_hf("gpt_neox", hf_dir, use_parallel_residual=False, rotary_pct=0.5, hidden_act="gelu",
                rope_scaling={"rope_type": "linear", "factor": 4.0})
    hf.hf_to_megatron(hf_dir, ckpt, progress=False, log=lambda *a: None)
    model = ck.read_model_config(ckpt)
    assert (model.parallel_residual, model.rotary_percent, model.activation, model.rope_scaling_type,
            model.rope_scaling_factor) == (False, 0.5, "gelu", "linear", 4.0)
    data = ch.data_yaml(tmp_path)
    assert ch.tp1_logit_error(hf_dir, ckpt, data, tmp_path / "run") < TOL
    parallel = _edit_model_yaml(ckpt, tmp_path / "parallel", "parallel_residual: false", "parallel_residual: true")
    assert ch.tp1_logit_error(hf_dir, parallel, data, tmp_path / "run-parallel") > 10 * TOL


def test_gpt_neox_reads_lm_head_and_legacy_rope_keys(converted, tmp_path):
    """transformers 5 names the head lm_head in memory (the Hub and save_pretrained: embed_out); a
    checkpoint with lm_head.weight converts to the same tensors. The legacy rotary_pct /
    rotary_emb_base keys derive what rope_parameters does."""
    from safetensors.torch import load_file, save_file

    hf_dir, ckpt, _ = converted["gpt_neox"]
    copy = tmp_path / "lm-head"
    shutil.copytree(hf_dir, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    hf.hf_to_megatron(copy, tmp_path / "ckpt", progress=False, log=lambda *a: None)
    a = load_file(str(next(ckpt.glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "ckpt").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((hf_dir / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    legacy = dict(cfg, rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    assert hf.derive_model_config(legacy, "legacy") == hf.derive_model_config(dict(cfg, rope_parameters=rope), "new")
    bare = hf.derive_model_config(cfg, "defaults")  # GPTNeoXConfig's defaults: 25%, theta 10000
    assert (bare["rotary_percent"], bare["rotary_base"]) == (0.25, 10000.0)


@pytest.mark.parametrize("family,over,match", [
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation='gelu' is not supported for gemma2"),
    ("gemma2", {"attention_bias": True}, "attention_bias=True is not supported for gemma2"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("gemma2", {"sliding_window": None}, "layer_types has sliding_attention layers but sliding_window is null"),
    ("gemma2", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope type 'yarn' is not supported"),
    ("gpt_neox", {"hidden_act": "relu"}, "hidden_act='relu' is not supported for gpt_neox"),
    ("gpt_neox", {"attention_bias": False}, "attention_bias=False is not supported for gpt_neox"),
    ("gpt_neox", {"tie_word_embeddings": True}, "tie_word_embeddings=True is not supported for gpt_neox"),
    ("gpt_neox", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
])
def test_features_not_implemented_are_refused_by_name(family, over, match):
    cfg = dict(ch.get_family(family).toy_config(), architectures=[ch.get_family(family).hf_architectures[0]], **over)
    with pytest.raises(ck.CheckpointError, match=match):
        hf.derive_model_config(cfg, "config.json")


# --------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("family", NEW)
def test_bf16_logits_are_as_close_to_fp32_as_transformers_bf16(converted, tmp_path, family):
    """In bf16 the converted model is as far from fp32 transformers as transformers' own bf16 model
    is (within 2x); the negative control in bf16 is far further."""
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt, data = converted[family]
    toks = ch.tokens(ch.vocab(family))
    reference = ch.hf_logits(hf_dir, toks)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.bfloat16, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_bf16 = float((model(input_ids=toks).logits.float() - reference).abs().max())
    control = CONTROLS_BF16[family]
    errors = {}
    for what, path in (("converted", ckpt), ("control", _edit_model_yaml(ckpt, tmp_path / "control", *control))):
        req = ch.request(path, data, tmp_path / f"run-{what}", "megatron.precision=bf16")
        with open_run(prepare(req), verbose=False) as (ctx, _):
            errors[what] = float((ch.megatron_logits(ctx.backend, toks).float() - reference).abs().max())
    assert errors["converted"] < 2 * hf_bf16, (errors, hf_bf16)
    assert errors["control"] > 5 * hf_bf16, (errors, hf_bf16)


CONTROLS_BF16 = {"gemma2": ("attn_logit_softcapping: 1.0", "attn_logit_softcapping: null"),
                 "gpt_neox": ("parallel_residual: true", "parallel_residual: false")}


# --------------------------------------------------------------------------- bilevel runs with LISA

STEPS = 4
# as tests/test_parallel.py: LISA switching at steps 0 and 2, independent draws, 2 micro-batches per rank
RUN_SETS = ("run.global_batch=8", "run.micro_batch=2", "run.val_batch=4", "run.progress=false",
            "data.seq_length=32", "lisa.interval=2", "lisa.gamma=2", "lisa.draw=independent", "softmax.lr=0.2",
            "minimax.alpha=5")


def _toy_model_yaml(family: str, folder: Path) -> Path:
    """The family's toy architecture with the demo tokenizer's vocabulary, from random weights."""
    import yaml

    cfg = dict(ch.get_family(family).toy_config(), architectures=[ch.get_family(family).hf_architectures[0]])
    fields = dict(hf.derive_model_config(cfg, family), name=f"toy-{family}", vocab_size=2048)
    path = folder / f"toy-{family}.yaml"
    path.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}))
    return path


def _bilevel(rank, world, out, model_yaml, sets):
    from scalebio.runner import RunRequest, execute

    req = RunRequest(model=model_yaml, sets=RUN_SETS + tuple(sets), plugins=("lisa",), steps=STEPS, out=out,
                     seed=1234)
    execute(prepare(req))
    return rank


def _close(a, b, tol):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW)
def test_bilevel_lisa_run_at_tp2_pp2_equals_one_process(tmp_path, family):
    model_yaml = str(_toy_model_yaml(family, tmp_path))
    records = {}
    for name, world, sets in (("tp1", 1, ()), ("tp2pp2", 4, ("megatron.tp=2", "megatron.pp=2"))):
        out = tmp_path / name
        run_ranks(_bilevel, world, str(out), model_yaml, sets, timeout=600)
        records[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref, got = records["tp1"], records["tp2pp2"]
    assert len(got) == len(ref) == STEPS
    assert "trainable_layers" in got[0] and "trainable_layers" in got[2]  # LISA drew at steps 0 and 2
    for step, (g, r) in enumerate(zip(got, ref)):
        assert g.get("trainable_layers") == r.get("trainable_layers")
        for key in ("pi", "loss_u", "loss_w", "val_loss", "train_loss_u", "train_loss_w"):
            assert _close(g[key], r[key], 1e-5), f"{family} step {step} {key}: {g[key]} != {r[key]}"
        for key in ("grad_norm_u", "grad_norm_w"):
            assert _close(g[key], r[key], 1e-4), f"{family} step {step} {key}: {g[key]} != {r[key]}"
    assert abs(got[-1]["pi"]["clean"] - got[0]["pi"]["clean"]) > 1e-3  # the weights moved
    assert got[-1]["loss_w"] != got[0]["loss_w"]
