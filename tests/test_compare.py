"""``scalebio compare`` end to end on the demo data with the tiny model from scratch: the pipeline
holds together (files, shapes, seeds, determinism). It asserts no effectiveness: that is measured
in docs/results.md and the benchmark, not here."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import DEMO_DIR
from scalebio import cli

SMALL = ("model.num_layers=2", "run.global_batch=8", "run.micro_batch=4", "run.val_batch=4",
         "data.seq_length=32", "train.eval_samples=8")


def _data(tmp_path: Path, test: bool = True) -> Path:
    val = (DEMO_DIR / "validation.jsonl").read_text().splitlines(True)
    (tmp_path / "val.jsonl").write_text("".join(val[:40]))
    (tmp_path / "test.jsonl").write_text("".join(val[360:]))
    text = (DEMO_DIR / "data.yaml").read_text().replace("path: ", f"path: {DEMO_DIR}/")
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("validation:")) + "\n"
    text += f"validation: {{path: {tmp_path / 'val.jsonl'}, format: prompt_response}}\n"
    if test:
        text += f"test: {{path: {tmp_path / 'test.jsonl'}, format: prompt_response}}\n"
    (tmp_path / "data.yaml").write_text(text)
    return tmp_path / "data.yaml"


def _argv(data, out, *extra):
    argv = ["compare", "--data", str(data), "--out", str(out), "--steps", "2", "--seeds", "2", *extra]
    for s in SMALL:
        argv += ["--set", s]
    return argv


@pytest.mark.slow
def test_small_compare_writes_every_arm_and_seed_and_reproduces(tmp_path, capsys):
    data, out = _data(tmp_path), tmp_path / "cmp"
    assert cli.main(_argv(data, out, "--train-steps", "3")) == 0
    printed = capsys.readouterr().out
    assert "test loss (mean ± sd)" in printed and "learned - uniform: " in printed

    result = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arms = ["learned", "doremi", "uniform", "natural"]
    assert list(result["arms"]) == arms and result["seeds"] == [1234, 1235]
    names = ["clean", "shuffled", "typos"]
    # the weights each arm trained on: the learning runs' weights.json, uniform, natural
    assert result["weights"]["learned"] == json.loads((out / "bilevel" / "weights.json").read_text())
    assert result["weights"]["doremi"] == json.loads((out / "doremi" / "weights.json").read_text())
    assert result["weights"]["uniform"] == pytest.approx({n: 1 / 3 for n in names})
    assert result["weights"]["natural"]["clean"] > 0.5
    for arm in arms:
        runs = result["arms"][arm]["runs"]
        assert [r["seed"] for r in runs] == [1234, 1235]
        losses = [json.loads((Path(r["out"]) / "test.json").read_text())["loss"] for r in runs]
        assert result["arms"][arm]["test_loss"]["values"] == losses and result["arms"][arm]["test_loss"]["n"] == 2
        for r in runs:
            config = (Path(r["out"]) / "config.yaml").read_text()
            assert f"seed: {r['seed']}" in config and "steps: 3" in config
            assert json.loads((Path(r["out"]) / "weights.json").read_text()) == pytest.approx(result["weights"][arm])
    # matched budgets: every train run saw 3 steps x 8 rows
    assert result["budget"]["train_steps"] == 3 and result["budget"]["global_batch"] == 8
    assert all(v == [24, 24] for v in result["budget"]["samples"].values())
    # differences are paired by seed
    uniform = result["arms"]["uniform"]["test_loss"]["values"]
    for arm in ("learned", "doremi", "natural"):
        values = result["arms"][arm]["test_loss"]["values"]
        assert result["minus_uniform"][arm]["values"] == pytest.approx([v - u for v, u in zip(values, uniform)])
    # seeds matter, and a run is a function of its command: rerun one, get the same test loss bit for bit
    assert uniform[0] != uniform[1]
    run = result["arms"]["natural"]["runs"][1]
    cmd = [a if a != run["out"] else str(tmp_path / "again") for a in run["command"]]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    again = json.loads((tmp_path / "again" / "test.json").read_text())
    assert again["loss"] == result["arms"]["natural"]["test_loss"]["values"][1]


def test_compare_needs_a_test_set_and_says_so_before_running(tmp_path, capsys):
    data = _data(tmp_path, test=False)
    assert cli.main(_argv(data, tmp_path / "cmp")) == 2
    err = capsys.readouterr().err
    assert "compare scores every arm on a held-out test set" in err and "add 'test:'" in err
    assert not (tmp_path / "cmp").exists()


def test_unknown_baseline_and_bad_settings_fail_before_running(tmp_path, capsys):
    data = _data(tmp_path)
    assert cli.main(_argv(data, tmp_path / "cmp", "--baselines", "doremy")) == 2
    err = capsys.readouterr().err
    assert "--baselines doremy: not an installed weight-learning solver plugin (installed: doremi" in err
    assert cli.main(_argv(data, tmp_path / "cmp", "--train-set", "train.val_evry=2")) == 2
    assert "unknown key 'train.val_evry'" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
