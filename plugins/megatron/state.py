"""Resumable training state of the megatron backend, in megatron-core ``dist_checkpointing``.

Each model copy (u, w) is one dist_checkpointing directory holding, for every parameter under its
layout-independent name (global layer numbers, local-spec norm names, a tied output layer as the
embedding), the kinds

    NAME/weight        the model weight, in the model's dtype
    NAME/master        the fp32 master weight (bf16 models only: in fp32 it is the weight)
    NAME/exp_avg       Adam's moments, where the optimizer holds the parameter and has stepped
    NAME/exp_avg_sq
    NAME/step          Adam's step count of that parameter

Each tensor is tensor-parallel sharded exactly as the weight is: a split along ``dim`` with stride
``s`` (SwiGLU's fc1 holds [gate; up]: s = 2) is stored with an extra axis of size ``s`` before
``dim``, so a rank's shard is one contiguous block of the global tensor at every TP size.
Data-parallel copies (and the last stage's copy of a tied embedding) are replicas that are not
written twice. The vocabulary rows are stored padded and loaded with ``allow_shape_mismatch``:
padding rows are zero in weights and moments, so a layout with other padding reads the rows it
shares and zeros for the rest. With the distributed optimizer a parameter's master and moments
are first reassembled over the data-parallel group (``Replica.param_state``) and scattered again
at load (``Replica.load_param_state``), so DP size and the optimizer kind may change too.

Writing uses megatron-core's torch_dist format through torch's own single-process
``FileSystemWriter``: megatron's default writer forks writer processes and starts a spawned
manager process on each process's first save (measured: docs/configuration.md).

A save holds, per rank, one model copy's optimizer state as whole tensors of this rank's
tensor-parallel shard (without the distributed optimizer these are the optimizer's own tensors,
no copy). u and w are written one after the other.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .checkpoint import CheckpointError, canonical_name, is_vocab_tensor, tp_split_of
from .optim_state import ParamState

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _in_process_strategy():
    """megatron-core's torch_dist save strategy, writing in this process with torch's FileSystemWriter."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)

    class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
        def __init__(self):
            super().__init__("torch_dist", 1, thread_count=1)

        def save(self, sharded_state_dict, checkpoint_dir):
            import torch.distributed.checkpoint as dcp

            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            dcp.save(mcore_to_pyt_state_dict(flat, False),
                     storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=True),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                              flatten_state_dict=False))

    return InProcessTorchDistSave()


