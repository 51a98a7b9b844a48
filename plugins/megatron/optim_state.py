"""The optimizer state of a model copy across LISA switches: which tensor the torch optimizer
updates for each model parameter (the parameter, its fp32 master, or its distributed-optimizer
shard), per-parameter access to masters and Adam moments (to carry them from an old optimizer to
a rebuilt one), and the fp32 masters of frozen bf16 layers (:class:`FrozenMasters`)."""
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

#: the param-group key under which :func:`step_groups` records the Adam step a group starts from
STEP_KEY = "scalebio_adam_step"


def keeps_group_step(opt) -> bool:
    """Whether the torch optimizer ``opt`` counts Adam's step once per param group
    (``group["step"]``, used for every parameter of the group) rather than per parameter
    (``state[p]["step"]``). torch's own Adam/AdamW count per parameter; the fused Adams megatron-core
    takes where they are installed (Transformer Engine's, then Apex's FusedAdam) count per group."""
    return not type(opt).__module__.startswith("torch.")


def step_groups(steps: dict) -> dict:
    """megatron-core ``config_overrides`` that put the parameters of ``steps`` (parameter -> the Adam
    step its carried state is at) into param groups of their own, one per step value: with an
    optimizer that counts steps per group, carried and fresh parameters cannot share a group."""
    from megatron.core.optimizer import ParamKey, ParamPredicate

    out = {}
    for n in sorted(set(steps.values())):
        key = ParamKey(predicate=ParamPredicate(name=f"{STEP_KEY}={n}", fn=lambda p, n=n: steps.get(p) == n))
        out[key] = {STEP_KEY: int(n)}
    return out


def start_group_steps(optimizer) -> None:
    """Give each param group made by :func:`step_groups` its step count, in optimizers that count
    steps per group (the others get theirs per parameter, from :meth:`OptimizerView.scatter`)."""
    for o in sub_optimizers(optimizer):
        inner = getattr(o, "optimizer", None)
        if inner is None or not keeps_group_step(inner):
            continue
        for g in inner.param_groups:
            if STEP_KEY in g:
                g["step"] = g[STEP_KEY]


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
        # the param group of each tensor the optimizer updates: where a per-group step count is
        self.groups = {id(m): g for o in sub_optimizers(optimizer) if getattr(o, "optimizer", None) is not None
                       for g in o.optimizer.param_groups for m in g["params"]}
        self.distributed = any(isinstance(o, DistributedOptimizer) for o in sub_optimizers(optimizer))
        self.group = ps.get_data_parallel_group(with_context_parallel=True) if self.distributed else None

    def __contains__(self, p) -> bool:
        return p in self.targets

    def _step(self, main, opt, state) -> Optional[float]:
        """The Adam step of ``main``'s state, wherever ``opt`` keeps it (None before the first step)."""
        if keeps_group_step(opt):
            step = self.groups[id(main)].get("step")
        else:
            step = state.get("step")
        return None if step is None else float(step)

    def steps(self, params: list) -> dict:
        """Parameter -> Adam step of its state, for those of ``params`` that have one. Collective
        over the data-parallel group with the distributed optimizer (one reduction for all)."""
        found = torch.zeros(len(params), dtype=torch.float64)
        for i, p in enumerate(params):
            src = self.targets.get(p)
            if src is not None and src[1].state.get(src[0]):
                found[i] = self._step(src[0], src[1], src[1].state[src[0]]) or 0.0
        if self.distributed:
            import torch.distributed as dist

            found = found.to(params[0].device if params else torch.device("cpu"))
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.group)
            found = found.cpu()
        return {p: float(n) for p, n in zip(params, found.tolist()) if n > 0}

    def gather(self, p, moments: bool = True) -> Optional[ParamState]:
        """``p``'s state (without its moments unless ``moments``), or None where the optimizer does
        not hold ``p`` (on any rank)."""
        src = self.targets.get(p)
        if not self.distributed:
            if src is None:
                return None
            main, opt = src[0], src[1]
            state = opt.state.get(main)
            if not state or not moments:
                return ParamState(main.detach())
            return ParamState(main.detach(), {k: state[k] for k in _MOMENTS}, self._step(main, opt, state))
        import torch.distributed as dist

        rows = 1 + len(_MOMENTS) if moments else 1
        full = torch.zeros(rows, p.numel(), dtype=torch.float32, device=p.device)
        flags = torch.zeros(3, dtype=torch.float32, device=p.device)  # [holds p, has moments, Adam step]
        if src is not None:
            main, opt, a, b = src
            full[0, a:b] = main.detach().view(-1).float()
            flags[0] = 1.0
            state = opt.state.get(main)
            if state and moments:
                for i, key in enumerate(_MOMENTS, 1):
                    full[i, a:b] = state[key].view(-1).float()
                flags[1] = 1.0
                flags[2] = self._step(main, opt, state) or 0.0
        dist.all_reduce(full, group=self.group)  # each element is owned by exactly one rank: the sum is the whole
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        if float(flags[0]) == 0.0:
            return None
        held = None
        if float(flags[1]) > 0:
            held = {key: full[i].view_as(p) for i, key in enumerate(_MOMENTS, 1)}
        return ParamState(full[0].view_as(p), held, float(flags[2]) if float(flags[2]) > 0 else None)

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
        if state.step is not None and not keeps_group_step(opt):
            moved["step"] = torch.tensor(float(state.step))
        elif state.step is not None and self.groups[id(main)].get("step") != int(state.step):
            # the group's step was set when the optimizer was built (start_group_steps): a group
            # without the parameter's step would apply another bias correction to its moments
            raise RuntimeError(f"Adam state at step {state.step} scattered into a param group at step "
                               f"{self.groups[id(main)].get('step')}: build the optimizer with step_groups")
        opt.state[main] = moved


