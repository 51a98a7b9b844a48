"""The optimizer state of a model copy across LISA switches: which tensor the torch optimizer
updates for each model parameter (the parameter, its fp32 master, or its distributed-optimizer
shard), and the transfer of masters and Adam moments from an old optimizer to a rebuilt one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


@dataclass
class ParamState:
    """One parameter's optimizer-side state, whole: this rank's tensor-parallel shard of it, with
    every data-parallel shard joined (``p``'s shape)."""

    master: torch.Tensor  # the fp32 master weight (the parameter itself in fp32 without a separate master)
    moments: Optional[dict] = None  # exp_avg, exp_avg_sq in fp32; None before the first step
    step: Optional[float] = None  # Adam's step count, where the optimizer keeps it per parameter


class OptimizerView:
    """Per-parameter access to a megatron optimizer's state, whatever its kind (plain, fp32
    masters of bf16 weights, distributed-optimizer shards).

    With the distributed optimizer :meth:`gather` and :meth:`scatter` are collective over the
    data-parallel group: every rank calls them for the same parameters in the same order, and
    the extra memory is one parameter at a time.
    """

    def __init__(self, optimizer):
        from megatron.core import parallel_state as ps
        from megatron.core.optimizer import DistributedOptimizer

        self.optimizer = optimizer
        self.targets = optimizer_targets(optimizer)
        self.distributed = any(isinstance(o, DistributedOptimizer) for o in sub_optimizers(optimizer))
        self.group = ps.get_data_parallel_group(with_context_parallel=True) if self.distributed else None

    def __contains__(self, p) -> bool:
        return p in self.targets

    def gather(self, p) -> Optional[ParamState]:
        """``p``'s state, or None where the optimizer does not hold ``p`` (on any rank)."""
        src = self.targets.get(p)
        if not self.distributed:
            if src is None:
                return None
            main, opt = src[0], src[1]
            state = opt.state.get(main)
            if not state:
                return ParamState(main.detach())
            step = state.get("step")
            return ParamState(main.detach(), {k: state[k] for k in _MOMENTS},
                              None if step is None else float(step))
        import torch.distributed as dist

        full = torch.zeros(1 + len(_MOMENTS), p.numel(), dtype=torch.float32, device=p.device)
        flags = torch.zeros(3, dtype=torch.float32, device=p.device)  # [holds p, has moments, Adam step]
        if src is not None:
            main, opt, a, b = src
            full[0, a:b] = main.detach().view(-1).float()
            flags[0] = 1.0
            state = opt.state.get(main)
            if state:
                for i, key in enumerate(_MOMENTS, 1):
                    full[i, a:b] = state[key].view(-1).float()
                flags[1] = 1.0
                flags[2] = float(state.get("step", 0.0))  # torch's AdamW keeps it per parameter; TE's per group
        dist.all_reduce(full, group=self.group)  # each element is owned by exactly one rank: the sum is the whole
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        if float(flags[0]) == 0.0:
            return None
        moments = None
        if float(flags[1]) > 0:
            moments = {key: full[i].view_as(p) for i, key in enumerate(_MOMENTS, 1)}
        return ParamState(full[0].view_as(p), moments, float(flags[2]) if float(flags[2]) > 0 else None)

    def scatter(self, p, state: ParamState, moments: bool = True) -> None:
        """Give ``p`` the master weight of ``state`` and, with ``moments``, its Adam state (this
        rank's part of it). A parameter the optimizer does not hold here is skipped."""
        dst = self.targets.get(p)
        if dst is None:
            return
        main, opt, a, b = dst
        if main is not state.master:
            main.data.view(-1).copy_(state.master.reshape(-1)[a:b])
        if not moments or state.moments is None:
            return
        if not self.distributed and state.moments["exp_avg"].shape == main.shape:
            moved = dict(state.moments)  # the old optimizer is dropped: take its tensors, no copy
        else:
            moved = {k: v.reshape(-1)[a:b].view_as(main).to(main.dtype).clone() for k, v in state.moments.items()}
        if state.step is not None:
            moved["step"] = torch.tensor(float(state.step))
        opt.state[main] = moved


def transfer_optimizer_state(old, new, params: list) -> None:
    """Carry master weights and Adam moments of ``params`` from the old optimizer to the rebuilt one.

    With the distributed optimizer the old and new shard boundaries differ, so each parameter's
    full state is reassembled over the data-parallel group and every rank keeps its new shard.
    ``params`` must be in the same order on every rank.
    """
    src, dst = OptimizerView(old), OptimizerView(new)
    for p in params:
        state = src.gather(p)
        if state is not None and state.moments is not None:
            dst.scatter(p, state)
