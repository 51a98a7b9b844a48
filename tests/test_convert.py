"""Hugging Face <-> Megatron conversion: logit parity with transformers, round trips, config derivation
(bad input: test_convert_bad_input.py).

Every family's tiny random model (built by transformers from a config) is converted once; the
Megatron model the backend loads from it must give transformers' logits within 1e-4 (fp32) at
TP1/PP1 and at TP2 x PP2 over gloo; HF -> Megatron -> HF must give back the same bytes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import convert_helpers as ch
from distributed import run_ranks
from helpers import REPO
from scalebio.config import ConfigError, load_model
from scalebio.runner import open_run, prepare
from scalebio_plugins.megatron import checkpoint as ck
from scalebio_plugins.megatron import hf

TOL = 1e-4


def _vocab(family):
    return ch.vocab(family)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (HF dir, checkpoint dir, data YAML); Qwen2 sharded with an index, as large checkpoints are."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for family in ch.FAMILIES:
        hf_dir, ckpt = ch.toy_checkpoint(family, root, max_shard_size="100KB" if family == "qwen2" else None)
        out[family] = (hf_dir, ckpt, ch.data_yaml(root))
    return out


def _safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _hf_losses(hf_dir, ckpt, data, tmp_path) -> dict:
    return ch.hf_losses(hf_dir, ckpt, data, tmp_path)


def _assert_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), f"{name} differs"


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", ch.FAMILIES)
def test_logits_match_transformers_at_tp1(converted, family, tmp_path):
    hf_dir, ckpt, data = converted[family]
    toks = ch.tokens(_vocab(family))
    expected = ch.hf_logits(hf_dir, toks)
    with open_run(prepare(ch.request(ckpt, data, tmp_path / "run")), verbose=False) as (ctx, _):
        got = ch.megatron_logits(ctx.backend, toks)
        u_params = [p.detach().clone() for p in ctx.backend.replicas["u"].parameters()]
        w_params = list(ctx.backend.replicas["w"].parameters())
        assert all(torch.equal(a, b) for a, b in zip(u_params, w_params)), "u and w must start from the checkpoint"
        tokenizer_path = ctx.config.data.tokenizer.path
    assert tokenizer_path == str(ckpt), "the run uses the checkpoint's own tokenizer"
    err = (got - expected).abs().max().item()
    assert err < TOL, f"{family}: max |logit error| {err:.2e}"


@pytest.mark.slow
def test_logits_losses_and_save_at_tp2_pp2(converted, tmp_path):
    """All families in one 4-rank case: TP2 x PP2 logits and eval losses against transformers, and
    the backend's save (gathered over TP, one file per stage, tied head skipped) is the checkpoint."""
    cases = {f: (str(ckpt), str(data), _vocab(f)) for f, (_, ckpt, data) in converted.items()}
    results = run_ranks(ch.parallel_case, 4, cases, 2, 2, str(tmp_path), timeout=600)
    last = results[3]  # ranks 2 and 3 are the last stage (TP is the fastest-varying rank index)
    for family, (hf_dir, ckpt, data) in converted.items():
        got = last[family]["logits"]
        expected = ch.hf_logits(hf_dir, ch.tokens(_vocab(family)))
        err = (got - expected).abs().max().item()
        assert err < TOL, f"{family} at TP2 x PP2: max |logit error| {err:.2e}"
        assert results[0][family]["logits"] is None  # the first stage hands hidden states on
        hf_losses = _hf_losses(hf_dir, ckpt, data, tmp_path)
        for name, loss in last[family]["losses"].items():
            assert abs(loss - hf_losses[name]) < TOL, f"{family} {name}: {loss} vs transformers {hf_losses[name]}"
        saved = tmp_path / f"saved-{family}"
        _assert_identical(_safetensors(saved), _safetensors(ckpt))
        assert ck.read_model_config(saved) == ck.read_model_config(ckpt)
        assert (saved / "hf" / "config.json").read_bytes() == (ckpt / "hf" / "config.json").read_bytes()
        assert sorted(p.name for p in saved.glob("*.safetensors")) == \
            ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@pytest.mark.slow
