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

Where things are: this file holds the options, the up-front checks and the role methods;
``replica.py`` one model copy and its trainable set, ``optim_state.py`` the optimizer state
carried across a switch, ``passes.py`` the schedule call and its loss function, ``model.py``
the GPTModel build, ``checkpoint.py`` weights on disk, ``layout.py`` the parallel layout.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from scalebio.config import ConfigError
from scalebio.roles import MODELS, Backend, PassResult

from . import model as mdl
from .layout import Layout, check_layout, world_size_from_env
from .optim_state import sub_optimizers
from .passes import micro_batches, run_schedule
from .replica import Replica


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
    # bf16 LISA: where frozen layers keep their fp32 masters (optim_state.FrozenMasters)
    frozen_masters: Literal["host", "device", "residual"] = "host"
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
            f"needs those weights. Convert them once (scalebio convert hf-to-megatron --hf "
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
            f"scalebio plan --model {config.model.name} --gpus 8 for layouts that fit, and launch with "
            f"torchrun --nproc-per-node 8 -m scalebio run ... (docs/scaling.md)")


def _finalize_grads(model_chunks, num_tokens=None, **kwargs):
    """finalize_model_grads without the division by the token count: our loss is already normalised."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    finalize_model_grads(model_chunks, None, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MegatronBackend(Backend):
    Options = MegatronOptions
    # a resumed run may change these: the checkpoint is resharded at load (state.py)
    layout_options = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                      "virtual_pipeline_model_parallel_size", "num_layers_in_first_pipeline_stage",
                      "num_layers_in_last_pipeline_stage", "use_distributed_optimizer", "distributed_backend",
                      "timeout_minutes")

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
        # a resumed run takes every weight from its checkpoint (load_state), not from run.load
        load = self.run.config.run.load if self.run.resume_from is None else None
        if load:  # a checkpoint that does not fit the model fails before any model is built
            from . import checkpoint

            layers = self.run.config.layers
            where = lambda key: layers.where(("model", key))  # noqa: E731
            checkpoint.open_checkpoint(load, model, where)
        for name in models:
            tconfig = mdl.transformer_config(model, opts, layout, dtype, self.use_te)
            tconfig.finalize_model_grads_func = _finalize_grads
            chunks = mdl.build_chunks(model, tconfig, spec, self.padded_vocab, layout.vpp, self.use_te)
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
            self.replicas[name] = Replica(name, chunks, tconfig, self)

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

    def all_gather_object(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

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

    def forward_backward(self, model, train, source_coef, val=None, val_token_coef=0.0) -> PassResult:
        micro = micro_batches(self, train, "train") + micro_batches(self, val, "val")
        return run_schedule(self, self.replicas[model], micro, source_coef, val_token_coef, forward_only=False)

    def evaluate(self, model, batch) -> PassResult:
        kind = "val" if bool((batch.source < 0).all()) else "train"
        with torch.no_grad():
            return run_schedule(self, self.replicas[model], micro_batches(self, batch, kind), None, 0.0,
                                      forward_only=True)

    def token_losses(self, model, batch) -> torch.Tensor:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        rows: list = []
        with torch.no_grad():
            run_schedule(self, self.replicas[model], micro_batches(self, batch, "train"), None, 0.0,
                         forward_only=True, token_out=rows)
        # each data-parallel rank holds a contiguous share of the rows (micro_batches); the last
        # stage gathers them in rank order and hands the whole batch to the other stages
        per_rank, seq = len(batch) // self.layout.dp, self.run.config.data.seq_length
        full = torch.zeros(len(batch), seq, dtype=torch.float32, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            mine = torch.cat(rows).float() if rows else full.new_zeros(per_rank, seq)
            parts = list(full.split(per_rank))
            dist.all_gather(parts, mine.contiguous(), group=ps.get_data_parallel_group())
            full = torch.cat(parts)
        if self.layout.pp > 1:
            dist.broadcast(full, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return full.cpu()

    def grad_norm(self, model) -> float:
        # prepare_grads only copies the gradients to where the optimizer reads them (the fp32
        # masters' grads): the optimizer step repeats it, and computes the same norm again
        replica = self.replicas[model]
        replica.optimizer.prepare_grads()
        return float(replica.optimizer.get_grad_norm())

    def optimizer_step(self, model, lr: float, clip_grad: float) -> dict:
        replica = self.replicas[model]
        wd = self.run.config.optim.weight_decay
        for group in replica.optimizer.param_groups:
            # Megatron's param groups carry multipliers (no weight decay on biases and norms)
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        for o in [replica.optimizer] + sub_optimizers(replica.optimizer):
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

    # ------------------------------------------------------------------ resumable state

    def save_state(self, path: Path) -> None:
        from .state import save_state

        save_state(self, path)

    def load_state(self, path: Path) -> None:
        from .state import load_state

        load_state(self, path)

    def state_dict(self) -> dict:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        return {"rng_tracker": get_cuda_rng_tracker().get_states()}

    def load_state_dict(self, state: dict) -> None:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["rng_tracker"])
