"""``scalebio convert verify``: passes on every family's converted toy model (every family the
registry lists, so a family added later is covered), at TP1 and at TP2 x PP2 over gloo, and fails
(exit status 1) on a checkpoint or config.json with a wrong rope theta and on a changed tensor."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import convert_helpers as ch
from helpers import REPO
from scalebio.cli import main
from scalebio_plugins.megatron import checkpoint as ck
from scalebio_plugins.megatron import families, verify

FAMILIES = sorted(families.FAMILIES)


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    out = {}
    for family in FAMILIES:
        out[family] = ch.toy_checkpoint(family, root)
    return out


def _verify(*argv, capsys):
    rc = main(["convert", "verify", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_verify_passes_on_every_family(toys, family, capsys):
    hf_dir, ckpt = toys[family]
    rc, out, err = _verify("--hf", str(hf_dir), "--ckpt", str(ckpt), capsys=capsys)
    assert rc == 0, out + err
    assert "PASS" in out and "MISMATCH" not in out
    # every Hugging Face tensor has its row, and the prompts are the tokenizer's
    names = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and "[" in line}
    assert set(ck.TensorDir(hf_dir).names()) - names <= {"lm_head.weight"}  # a tied head is the embedding
    assert "prompts encoded by the tokenizer" in out


@pytest.mark.slow
def test_verify_at_tp2_pp2_runs_four_processes(toys, capsys):
    hf_dir, ckpt = toys["llama"]
    rc, out, err = _verify("--hf", str(hf_dir), "--ckpt", str(ckpt), "--tp", "2", "--pp", "2", capsys=capsys)
    assert rc == 0, out + err
    assert "megatron backend at TP=2 PP=2" in out and "PASS" in out
    rc, out, err = _verify("--hf", str(hf_dir), "--ckpt", str(ckpt), "--tp", "3", capsys=capsys)
    assert rc == 2 and "TP=3 does not divide num_attention_heads=4" in err


@pytest.mark.slow
def test_wrong_rope_theta_fails(toys, tmp_path, capsys):
    """Negative controls: a checkpoint whose model.yaml has another rope base loads fine and has the
    same tensors, so only the logits tell; and the same for the Hugging Face side's config.json."""
    hf_dir, ckpt = toys["qwen2"]
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    text = (broken / ck.MODEL_FILE).read_text()
    assert "rotary_base: 1000000.0" in text
    (broken / ck.MODEL_FILE).write_text(text.replace("rotary_base: 1000000.0", "rotary_base: 10000.0"))
    rc, out, err = _verify("--hf", str(hf_dir), "--ckpt", str(broken), capsys=capsys)
    assert rc == 1 and "FAIL" in out and "verification failed" in err, out + err
    assert "50 of 50 tensors round-trip exactly" in out  # the tensors alone do not show it

    hf_broken = tmp_path / "hf"
    shutil.copytree(hf_dir, hf_broken)
    cfg = json.loads((hf_broken / "config.json").read_text())
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    cfg["rope_theta"] = theta / 100
    if "rope_parameters" in cfg:
        cfg["rope_parameters"]["rope_theta"] = theta / 100
    (hf_broken / "config.json").write_text(json.dumps(cfg))
    rc, out, _ = _verify("--hf", str(hf_broken), "--ckpt", str(ckpt), capsys=capsys)
    assert rc == 1 and "FAIL" in out


def test_a_changed_tensor_is_named(toys, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    hf_dir, ckpt = toys["gpt2"]
    broken = tmp_path / "hf"
    shutil.copytree(hf_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["transformer.h.2.ln_2.bias"] = tensors["transformer.h.2.ln_2.bias"] + 1e-3
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    rows = {r[0]: r for r in verify.round_trip(broken, ckpt)}
    assert not rows["transformer.h.2.ln_2.bias"][5] and rows["transformer.h.2.ln_2.bias"][4] == pytest.approx(1e-3, rel=1e-2)
    assert sum(not r[5] for r in rows.values()) == 1


@pytest.mark.slow
def test_hf_to_megatron_verify_and_the_missing_extra(toys, tmp_path):
    hf_dir, _ = toys["gpt2"]
    out = tmp_path / "ckpt"
    cli = [sys.executable, "-m", "scalebio", "convert"]
    ok = subprocess.run(cli + ["hf-to-megatron", "--hf", str(hf_dir), "--out", str(out), "--verify", "--no-progress"],
                        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "hf-to-megatron: wrote" in ok.stdout and "PASS" in ok.stdout
    # without transformers (a module set to None cannot be imported): one line naming the extra
    code = ("import sys; sys.modules['transformers'] = None; from scalebio.cli import main; "
            f"sys.exit(main(['convert', 'verify', '--hf', {str(hf_dir)!r}, '--ckpt', {str(out)!r}]))")
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "scalebio convert verify needs the 'transformers' package" in bad.stderr
    assert "pip install 'scalebio[hf]'" in bad.stderr


def test_random_prompts_without_a_tokenizer(toys, tmp_path):
    hf_dir, _ = toys["llama"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in hf_dir.iterdir():
        if f.name not in ck.TOKENIZER_FILES:
            shutil.copyfile(f, bare / f.name)
    ids, what = verify.prompt_ids(bare, 250, 1 << 30)
    again, _ = verify.prompt_ids(bare, 250, 1 << 30)
    assert "random prompts" in what and all(torch.equal(a, b) for a, b in zip(ids, again))
    assert all(int(t.max()) < 250 for t in ids)


def test_another_model_fails_without_comparing_logits(toys, tmp_path, capsys):
    rc, out, err = _verify("--hf", str(toys["gpt2"][0]), "--ckpt", str(toys["qwen2"][1]), capsys=capsys)
    assert rc == 1 and "not the same model: family is 'gpt2'" in out and "Traceback" not in err
    rc, out, err = _verify("--hf", str(tmp_path / "nope"), "--ckpt", str(toys["qwen2"][1]), capsys=capsys)
    assert rc == 2 and "nope does not exist" in err
