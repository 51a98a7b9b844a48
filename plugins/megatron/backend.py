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
from .layout import Layout, check_layout, world_size_from_env


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
    # start a published architecture (model.hf_name) from random weights, for benchmarks only
    random_init: bool = False


def check_checkpoint(config, opts: MegatronOptions) -> None:
    """A published architecture from random weights is only good for benchmarks: say what is needed."""
    model = config.model
    if model.hf_name and not config.run.load and not opts.random_init:
        raise ConfigError(
            f"model {model.name} describes the pretrained checkpoint {model.hf_name}; reweighting data for it "
            f"needs those weights. Convert them once (python tools/convert.py hf-to-megatron --hf "
            f"PATH/TO/{model.hf_name.split('/')[-1]} --out ckpt/{model.name}) and pass --load ckpt/{model.name}, "
            f"or pass --set megatron.random_init=true to benchmark with random weights")


def _rank_memory() -> tuple:
    """(bytes this rank can use, what they are): the GPU's memory, or its share of the host's."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        return total, f"GPU {torch.cuda.get_device_name()}"
    avail = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        return None, "unknown"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return avail // local, f"CPU, no CUDA; {local} rank(s) sharing the host's available memory"


def check_memory(config, opts: MegatronOptions, layout: Layout) -> None:
    """Refuse a run whose two model copies alone cannot fit on a rank, before building anything."""
    from . import memory

    avail, what = _rank_memory()
    if avail is None:
        return
    run = config.run
    work = memory.Workload(micro_batch=run.micro_batch, seq_length=config.data.seq_length,
                           global_batch=run.global_batch, val_batch=run.val_batch, gamma=0,
                           precision=opts.precision, distributed_optimizer=opts.use_distributed_optimizer,
                           transformer_engine=torch.cuda.is_available(),
                           make_vocab_size_divisible_by=opts.make_vocab_size_divisible_by)
    plan = memory.plan(config.model, layout, work)
    need = plan.worst.bytes["weights"]
    if need > avail:
        gib = memory.GiB
        raise ConfigError(
            f"model {config.model.name} at TP={layout.tp} PP={layout.pp} needs {need / gib:.1f} GiB per rank for the "
            f"weights of u and w alone, and this rank has {avail / gib:.1f} GiB ({what}). It needs GPUs: see "
            f"python tools/plan.py --model {config.model.name} --gpus 8 for layouts that fit, and launch with "
            f"torchrun --nproc-per-node 8 tools/run.py ... (docs/scaling.md)")


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
            _transfer_optimizer_state(old_optimizer, self.optimizer, kept)
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
                if main.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():  # a separate fp32 master
                    opt += main.numel() * main.element_size()
        return {"grads": grads, "optimizer": opt}


def _sub_optimizers(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_targets(optimizer) -> dict:
    """model parameter -> (main, torch optimizer, start, end): ``main`` is the tensor the torch
    optimizer updates for the elements [start, end) of the flattened parameter on this rank (the
    parameter itself, its fp32 master copy, or its distributed-optimizer shard)."""
    from megatron.core.optimizer import DistributedOptimizer

    out = {}
    for o in _sub_optimizers(optimizer):
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


def _optimizer_entries(optimizer) -> dict:
    """model parameter -> (main parameter, optimizer state) for the parameters that have state."""
    out = {}
    for p, (main, opt, _, _) in _optimizer_targets(optimizer).items():
        state = opt.state.get(main)
        if state:
            out[p] = (main, state)
    return out


_MOMENTS = ("exp_avg", "exp_avg_sq")


def _transfer_optimizer_state(old, new, params: list) -> None:
    """Carry master weights and Adam moments of ``params`` from the old optimizer to the rebuilt one.

    With the distributed optimizer the old and new shard boundaries differ, so each parameter's
    full state is reassembled over the data-parallel group (one parameter at a time, to keep the
    extra memory at the size of the largest parameter) and every rank keeps its new shard.
    ``params`` must be in the same order on every rank.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import DistributedOptimizer

    old_targets, new_targets = _optimizer_targets(old), _optimizer_targets(new)
    distributed = any(isinstance(o, DistributedOptimizer) for o in _sub_optimizers(new))
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


class MegatronBackend(Backend):
    Options = MegatronOptions

    def __init__(self, options: MegatronOptions, run):
        super().__init__(options, run)
        check_checkpoint(run.config, options)
        self.use_te = mdl.use_transformer_engine(options.transformer_impl)
        if run.config.data.packing and self.use_te:
            # TE attention takes the causal mask from its mask type and ignores a dense one; packing
            # under TE needs the THD layout with packed_seq_params, which this backend does not build
            raise ConfigError("data.packing needs megatron.transformer_impl: local (Transformer Engine "
                              "attention would ignore the per-sample attention mask)")
        self.layout = check_layout(run.config, options, world_size_from_env())
        check_memory(run.config, options, self.layout)
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

    def setup(self, models=MODELS) -> None:
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
        dtype = torch.bfloat16 if opts.precision == "bf16" else torch.float32
        self.padded_vocab = mdl.padded_vocab_size(model.vocab_size, opts.make_vocab_size_divisible_by, layout.tp)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        spec = mdl.layer_spec(model, self.use_te)
        load = self.run.config.run.load
        if load:  # a checkpoint that does not fit the model fails before any model is built
            from . import checkpoint

            layers = self.run.config.layers
            where = lambda key: layers.where(("model", key))  # noqa: E731
            checkpoint.open_checkpoint(load, model, where)
        for name in models:
            tconfig = mdl.transformer_config(model, opts, layout, dtype, self.use_te)
            tconfig.finalize_model_grads_func = _finalize_grads
            chunks = mdl.build_chunks(model, tconfig, spec, self.padded_vocab, layout.vpp)
            # u and w start from the same weights: a checkpoint's (each rank reads its own shards), or
            # the same seeded full tensors, sharded alike
            if load:
                checkpoint.load_weights_(chunks, load, model, self.tp_rank, layout.tp, self.padded_vocab, where)
            else:
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
        """Write ``model`` as a scalebio checkpoint (the format ``run.load`` and tools/convert.py read).

        Collective: every rank gathers its tensors over TP; one rank per pipeline stage writes that
        stage's shard; rank 0 writes the index, model.yaml, tokenizer and Hugging Face side files.
        """
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from . import checkpoint

        replica, cfg = self.replicas[model], self.run.config
        written = checkpoint.save_weights(
            replica.chunks, path, cfg.model, self.tp_rank, self.layout.tp, self.dp_rank,
            ps.get_pipeline_model_parallel_rank(), self.layout.pp, ps.get_tensor_model_parallel_group())
        maps = [None] * dist.get_world_size()
        dist.all_gather_object(maps, written)
        if self.is_main:
            weight_map = {k: v for m in maps for k, v in m.items()}
            dtype = next(replica.parameters()).dtype
            tok = cfg.data.tokenizer.path if cfg.data.tokenizer is not None else None
            checkpoint.finish_checkpoint(path, cfg.model, weight_map, dtype, f"scalebio run (model {model})",
                                         str(self.run.out_dir), tokenizer_path=tok, loaded_from=cfg.run.load)
        dist.barrier()
