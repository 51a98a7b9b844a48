"""The optimizer state of a model copy across LISA switches: which tensor the torch optimizer
updates for each model parameter (the parameter, its fp32 master, or its distributed-optimizer
shard), and the transfer of masters and Adam moments from an old optimizer to a rebuilt one."""
from __future__ import annotations

import torch


def sub_optimizers(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_targets(optimizer) -> dict:
    """model parameter -> (main, torch optimizer, start, end): ``main`` is the tensor the torch
    optimizer updates for the elements [start, end) of the flattened parameter on this rank (the
    parameter itself, its fp32 master copy, or its distributed-optimizer shard)."""
    from megatron.core.optimizer import DistributedOptimizer

    out = {}
    for o in sub_optimizers(optimizer):
        if isinstance(o, DistributedOptimizer):
            for p, (group, order) in o.model_param_group_index_map.items():
                r = o._get_model_param_range_map(p)["param"]
                out[p] = (o.optimizer.param_groups[group]["params"][order], o.optimizer, r.start, r.end)
        elif hasattr(o, "float16_groups"):  # mixed precision: fp32 master copies
            for g16, g32 in zip(o.float16_groups, o.fp32_from_float16_groups):
                out.update((p, (main, o.optimizer, 0, p.numel())) for p, main in zip(g16, g32))
            for g in o.fp32_from_fp32_groups:
                out.update((p, (p, o.optimizer, 0, p.numel())) for p in g)
        else:
            for g in o.optimizer.param_groups:
                out.update((p, (p, o.optimizer, 0, p.numel())) for p in g["params"])
    return out


def optimizer_entries(optimizer) -> dict:
    """model parameter -> (main parameter, optimizer state) for the parameters that have state."""
    out = {}
    for p, (main, opt, _, _) in optimizer_targets(optimizer).items():
        state = opt.state.get(main)
        if state:
            out[p] = (main, state)
    return out


_MOMENTS = ("exp_avg", "exp_avg_sq")


def transfer_optimizer_state(old, new, params: list) -> None:
    """Carry master weights and Adam moments of ``params`` from the old optimizer to the rebuilt one.

    With the distributed optimizer the old and new shard boundaries differ, so each parameter's
    full state is reassembled over the data-parallel group (one parameter at a time, to keep the
    extra memory at the size of the largest parameter) and every rank keeps its new shard.
    ``params`` must be in the same order on every rank.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import DistributedOptimizer

    old_targets, new_targets = optimizer_targets(old), optimizer_targets(new)
    distributed = any(isinstance(o, DistributedOptimizer) for o in sub_optimizers(new))
    group = ps.get_data_parallel_group(with_context_parallel=True) if distributed else None
    for p in params:
        src, dst = old_targets.get(p), new_targets.get(p)
        state = src[1].state.get(src[0]) if src is not None else None
        if not distributed:
            if state and dst is not None:
                if dst[0] is not src[0]:
                    dst[0].data.copy_(src[0].data)  # fp32 master weights survive the rebuild
                dst[1].state[dst[0]] = state
            continue
        n = p.numel()
        full = torch.zeros(1 + len(_MOMENTS), n, dtype=torch.float32, device=p.device)
        flags = torch.zeros(2, dtype=torch.float32, device=p.device)  # [has state, Adam step]
        if state:
            main, _, a, b = src
            full[0, a:b] = main.detach().view(-1).float()
            for i, key in enumerate(_MOMENTS, 1):
                full[i, a:b] = state[key].view(-1).float()
            flags[0] = 1.0
            flags[1] = float(state.get("step", 0.0))  # torch's AdamW keeps it per parameter; TE's per group
        dist.all_reduce(full, group=group)  # each element is owned by exactly one rank: the sum is the whole
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        if float(flags[0]) == 0.0 or dst is None:
            continue  # no state yet, or this rank owns no part of the parameter now
        main, opt, a, b = dst
        main.data.view(-1).copy_(full[0, a:b])
        moved = {key: full[i, a:b].view_as(main).to(main.dtype).clone() for i, key in enumerate(_MOMENTS, 1)}
        if float(flags[1]) > 0:
            moved["step"] = torch.tensor(float(flags[1]))
        opt.state[main] = moved
