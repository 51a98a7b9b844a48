"""One model copy (u or w) of the megatron backend: its chunks, and the DDP grad buffers and
optimizer built over its trainable set only (rebuilt at each LISA switch, SPEC §3).

What a switch carries (bf16: every trained parameter has an fp32 master, SPEC §3):
- a parameter trainable before and after keeps its master; its Adam moments too when it is an
  embedding, the final norm or the output layer, or with ``keep`` (``reset`` resets moments only);
- a parameter that freezes leaves its master in :class:`FrozenMasters`, and gets it back when its
  layer is selected again (with fresh moments);
- a frozen parameter holds no gradient buffer and no optimizer state.
"""
from __future__ import annotations

import gc
from typing import Optional

import torch

from . import model as mdl
from .optim_state import FrozenMasters, OptimizerView, ParamState, optimizer_entries, start_group_steps, step_groups


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
        self.frozen: Optional[FrozenMasters] = None  # bf16 only: fp32 weights are their own masters
        if backend.options.precision == "bf16":
            from megatron.core import parallel_state as ps

            group = ps.get_data_parallel_group(with_context_parallel=True)
            self.frozen = FrozenMasters(backend.options.frozen_masters,
                                        group if group.size() > 1 else None)

    def parameters(self):
        for chunk in self.chunks:
            yield from chunk.parameters()

    # ------------------------------------------------------------------ trainable set

    def set_trainable(self, layers: frozenset, keep_state: bool) -> None:
        old = self.view() if self.optimizer is not None else None
        trained = {p for p in self.parameters() if p.requires_grad} if old is not None else set()
        for p in self.parameters():
            layer = mdl.layer_index(self.global_name[p])
            p.requires_grad_(layer is None or layer in layers)
        # the parameters whose moments carry over keep their Adam step too: an optimizer that counts
        # steps per param group (TE's, Apex's FusedAdam) gets them in groups of their own
        carried = [p for p in self.parameters() if p in trained and p.requires_grad
                   and (keep_state or mdl.layer_index(self.global_name[p]) is None)]
        # fresh state is labelled step 0: the groups then come in the same order (by step) in a run
        # resumed from its checkpoint's steps, all shifted alike, and so do the gradient-norm sums
        fresh = {p: 0.0 for p in self.parameters() if p.requires_grad}
        self._rebuild({**fresh, **(old.steps(carried) if carried else {})})  # carried: a list, one order on all ranks
        carried = set(carried)
        new = self.view()
        # the same parameters in the same order on every rank: gather and pop are collective
        for p in self.parameters():
            if p in trained:
                state = old.gather(p, moments=p.requires_grad)
                if p.requires_grad:
                    new.scatter(p, state, moments=p in carried)
                elif self.frozen is not None:
                    self.frozen.put(p, state.master)
            elif p.requires_grad and self.frozen is not None and p in self.frozen:
                new.scatter(p, ParamState(self.frozen.pop(p)), moments=False)
        self.active_layers = frozenset(layers)

    def _rebuild(self, steps: dict) -> None:
        """New DDP wrappers and optimizer over the trainable parameters; those in ``steps``
        (parameter -> Adam step of the state they will get) go into param groups by step."""
        from megatron.core.distributed import DistributedDataParallel as DDP
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides

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
        config = OptimizerConfig(
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
        )
        # megatron's own groups (no weight decay on biases and norms), each split by carried step
        overrides = {**get_standard_config_overrides(config), **step_groups(steps)}
        self.optimizer = get_megatron_optimizer(config, self.ddp, config_overrides=overrides)
        start_group_steps(self.optimizer)

    # ------------------------------------------------------------------ per-parameter state

    def view(self) -> OptimizerView:
        if self._view is None or self._view.optimizer is not self.optimizer:
            self._view = OptimizerView(self.optimizer)
        return self._view

    def param_state(self, p) -> ParamState:
        """``p``'s fp32 master weight and Adam state, whether it trains now or not (a frozen bf16
        parameter: its kept master, no moments). Collective over the data-parallel group: every
        rank asks for the same parameters in the same order."""
        held = self.view().gather(p) if self.optimizer is not None else None
        if held is None and self.frozen is not None:
            master = self.frozen.master(p)
            held = None if master is None else ParamState(master)
        return held if held is not None else ParamState(p.detach().float())

    def load_param_states(self, states: list) -> None:
        """:meth:`load_param_state` for every ``(p, state)`` of ``states`` (every parameter of this
        model, in the same order on every rank), the optimizer first rebuilt with param groups by
        the Adam step of the restored states, as a run that never stopped has them."""
        steps = {p: st.step for p, st in states if p.requires_grad and st.moments is not None and st.step is not None}
        if self.optimizer is not None and steps:
            steps = {**{p: 0.0 for p, _ in states if p.requires_grad}, **steps}
            with torch.enable_grad():  # DDP hooks its gradient accumulators through autograd
                self._rebuild(steps)
        for p, st in states:
            self.load_param_state(p, st)

    def load_param_state(self, p, state: ParamState) -> None:
        """Restore ``p``'s master, and its moments where ``p`` trains now; a frozen bf16 parameter
        keeps the master for when its layer trains again (also before the first set_trainable).
        The model weight itself is the caller's (a frozen one must be the master rounded to bf16)."""
        if self.optimizer is not None and p.requires_grad:
            self.view().scatter(p, state)
        elif self.frozen is not None:
            self.frozen.put(p, state.master.to(p.device, torch.float32))

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
        out = {"grads": grads, "optimizer": opt}
        out.update(self.frozen.bytes() if self.frozen is not None
                   else {"frozen_masters": 0, "frozen_masters_host": 0})
        return out
