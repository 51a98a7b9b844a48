"""One model copy (u or w) of the megatron backend: its chunks, and the DDP grad buffers and
optimizer built over its trainable set only (rebuilt at each LISA switch, SPEC §3)."""
from __future__ import annotations

import gc
from typing import Optional

import torch

from . import model as mdl
from .optim_state import OptimizerView, ParamState, optimizer_entries, transfer_optimizer_state


class Replica:
    """One model copy (u or w): its chunks, and the DDP wrappers and optimizer over the active set."""

    def __init__(self, name: str, chunks: list, tconfig, backend):
        self.name = name
        self.chunks = chunks
        self.tconfig = tconfig
        self.backend = backend
        self.ddp: list = []
        self.optimizer = None
        self.active_layers: Optional[frozenset] = None
        self._view: Optional[OptimizerView] = None
        names = {}
        for chunk in chunks:
            glob = mdl.global_names(chunk)
            for local, p in chunk.named_parameters():
                names[p] = glob[local]
        self.global_name = names  # parameter -> layout-independent name

    def parameters(self):
        for chunk in self.chunks:
            yield from chunk.parameters()

    # ------------------------------------------------------------------ trainable set

    def set_trainable(self, layers: frozenset, keep_state: bool) -> None:
        old_optimizer, old_active = self.optimizer, self.active_layers or frozenset()
        for p in self.parameters():
            layer = mdl.layer_index(self.global_name[p])
            p.requires_grad_(layer is None or layer in layers)
        self._rebuild()
        if old_optimizer is not None:
            # embeddings, final norm and output layer always keep their moments; a body layer only
            # with keep_state and only when it stays selected
            kept = [p for p in self.parameters() if p.requires_grad and (
                mdl.layer_index(self.global_name[p]) is None
                or (keep_state and mdl.layer_index(self.global_name[p]) in old_active))]
            transfer_optimizer_state(old_optimizer, self.optimizer, kept)
        self.active_layers = frozenset(layers)

    def _rebuild(self) -> None:
        from megatron.core.distributed import DistributedDataParallel as DDP
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        # Drop the old buffers and optimizer first; DDP's grad hooks die with the old wrapper.
        self.ddp, self.optimizer = [], None
        for p in self.parameters():
            p.grad = None
            if hasattr(p, "main_grad"):
                del p.main_grad
            if p.data._base is not None:  # a view into an old DDP param buffer: own the storage
                p.data = p.data.clone()
        gc.collect()
        opts = self.backend.options
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=opts.use_distributed_optimizer,
        )
        self.ddp = [DDP(config=self.tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
                    for i, chunk in enumerate(self.chunks)]
        o = self.backend.run.config.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=opts.precision == "bf16",
                params_dtype=torch.bfloat16 if opts.precision == "bf16" else torch.float32,
                use_distributed_optimizer=opts.use_distributed_optimizer,
            ),
            self.ddp,
        )

    # ------------------------------------------------------------------ per-parameter state

    def view(self) -> OptimizerView:
        if self._view is None or self._view.optimizer is not self.optimizer:
            self._view = OptimizerView(self.optimizer)
        return self._view

    def param_state(self, p) -> ParamState:
        """``p``'s fp32 master weight and Adam state, whether it trains now or not. Collective with
        the distributed optimizer: every rank asks for the same parameters in the same order."""
        held = self.view().gather(p) if self.optimizer is not None else None
        return held if held is not None else ParamState(p.detach().float())

    def load_param_state(self, p, state: ParamState) -> None:
        """Restore ``p``'s master (and its moments, where the optimizer holds ``p``); the model
        weight itself is the caller's."""
        if self.optimizer is not None and p in self.view():
            self.view().scatter(p, state)

    # ------------------------------------------------------------------ accounting

    def state_bytes(self) -> dict:
        grads = sum(buf.grad_data.numel() * buf.grad_data.element_size()
                    for d in self.ddp for buf in list(d.buffers) + list(d.expert_parallel_buffers))
        opt = 0
        if self.optimizer is not None:
            for p, (main, state) in optimizer_entries(self.optimizer).items():
                opt += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
                if main.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():  # a separate fp32 master
                    opt += main.numel() * main.element_size()
        return {"grads": grads, "optimizer": opt}
