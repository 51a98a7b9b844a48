"""Non-finite steps: checked before any update, then stop (exit 3) or skip (``run.on_nonfinite``).

The non-finite values are real, not patched in: a weight set to inf (the loss of the next pass is
NaN), or a learning rate of 1e30 (step 0's Adam update moves every weight by about 1e30, so every
later forward pass overflows).
"""
from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY, tiny_request
from scalebio.cli import main
from scalebio.config import ConfigError
from scalebio.roles import NonFiniteError
from scalebio.runner import prepare


def _state(ctx) -> list:
    """Everything a step can change: weights, fp32 masters, Adam moments and steps of u and w, the
    weights plugin's and the solver's state."""
    out = []
    for name, replica in ctx.backend.replicas.items():
        for p in replica.parameters():
            st = replica.param_state(p)
            out.append((name, "weight", p.detach().clone()))
            out.append((name, "master", st.master.detach().clone()))
            for k, v in (st.moments or {}).items():
                out.append((name, k, v.detach().clone()))
            out.append((name, "step", st.step))
    out += [("weights", k, v) for k, v in ctx.weights.state_dict().items()]
    out += [("solver", k, v) for k, v in ctx.solver.state_dict().items()]
    return out


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        ka == kb and (torch.equal(va, vb) if torch.is_tensor(va) else va == vb)
        for (*ka, va), (*kb, vb) in zip(a, b))


@pytest.mark.parametrize("model", ["u", "w"])
def test_a_non_finite_step_changes_nothing(tiny_run, model):
    """The step is refused before any update: u, w, their optimizers, lambda and the solver's
    lambda_every accumulator are bit-identical afterwards. (Before the check moved, u's and w's
    optimizer steps and lambda's update came first and only then was anything checked.)"""
    ctx, data = tiny_run("minimax.lambda_every=2")
    for m in ("u", "w"):
        ctx.backend.set_trainable(m, frozenset(range(4)), keep_state=False)
    ctx.solver.step(0, data.next_train(8), data.next_val(4))  # moments, Adam steps and a half-full accumulator
    with torch.no_grad():
        ctx.backend.replicas[model].chunks[0].decoder.final_layernorm.weight.fill_(float("inf"))
    before = _state(ctx)
    with pytest.raises(NonFiniteError, match=rf"step 1: loss of source \w+ of model {model} is nan") as err:
        ctx.solver.step(1, data.next_train(8), data.next_val(4))
    assert (err.value.step, err.value.model) == (1, model) and err.value.quantity.startswith("loss of source")
    after = _state(ctx)
    assert _same(before, after)
    # negative control: the comparison sees a real step
    ctx.backend.replicas[model].chunks[0].decoder.final_layernorm.weight.data.fill_(1.0)
    ctx.solver.step(1, data.next_train(8), data.next_val(4))
    assert not _same(after, _state(ctx))


def test_an_absent_source_is_no_divergence(tiny_run):
    """A source with no sample in the batch has a NaN mean loss: masked (no error, Delta 0, logged
    None), not taken for a diverged one."""
    ctx, data = tiny_run()
    for m in ("u", "w"):
        ctx.backend.set_trainable(m, frozenset(range(4)), keep_state=False)
    batch = data.next_train(8)
    absent = int(batch.source[0])
    rows = batch.source != absent
    metrics = ctx.solver.step(0, batch.rows(rows), data.next_val(4))
    name = ctx.source_names[absent]
    assert metrics["loss_u"][name] is None and metrics["delta"][name] == 0.0
    assert all(v is not None for n, v in metrics["loss_u"].items() if n != name)


def _cli(out, *extra) -> int:
    return main(["run", "--steps", "6", "--out", str(out), "--save-every", "1", "--set", "run.keep_checkpoints=10",
                 "--set", "optim.lr=1e30", *extra] + [a for s in TINY for a in ("--set", s)])


def _checkpoints(out) -> list:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _metrics(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_stop_names_the_step_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(out) == 3
    err = capsys.readouterr().err
    assert "error: step 1: loss of source clean of model u is nan" in err, err
    assert _checkpoints(out) == ["step-00000001"]  # step 0's, nothing after the non-finite step
    assert [r["step"] for r in _metrics(out)] == [0]
    assert not (out / "weights.json").exists()


@pytest.mark.slow
def test_skip_drops_the_updates_and_stops_after_max_skips(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(out, "--set", "run.on_nonfinite=skip", "--set", "run.max_skips=2") == 3
    err = capsys.readouterr().err
    assert "error: step 3: loss of source clean of model u is nan" in err and "run.max_skips=2" in err, err
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "skipped" not in rows[0]
    for r, n in zip(rows[1:], (1, 2)):
        assert r["skipped"].startswith(f"step {n}: loss of source clean of model u") and r["skipped_in_a_row"] == n
    assert rows[1]["pi"] == rows[2]["pi"]
    # the checkpoints after step 0 (a real update) and after the skipped steps 1 and 2 hold
    # byte-identical model state (weights, masters, moments, Adam steps); nothing after step 3
    assert _checkpoints(out) == ["step-00000001", "step-00000002", "step-00000003"]
    ckpt = out / "checkpoints"
    for model in ("u", "w"):
        files = sorted(f.name for f in (ckpt / "step-00000001" / model).iterdir() if f.suffix == ".distcp")
        assert files
        for f in files:
            first, *later = ((ckpt / s / model / f).read_bytes() for s in _checkpoints(out))
            assert all(b == first for b in later), (model, f)


@pytest.mark.parametrize("sets, message", [
    (("run.max_skips=0",), r"run.max_skips must be at least 1"),
    (("run.on_nonfinite=retry",), r"on_nonfinite"),
])
def test_bad_nonfinite_settings(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message):
        prepare(tiny_request(tmp_path, *sets))
