"""Preemption and kills of a real ``python tools/run.py`` process, as a scheduler does them.

SIGTERM: exit code 75 and the exact resume command, which continues the run bit for bit; a second
signal (SIGINT, as Ctrl-C sends) ends the process at once. ``kill -9`` while a checkpoint is being written leaves the previous
one loadable: the resumed run drops the rows after it and equals the uninterrupted run. The issue's
own sequence on the embedded demo (30 steps, several minutes) runs with SCALEBIO_DEMO_RESUME=1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY
from resume_helpers import differences, records, resume
from resume_helpers import run as helpers_run

STEPS = 6
SETS = ("lisa.interval=3", "lisa.gamma=2", "minimax.lambda_every=4", "softmax.lr=0.2", "minimax.alpha=5")
EX_TEMPFAIL = 75


def _cli(out: Path, *extra) -> list:
    sets = [a for s in TINY + SETS for a in ("--set", s)]
    return [sys.executable, "tools/run.py", "--model", "tiny", "--plugins", "lisa", "--seed", "1234",
            "--steps", str(STEPS), "--out", str(out), *sets, *extra]


def _start(cmd, log: Path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    fh = open(log, "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, text=True, env=env), fh


def _until(condition, proc, what: str, timeout: float = 300, poll: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def _rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "whole"
    helpers_run(out, *SETS, steps=STEPS)
    return records(out)


@pytest.mark.slow
def test_sigterm_exits_75_with_the_resume_command_which_continues_exactly(tmp_path, whole):
    out = tmp_path / "R"
    proc, fh = _start(_cli(out, "--save-every", "2"), tmp_path / "first.log")
    with fh:
        _until(lambda: _rows(out) >= 2, proc, "two logged steps")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == EX_TEMPFAIL
    said = (tmp_path / "first.log").read_text()
    command = f"python tools/run.py --resume {out}"
    assert said.rstrip().endswith(f"Resume with: {command}"), said[-1500:]
    assert json.loads((out / "partial.json").read_text())["resume"] == command
    done = len(records(out))
    assert 2 <= done < STEPS

    again = subprocess.run([sys.executable] + command.split()[1:], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-1500:] + again.stderr[-1500:]
    assert f"from step-{done:08d}: {done} of {STEPS} steps done" in again.stdout
    assert differences(records(out), whole) == []


@pytest.mark.slow
def test_a_second_signal_ends_the_run_at_once(tmp_path):
    # SIGINT here (Ctrl-C), SIGTERM in the test above: both stop the run the same way
    out = tmp_path / "R"
    log = tmp_path / "log"
    proc, fh = _start(_cli(out, "--save-every", "100"), log)
    with fh:
        _until(lambda: _rows(out) >= 1, proc, "a logged step")
        proc.send_signal(signal.SIGINT)
        _until(lambda: "SIGINT received" in log.read_text(), proc, "the first signal's message", poll=0.005)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == -signal.SIGINT  # the signal's default action: no save, no exit code 75
    assert "send SIGINT again to stop at once" in log.read_text()
    assert not (out / "partial.json").exists() and not list((out / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_kill_9_while_a_checkpoint_is_written_leaves_the_previous_one(tmp_path, whole, capsys):
    out = tmp_path / "R"
    partial = out / "checkpoints" / ".step-00000004.partial"
    proc, fh = _start(_cli(out, "--save-every", "2"), tmp_path / "log")
    with fh:
        _until(partial.exists, proc, f"{partial} to appear", poll=0.002)
        proc.kill()
        proc.wait(timeout=60)
    assert partial.exists() and [r["step"] for r in records(out)] == [0, 1, 2, 3]
    capsys.readouterr()
    resume(out)
    said = capsys.readouterr().out
    assert f"removed {partial}" in said and "from step-00000002: 2 of 6 steps done" in said
    assert differences(records(out), whole) == []  # rows 2 and 3 were dropped and run again
    assert len((out / "pi.csv").read_text().splitlines()) == 1 + STEPS + 1


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SCALEBIO_DEMO_RESUME") != "1",
                    reason="the issue's 30-step demo sequence takes minutes: set SCALEBIO_DEMO_RESUME=1")
def test_the_demo_sequence_of_issue_10(tmp_path):
    r, r2 = tmp_path / "R", tmp_path / "R2"
    py = [sys.executable, "tools/run.py"]
    proc, fh = _start(py + ["--steps", "30", "--save-every", "5", "--out", str(r)], tmp_path / "first.log")
    with fh:
        _until(lambda: _rows(r) >= 7, proc, "seven logged steps", timeout=1800)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=600) == EX_TEMPFAIL
    assert len(records(r)) < 30
    for cmd in (py + ["--resume", str(r)], py + ["--steps", "30", "--out", str(r2)]):
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = records(r), records(r2)
    assert [x["step"] for x in a] == list(range(30)) and [x["pi"] for x in a] == [x["pi"] for x in b]
