"""Forward/backward passes through megatron-core's pipeline schedules, and the loss function that
carries the ScaleBiO objective into the gradients (see backend.py for why nothing is divided
after the fact)."""
from __future__ import annotations

from functools import partial

import torch

from scalebio.roles import PassResult


def micro_batches(backend, batch, kind: str) -> list:
    """This data-parallel rank's contiguous share of a global batch, cut into micro-batches."""
    if batch is None:
        return []
    mbs, dp = backend.run.config.run.micro_batch, backend.layout.dp
    per_rank = len(batch) // dp
    mine = batch.rows(slice(backend.dp_rank * per_rank, (backend.dp_rank + 1) * per_rank))
    dev = backend.device
    out = []
    for i in range(0, per_rank, mbs):
        mb = mine.rows(slice(i, i + mbs))
        out.append({"kind": kind, "tokens": mb.tokens.to(dev), "labels": mb.labels.to(dev),
                    "loss_mask": mb.loss_mask.to(dev), "source": mb.source.to(dev)})
        if mb.segment is not None:  # packed rows (data.packing); the attention mask is built per forward
            out[-1].update(segment=mb.segment.to(dev), position_ids=mb.position_ids.to(dev),
                           segment_source=mb.segment_source.to(dev))
    return out

def run_schedule(backend, replica, micro_batches: list, source_coef, val_token_coef: float,
                  forward_only: bool, token_out: list | None = None) -> PassResult:
    """One schedule call over ``micro_batches``; with ``token_out`` (a list), the masked per-token
    losses of each micro-batch are appended to it in order (on the last pipeline stage)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    k = len(backend.run.source_names)
    dev = backend.device
    # [loss sums by source | sample counts by source | val CE sum | val tokens], float64 so that
    # sums over large global batches stay exact enough for the hypergradient
    stats = torch.zeros(2 * k + 2, dtype=torch.float64, device=dev)
    coef = None if source_coef is None else source_coef.to(dev, torch.float32)
    seq = backend.run.config.data.seq_length
    positions = torch.arange(seq, device=dev).unsqueeze(0)

    def loss_func(mb, per_token):
        per_token = per_token.float()
        mask = mb["loss_mask"]
        if token_out is not None:
            token_out.append((per_token * mask).detach())
        token_sum = (per_token * mask).sum(dim=1)
        tokens = mask.sum(dim=1)
        if mb["kind"] == "val":
            loss = val_token_coef * token_sum.sum()
            stats[2 * k] += token_sum.detach().sum().double()
            stats[2 * k + 1] += tokens.sum().double()
        else:
            per_sample = token_sum / tokens.clamp(min=1.0)  # 0 for a sample with no supervised token
            src = mb["source"]
            if "segment" in mb:  # packed rows: one loss per packed sample, slot = row * max samples + segment
                seg_src = mb["segment_source"]
                slots = seg_src.numel()
                slot = (torch.arange(seg_src.shape[0], device=dev)[:, None] * seg_src.shape[1]
                        + mb["segment"].clamp(min=0)).reshape(-1)  # padding has no loss: any slot will do
                sample_sum = per_token.new_zeros(slots).index_add(0, slot, (per_token * mask).reshape(-1))
                sample_tokens = mask.new_zeros(slots).index_add(0, slot, mask.reshape(-1))
                present = seg_src.reshape(-1) >= 0
                per_sample = (sample_sum / sample_tokens.clamp(min=1.0))[present]
                src = seg_src.reshape(-1)[present]
            loss = (coef[src] * per_sample).sum() if coef is not None else per_sample.sum()
            stats[:k].index_add_(0, src, per_sample.detach().double())
            stats[k:2 * k].index_add_(0, src, torch.ones_like(per_sample, dtype=torch.float64))
        return loss, tokens.sum().int(), {}

    def forward_step(data_iterator, module):
        mb = next(data_iterator)
        pos, attention_mask = positions.expand(mb["tokens"].shape[0], -1), None
        if "segment" in mb:  # packed rows: attend only within a sample (True = masked), positions restart
            seg = mb["segment"]
            same = (seg[:, :, None] == seg[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool, device=dev).tril()
            pos, attention_mask = mb["position_ids"], ~same.unsqueeze(1)
        out = module(mb["tokens"], pos, attention_mask, labels=mb["labels"])
        return out, partial(loss_func, mb)

    modules = replica.chunks if forward_only else replica.ddp
    if not forward_only:
        if not modules:
            raise RuntimeError(f"model {replica.name}: call set_trainable before forward_backward")
        for d in modules:
            d.zero_grad_buffer()
        replica.optimizer.zero_grad()
    n = len(modules)
    iterators = [iter(micro_batches) for _ in range(n)]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if n > 1 else iterators[0],
        model=modules,
        num_microbatches=len(micro_batches),
        seq_length=seq,
        micro_batch_size=backend.run.config.run.micro_batch,
        forward_only=forward_only,
    )
    # Statistics live on the last pipeline stage: sum them over data-parallel replicas, then
    # hand them to every stage, so pi and lambda are identical on all ranks.
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(stats, group=ps.get_data_parallel_group())
    if backend.layout.pp > 1:
        dist.broadcast(stats, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    stats = stats.cpu()
    return PassResult(loss_sum=stats[:k].clone(), count=stats[k:2 * k].clone(),
                      val_loss_sum=float(stats[2 * k]), val_tokens=float(stats[2 * k + 1]))
