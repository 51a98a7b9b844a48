"""Conversion's bad input: bad output paths and sizes are one-line errors before any tensor is read,
nothing the user has is changed, --overwrite replaces only an earlier conversion's output, the
output directory gets the umask's mode, partials of a killed conversion are cleaned; broken,
truncated or unknown checkpoints and impossible TP splits name the problem."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert_helpers as ch
from bad_input_helpers import read_only_dir
from helpers import REPO
from scalebio.cli import main
from scalebio.config import ConfigError
from scalebio_plugins.megatron import checkpoint as ck
from scalebio_plugins.megatron import hf


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    w = tmp_path_factory.mktemp("convert-bad")
    ch.build_hf("gpt2", w / "hfm")
    hf.hf_to_megatron(w / "hfm", w / "ckpt", progress=False, log=lambda *a: None)
    (w / "afile").write_text("not a directory")
    (w / "mine").mkdir()
    (w / "mine" / "notes.txt").write_text("my notes")
    return w


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


H2M = "convert hf-to-megatron --hf {w}/hfm --no-progress --out "
M2H = "convert megatron-to-hf --ckpt {w}/ckpt --no-progress --out "
CASES = [
    ("h2m-out-is-the-input", H2M + "{w}/hfm --overwrite", r"--out .*hfm is the input .*hfm: converting would destroy it"),
    ("h2m-out-inside-the-input", H2M + "{w}/hfm/sub", r"--out .*hfm/sub lies inside the input"),
    ("h2m-out-contains-the-input", H2M + "{w} --overwrite", r"contains the input .*hfm"),
    ("m2h-out-is-the-input", M2H + "{w}/ckpt --overwrite", r"--out .*ckpt is the input .*ckpt"),
    ("m2h-out-inside-the-input", M2H + "{w}/ckpt/hf --overwrite", r"--out .*ckpt/hf lies inside the input"),
    ("h2m-overwrite-foreign-dir", H2M + "{w}/mine --overwrite",
     r"--overwrite replaces only an earlier conversion's output, and .*mine holds files a conversion does not "
     r"write \(notes\.txt\)"),
    ("m2h-overwrite-a-checkpoint", M2H + "{w}/other-ckpt --overwrite", r"other-ckpt holds files a conversion does "
     r"not write \(hf, model\.yaml, scalebio_checkpoint\.json\)"),
    ("h2m-existing-dir", H2M + "{w}/mine", r"mine exists and is not empty; choose another --out or pass --overwrite"),
    ("h2m-out-is-a-file", H2M + "{w}/afile", r"--out .*afile exists and is not a directory"),
    ("m2h-out-under-a-file", M2H + "{w}/afile/hf", r"afile is a file, so nothing can be written under it"),
    ("h2m-out-read-only", H2M + "{ro}/ckpt", r"--out .*ro/ckpt: cannot write in .*ro \("),
    ("max-shard-size-zero", H2M + "{w}/new --max-shard-size 0", r"--max-shard-size must be positive, got 0 bytes"),
    ("max-shard-size-negative", M2H + "{w}/new --max-shard-size=-5M", r"--max-shard-size must be positive"),
    ("max-shard-size-garbage", H2M + "{w}/new --max-shard-size lots",
     r"argument --max-shard-size: 'lots' is not a size \(bytes, or a number with K, M or G\)"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_output_is_one_line_and_changes_nothing(ws, tmp_path, capsys, argv, message):
    if "other-ckpt" in argv and not (ws / "other-ckpt").exists():  # a checkpoint is no Hugging Face output
        hf.hf_to_megatron(ws / "hfm", ws / "other-ckpt", progress=False, log=lambda *a: None)
    with read_only_dir(tmp_path / "ro") as ro:
        if "{ro}" in argv and ro is None:
            pytest.skip("no read-only directory can be made here (root without mount permission)")
        before = _hashes(ws)
        line = argv.format(w=ws, ro=ro)
        try:
            rc = main(shlex.split(line))
        except SystemExit as exc:  # argparse
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = [x for x in err.splitlines() if x.strip() and not x.startswith("usage:") and not x.startswith(" ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert re.search(message, lines[0]), lines[0]
        assert _hashes(ws) == before  # nothing changed, nothing added (no partial directory)
        assert not (ws / "new").exists() and not (ws / "hfm" / "sub").exists()


def test_output_directory_gets_the_umask_mode(ws, tmp_path):
    """The output was the temporary directory renamed, with mkdtemp's mode 0700 (fails before the fix)."""
    old = os.umask(0o022)
    try:
        hf.hf_to_megatron(ws / "hfm", tmp_path / "ckpt", progress=False, log=lambda *a: None)
        hf.megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False, log=lambda *a: None)
    finally:
        os.umask(old)
    for d in (tmp_path / "ckpt", tmp_path / "back"):
        assert (d.stat().st_mode & 0o777) == 0o755, oct(d.stat().st_mode)
        assert not (d / ".scalebio-owner").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partials_of_a_killed_conversion_are_cleaned_with_a_message(ws, tmp_path):
    import socket

    out = tmp_path / "ckpt"
    stale = [tmp_path / ".ckpt.partial-killed", tmp_path / ".ckpt.partial-old-version"]
    for d in stale:
        d.mkdir()
        (d / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 2**20)
    (stale[0] / ".scalebio-owner").write_text(f"{socket.gethostname()} {_dead_pid()}\n")
    live = tmp_path / ".ckpt.partial-running"  # a conversion still in progress (this process) is left alone
    live.mkdir()
    (live / ".scalebio-owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    other = tmp_path / ".other.partial-killed"  # another target's partial is not this conversion's business
    other.mkdir()
    lines = []
    hf.hf_to_megatron(ws / "hfm", out, progress=False, log=lines.append)
    assert not any(d.exists() for d in stale) and live.is_dir() and other.is_dir()
    removed = [line for line in lines if line.startswith("removed")]
    assert len(removed) == 2 and all("left by an interrupted conversion to" in r and "1.0 MiB" in r for r in removed)
    assert (out / ck.META_FILE).is_file()


def test_a_kill_during_conversion_is_cleaned_by_the_next_one(ws, tmp_path):
    """A real SIGKILL while writing (the writer is slowed by a tiny shard size and a sleep per tensor)."""
    import signal
    import time

    out = tmp_path / "ckpt"
    code = ("import sys, time; from scalebio_plugins.megatron import tensorio; real = tensorio.StreamWriter.write\n"
            "def slow(self, *a):\n    time.sleep(0.2); return real(self, *a)\n"
            "tensorio.StreamWriter.write = slow\n"
            "from scalebio.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "convert", "hf-to-megatron", "--hf", str(ws / "hfm"),
                             "--out", str(out), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".ckpt.partial-*/*.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".ckpt.partial-*")), "the kill left no partial directory to clean"
    lines = []
    hf.hf_to_megatron(ws / "hfm", out, progress=False, log=lines.append)
    assert not list(tmp_path.glob(".ckpt.partial-*"))
    assert any(line.startswith("removed") for line in lines), lines


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (HF dir, checkpoint dir, data YAML) of the families these cases use; Qwen2 sharded."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for family in ("qwen2", "llama", "gpt2"):
        hf_dir, ckpt = ch.toy_checkpoint(family, root, max_shard_size="100KB" if family == "qwen2" else None)
        out[family] = (hf_dir, ckpt, ch.data_yaml(root))
    return out


# --------------------------------------------------------------------------- bad input


def _no_leftovers(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "a temporary directory was left"


def test_bad_inputs_are_clear_errors_and_leave_nothing(converted, tmp_path):
    qwen_dir = converted["qwen2"][0]

    def convert(src, **kw):
        return hf.hf_to_megatron(src, tmp_path / "out", progress=False, log=lambda *a: None, **kw)

    # a missing shard of a sharded checkpoint
    broken = tmp_path / "missing"
    shutil.copytree(qwen_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ck.CheckpointError, match=f"missing shard.*{shard.name}"):
        convert(broken)
    _no_leftovers(tmp_path, "out")

    # a truncated shard: found before anything is written
    trunc = tmp_path / "trunc"
    shutil.copytree(qwen_dir, trunc)
    shard = sorted(trunc.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ck.CheckpointError, match=f"{shard.name}: truncated"):
        convert(trunc)
    _no_leftovers(tmp_path, "out")

    # an architecture nobody maps
    unknown = tmp_path / "unknown"
    shutil.copytree(qwen_dir, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(cfg, architectures=["FalconForCausalLM"], model_type="falcon")))
    with pytest.raises(ck.CheckpointError, match="unknown architecture FalconForCausalLM; supported: GPT2LMHeadModel"):
        convert(unknown)

    # Gemma-3: recognised and refused, with what its model has that no family adapter implements
    (unknown / "config.json").write_text(json.dumps(dict(cfg, architectures=["Gemma3ForCausalLM"], model_type="gemma3")))
    with pytest.raises(ck.CheckpointError, match="Gemma3ForCausalLM is not supported: Gemma-3 has no family adapter "
                                                 r"\(QK norms"):
        convert(unknown)

    # TP that does not divide the heads (4 heads, 2 key/value groups)
    with pytest.raises(ck.CheckpointError, match="TP=3 does not divide num_attention_heads=4"):
        convert(qwen_dir, tp=3)
    with pytest.raises(ck.CheckpointError, match=r"TP=4 does not divide num_query_groups=2 \(the key/value heads\)"):
        convert(qwen_dir, tp=4)
    _no_leftovers(tmp_path, "out")

    # a tensor config.json does not explain, and one with the wrong shape
    odd = tmp_path / "odd"
    shutil.copytree(converted["gpt2"][0], odd)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(odd / "model.safetensors"))
    save_file(dict(tensors, **{"transformer.extra.weight": torch.zeros(2)}), str(odd / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ck.CheckpointError, match="does not account for: transformer.extra.weight"):
        convert(odd)
    tensors["transformer.h.1.attn.c_attn.weight"] = tensors["transformer.h.1.attn.c_attn.weight"][:, :-1].contiguous()
    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ck.CheckpointError, match=r"transformer.h.1.attn.c_attn.weight has shape \[64, 191\]"):
        convert(odd)
    _no_leftovers(tmp_path, "out")


def test_failure_while_writing_leaves_no_partial_directory(converted, tmp_path, monkeypatch):
    hf_dir = converted["llama"][0]
    calls = {"n": 0}
    real_get = ck.TensorDir.get

    def failing_get(self, name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk on fire")
        return real_get(self, name)

    monkeypatch.setattr(ck.TensorDir, "get", failing_get)
    with pytest.raises(OSError, match="disk on fire"):
        hf.hf_to_megatron(hf_dir, tmp_path / "out", progress=False, log=lambda *a: None)
    _no_leftovers(tmp_path, "out")


def test_existing_output_is_not_clobbered(converted, tmp_path):
    """issue 11: --overwrite replaced any non-empty directory; now only an earlier conversion's output."""
    hf_dir, ckpt, _ = converted["gpt2"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ck.CheckpointError, match="exists and is not empty"):
        hf.hf_to_megatron(hf_dir, out, progress=False, log=lambda *a: None)
    with pytest.raises(ck.CheckpointError, match=r"holds files a conversion does not write \(keep.txt\)"):
        hf.hf_to_megatron(hf_dir, out, overwrite=True, progress=False, log=lambda *a: None)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    hf.hf_to_megatron(hf_dir, out, progress=False, log=lambda *a: None)  # an empty directory is fine
    hf.hf_to_megatron(hf_dir, out, overwrite=True, progress=False, log=lambda *a: None)  # an earlier one too
    assert (out / ck.META_FILE).is_file()
    _no_leftovers(tmp_path, "out.partial")


def test_load_errors_name_the_problem(converted, tmp_path):
    hf_dir, ckpt, data = converted["gpt2"]
    with pytest.raises(ConfigError, match="looks like a Hugging Face checkpoint"):
        ck.open_checkpoint(hf_dir)
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    index = json.loads((copy / ck.INDEX_FILE).read_text())
    del index["weight_map"]["decoder.layers.3.mlp.linear_fc2.bias"]
    (copy / ck.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="missing decoder.layers.3.mlp.linear_fc2.bias"):
        ck.open_checkpoint(copy)


def test_convert_cli_summary_and_error_exit(converted, tmp_path):
    hf_dir = converted["gpt2"][0]
    tool = [sys.executable, str(REPO / "tools" / "convert.py")]
    ok = subprocess.run(tool + ["hf-to-megatron", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "hf-to-megatron: wrote 52 tensors" in ok.stdout and "family gpt2" in ok.stdout
    assert "hf-to-megatron: 100%" in ok.stderr  # the progress bar
    bad = subprocess.run(tool + ["megatron-to-hf", "--ckpt", str(hf_dir), "--out", str(tmp_path / "hf")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr and "looks like a Hugging Face checkpoint" in bad.stderr
    _no_leftovers(tmp_path, "hf")
