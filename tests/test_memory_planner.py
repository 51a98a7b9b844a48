"""The memory planner against memory measured on CPU: weights, gradient buffers and optimizer
state as allocated, and activations as the peak of tensors saved for backward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from helpers import tiny_request
from scalebio_plugins.megatron import memory
from scalebio_plugins.megatron.layout import Layout


def _measure(rank, world, out, sets, trainable):
    """On each rank: bytes of weights (u + w), grads and optimizer state (u + w, after a step),
    and the activation peak of w's pass (training and validation micro-batches)."""
    from scalebio.runner import open_run, prepare
    from scalebio_plugins.minimax import loss_coefficients

    req = tiny_request(Path(out), *sets, steps=1)
    with open_run(prepare(req), verbose=False) as (ctx, data):
        backend, cfg = ctx.backend, ctx.config
        layers = frozenset(range(cfg.model.num_layers)) if trainable is None else frozenset(trainable)
        for m in ("u", "w"):
            backend.set_trainable(m, layers, keep_state=False)
        batch, val = data.next_train(cfg.run.global_batch), data.next_val(cfg.run.val_batch)
        ctx.solver.step(0, batch, val)
        params = [p for m in ("u", "w") for p in backend.replicas[m].parameters()]
        state = [backend.trainable_state_bytes(m) for m in ("u", "w")]
        meter = memory.SavedTensorMeter(exclude={p.untyped_storage().data_ptr() for p in params})
        coef, _ = loss_coefficients(ctx.weights.probs(), batch.source_counts(3))
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            backend.forward_backward("w", batch, coef, val, 1e-3)
        from megatron.core import parallel_state as ps

        return {"stage": ps.get_pipeline_model_parallel_rank(),
                "weights": sum(p.numel() * p.element_size() for p in params),
                "grads": sum(s["grads"] for s in state), "optimizer": sum(s["optimizer"] for s in state),
                "frozen_masters": sum(s["frozen_masters"] for s in state), "activations": meter.peak}


def _planned(sets, layout, gamma):
    """The plan of the run ``sets`` describe (local spec, no Transformer Engine: what the CPU runs)."""
    from scalebio.runner import prepare

    p = prepare(tiny_request(Path("/tmp"), *sets))
    cfg, opts = p.config, p.options["backend"]
    work = memory.Workload(micro_batch=cfg.run.micro_batch, seq_length=cfg.data.seq_length,
                           global_batch=cfg.run.global_batch, val_batch=cfg.run.val_batch, gamma=gamma,
                           precision=opts.precision, distributed_optimizer=opts.use_distributed_optimizer,
                           transformer_engine=False, frozen_masters=opts.frozen_masters,
                           make_vocab_size_divisible_by=opts.make_vocab_size_divisible_by)
    return memory.plan(cfg.model, layout, work)


