"""The parallel layout of the megatron backend and its validation.

Every check runs before anything heavy starts and names the numbers that conflict.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from scalebio.config import ConfigError


@dataclass
class Layout:
    """A TP x PP x DP layout (VPP virtual stages per rank, or an uneven pipeline split)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp}" + (f" VPP{self.vpp}" if self.vpp else "")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def split_problems(num_layers: int, heads: int, groups: int, tp: int, pp: int, vpp=None, first=None,
                   last=None) -> list:
    """What stops a model of this shape from being split TP x PP (x VPP, or unevenly)."""
    problems = []
    if heads % tp:
        problems.append(f"TP={tp} does not divide num_attention_heads={heads}")
    if groups % tp:
        problems.append(f"TP={tp} does not divide num_query_groups={groups} (the key/value heads)")
    if vpp is not None:
        if pp < 2:
            problems.append(f"interleaved pipeline (VPP={vpp}) needs PP >= 2, got PP={pp}")
        if vpp < 2:
            problems.append(f"VPP={vpp}: give at least 2 virtual stages or leave it unset")
    if first is not None or last is not None:
        if pp < 2 or vpp is not None:
            problems.append("an uneven pipeline split needs PP >= 2 and no VPP")
        else:
            middle_layers = num_layers - (first or 0) - (last or 0)
            middle_stages = pp - (first is not None) - (last is not None)
            if middle_layers < 0 or (middle_stages and middle_layers % middle_stages) or \
                    (not middle_stages and middle_layers):
                problems.append(f"num_layers={num_layers} cannot be split with {first} layers on the first "
                                f"and {last} on the last of PP={pp} stages")
    else:
        chunks = pp * (vpp or 1)
        if num_layers % chunks:
            what = f"PP x VPP = {pp} x {vpp} = {chunks}" if vpp else f"PP={pp}"
            problems.append(f"{what} does not divide num_layers={num_layers} (or give an uneven split "
                            f"with num_layers_in_first/last_pipeline_stage)")
    return problems


def check_layout(config, opts, world: int) -> Layout:
    """Reject impossible layouts before anything heavy starts, naming the numbers that conflict."""
    model, run = config.model, config.run
    tp, pp, vpp = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size, \
        opts.virtual_pipeline_model_parallel_size
    first, last = opts.num_layers_in_first_pipeline_stage, opts.num_layers_in_last_pipeline_stage
    if tp < 1 or pp < 1:
        raise ConfigError(f"megatron: tensor and pipeline parallel sizes must be >= 1, got TP={tp}, PP={pp}")
    if world % (tp * pp):
        raise ConfigError(f"megatron: world size {world} is not a multiple of TP x PP = {tp} x {pp} = {tp * pp}: "
                          f"launch with torchrun --nproc-per-node {tp * pp} (or a multiple), or choose --tp/--pp "
                          f"whose product divides {world}")
    dp = world // (tp * pp)
    problems = split_problems(model.num_layers, model.num_attention_heads,
                              model.num_query_groups or model.num_attention_heads, tp, pp, vpp, first, last)
    per_step = run.micro_batch * dp
    if run.global_batch % per_step:
        problems.append(f"run.global_batch={run.global_batch} is not divisible by micro_batch x DP = "
                        f"{run.micro_batch} x {dp} = {per_step}")
    if run.val_batch % per_step:
        problems.append(f"run.val_batch={run.val_batch} is not divisible by micro_batch x DP = "
                        f"{run.micro_batch} x {dp} = {per_step}")
    if vpp is not None and run.global_batch % per_step == 0:
        for what, n in (("global_batch", run.global_batch), ("val_batch", run.val_batch)):
            if (n // per_step) % pp:
                problems.append(f"the interleaved schedule needs micro-batches per step divisible by PP={pp}: "
                                f"run.{what}={n} gives {n // per_step} micro-batches per rank")
    if problems:
        raise ConfigError(f"megatron layout TP={tp} PP={pp} DP={dp} (world size {world}) is impossible: "
                          + "; ".join(problems))
    return Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
