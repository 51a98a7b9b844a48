"""Memory planner: per-GPU bytes of a ScaleBiO run for a model, layout and batch shape.

For each pipeline stage it counts, for *both* model copies (u and w):
- weights: every parameter of the stage, in the run's precision;
- gradients: megatron-core DDP grad buffers (fp32) over the trainable parameters only;
- optimizer: Adam moments (fp32, and the fp32 master copy under bf16) of the trainable
  parameters, divided over data-parallel ranks with the distributed optimizer;
and, for the one model whose pass is in flight, the activations kept for backward.

With LISA the trainable set is embeddings + final norm + output layer + gamma decoder layers.
The draw is random, so the planner takes the worst case: all gamma layers on the stage in
question. Frozen layers still need their activations (gradients flow through them to the
embeddings), so LISA saves gradient and optimizer memory, not activation memory.

Activation coefficients of the local layer spec were measured on CPU (saved-tensor hooks) and
are checked by tests/test_memory_planner.py; the Transformer Engine path uses flash attention
(no s^2 attention probabilities) and is not measured here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from . import families
from .families.base import is_gated
from .layout import Layout
from .model import padded_vocab_size

GiB = 1024 ** 3


@dataclass
class Workload:
    micro_batch: int = 1
    seq_length: int = 1024
    global_batch: int = 128  # training samples per step, all ranks
    val_batch: int = 64
    gamma: Optional[int] = 2  # LISA layers; None = every layer trains
    precision: str = "bf16"
    distributed_optimizer: bool = False
    transformer_engine: bool = True
    make_vocab_size_divisible_by: int = 128


@dataclass
class StagePlan:
    stage: int
    layers: int
    params: int
    trainable: int
    bytes: dict = field(default_factory=dict)  # weights, grads, optimizer, activations

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


@dataclass
class Plan:
    model: str
    layout: Layout
    workload: Workload
    stages: list

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    def fits(self, gpu_bytes: int, overhead: int = 3 * GiB, margin: float = 0.10) -> bool:
        """Room for the CUDA context, NCCL and allocator fragmentation: a fixed overhead plus a margin."""
        return self.worst.total * (1 + margin) + overhead <= gpu_bytes


def stage_layers(num_layers: int, layout: Layout) -> list:
    """Decoder layers on each pipeline stage (all virtual chunks of a rank together)."""
    pp = layout.pp
    first, last = layout.first_stage_layers, layout.last_stage_layers
    if first is None and last is None:
        return [num_layers // pp] * pp
    middle_stages = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    per = rest // middle_stages if middle_stages else 0
    out = [per] * pp
    if first is not None:
        out[0] = first
    if last is not None:
        out[-1] = last
    return out


def layer_params(m, tp: int) -> int:
    """Parameters of one decoder layer on one tensor-parallel rank: the model family's tensors of a
    layer, split ones divided over TP, replicated ones (norms, row-parallel biases) whole."""
    family = families.get(m.family)
    n = 0
    for name, shape in family.layer_tensors(m).items():
        numel = math.prod(shape)
        n += numel // tp if family.tp_split_of(f"decoder.layers.0.{name}", m) is not None else numel
    return n


def edge_params(m, tp: int, padded_vocab: int, first: bool, last: bool, pp: int) -> int:
    """Embeddings (first stage), final norm and output layer (last stage) on one TP rank."""
    h = m.hidden_size
    n = 0
    if first:
        n += padded_vocab * h // tp
        if m.position_embedding_type == "learned_absolute":
            n += m.max_sequence_length * h
    if last:
        n += 2 * h if m.normalization == "LayerNorm" else h
        if not m.share_embeddings_and_output_weights or (pp > 1 and not first):
            n += padded_vocab * h // tp  # a separate output layer, or the last stage's tied copy
    return n


def layer_activation_bytes(m, tp: int, micro_batch: int, seq: int, dtype_bytes: int, te: bool,
                           frozen: bool = False) -> int:
    """Bytes one decoder layer keeps for backward, per micro-batch (no recompute, no sequence parallel).

    Local spec, per token, replicated over TP: each of the two norm blocks keeps its input, the
    normalised value and the linear layer's input (RMSNorm, 3h; LayerNorm keeps 2h and fp32
    mean/rstd); split over TP: Q, K, V (after GQA expansion and rotary) and the projection input,
    4h (multi-head attention keeps the whole QKV output instead of expanded K, V: 2h more), and
    5f for SwiGLU (fc1 output, SiLU output, fc2 input) or 2f for GELU. Per sequence: attention
    probabilities b*a*s^2/TP, rotary cos/sin 4*s*head_dim, and the boolean causal mask (s^2
    bytes). With Transformer Engine, flash attention keeps softmax statistics instead of the s^2
    probabilities. Measured exactly on CPU for the local spec (tests/test_memory_planner.py).

    A frozen layer (LISA) keeps less: a linear layer whose weight needs no gradient does not keep
    its input, nor does a norm its normalised value; what remains is each norm's input, Q, K, V
    and the MLP's internal values (4f for SwiGLU, f for GELU).
    """
    h, f, b, s = m.hidden_size, m.ffn_hidden_size, micro_batch, seq
    a = m.num_attention_heads
    kv_ch = m.kv_channels or h // a
    tokens = b * s
    rms = m.normalization == "RMSNorm"
    mha = (m.num_query_groups or a) == a
    swiglu = is_gated(m.activation)  # SwiGLU or GeGLU
    if frozen:
        replicated = 2 * h
        split = 3 * h + (2 * h if mha else 0) + (4 * f if swiglu else f)
    else:
        replicated = 6 * h if rms else 4 * h
        split = 4 * h + (2 * h if mha else 0) + (5 * f if swiglu else 2 * f)
    elems = tokens * (replicated + split // tp)
    norm_stats = (2 if rms else 4) * tokens * 4  # fp32 rstd (and mean for LayerNorm) of both norms
    if te:
        elems += tokens * a // tp  # softmax statistics of flash attention
        mask = 0
    else:
        elems += b * a * s * s // tp
        mask = s * s
    if m.position_embedding_type == "rope":
        elems += 4 * s * kv_ch
    return elems * dtype_bytes + norm_stats + mask


def edge_activation_bytes(m, tp: int, padded_vocab: int, micro_batch: int, seq: int, dtype_bytes: int,
                          first: bool, last: bool) -> int:
    """Embedding output on the first stage; final norm, output-layer input and fp32 logits for the
    vocab-parallel cross entropy on the last stage, per micro-batch."""
    tokens = micro_batch * seq
    n = 0
    if first:
        n += tokens * m.hidden_size * dtype_bytes
    if last:
        n += 2 * tokens * m.hidden_size * dtype_bytes + tokens * 4
        n += tokens * padded_vocab // tp * 4  # softmax of the logits, kept in fp32
        if dtype_bytes != 4:
            n += tokens * padded_vocab // tp * dtype_bytes  # the logits themselves
    return n


def in_flight(stage: int, layout: Layout, micro_batches: int) -> float:
    """Micro-batches (in units of the stage's full layer count) whose activations a stage holds at peak."""
    pp = layout.pp
    if pp == 1:
        return 1
    if not layout.vpp:  # 1F1B: stage i runs pp - i forward passes before its first backward
        return min(pp - stage, micro_batches)
    vpp = layout.vpp
    warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp + 1  # chunk-sized micro-batches in the warmup
    return min(warmup, micro_batches * vpp) / vpp


def plan(m, layout: Layout, work: Workload) -> Plan:
    tp = layout.tp
    dtype_bytes = 2 if work.precision == "bf16" else 4
    padded = padded_vocab_size(m.vocab_size, work.make_vocab_size_divisible_by, tp)
    per_layer = layer_params(m, tp)
    # a family whose attention TE cannot compute (Gemma-2's soft-capping) keeps the s^2 scores under TE too
    te_attention = work.transformer_engine and families.get(m.family).te_core_attention
    act_layer, act_frozen = (layer_activation_bytes(m, tp, work.micro_batch, work.seq_length, dtype_bytes,
                                                    te_attention, frozen) for frozen in (False, True))
    counts = stage_layers(m.num_layers, layout)
    # micro-batches of w's pass (training and validation rows together) on one data-parallel rank
    micro = max(1, (work.global_batch + work.val_batch) // (work.micro_batch * layout.dp))
    stages = []
    for i, n_layers in enumerate(counts):
        first, last = i == 0, i == layout.pp - 1
        edge = edge_params(m, tp, padded, first, last, layout.pp)
        params = edge + n_layers * per_layer
        active_layers = n_layers if work.gamma is None else min(work.gamma, n_layers)
        trainable = edge + active_layers * per_layer
        opt_per_param = 8 + (4 if work.precision == "bf16" else 0)
        opt = trainable * opt_per_param
        if work.distributed_optimizer:
            opt = math.ceil(opt / layout.dp)
        acts = in_flight(i, layout, micro) * (
            active_layers * act_layer + (n_layers - active_layers) * act_frozen
            + edge_activation_bytes(m, tp, padded, work.micro_batch, work.seq_length, dtype_bytes, first, last))
        stages.append(StagePlan(i, n_layers, params, trainable, {
            "weights": 2 * params * dtype_bytes,
            "grads": 2 * trainable * 4,
            "optimizer": 2 * opt,
            "activations": int(acts),
        }))
    return Plan(m.name, layout, work, stages)


def layouts_for(m, num_gpus: int) -> list:
    """Every TP x PP x DP factorisation of ``num_gpus`` the model allows (TP divides heads and
    query groups and stays within a node of 8; PP divides the layers)."""
    groups = m.num_query_groups or m.num_attention_heads
    out = []
    for tp in (1, 2, 4, 8):
        if tp > num_gpus or m.num_attention_heads % tp or groups % tp or num_gpus % tp:
            continue
        for pp in range(1, num_gpus // tp + 1):
            if (num_gpus // tp) % pp or m.num_layers % pp:
                continue
            out.append(Layout(tp=tp, pp=pp, dp=num_gpus // (tp * pp)))
    return out


def recommend(m, num_gpus: int, gpu_bytes: int, work: Workload) -> list:
    """Plans of every layout whose data-parallel size divides the batches: those that fit first,
    then by fewest model-parallel ranks (more data parallelism, less communication), then by
    least memory."""
    plans = [plan(m, layout, work) for layout in layouts_for(m, num_gpus)
             if work.global_batch % (work.micro_batch * layout.dp) == 0
             and work.val_batch % (work.micro_batch * layout.dp) == 0]
    return sorted(plans, key=lambda p: (not p.fits(gpu_bytes), p.layout.tp * p.layout.pp, p.worst.total))


class SavedTensorMeter:
    """Measures activation memory: the peak bytes of tensors autograd keeps for backward.

    Use as ``with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):`` around a
    forward/backward. Each storage counts once while any saved tensor uses it; parameters (and
    anything else in ``exclude``, by storage pointer) are not activations and are skipped.
    """

    def __init__(self, exclude=()):
        import weakref

        self._finalize = weakref.finalize
        self.exclude = set(exclude)
        self.live: dict = {}
        self.current = 0
        self.peak = 0

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude:
            return t
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [0, storage.nbytes()]
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        self._finalize(t, self._release, ptr)
        return t

    def unpack(self, t):
        return t

    def _release(self, ptr) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[ptr]