CASES = {
    # name: (world, settings, layout, LISA gamma with the trainable layers that realise its worst case)
    "tp1_lisa": (1, ("data.seq_length=64",), Layout(), (2, [0, 1])),
    "tp1_full_gelu": (1, ("model.activation=gelu", "model.num_query_groups=4", "model.hidden_size=128",
                          "model.ffn_hidden_size=512"), Layout(), (None, None)),
    "tp1_lisa_gpt2_style": (1, ("model.activation=gelu", "model.normalization=LayerNorm",
                                "model.position_embedding_type=learned_absolute", "model.add_bias_linear=true"),
                            Layout(), (1, [2])),
    "tp2": (2, ("megatron.tp=2", "run.micro_batch=2"), Layout(tp=2), (None, None)),
    "pp2": (2, ("megatron.pp=2", "run.micro_batch=2"), Layout(pp=2), (None, None)),
    "dp2_distopt": (2, ("megatron.use_distributed_optimizer=true", "run.micro_batch=2"), Layout(dp=2),
                    (None, None)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_planner_within_15_percent_of_measured(tmp_path, name):
    world, sets, layout, (gamma, trainable) = CASES[name]
    measured = run_ranks(_measure, world, str(tmp_path / "run"), sets, trainable, timeout=300)
    plan = _planned(sets, layout, gamma)
    for got in measured:
        want = plan.stages[got["stage"]].bytes
        for key in ("weights", "grads", "optimizer"):
            assert abs(want[key] - got[key]) <= 0.01 * got[key] + 64, (name, key, want[key], got[key])
        assert abs(want["activations"] - got["activations"]) <= 0.15 * got["activations"], \
            (name, want["activations"], got["activations"])
        total_want, total_got = sum(want.values()), sum(got[k] for k in want)
        assert abs(total_want - total_got) <= 0.15 * total_got


def _measure_frozen_masters(rank, world, out, sets, gamma):
    """Every layer trains one step, then only the first ``gamma`` do, for another step: the
    planner's worst case (the other layers frozen, each with the master it trained). Bytes of u and
    w together on this rank."""
    from scalebio.runner import open_run, prepare

    with open_run(prepare(tiny_request(Path(out), *sets, steps=2)), verbose=False) as (ctx, data):
        backend, cfg = ctx.backend, ctx.config
        for step, layers in enumerate((range(cfg.model.num_layers), range(gamma))):
            for m in ("u", "w"):
                backend.set_trainable(m, frozenset(layers), keep_state=False)
            ctx.solver.step(step, data.next_train(cfg.run.global_batch), data.next_val(cfg.run.val_batch))
        state = [backend.trainable_state_bytes(m) for m in ("u", "w")]
        return {key: sum(s[key] for s in state) for key in state[0]}


MASTER_CASES = {
    # name: (world, settings, layout)
    "host": (1, ("megatron.frozen_masters=host",), Layout()),
    "device": (1, ("megatron.frozen_masters=device",), Layout()),
    "residual": (1, ("megatron.frozen_masters=residual",), Layout()),
    "dp2_distopt_host": (2, ("megatron.frozen_masters=host", "megatron.use_distributed_optimizer=true",
                             "run.micro_batch=2"), Layout(dp=2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MASTER_CASES))
def test_planned_frozen_masters_match_what_the_backend_holds(tmp_path, name):
    world, sets, layout = MASTER_CASES[name]
    sets = ("megatron.precision=bf16",) + sets
    gamma = 1
    measured = run_ranks(_measure_frozen_masters, world, str(tmp_path / "run"), sets, gamma, timeout=300)
    plan = _planned(sets, layout, gamma).stages[0]
    for got in measured:
        assert got["frozen_masters"] + got["frozen_masters_host"] > 0
        for want, have in ((plan.bytes["frozen_masters"], got["frozen_masters"]),
                           (plan.host, got["frozen_masters_host"]),
                           (plan.bytes["grads"], got["grads"]), (plan.bytes["optimizer"], got["optimizer"])):
            assert abs(want - have) <= 0.01 * have + 64, (name, plan.bytes, plan.host, got)


# parameter counts published for the Hugging Face checkpoints (the sum of their tensors)
PUBLISHED = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
             "qwen2-7b": 7_615_616_512, "qwen2.5-32b": 32_763_876_352, "llama-3-8b": 8_030_261_248,
             "smollm2-135m": 134_515_008, "gemma-2-2b": 2_614_341_888, "gemma-2-9b": 9_241_705_984,
             "gemma-2-27b": 27_227_128_320, "gpt-neox-20b": 20_554_567_680, "yi-34b": 34_388_917_248,
             "yi-1.5-34b": 34_388_917_248, "llama-3-70b": 70_553_706_496, "llama-3.1-70b": 70_553_706_496}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_configs_have_the_published_parameter_count(name):
    from scalebio.config import load_model

    model, _ = load_model(name)
    p = memory.plan(model, Layout(), memory.Workload(make_vocab_size_divisible_by=1))
    assert sum(s.params for s in p.stages) == PUBLISHED[name]
    # split over 8 GPUs the ranks hold the whole model once (TP shards, PP stages)
    layout = Layout(tp=2, pp=4) if model.num_layers % 4 == 0 else Layout(tp=2, pp=2)
    split = memory.plan(model, layout, memory.Workload(make_vocab_size_divisible_by=1))
    # every TP rank holds the norms (Gemma-2: four a layer; LayerNorm: and their biases) and the biases of the
    # row-parallel layers whole
    h = model.hidden_size
    per_layer = (4 if model.family == "gemma2" else 2) * h * (2 if model.normalization == "LayerNorm" else 1) \
        + 2 * h * model.add_bias_linear
    replicated = model.num_layers * per_layer + h * (2 if model.normalization == "LayerNorm" else 1)
    tied_copy = model.share_embeddings_and_output_weights * model.vocab_size * h
    assert sum(s.params for s in split.stages) * layout.tp == PUBLISHED[name] + replicated * (layout.tp - 1) \
        + tied_copy
