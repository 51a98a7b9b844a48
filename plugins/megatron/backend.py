"""The ``megatron`` backend: u and w as megatron-core GPTModels under one TP x PP x DP layout.

How the ScaleBiO objective reaches the gradients (SPEC §2, §6):
- The loss function handed to the schedule computes, per micro-batch, the sum of
  ``pi_s / N_s * loss_i`` over training rows and ``val_token_coef * CE`` over validation tokens,
  with N_s and the validation token count taken from the *global* batch. So the gradient of the
  global objective is the plain sum of the micro-batch gradients over micro-batches and
  data-parallel ranks.
- ``calculate_per_token_loss=True`` stops Megatron from dividing by the number of micro-batches
  and makes DDP sum (not average) over data-parallel ranks; the finalize function is wrapped so
  it does not rescale by a token count either. Nothing is divided after the fact.
- One schedule call per model per optimizer step: w's training and validation micro-batches go
  through the same call, tagged.

LISA memory: the DDP grad buffers and the optimizer are built over the trainable parameters only
and rebuilt at each switch, so frozen layers hold neither gradients nor optimizer state.
"""
from __future__ import annotations

import datetime
import gc
import os
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch

from scalebio.config import ConfigError
from scalebio.roles import MODELS, Backend, PassResult

from . import model as mdl


@dataclass
class MegatronOptions:
    """``megatron:`` section. Sizes use megatron-core's names; tp/pp/vpp are accepted aliases."""

    tensor_model_parallel_size: int = field(default=1, metadata={"aliases": ["tp"]})
    pipeline_model_parallel_size: int = field(default=1, metadata={"aliases": ["pp"]})
    virtual_pipeline_model_parallel_size: Optional[int] = field(default=None, metadata={"aliases": ["vpp"]})
    # uneven pipeline split: layers on the first / last stage, the rest shared evenly
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    use_distributed_optimizer: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    make_vocab_size_divisible_by: int = 128
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_minutes: float = 30.0


@dataclass
class Layout:
    world: int
    tp: int
    pp: int
    dp: int
    vpp: Optional[int] = None
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(config, opts: MegatronOptions, world: int) -> Layout:
    """Reject impossible layouts before anything heavy starts, naming the numbers that conflict."""
    model, run = config.model, config.run
    tp, pp, vpp = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size, \
        opts.virtual_pipeline_model_parallel_size
    problems = []
    if tp < 1 or pp < 1:
        raise ConfigError(f"megatron: tensor and pipeline parallel sizes must be >= 1, got TP={tp}, PP={pp}")
    if world % (tp * pp):
        raise ConfigError(f"megatron: world size {world} is not a multiple of TP x PP = {tp} x {pp} = {tp * pp}")
    dp = world // (tp * pp)
    groups = model.num_query_groups or model.num_attention_heads
    if model.num_attention_heads % tp:
        problems.append(f"TP={tp} does not divide num_attention_heads={model.num_attention_heads}")
    if groups % tp:
        problems.append(f"TP={tp} does not divide num_query_groups={groups}")
    if vpp is not None:
        if pp < 2:
            problems.append(f"interleaved pipeline (VPP={vpp}) needs PP >= 2, got PP={pp}")
        if vpp < 2:
            problems.append(f"VPP={vpp}: give at least 2 virtual stages or leave it unset")
    first, last = opts.num_layers_in_first_pipeline_stage, opts.num_layers_in_last_pipeline_stage
    if first is not None or last is not None:
        if pp < 2 or vpp is not None:
            problems.append("an uneven pipeline split needs PP >= 2 and no VPP")
        else:
            middle_layers = model.num_layers - (first or 0) - (last or 0)
            middle_stages = pp - (first is not None) - (last is not None)
            if middle_layers < 0 or (middle_stages and middle_layers % middle_stages) or \
                    (not middle_stages and middle_layers):
                problems.append(f"num_layers={model.num_layers} cannot be split with {first} layers on the first "
                                f"and {last} on the last of PP={pp} stages")
    else:
        chunks = pp * (vpp or 1)
        if model.num_layers % chunks:
            what = f"PP x VPP = {pp} x {vpp} = {chunks}" if vpp else f"PP={pp}"
            problems.append(f"{what} does not divide num_layers={model.num_layers} (or give an uneven split "
                            f"with num_layers_in_first/last_pipeline_stage)")
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
    return Layout(world=world, tp=tp, pp=pp, dp=dp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)


