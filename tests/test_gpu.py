"""GPU tier: what CPU cannot show. Skipped without CUDA (this project's CI has none).

Run on a GPU machine with ``pip install -e ".[test,gpu]"`` and ``pytest -m gpu``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from helpers import tiny_request

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(rank, world, out, sets):
    from scalebio.runner import execute, prepare

    req = tiny_request(Path(out), *sets, steps=3)
    req.out = str(out)
    execute(prepare(req))
    return torch.cuda.max_memory_allocated()


def _records(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_transformer_engine_spec_matches_the_local_spec_in_bf16(tmp_path):
    pytest.importorskip("transformer_engine")
    # same seed, same weights (init is by parameter name; TE's fused norms start at ones like the local ones)
    run_ranks(_run, 1, str(tmp_path / "local"), ("megatron.precision=bf16", "megatron.transformer_impl=local"))
    run_ranks(_run, 1, str(tmp_path / "te"), ("megatron.precision=bf16",
                                             "megatron.transformer_impl=transformer_engine"))
    local, te = _records(tmp_path / "local"), _records(tmp_path / "te")
    for a, b in zip(local, te):
        assert abs(a["val_loss"] - b["val_loss"]) < 2e-2, (a["val_loss"], b["val_loss"])
        for name in a["loss_u"]:
            assert abs(a["loss_u"][name] - b["loss_u"][name]) < 2e-2


def test_bf16_run_learns_and_stays_finite(tmp_path):
    run_ranks(_run, 1, str(tmp_path / "bf16"), ("megatron.precision=bf16",))
    records = _records(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in records)
    assert records[-1]["val_loss"] < records[0]["val_loss"]


def test_fused_adam_keeps_a_carried_parameters_step_across_a_switch(tiny_run):
    """TE's (else Apex's) FusedAdam counts Adam's step per param group: after a LISA switch the
    embedding's update equals its update without the switch (test_group_step.py on CPU)."""
    import megatron.core.optimizer as mopt

    if mopt.USING_PYTORCH_OPTIMIZER:
        pytest.skip("neither Transformer Engine nor Apex is installed: megatron-core uses torch's AdamW")
    from test_group_step import kept_update_after_switch

    ctx, data = tiny_run("megatron.precision=bf16")
    du, dw, replica = kept_update_after_switch(ctx, data)
    assert type(replica.optimizer.chained_optimizers[0].optimizer).__name__ == "FusedAdam"
    emb = replica.chunks[0].embedding.word_embeddings.weight
    assert replica.view().gather(emb).step == 4.0
    assert dw.abs().max() > 0
    assert torch.equal(du, dw), float((du - dw).abs().max())
