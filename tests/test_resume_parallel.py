"""Exact resume under tensor, pipeline and data parallelism (gloo, CPU), and resume at another layout.

Each layout runs, in one group of spawned ranks: the uninterrupted run of STEPS steps; the same run
with checkpoints every 4 steps, stopped by SIGTERM after STOP steps (at TP2xPP2 only rank 3 gets
the signal, as when a scheduler signals one process); its resumption, which must equal the
uninterrupted run bit for bit at every step; and, as the negative control, a resumption from a
checkpoint whose models and optimizers are those of an earlier step, which must differ. LISA draws
at steps 0, 3 and 6 and lambda updates at steps 2 and 5: the stop falls mid-accumulation, a switch
and an update after it. The stopped run is then resumed in this process at one rank (TP1; DP1 with the plain optimizer):
pi within 1e-6 of the uninterrupted run.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from distributed import run_ranks
from resume_helpers import differences, records, resume, swap_model_state
from resume_helpers import run as helpers_run

STEPS, STOP, SAVE = 8, 5, 4
COMMON = ("run.micro_batch=2", "lisa.interval=3", "lisa.gamma=2", "minimax.lambda_every=3", "softmax.lr=0.2",
          "minimax.alpha=5", "run.save_every=%d" % SAVE)


def _wait_for(path: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"rank 0 did not prepare {path}")
        time.sleep(0.05)


def _sequence(rank, world, root, sets, signal_rank):
    """Every run of one layout in one process group (the backend leaves a group it did not create),
    so ranks start once."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        root = Path(root)
        helpers_run(root / "whole", *COMMON, *sets, steps=STEPS)
        message = helpers_run(root / "stopped", *COMMON, *sets, steps=STEPS, stop_after=STOP,
                              signal_rank=signal_rank)
        ready = root / "copies.ready"
        if rank == 0:  # every rank reads the checkpoint's manifest before the next collective
            for name in ("resumed", "perturbed"):
                shutil.copytree(root / "stopped", root / name)
            swap_model_state(root / "perturbed", STOP, SAVE)
            ready.touch()
        _wait_for(ready)
        resume(root / "resumed")
        resume(root / "perturbed")
        return message
    finally:
        dist.destroy_process_group()


# name: (world, layout settings, the rank signalled (None: every rank), the one-rank layout it resumes at)
LAYOUTS = {
    "tp2pp2": (4, ("megatron.tp=2", "megatron.pp=2"), 3, ("megatron.tp=1", "megatron.pp=1")),
    "dp2_distopt": (2, ("megatron.use_distributed_optimizer=true",), None,
                    ("megatron.use_distributed_optimizer=false",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_is_exact_at_the_same_layout_and_close_at_one_rank(tmp_path, name):
    world, sets, signal_rank, single = LAYOUTS[name]
    messages = run_ranks(_sequence, world, str(tmp_path), sets, signal_rank, timeout=400)
    assert all(m is not None and f"after {STOP} of {STEPS} steps" in m for m in messages)  # every rank stopped
    whole = records(tmp_path / "whole")
    assert whole[3]["trainable_layers"] != whole[6]["trainable_layers"]  # a LISA switch after the resume point
    assert [r["lambda_updated"] for r in whole] == [False, False, True] * 2 + [False] * 2
    assert len(records(tmp_path / "stopped")) == STOP
    assert differences(records(tmp_path / "resumed"), whole) == []
    assert any(key == "loss_u" for _, key in differences(records(tmp_path / "perturbed"), whole))

    # the same checkpoint at one rank: only the summation order changes
    shutil.copytree(tmp_path / "stopped", tmp_path / "one_rank")
    resume(tmp_path / "one_rank", *single)
    one = records(tmp_path / "one_rank")
    assert [r["step"] for r in one] == list(range(STEPS))

    def pi_gap(run):
        return max(abs(r["pi"][k] - w["pi"][k]) for r, w in zip(run, whole) for k in w["pi"])

    assert pi_gap(one) <= 1e-6
    assert pi_gap(records(tmp_path / "perturbed")) > 1e-6  # the tolerance tells a wrong state apart
