"""Exact resume in one process: a run stopped by a signal and resumed equals, bit for bit, the run
that was never stopped; checkpoints are atomic, pruned, and checked against the configuration.

The run switches LISA layers at steps 0, 4 and 8 and updates lambda every 4 steps; it is stopped
after 6 steps, between two draws and two lambda updates. It writes checkpoints every 5 steps.
"""
from __future__ import annotations

import shutil

import pytest

from helpers import tiny_request
from resume_helpers import differences, drop_accumulator, plugins, records, resume, swap_model_state
from resume_helpers import run as helpers_run
from scalebio.checkpointing import CheckpointError, scan
from scalebio.config import ConfigError
from scalebio.runner import RunRequest, execute, prepare

STEPS, STOP = 10, 6
COMMON_SETS = ("lisa.interval=4", "lisa.gamma=2", "minimax.lambda_every=4", "softmax.lr=0.2", "minimax.alpha=5")


def run(out, *sets, steps=STEPS, stop_after=None):
    return helpers_run(out, *COMMON_SETS, *sets, steps=steps, stop_after=stop_after)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run, and one stopped after STOP steps (checkpoints every 5 steps)."""
    root = tmp_path_factory.mktemp("resume")
    run(root / "whole")
    message = run(root / "stopped", "run.save_every=5", stop_after=STOP)
    return root, message


def _copy(runs, tmp_path):
    root, _ = runs
    return shutil.copytree(root / "stopped", tmp_path / "stopped")


def test_stopped_and_resumed_equals_uninterrupted_with_negative_controls(runs, tmp_path, capsys):
    root, message = runs
    whole = records(root / "whole")
    assert whole[4]["trainable_layers"] != whole[8]["trainable_layers"]  # a LISA switch after the resume point
    assert [r["lambda_updated"] for r in whole[:8]] == [False, False, False, True] * 2  # stopped mid-accumulation
    assert message is not None and f"after {STOP} of {STEPS} steps" in message and "--resume" in message
    out = _copy(runs, tmp_path)
    assert [s for s, _ in scan(out)[0]] == [5, 6]
    capsys.readouterr()
    resume(out)
    assert f"from step-{STOP:08d}: {STOP} of {STEPS} steps done, continuing at step {STOP}" in capsys.readouterr().out
    assert differences(records(out), whole) == []
    assert whole[-1]["pi"] != whole[0]["pi"]  # pi moved, so equal trajectories are not trivially equal
    # the final checkpoint at 10; the latest two are kept
    assert [s for s, _ in scan(out)[0]] == [6, 10]

    # negative controls: resumed from a perturbed state, the same comparison fails
    stale = _copy(runs, tmp_path / "stale_model")
    swap_model_state(stale, STOP, 5)  # the models and optimizers of step 5 with everything else of step 6
    resume(stale)
    assert any(key == "loss_u" for _, key in differences(records(stale), whole))

    lost = _copy(runs, tmp_path / "lost_accumulator")
    drop_accumulator(lost, STOP)
    resume(lost)
    diff = differences(records(lost), whole)
    assert (7, "lambda_updated") in diff and any(key == "pi" for _, key in diff)


def test_partial_outputs_after_a_signal(runs):
    import json

    root, _ = runs
    out = root / "stopped"
    partial = json.loads((out / "partial.json").read_text())
    assert partial["partial"] is True and partial["steps_done"] == STOP and partial["steps"] == STEPS
    assert partial["resume"].endswith(f"--resume {out}")
    weights = json.loads((out / "weights.json").read_text())
    assert weights == records(root / "whole")[STOP]["pi"]  # pi after the steps done
    assert len((out / "pi.csv").read_text().splitlines()) == 1 + STOP + 1  # header, the steps, the final pi
    assert (out / "pi.png").stat().st_size > 1000
    assert len(records(out)) == STOP


def test_resumed_run_clears_the_partial_mark(runs, tmp_path):
    out = _copy(runs, tmp_path)
    resume(out)
    assert not (out / "partial.json").exists()
    assert len((out / "pi.csv").read_text().splitlines()) == 1 + STEPS + 1


def test_half_written_and_hidden_checkpoints_are_ignored_with_a_message(runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    ckpts = out / "checkpoints"
    # what a kill leaves: a directory still being written, and one that never got its manifest
    shutil.copytree(ckpts / f"step-{STOP:08d}", ckpts / ".step-00000009.partial")
    shutil.copytree(ckpts / f"step-{STOP:08d}", ckpts / "step-00000008")
    (ckpts / "step-00000008" / "scalebio_state.json").unlink()
    capsys.readouterr()
    p = prepare(RunRequest(resume=str(out), steps=STOP), plugins=plugins("lisa"))
    said = capsys.readouterr().out
    assert p.resume.step == STOP
    assert "ignoring" in said and ".step-00000009.partial" in said and "step-00000008" in said


def test_resume_accepts_only_steps_and_layout_changes(runs, tmp_path):
    out = _copy(runs, tmp_path)
    with pytest.raises(ConfigError, match=r"optim\.lr is 0\.002 here \(--set optim\.lr=0\.002\) but 0\.001"):
        prepare(RunRequest(resume=str(out), sets=("optim.lr=0.002",)), plugins=plugins("lisa"))
    with pytest.raises(ConfigError, match="--data cannot be given"):
        prepare(RunRequest(resume=str(out), data="x.yaml"), plugins=plugins("lisa"))
    with pytest.raises(ConfigError, match="run.steps=3 .* below the 6 steps"):
        prepare(RunRequest(resume=str(out), steps=3), plugins=plugins("lisa"))
    # the layout may change; run.steps may grow
    p = prepare(RunRequest(resume=str(out), steps=14, sets=("megatron.use_distributed_optimizer=true",)),
                plugins=plugins("lisa"))
    assert p.resume.step == STOP and p.config.run.steps == 14
    # an edited config.yaml is a difference too, named by key and file
    cfg = out / "config.yaml"
    cfg.write_text(cfg.read_text().replace("interval: 4", "interval: 5"))
    with pytest.raises(ConfigError, match=r"lisa\.interval is 5 here \(.*config\.yaml\) but 4"):
        prepare(RunRequest(resume=str(out)), plugins=plugins("lisa"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.yaml"):
        prepare(RunRequest(resume=str(tmp_path / "empty")), plugins=plugins("lisa"))
    with pytest.raises(CheckpointError, match="the path does not exist"):
        prepare(RunRequest(resume=str(tmp_path / "nothing")), plugins=plugins("lisa"))


def test_a_completed_run_extends_with_more_steps(runs, tmp_path, capsys):
    import yaml

    out = _copy(runs, tmp_path)
    resume(out)
    capsys.readouterr()
    resume(out, steps=STEPS + 2)
    said = capsys.readouterr().out
    assert f"from step-{STEPS:08d}" in said and "learning-rate schedule" in said
    assert [r["step"] for r in records(out)] == list(range(STEPS + 2))
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["steps"] == STEPS + 2


def test_a_checkpoints_path_that_is_not_a_directory_fails_before_the_first_step(tmp_path):
    # --overwrite would remove it as an earlier run's output; without it the run refuses the directory
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    req = tiny_request(out, "run.save_every=2", steps=2)
    req.out = str(out)
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        execute(prepare(req), overwrite=False)
    assert not (out / "metrics.jsonl").exists()


def test_packed_bf16_resume_is_exact(tmp_path):
    # bf16 keeps fp32 masters, also of frozen layers (lisa.gamma=2 of 4); packing keeps its own
    # stream of rows. LISA draws at 0, 3, 6 (checkpoints 4 and 5 under the same draw, a switch
    # after the stop at 5), lambda updates at 3, 7.
    sets = ("data.packing=true", "megatron.transformer_impl=local", "megatron.precision=bf16", "lisa.interval=3",
            "run.save_every=4")
    run(tmp_path / "whole", *sets[:-1], steps=8)
    run(tmp_path / "stopped", *sets, steps=8, stop_after=5)
    whole = records(tmp_path / "whole")
    assert whole[3]["trainable_layers"] != whole[6]["trainable_layers"]
    for name in ("resumed", "perturbed"):
        shutil.copytree(tmp_path / "stopped", tmp_path / name)
    resume(tmp_path / "resumed")
    assert differences(records(tmp_path / "resumed"), whole) == []
    swap_model_state(tmp_path / "perturbed", 5, 4)  # negative control
    resume(tmp_path / "perturbed")
    assert any(key == "loss_u" for _, key in differences(records(tmp_path / "perturbed"), whole))


def test_a_full_disk_at_a_checkpoint_is_a_clear_error_and_the_previous_one_stays(tmp_path, monkeypatch):
    import json
    import os
    import subprocess

    from scalebio.checkpointing import read_common

    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        # after the checkpoint of step 2 the disk fills, but for room for the steps' metrics rows
        monkeypatch.setenv("SCALEBIO_TEST_FILL", str(mount / "filler"))
        monkeypatch.setenv("SCALEBIO_TEST_FILL_AFTER", "2")
        monkeypatch.setenv("SCALEBIO_TEST_FILL_ROOM", str(64 << 10))
        out = mount / "run"
        with pytest.raises(CheckpointError, match=r"cannot write the checkpoint of step 4 in .*: No space left on "
                                                  r"device.*the previous checkpoint .*step-00000002 is intact"):
            run(out, "run.save_every=2", steps=6)
        complete, ignored = scan(out)
        assert [s for s, _ in complete] == [2] and ignored == []  # nothing half-written is left
        assert read_common(complete[0][1])["step"] == 2
        assert [r["step"] for r in records(out)] == [0, 1, 2, 3]
        monkeypatch.delenv("SCALEBIO_TEST_FILL_AFTER")
        (mount / "filler").unlink()  # space again: the run goes on from step 2, dropping rows 2 and 3
        resume(out)
        assert [r["step"] for r in records(out)] == list(range(6))
        assert json.loads((out / "weights.json").read_text())
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