def _finalize_grads(model_chunks, num_tokens=None, **kwargs):
    """finalize_model_grads without the division by the token count: our loss is already normalised."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    finalize_model_grads(model_chunks, None, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Replica:
    """One model copy (u or w): its chunks, and the DDP wrappers and optimizer over the active set."""

    def __init__(self, name: str, chunks: list, tconfig, backend: "MegatronBackend"):
        self.name = name
        self.chunks = chunks
        self.tconfig = tconfig
        self.backend = backend
        self.ddp: list = []
        self.optimizer = None
        self.active_layers: Optional[frozenset] = None
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
        old_active = self.active_layers or frozenset()
        kept = {}
        if self.optimizer is not None:
            for p, (main, state) in _optimizer_entries(self.optimizer).items():
                layer = mdl.layer_index(self.global_name[p])
                if layer is None or (keep_state and layer in old_active and layer in layers):
                    kept[p] = (main, state)
        for p in self.parameters():
            layer = mdl.layer_index(self.global_name[p])
            p.requires_grad_(layer is None or layer in layers)
        self._rebuild()
        for p, (new_main, new_opt) in _optimizer_targets(self.optimizer).items():
            if p in kept:
                old_main, state = kept[p]
                if new_main is not p:
                    new_main.data.copy_(old_main.data)  # fp32 master weights survive the rebuild
                new_opt.state[new_main] = state
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

    # ------------------------------------------------------------------ accounting

    def state_bytes(self) -> dict:
        grads = sum(buf.grad_data.numel() * buf.grad_data.element_size()
                    for d in self.ddp for buf in list(d.buffers) + list(d.expert_parallel_buffers))
        opt = 0
        if self.optimizer is not None:
            for p, (main, state) in _optimizer_entries(self.optimizer).items():
                opt += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
                if main is not p:
                    opt += main.numel() * main.element_size()
        return {"grads": grads, "optimizer": opt}


def _sub_optimizers(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_targets(optimizer) -> dict:
    """model parameter -> (the parameter the torch optimizer updates, that torch optimizer)."""
    from megatron.core.optimizer import DistributedOptimizer

    out = {}
    for o in _sub_optimizers(optimizer):
        if isinstance(o, DistributedOptimizer):
            raise NotImplementedError("optimizer state transfer with the distributed optimizer")
        if hasattr(o, "float16_groups"):  # mixed precision: fp32 master copies
            for g16, g32 in zip(o.float16_groups, o.fp32_from_float16_groups):
                out.update((p, (main, o.optimizer)) for p, main in zip(g16, g32))
            for g in o.fp32_from_fp32_groups:
                out.update((p, (p, o.optimizer)) for p in g)
        else:
            for g in o.optimizer.param_groups:
                out.update((p, (p, o.optimizer)) for p in g["params"])
    return out


def _optimizer_entries(optimizer) -> dict:
    """model parameter -> (master parameter, optimizer state dict) for params with state."""
    out = {}
    for p, (main, opt) in _optimizer_targets(optimizer).items():
        state = opt.state.get(main)
        if state:
            out[p] = (main, state)
    return out


class MegatronBackend(Backend):
    Options = MegatronOptions

    def __init__(self, options: MegatronOptions, run):
        super().__init__(options, run)
        self.layout = check_layout(run.config, options, world_size_from_env())
        self.replicas: dict = {}
        self._rank = int(os.environ.get("RANK", "0"))
        self._owns_process_group = False

    # ------------------------------------------------------------------ setup

    @property
    def is_main(self) -> bool:
        return self._rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")

    def setup(self) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            from . import cpu_compat

            cpu_compat.install()
        opts, layout = self.options, self.layout
        if not dist.is_initialized():
            if "RANK" not in os.environ:  # a plain single-process run: a private rendezvous
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
            if self.cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = opts.distributed_backend
            if backend == "auto":
                backend = "nccl" if self.cuda else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=opts.timeout_minutes))
            self._owns_process_group = True
        self._rank = dist.get_rank()
        if dist.get_world_size() != layout.world:
            raise ConfigError(f"megatron: the process group has {dist.get_world_size()} ranks but the layout was "
                              f"checked for WORLD_SIZE={layout.world}")
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
        )
        seed = self.run.config.run.seed
        model_parallel_cuda_manual_seed(seed)
        model = self.run.config.model
        self.use_te = mdl.use_transformer_engine(opts.transformer_impl)
        dtype = torch.bfloat16 if opts.precision == "bf16" else torch.float32
        self.padded_vocab = mdl.padded_vocab_size(model.vocab_size, opts.make_vocab_size_divisible_by, layout.tp)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        spec = mdl.layer_spec(model, self.use_te)
        for name in MODELS:
            tconfig = mdl.transformer_config(model, opts, layout, dtype, self.use_te)
            tconfig.finalize_model_grads_func = _finalize_grads
            chunks = mdl.build_chunks(model, tconfig, spec, self.padded_vocab, layout.vpp)
            # u and w start from the same weights: the same seeded full tensors, sharded alike
            mdl.init_weights_(chunks, model, seed, self.tp_rank, layout.tp)
            for chunk in chunks:
                mdl.mask_vocab_padding(chunk, model.vocab_size, self.padded_vocab, self.tp_rank, layout.tp)
                if self.cuda:
                    chunk.cuda()
                if dtype == torch.bfloat16:
                    chunk.to(dtype)
            self.replicas[name] = _Replica(name, chunks, tconfig, self)

    @property
    def num_layers(self) -> int:
        return self.run.config.model.num_layers

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast_object(self, obj):
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        self.replicas.clear()
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_process_group = False

    # ------------------------------------------------------------------ training

    def set_trainable(self, model: str, layers: frozenset, keep_state: bool) -> None:
        self.replicas[model].set_trainable(frozenset(layers), keep_state)

    def _micro_batches(self, batch, kind: str) -> list:
        """This data-parallel rank's contiguous share of a global batch, cut into micro-batches."""
        if batch is None:
            return []
        mbs, dp = self.run.config.run.micro_batch, self.layout.dp
        per_rank = len(batch) // dp
        mine = batch.rows(slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank))
        dev = self.device
        out = []
        for i in range(0, per_rank, mbs):
            mb = mine.rows(slice(i, i + mbs))
            out.append({"kind": kind, "tokens": mb.tokens.to(dev), "labels": mb.labels.to(dev),
                        "loss_mask": mb.loss_mask.to(dev), "source": mb.source.to(dev)})
            if mb.segment is not None:  # packed rows (data.packing); the attention mask is built per forward
                if self.use_te:
                    # TE attention takes the causal mask from its mask type and ignores a dense one; packing
                    # under TE needs the THD layout with packed_seq_params, which this backend does not build
                    raise ConfigError("data.packing needs megatron.transformer_impl: local (Transformer Engine "
                                      "attention would ignore the per-sample attention mask)")
                out[-1].update(segment=mb.segment.to(dev), position_ids=mb.position_ids.to(dev),
                               segment_source=mb.segment_source.to(dev))
        return out

    def _run_schedule(self, replica: _Replica, micro_batches: list, source_coef, val_token_coef: float,
                      forward_only: bool) -> PassResult:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        k = len(self.run.source_names)
        dev = self.device
        # [loss sums by source | sample counts by source | val CE sum | val tokens], float64 so that
        # sums over large global batches stay exact enough for the hypergradient
        stats = torch.zeros(2 * k + 2, dtype=torch.float64, device=dev)
        coef = None if source_coef is None else source_coef.to(dev, torch.float32)
        seq = self.run.config.data.seq_length
        positions = torch.arange(seq, device=dev).unsqueeze(0)

        def loss_func(mb, per_token):
            per_token = per_token.float()
            mask = mb["loss_mask"]
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
            micro_batch_size=self.run.config.run.micro_batch,
            forward_only=forward_only,
        )
        # Statistics live on the last pipeline stage: sum them over data-parallel replicas, then
        # hand them to every stage, so pi and lambda are identical on all ranks.
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            dist.all_reduce(stats, group=ps.get_data_parallel_group())
        if self.layout.pp > 1:
            dist.broadcast(stats, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        stats = stats.cpu()
        return PassResult(loss_sum=stats[:k].clone(), count=stats[k:2 * k].clone(),
                          val_loss_sum=float(stats[2 * k]), val_tokens=float(stats[2 * k + 1]))

    def forward_backward(self, model, train, source_coef, val=None, val_token_coef=0.0) -> PassResult:
        micro = self._micro_batches(train, "train") + self._micro_batches(val, "val")
        return self._run_schedule(self.replicas[model], micro, source_coef, val_token_coef, forward_only=False)

    def evaluate(self, model, batch, num_sources=None) -> PassResult:
        kind = "val" if bool((batch.source < 0).all()) else "train"
        with torch.no_grad():
            return self._run_schedule(self.replicas[model], self._micro_batches(batch, kind), None, 0.0,
                                      forward_only=True)

    def optimizer_step(self, model, lr: float, clip_grad: float) -> dict:
        replica = self.replicas[model]
        wd = self.run.config.optim.weight_decay
        for group in replica.optimizer.param_groups:
            # Megatron's param groups carry multipliers (no weight decay on biases and norms)
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        for o in [replica.optimizer] + _sub_optimizers(replica.optimizer):
            o.config.clip_grad = clip_grad
        _, grad_norm, _ = replica.optimizer.step()
        return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}

    def trainable_state_bytes(self, model: str) -> dict:
        return self.replicas[model].state_bytes()

    def trainable_parameters(self, model: str) -> int:
        return sum(p.numel() for p in self.replicas[model].parameters() if p.requires_grad)

    def save_model(self, model: str, path: Path) -> None:
        from megatron.core import dist_checkpointing

        replica = self.replicas[model]
        if len(replica.chunks) == 1:
            state = replica.chunks[0].sharded_state_dict()
        else:
            state = {}
            for chunk in replica.chunks:
                state.update(chunk.sharded_state_dict())
        Path(path).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(state, str(path))