def test_interleaved_pipeline_loads_and_saves_the_checkpoint(converted, tmp_path):
    """PP2 x VPP2: four one-layer chunks on two ranks read and write the same global names."""
    cases = {f: (str(ckpt), str(data), _vocab(f)) for f, (_, ckpt, data) in converted.items() if f in ("qwen2", "gpt2")}
    results = run_ranks(ch.parallel_case, 2, cases, 1, 2, str(tmp_path), vpp=2, timeout=600)
    for family in cases:
        hf_dir, ckpt, data = converted[family]
        _assert_identical(_safetensors(tmp_path / f"saved-{family}"), _safetensors(ckpt))
        losses = results[1][family]["losses"]
        expected = _hf_losses(hf_dir, ckpt, data, tmp_path)
        assert all(abs(losses[k] - expected[k]) < TOL for k in expected), (losses, expected)


def test_negative_controls_fail_the_parity_check(converted, tmp_path):
    """A converter that ignored rope theta, llama3 scaling parameters or the sliding window would
    load without error; the parity check must catch each one."""
    broken = {
        "qwen2": ("rotary_base: 1000000.0", "rotary_base: 10000.0"),
        "llama": ("rope_scaling_original_max_position_embeddings: 16",
                  "rope_scaling_original_max_position_embeddings: 8192"),  # megatron-core's hard-coded value
        "mistral": ("window_size:\n- 7\n- 0", "window_size: null"),
    }
    for family, (good, bad) in broken.items():
        hf_dir, ckpt, data = converted[family]
        copy = tmp_path / f"broken-{family}"
        shutil.copytree(ckpt, copy)
        text = (copy / ck.MODEL_FILE).read_text()
        assert good in text
        (copy / ck.MODEL_FILE).write_text(text.replace(good, bad))
        toks = ch.tokens(_vocab(family))
        with open_run(prepare(ch.request(copy, data, tmp_path / f"run-{family}")), verbose=False) as (ctx, _):
            got = ch.megatron_logits(ctx.backend, toks)
        err = (got - ch.hf_logits(hf_dir, toks)).abs().max().item()
        assert err > 10 * TOL, f"{family}: {bad!r} still matches transformers (error {err:.2e})"


