"""Adam's step count survives a LISA switch with an optimizer that counts it per param group.

On GPU megatron-core builds Transformer Engine's (or Apex's) FusedAdam, which keeps one ``step``
per param group (``group["step"]``) and ignores any per-parameter count; torch's AdamW, the CPU
fallback, keeps ``state[p]["step"]``. A switch rebuilds the optimizer: a carried parameter (the
embeddings, final norm, output layer) must go on with its own step, not the fresh group's 1,
or its carried moments get the bias correction of a first step.

:class:`GroupStepAdam` is torch's AdamW made to count steps per group exactly as FusedAdam does
(the group's count, incremented once per ``step()``, is what every parameter's bias correction
uses), so the CPU suite runs the fused optimizers' bookkeeping; the GPU test in test_gpu.py runs
the real FusedAdam.
"""
from __future__ import annotations

import pytest
import torch


class GroupStepAdam(torch.optim.AdamW):
    """AdamW whose step count lives in the param group, as in TE's and Apex's FusedAdam."""

    def __init__(self, params, adam_w_mode: bool = True, **kwargs):
        assert adam_w_mode  # megatron asks for decoupled weight decay (AdamW)
        super().__init__(params, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1  # FusedAdam: one count per group
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # torch's update adds 1 to this and takes its bias correction from it
                state["step"] = torch.tensor(float(group["step"] - 1), dtype=torch.float32)
        return super().step(closure)


@pytest.fixture
def group_step_adam(monkeypatch):
    """megatron-core takes the fused-Adam branch it takes on a GPU with Transformer Engine."""
    import megatron.core.optimizer as mopt

    monkeypatch.setattr(mopt, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(mopt, "Adam", GroupStepAdam)
    return GroupStepAdam


def kept_update_after_switch(ctx, data, steps_before: int = 3):
    """u and w (identical) train layers {0, 1} for ``steps_before`` steps; then u switches to
    {2, 3} (moments of body layers reset) while w keeps {0, 1}, and both take one more step on the
    same batch. Returns (u's, w's) update of the word embedding in that step, and u's optimizer."""
    be = ctx.backend
    batch = data.next_train(8)
    k = len(ctx.source_names)
    counts = batch.source_counts(k)
    coef = torch.where(counts > 0, (1.0 / k) / counts.clamp(min=1), torch.zeros_like(counts))
    for m in ("u", "w"):
        be.set_trainable(m, frozenset({0, 1}), keep_state=False)

    def step(m):  # no clipping: the global norm depends on the trainable set, the embedding's gradient not
        be.forward_backward(m, batch, coef)
        be.optimizer_step(m, 1e-3, 0.0)

    for _ in range(steps_before):
        for m in ("u", "w"):
            step(m)
    be.set_trainable("u", frozenset({2, 3}), keep_state=False)
    emb = {m: be.replicas[m].chunks[0].embedding.word_embeddings.weight for m in ("u", "w")}
    before = {m: emb[m].detach().clone() for m in emb}
    assert torch.equal(before["u"], before["w"])
    for m in ("u", "w"):
        step(m)
    return emb["u"].detach() - before["u"], emb["w"].detach() - before["w"], be.replicas["u"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kept_parameter_update_is_unchanged_by_a_switch(tiny_run, group_step_adam, precision):
    """Fails before the fix: the rebuilt group started at step 1, so the embedding's update after
    the switch was (1 - beta1) / sqrt(1 - beta2)-scaled moments, not those of step 4."""
    ctx, data = tiny_run(f"megatron.precision={precision}", "megatron.transformer_impl=local")
    du, dw, replica = kept_update_after_switch(ctx, data)
    inner = replica.optimizer.chained_optimizers[0].optimizer
    assert isinstance(inner, GroupStepAdam)  # the per-group bookkeeping is what ran
    assert dw.abs().max() > 0
    assert torch.equal(du, dw), float((du - dw).abs().max())
    emb = replica.chunks[0].embedding.word_embeddings.weight
    assert replica.view().gather(emb).step == 4.0


def test_per_parameter_step_is_unchanged_by_a_switch(tiny_run):
    """The same with torch's AdamW (per-parameter steps), the CPU default."""
    ctx, data = tiny_run("megatron.transformer_impl=local")
    du, dw, replica = kept_update_after_switch(ctx, data)
    assert type(replica.optimizer.chained_optimizers[0].optimizer) is torch.optim.AdamW
    assert dw.abs().max() > 0 and torch.equal(du, dw)
