"""bf16 + LISA loses no training (issue 8, SPEC §3): every trained parameter's fp32 master
survives every switch, whether its layer stays selected, freezes, or is selected again."""
from __future__ import annotations

import importlib.metadata
import json
import textwrap
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from helpers import tiny_request
from scalebio.plugins import Plugins, discover
from scalebio.runner import execute, open_run, prepare
from scalebio_plugins.megatron.model import layer_index
from scalebio_plugins.megatron.optim_state import optimizer_targets

# the issue's case: LISA gamma=2 every 5 steps, one draw for u and w, the LISA learning rate
ISSUE_CASE = ("lisa.gamma=2", "lisa.interval=5", "lisa.draw=shared", "optim.lr=5e-6")

CAPTURE = """
from scalebio import hookimpl

FINAL = {}

@hookimpl
def scalebio_run_end(run, result):
    for m, replica in run.backend.replicas.items():
        FINAL[m] = {replica.global_name[p]: (p.detach().float().clone(), replica.param_state(p).master.clone())
                    for p in replica.parameters()}
"""


def _initial(tmp_path, precision):
    with open_run(prepare(tiny_request(tmp_path / f"init-{precision}", f"megatron.precision={precision}")),
                  verbose=False) as (ctx, _):
        replica = ctx.backend.replicas["w"]
        return {replica.global_name[p]: p.detach().float().clone() for p in replica.parameters()}


def _run(tmp_path, monkeypatch, precision):
    """The issue's run through execute(): the final weights and fp32 masters of u and w, and the
    layers each model ever trained."""
    (tmp_path / "capture_final.py").write_text(textwrap.dedent(CAPTURE))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = list(importlib.metadata.entry_points(group="scalebio"))
    eps.append(importlib.metadata.EntryPoint("capture", "capture_final", "scalebio"))
    req = tiny_request(tmp_path / precision, f"megatron.precision={precision}", *ISSUE_CASE, steps=20)
    execute(prepare(req, plugins=Plugins(["lisa", "capture"], infos=discover(eps))))
    import capture_final

    out = tmp_path / precision / "run" / "metrics.jsonl"
    selected = {"u": set(), "w": set()}
    for r in map(json.loads, out.read_text().splitlines()):
        for m, layers in r.get("trainable_layers", {}).items():
            selected[m].update(layers)
    final = dict(capture_final.FINAL)
    capture_final.FINAL.clear()
    return final, selected


def _body_movement(final, initial, which):
    """Sum over the body-layer elements of u and w of |final - initial|."""
    return sum(float((final[m][n][which] - initial[n]).abs().sum())
               for m in final for n in final[m] if layer_index(n) is not None)


@pytest.mark.slow
def test_bf16_lisa_body_layers_move_as_far_as_fp32(tmp_path, monkeypatch):
    """The issue's case: 4-layer Qwen2-style model, LISA gamma=2, interval 5, shared draw, lr 5e-6,
    20 steps. Body-layer movement (L1, u and w) of the fp32 masters from the bf16-rounded initial
    weights, against the fp32 run's movement from its initial weights:

    - before this fix (masters rebuilt from the bf16 weight at every switch): 0.441x, and 8 body
      tensors that trained (the norm weights of the layers trained only in the middle) ended
      with their initial value;
    - with it: 0.994x, none unchanged.

    The bf16 weights are compared as the masters rounded to bf16, not by their own movement: a
    weight moves only once its master has moved half an ulp from where it started, so at this
    learning rate even full-parameter bf16 training without LISA moves its bf16 weights 0.62x as
    far as fp32 (measured; 0.47x here with the fix, 0.39x before it).
    """
    init32, init16 = _initial(tmp_path, "fp32"), _initial(tmp_path, "bf16")
    assert all(torch.equal(init16[n], init32[n].bfloat16().float()) for n in init32)  # bf16-rounded init
    final32, _ = _run(tmp_path, monkeypatch, "fp32")
    final16, selected = _run(tmp_path, monkeypatch, "bf16")
    assert selected["u"] == selected["w"] == {0, 1, 2, 3}
    ratio = _body_movement(final16, init16, 1) / _body_movement(final32, init32, 0)
    assert ratio >= 0.8, f"bf16 body layers moved {ratio:.3f}x as far as fp32"
    unchanged = [(m, n) for m in final16 for n, (_, master) in final16[m].items()
                 if layer_index(n) in selected[m] and torch.equal(master, init16[n])]
    assert not unchanged, f"trained body tensors that ended where they started: {unchanged}"
    # what the model holds (and a checkpoint writes) is the master rounded to bf16
    assert all(torch.equal(w, master.bfloat16().float()) for m in final16 for w, master in final16[m].values())


def _layer_params(replica, layer):
    return [p for p in replica.parameters() if layer_index(replica.global_name[p]) == layer]