def test_run_model_must_match_the_checkpoint(converted, tmp_path):
    _, ckpt, data = converted["qwen2"]
    req = ch.request(ckpt, data, tmp_path / "run", "model.rotary_base=10000")
    with pytest.raises(ConfigError, match=r"rotary_base: 10000.0 in --set model.rotary_base=10000 but 1000000.0"):
        with open_run(prepare(req), verbose=False):
            pass


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", ch.FAMILIES)
def test_round_trip_is_bit_identical(converted, family, tmp_path):
    hf_dir, ckpt, _ = converted[family]
    back = tmp_path / "back"
    hf.megatron_to_hf(ckpt, back, progress=False, log=lambda *a: None)
    _assert_identical(_safetensors(back), _safetensors(hf_dir))
    assert (back / "config.json").read_bytes() == (hf_dir / "config.json").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json"):
        assert (back / name).is_file() == (hf_dir / name).is_file(), name
        if (hf_dir / name).is_file():
            assert (back / name).read_bytes() == (hf_dir / name).read_bytes(), name
    index = json.loads((back / ck.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(_safetensors(hf_dir))


def test_bf16_sharded_round_trip_keeps_dtype(tmp_path):
    src = tmp_path / "hf"
    ch.build_hf("llama", src, dtype=torch.bfloat16, max_shard_size="200KB")
    hf.hf_to_megatron(src, tmp_path / "ckpt", progress=False, log=lambda *a: None, max_shard_bytes=150_000)
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    assert ck.read_meta(tmp_path / "ckpt")["dtype"] == "bfloat16"
    hf.megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False, log=lambda *a: None)
    back = _safetensors(tmp_path / "back")
    assert {t.dtype for t in back.values()} == {torch.bfloat16}
    _assert_identical(back, _safetensors(src))


@pytest.mark.parametrize("family", ch.FAMILIES)
def test_config_json_written_from_model_yaml(converted, family, tmp_path):
    """A checkpoint without the original config.json (a model trained from scratch) still exports
    to a config that transformers reads as the same model."""
    hf_dir, ckpt, _ = converted[family]
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    shutil.rmtree(copy / ck.HF_DIR)
    meta = json.loads((copy / ck.META_FILE).read_text())
    (copy / ck.META_FILE).write_text(json.dumps(dict(meta, hf_config=None)))
    hf.megatron_to_hf(copy, tmp_path / "back", progress=False, log=lambda *a: None)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert not ck.arch_differences(ck.read_model_config(ckpt), hf.derive_model_config(cfg, "synthesized"))
    toks = ch.tokens(_vocab(family))
    assert torch.equal(ch.hf_logits(tmp_path / "back", toks), ch.hf_logits(hf_dir, toks))


def test_trained_w_converts_back_to_transformers(converted, tmp_path):
    """Train from a checkpoint, save the final w, export it: transformers computes what Megatron does."""
    from scalebio.runner import execute

    hf_dir, ckpt, data = converted["qwen2"]
    req = ch.request(ckpt, data, tmp_path / "run", "run.save_final=true", "optim.lr=1e-2", "optim.warmup=0")
    execute(prepare(req))
    final_w = tmp_path / "run" / "final" / "w"
    trained = _safetensors(final_w)
    original = _safetensors(ckpt)
    assert any(not torch.equal(trained[n], original[n]) for n in original), "training changed nothing"
    hf.megatron_to_hf(final_w, tmp_path / "hf-w", progress=False, log=lambda *a: None)
    toks = ch.tokens(_vocab("qwen2"))
    with open_run(prepare(ch.request(final_w, data, tmp_path / "check")), verbose=False) as (ctx, _):
        got = ch.megatron_logits(ctx.backend, toks)
    err = (got - ch.hf_logits(tmp_path / "hf-w", toks)).abs().max().item()
    assert err < TOL
    assert (tmp_path / "hf-w" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------- evaluation entry


def test_eval_prints_per_source_token_mean_losses_of_transformers(converted, tmp_path, capsys):
    from scalebio import cli

    hf_dir, ckpt, data = converted["gpt2"]
    assert cli.main(["eval", "--load", str(ckpt), "--data", str(data), "--set", "run.progress=false",
                     "--set", "run.global_batch=4", "--set", "run.micro_batch=2", "--set", "run.val_batch=4"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = _hf_losses(hf_dir, ckpt, data, tmp_path)
    assert set(result["sources"]) == {"clean", "typos"}
    for name, loss in expected.items():
        got = result["validation"] if name == "validation" else result["sources"][name]
        assert abs(got["loss"] - loss) < TOL, name
        assert got["tokens"] > 0 and abs(got["perplexity"] - torch.tensor(loss).exp().item()) < 1e-3


# --------------------------------------------------------------------------- config derivation


def test_model_name_must_match_config_json(converted, tmp_path):
    hf_dir = converted["qwen2"][0]
    with pytest.raises(ck.CheckpointError) as exc:
        hf.hf_to_megatron(hf_dir, tmp_path / "out", model_name="tiny", progress=False, log=lambda *a: None)
    msg = str(exc.value)
    assert "hidden_size: 128 in" in msg and "vocab_size: 2048 in" in msg and "tiny.yaml" in msg and "config.json" in msg
    assert not (tmp_path / "out").exists()


def test_matching_model_config_gives_its_name(tmp_path):
    """A Hugging Face model with tiny.yaml's architecture converts under that name, with its defaults."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scalebio.config import find_model, load_yaml

    tiny = load_yaml(find_model("tiny"))
    cfg = Qwen2Config(vocab_size=tiny["vocab_size"], hidden_size=tiny["hidden_size"],
                      intermediate_size=tiny["ffn_hidden_size"], num_hidden_layers=tiny["num_layers"],
                      num_attention_heads=tiny["num_attention_heads"], num_key_value_heads=tiny["num_query_groups"],
                      rope_theta=float(tiny["rotary_base"]), rms_norm_eps=tiny["layernorm_epsilon"],
                      tie_word_embeddings=True, max_position_embeddings=32768)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    hf.hf_to_megatron(tmp_path / "hf", tmp_path / "ckpt", model_name="tiny", tp=2, progress=False, log=lambda *a: None)
    model = ck.read_model_config(tmp_path / "ckpt")
    assert model.name == "tiny" and model.defaults["lisa"] == tiny["defaults"]["lisa"]
    assert model.defaults["megatron"]["tp"] == 2
    assert model.max_sequence_length == tiny["max_sequence_length"]


def test_config_derivation_of_published_configs():
    """config.json files as the Hub publishes them (legacy rope keys), field by field."""
    qwen = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
            "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
            "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "use_sliding_window": False,
            "vocab_size": 151936, "hidden_act": "silu"}
    m = hf.derive_model_config(qwen, "qwen2.5-0.5b")
    assert (m["num_query_groups"], m["add_qkv_bias"], m["rotary_base"], m["share_embeddings_and_output_weights"],
            m["window_size"], m["kv_channels"]) == (2, True, 1e6, True, None, None)
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
             "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"},
             "rope_theta": 500000.0, "vocab_size": 128256, "max_position_embeddings": 131072,
             "model_type": "llama", "hidden_act": "silu", "tie_word_embeddings": False}
    m = hf.derive_model_config(llama, "llama-3.1-8b")
    assert m["rope_scaling"] and m["rope_scaling_factor"] == 8.0 and m["rotary_base"] == 500000.0
    mistral = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
               "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "sliding_window": 4096,
               "rope_theta": 10000.0, "vocab_size": 32000, "model_type": "mistral", "rms_norm_eps": 1e-5}
    assert hf.derive_model_config(mistral, "mistral")["window_size"] == (4095, 0)
    for name in ("llama-3.1-8b", "mistral-7b", "gpt2"):  # the shipped configs are what their config.json derive
        assert (REPO / "model_configs" / f"{name}.yaml").is_file()
    named, _ = load_model("llama-3.1-8b")
    assert not ck.arch_differences(named, hf.derive_model_config(llama, "llama-3.1-8b"))
    mistral_v03 = dict(mistral, sliding_window=None, rope_theta=1e6, vocab_size=32768)
    named, _ = load_model("mistral-7b")
    assert not ck.arch_differences(named, hf.derive_model_config(mistral_v03, "mistral-7b-v0.3"))
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
            "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05, "model_type": "gpt2"}
    named, _ = load_model("gpt2")
    assert not ck.arch_differences(named, hf.derive_model_config(gpt2, "gpt2"))


# --------------------------------------------------------------------------- sharded reads


@pytest.mark.parametrize("name,rows,padded", [
    ("embedding.word_embeddings.weight", 250, 256),  # vocabulary padding cut by TP
    ("decoder.layers.0.mlp.linear_fc1.weight", 192, None),  # SwiGLU: stride 2
    ("decoder.layers.0.self_attention.linear_proj.weight", 64, None),  # split on dim 1
    ("decoder.layers.0.self_attention.linear_qkv.bias", 128, None),
])
def test_read_shard_equals_megatron_split_of_the_full_tensor(tmp_path, name, rows, padded):
    from safetensors.torch import save_file

    from scalebio.config import ModelConfig
    from scalebio_plugins.megatron import model as mdl

    full = torch.randn(rows, 64) if not name.endswith("bias") else torch.randn(rows)
    save_file({name: full}, str(tmp_path / "model.safetensors"))
    src = ck.TensorDir(tmp_path)
    model = ModelConfig(activation="swiglu")
    split = ck.tp_split_of(name, model)
    padded_full = full if padded is None else torch.cat([full, torch.zeros(padded - rows, *full.shape[1:])])
    for world in (1, 2, 4):
        for rank in range(world):
            got = ck.read_shard(src, name, split, rank, world, padded)
            assert torch.equal(got, mdl.shard(padded_full, split, rank, world)), (world, rank)