FROZEN_MASTERS = ("host", "device", "residual")


class FrozenMasters:
    """The fp32 master weights of frozen parameters (bf16 LISA), kept until their layer trains again.

    A frozen parameter's bf16 weight stays bit-identical, but its master also holds every update
    smaller than half a bf16 ulp, which the weight cannot show: rebuilding the master from the
    weight would lose them (SPEC §3). Where the masters live (``megatron.frozen_masters``):

    - ``host``: fp32 in host memory (pinned with CUDA); no device memory;
    - ``device``: fp32 on the device;
    - ``residual``: on the device as the bf16 residual ``master - bf16(master)``, 2 bytes a
      parameter; the master comes back to within 2^-8 of the residual (2^-16 of the weight).

    The data-parallel ranks hold identical masters whatever the optimizer, so each keeps an equal
    1/DP slice of every one. :meth:`put` is local; :meth:`master` and :meth:`pop` are collective
    over the data-parallel group (every rank asks for the same parameters in the same order).
    A master equal to its bf16 weight (a layer that never trained) is not stored at all.
    """

    def __init__(self, where: str, group=None):
        import torch.distributed as dist

        self.where = where
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        self.parts: dict = {}  # model parameter -> this rank's slice of its master (or residual)

    def __contains__(self, p) -> bool:
        return p in self.parts

    def _range(self, n: int) -> tuple:
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def put(self, p, master: torch.Tensor) -> None:
        """Keep ``master``, the whole fp32 master of the frozen bf16 parameter ``p``."""
        rounded = master.to(p.dtype).float()
        if torch.equal(rounded, master):  # the weight says it all
            self.parts.pop(p, None)
            return
        a, b = self._range(p.numel())
        part = master.reshape(-1)[a:b]
        if self.where == "residual":
            kept = (part - rounded.reshape(-1)[a:b]).to(torch.bfloat16)
        elif self.where == "host":
            kept = torch.empty(b - a, dtype=torch.float32, pin_memory=part.is_cuda).copy_(part)
        else:
            kept = part.detach().clone()
        self.parts[p] = kept

    def master(self, p) -> Optional[torch.Tensor]:
        """``p``'s whole fp32 master (``p``'s shape), or None where none is kept."""
        part = self.parts.get(p)
        if part is None:
            return None
        full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        a, b = self._range(p.numel())
        full[a:b] = part.to(p.device, torch.float32)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(full, group=self.group)  # zeros elsewhere: the sum is the whole
        full = full.view_as(p)
        if self.where == "residual":
            full += p.detach().float()  # a frozen weight is its master rounded to bf16
        return full

    def pop(self, p) -> Optional[torch.Tensor]:
        out = self.master(p)
        self.parts.pop(p, None)
        return out

    def bytes(self) -> dict:
        """Bytes this rank holds: ``frozen_masters`` on the device, ``frozen_masters_host`` in host memory."""
        n = sum(t.numel() * t.element_size() for t in self.parts.values())
        return {"frozen_masters": 0 if self.where == "host" else n,
                "frozen_masters_host": n if self.where == "host" else 0}
