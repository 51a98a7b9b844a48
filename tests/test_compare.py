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
    assert "test loss (mean ± sd)" in printed and "learned - uniform: " in printed and "compare took " in printed

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


def _equal_size_data(tmp_path: Path) -> Path:
    """Two demo sources cut to 100 samples each: natural weights equal uniform's."""
    for name in ("clean", "typos"):
        lines = (DEMO_DIR / f"{name}.jsonl").read_text().splitlines(True)[:100]
        (tmp_path / f"{name}.jsonl").write_text("".join(lines))
    data = _data(tmp_path)
    text = data.read_text().replace(f"{DEMO_DIR}/clean.jsonl", str(tmp_path / "clean.jsonl"))
    text = text.replace(f"{DEMO_DIR}/typos.jsonl", str(tmp_path / "typos.jsonl"))
    data.write_text("\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("shuffled:")) + "\n")
    return data


@pytest.mark.parametrize("equal", [True, False])
def test_natural_equal_to_uniform_is_not_run_twice(tmp_path, equal):
    from scalebio.compare.run import CompareRequest, check, plan, same_as_uniform
    from scalebio.plugins import discover

    data = _equal_size_data(tmp_path) if equal else _data(tmp_path)
    req = CompareRequest(data=str(data), model="tiny", steps=2, seeds=2, baselines=(), sets=SMALL)
    runs = plan(req, tmp_path / "cmp", discover())
    check(runs)
    kept, same = same_as_uniform(runs)
    arms = [r.arm for r in kept if r.is_train]
    if equal:  # the same weights and seeds would draw the same rows: uniform's runs stand for natural's
        assert same == {"natural": "uniform"} and arms == ["learned", "uniform"] * 2
    else:  # the demo's sources differ in size (2000, 700, 700): natural is its own arm
        assert same == {} and kept == runs and arms == ["learned", "uniform", "natural"] * 2


def test_report_shows_an_arm_not_run_as_the_one_it_equals(tmp_path):
    from scalebio.compare import report
    from scalebio.compare.run import CompareRequest, Run

    def train_run(arm, seed, loss):
        run = Run(f"train-{arm}-s{seed}", arm, seed, None, weights=arm)
        run.result = {"test": {"loss": loss, "tokens": 100}, "weights": {"a": 0.5, "b": 0.5}, "out": f"/r/{arm}{seed}",
                      "trained_on": {"steps": 3, "samples": 24, "supervised_tokens": 240}, "global_batch": 8,
                      "seconds": 1.0, "command": ["scalebio"]}
        return run

    runs = [train_run(a, s, loss) for s, pair in ((1, (2.0, 2.5)), (2, (2.2, 2.6))) for a, loss in
            zip(("learned", "uniform"), pair)]
    cfg = type("Cfg", (), {"model": type("M", (), {"name": "tiny"})})
    result = report.summarize(CompareRequest(data="d.yaml"), runs, cfg, same={"natural": "uniform"})
    assert list(result["arms"]) == ["learned", "uniform", "natural"]
    assert result["arms"]["natural"]["same_as"] == "uniform"
    assert result["arms"]["natural"]["test_loss"]["values"] == [2.5, 2.6] and result["arms"]["natural"]["runs"] == []
    assert result["minus_uniform"]["learned"]["values"] == pytest.approx([-0.5, -0.4])
    text = report.table(result)
    assert "= uniform (not run)" in text and "natural: the same weights as uniform" in text
    report.write(tmp_path, result)
    assert json.loads((tmp_path / "compare.json").read_text())["arms"]["natural"]["same_as"] == "uniform"
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_a_recipe_with_its_own_weights_plugin_works_with_every_arm(tmp_path):
    """The recipe names simplex; the doremi baseline and the train arms take the weights role
    themselves, and their --plugins replace the recipe's (it failed: 'simplex and doremi both
    take the weights role')."""
    from scalebio.compare.run import CompareRequest, check, plan
    from scalebio.plugins import discover
    from scalebio.runner import prepare

    req = CompareRequest(data=str(_data(tmp_path)), model="tiny", steps=2, seeds=1, configs=("small-pretrained",),
                         sets=SMALL)
    runs = plan(req, tmp_path / "cmp", discover())
    check(runs)
    picked = {r.arm: prepare(r.request).plugins.selected for r in runs if not r.is_train}
    assert picked["bilevel"]["weights"] == "simplex" and picked["doremi"]["weights"] == "doremi"
    assert picked["doremi"]["layer_selection"] == "lisa"