@pytest.mark.parametrize("where", ["host", "device", "residual"])
def test_a_frozen_layer_keeps_its_master_until_it_trains_again(tiny_run, where):
    ctx, data = tiny_run("megatron.precision=bf16", f"megatron.frozen_masters={where}", plugins=["lisa"])
    backend, solver = ctx.backend, ctx.solver
    for m in ("u", "w"):
        backend.set_trainable(m, frozenset({0, 1}), keep_state=False)
    for step in range(2):
        solver.step(step, data.next_train(8), data.next_val(4))
    replica = backend.replicas["u"]
    layer0 = _layer_params(replica, 0)
    masters = [replica.param_state(p).master.clone() for p in layer0]
    weights = [p.detach().clone() for p in layer0]
    assert not all(torch.equal(m, p.float()) for m, p in zip(masters, layer0))  # something a rebuild would lose

    backend.set_trainable("u", frozenset({2, 3}), keep_state=False)
    solver.step(2, data.next_train(8), data.next_val(4))
    assert all(torch.equal(p, w) for p, w in zip(layer0, weights))  # frozen: bit-identical
    kept = [replica.param_state(p).master for p in layer0]
    frozen = sum(p.numel() for layer in (0, 1) for p in _layer_params(replica, layer))
    held = replica.state_bytes()
    if where == "residual":
        # within 2^-8 of the residual master - bf16(master)
        for k, m, p in zip(kept, masters, layer0):
            assert ((k - m).abs() <= (m - p.float()).abs() * 2 ** -8).all()
        assert held["frozen_masters"] == 2 * frozen and held["frozen_masters_host"] == 0
    else:
        assert all(torch.equal(k, m) for k, m in zip(kept, masters))
        key = "frozen_masters_host" if where == "host" else "frozen_masters"
        assert held[key] == 4 * frozen and held["frozen_masters" if where == "host" else "frozen_masters_host"] == 0

    backend.set_trainable("u", frozenset({0, 3}), keep_state=False)
    targets = optimizer_targets(replica.optimizer)
    for p, k in zip(layer0, kept):
        assert torch.equal(targets[p][0], k), "a reselected layer must continue from its kept master"
    # now layers 1 (trained at steps 0-1) and 2 (step 2) are frozen with masters
    assert replica.state_bytes()["frozen_masters" if where != "host" else "frozen_masters_host"] == \
        (2 if where == "residual" else 4) * sum(p.numel() for layer in (1, 2) for p in _layer_params(replica, layer))
    solver.step(3, data.next_train(8), data.next_val(4))


def _dp2_reselect(rank, world, out):
    from scalebio.runner import open_run, prepare

    req = tiny_request(Path(out), "megatron.precision=bf16", "megatron.use_distributed_optimizer=true",
                       "run.micro_batch=2", plugins=["lisa"], steps=10)
    with open_run(prepare(req), verbose=False) as (ctx, data):
        backend, solver = ctx.backend, ctx.solver
        for m in ("u", "w"):
            backend.set_trainable(m, frozenset({0, 1}), keep_state=False)
        for step in range(2):
            solver.step(step, data.next_train(8), data.next_val(4))
        replica = backend.replicas["w"]
        layer0 = _layer_params(replica, 0)
        before = [replica.param_state(p).master.clone() for p in layer0]  # gathered over DP
        weights = [p.detach().float().clone() for p in layer0]
        backend.set_trainable("w", frozenset({2, 3}), keep_state=False)
        solver.step(2, data.next_train(8), data.next_val(4))
        frozen_bytes = replica.state_bytes()["frozen_masters_host"]
        backend.set_trainable("w", frozenset({0, 2}), keep_state=False)
        after = [replica.param_state(p).master.clone() for p in layer0]  # from the rebuilt optimizer's shards
        solver.step(3, data.next_train(8), data.next_val(4))
        moved = [replica.param_state(p).master for p in layer0]
        return {"before": before, "after": after, "moved": moved, "weights": weights,
                "frozen_bytes": frozen_bytes,
                "frozen_numel": sum(p.numel() for layer in (0, 1) for p in _layer_params(replica, layer))}


@pytest.mark.slow
def test_dp2_distributed_optimizer_frozen_layer_continues_from_its_master(tmp_path):
    ranks = run_ranks(_dp2_reselect, 2, str(tmp_path / "run"), timeout=300)
    for r in ranks:
        assert all(torch.equal(a, b) for a, b in zip(r["after"], r["before"]))
        assert all(torch.equal(a, b) for a, b in zip(r["after"], ranks[0]["before"]))
        # there was something to lose (the master is not its bf16 weight) and training went on from it
        assert not all(torch.equal(a, w) for a, w in zip(r["before"], r["weights"]))
        assert not all(torch.equal(a, b) for a, b in zip(r["moved"], r["after"]))
    # each data-parallel rank keeps half of the frozen masters, not a full copy
    assert sum(r["frozen_bytes"] for r in ranks) == 4 * ranks[0]["frozen_numel"]
    assert all(r["frozen_bytes"] <= 4 * r["frozen_numel"] // 2 + 4 * 32 for r in ranks)