class _Entry:
    """How one parameter of this rank maps onto the checkpoint's global tensors."""

    def __init__(self, backend, replica, p):
        from megatron.core import parallel_state as ps

        model = backend.run.config.model
        glob = replica.global_name[p]
        self.p = p
        self.name = canonical_name(glob, model)
        self.split = tp_split_of(self.name, model)
        self.vocab = is_vocab_tensor(self.name)
        tied_copy = glob != self.name and glob == "output_layer.weight"  # the last stage's tied embedding
        tp_rank, dp_rank = backend.tp_rank, ps.get_data_parallel_rank(with_context_parallel=True)
        self.tp_rank, self.tp_world = tp_rank, backend.layout.tp
        # a replica id of all zeros writes the tensor; every other copy only reads it
        self.replica_id = (int(tied_copy), 0 if self.split is not None else tp_rank, dp_rank)
        self.scalar_replica_id = (int(tied_copy), tp_rank, dp_rank)

    def key(self, kind: str) -> str:
        return f"{self.name}/{kind}"

    def sharded(self, kind: str, local: torch.Tensor):
        from megatron.core.dist_checkpointing import ShardedTensor

        key = self.key(kind)
        if self.split is None:
            return ShardedTensor.from_rank_offsets(key, local, replica_id=self.replica_id,
                                                   allow_shape_mismatch=self.vocab)
        dim, stride = self.split
        shape = list(local.shape)
        view = local.reshape(shape[:dim] + [stride, shape[dim] // stride] + shape[dim + 1:])
        return ShardedTensor.from_rank_offsets(key, view, (dim + 1, self.tp_rank, self.tp_world),
                                               replica_id=self.replica_id, allow_shape_mismatch=self.vocab)

    def sharded_step(self, step: torch.Tensor):
        from megatron.core.dist_checkpointing import ShardedTensor

        return ShardedTensor.from_rank_offsets(self.key("step"), step, replica_id=self.scalar_replica_id)


def _entries(backend, replica) -> list:
    # the same order on every rank of a data-parallel group: param_state gathers collectively
    return [_Entry(backend, replica, p) for p in replica.parameters()]


def save_state(backend, path: Path) -> None:
    """Write every model copy's weights, fp32 masters and Adam state under ``path`` (collective)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    for model_name, replica in backend.replicas.items():
        folder = Path(path) / model_name
        folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        sd = {}
        for e in _entries(backend, replica):
            state = replica.param_state(e.p)
            sd[e.key("weight")] = e.sharded("weight", e.p.detach())
            if e.p.dtype != torch.float32:
                sd[e.key("master")] = e.sharded("master", state.master.detach().float())
            if state.moments is not None:
                for kind in _MOMENTS:
                    sd[e.key(kind)] = e.sharded(kind, state.moments[kind].detach().float())
            if state.step is not None:
                sd[e.key("step")] = e.sharded_step(torch.tensor([float(state.step)], dtype=torch.float64))
        dist_checkpointing.save(sd, str(folder), sharded_strategy=_in_process_strategy())


@torch.no_grad()
def load_state(backend, path: Path) -> None:
    """Restore what :func:`save_state` wrote, at this backend's layout (which may differ).

    The trainable sets must already be those of the saved run (the caller applies the layer
    selection of the checkpoint's step first): moments are restored where the optimizer holds the
    parameter, and a stored moment of a parameter the optimizer does not hold is an error.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    for model_name, replica in backend.replicas.items():
        folder = Path(path) / model_name
        if not (folder / "metadata.json").is_file():
            raise CheckpointError(f"checkpoint {path} has no state for model {model_name} ({folder} is missing or "
                                  f"incomplete)")
        try:
            stored = dist_checkpointing.load_tensors_metadata(str(folder))
        except (CheckpointingException, OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read checkpoint {folder}: {exc}") from None
        entries = _entries(backend, replica)
        sd, plan = {}, []
        for e in entries:
            kinds = ["weight"] + (["master"] if e.p.dtype != torch.float32 else [])
            # not "held by this rank's optimizer": a distributed optimizer holds only its shards, and
            # a rank may own none of a small parameter
            trains = replica.optimizer is not None and e.p.requires_grad
            has_moments = f"{e.name}/exp_avg" in stored
            if has_moments and not trains:
                raise CheckpointError(f"checkpoint {folder} holds Adam moments of {e.name}, which does not train at this "
                                      f"step here: the layer selection differs from the saved run's")
            if has_moments:
                kinds += list(_MOMENTS)
            missing = [k for k in kinds if f"{e.name}/{k}" not in stored]
            if missing:
                raise CheckpointError(f"checkpoint {folder} has no {e.name}/{missing[0]}: it was written for another "
                                      f"model or precision")
            for kind in kinds:
                dtype = e.p.dtype if kind == "weight" else torch.float32
                sd[e.key(kind)] = e.sharded(kind, torch.empty(e.p.shape, dtype=dtype, device=e.p.device))
            step = f"{e.name}/step" in stored and has_moments
            if step:
                sd[e.key("step")] = e.sharded_step(torch.zeros(1, dtype=torch.float64))
            plan.append((e, kinds, step))
        try:
            with warnings.catch_warnings():  # megatron-core calls a torch.distributed.checkpoint API torch deprecates
                warnings.simplefilter("ignore", FutureWarning)
                loaded = dist_checkpointing.load(sd, str(folder))
        except CheckpointingException as exc:
            raise CheckpointError(f"cannot load checkpoint {folder} at this layout: {exc}") from None
        states = []
        for e, kinds, step in plan:
            got = {k: loaded[e.key(k)].reshape(e.p.shape) for k in kinds}
            e.p.data.copy_(got["weight"])
            master = got.get("master", got["weight"].float())
            moments = {k: got[k] for k in _MOMENTS} if "exp_avg" in got else None
            step_count = float(loaded[e.key("step")][0]) if step else None
            states.append((e.p, ParamState(master, moments, step_count)))
        replica.load_param_states(states)
