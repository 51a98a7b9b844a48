"""Impossible parallel layouts are rejected before anything heavy starts, naming the numbers."""
from __future__ import annotations

import pytest

from helpers import tiny_request
from scalebio.config import ConfigError
from scalebio.runner import prepare
from scalebio_plugins.megatron.layout import check_layout
from scalebio_plugins.megatron.model import padded_vocab_size


def _check(tmp_path, world, *sets, tp=None, pp=None):
    req = tiny_request(tmp_path, *sets)
    req.tp, req.pp = tp, pp
    p = prepare(req)
    return check_layout(p.config, p.options["backend"], world)


@pytest.mark.parametrize("world,sets,kw,message", [
    (6, (), dict(tp=2, pp=2), "world size 6 is not a multiple of TP x PP = 2 x 2 = 4"),
    (3, (), dict(tp=3), "TP=3 does not divide num_attention_heads=4"),
    (4, (), dict(tp=4), "TP=4 does not divide num_query_groups=2"),
    (3, (), dict(pp=3), "PP=3 does not divide num_layers=4"),
    (4, ("megatron.vpp=4",), dict(pp=2), "PP x VPP = 2 x 4 = 8 does not divide num_layers=4"),
    (4, ("run.micro_batch=4",), {}, "run.global_batch=8 is not divisible by micro_batch x DP = 4 x 4 = 16"),
    (2, ("run.val_batch=6",), {}, "run.val_batch=6 is not divisible by micro_batch x DP = 4 x 2 = 8"),
    (2, ("megatron.num_layers_in_first_pipeline_stage=5",), dict(pp=2),
     "num_layers=4 cannot be split with 5 layers on the first and None on the last of PP=2 stages"),
    (2, ("megatron.vpp=2", "run.micro_batch=4"), dict(pp=2),
     "the interleaved schedule needs micro-batches per step divisible by PP=2: run.val_batch=4 gives "
     "1 micro-batches per rank"),
])
def test_impossible_layouts_name_the_conflict(tmp_path, world, sets, kw, message):
    with pytest.raises(ConfigError) as err:
        _check(tmp_path, world, *sets, **kw)
    assert message in str(err.value), str(err.value)


def test_valid_layouts_and_data_parallel_size(tmp_path):
    assert _check(tmp_path, 8, "run.micro_batch=2", tp=2, pp=2).dp == 2
    assert _check(tmp_path, 2, "run.micro_batch=2", tp=1, pp=2).dp == 1
    # several problems are reported together
    with pytest.raises(ConfigError, match="TP=3 does not divide num_attention_heads=4; TP=3 does not divide"):
        _check(tmp_path, 3, tp=3)


def test_tp_flag_reaches_the_backend_and_names_itself(tmp_path):
    req = tiny_request(tmp_path)
    req.tp = 2
    assert prepare(req).options["backend"].tensor_model_parallel_size == 2
    req.tp = 0
    with pytest.raises(ConfigError, match="must be >= 1"):
        check_layout(prepare(req).config, prepare(req).options["backend"], 1)


def test_vocab_padding_follows_megatron_lm():
    assert padded_vocab_size(2048, 128, 1) == 2048
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 8) == 51200
    assert padded_vocab_size(152064, 128, 8) == 152576


def test_a_published_model_without_checkpoint_says_what_it_needs(tmp_path):
    from scalebio.runner import RunRequest, open_run

    req = RunRequest(model="qwen2.5-32b", plugins=("lisa", "simplex"), out=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match=r"pretrained checkpoint Qwen/Qwen2.5-32B.*scalebio convert hf-to-megatron"
                                          r".*--load.*megatron.random_init=true"):
        with open_run(prepare(req), verbose=False):
            pass
    # random weights on one CPU process: the two copies alone cannot fit, say so before building
    req = RunRequest(model="qwen2.5-32b", plugins=("lisa",), out=str(tmp_path / "r"), tp=1,
                     sets=("megatron.random_init=true",))
    with pytest.raises(ConfigError, match=r"needs 122\.1 GiB per rank for the weights of u and w alone.*"
                                          r"It needs GPUs.*scalebio plan --model qwen2.5-32b"):
        with open_run(prepare(req), verbose=False):
            pass


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="Transformer Engine may run here")
def test_transformer_engine_is_asked_for_where_it_cannot_run(tmp_path):
    from scalebio_plugins.megatron.backend import MegatronBackend
    from scalebio.roles import RunContext

    p = prepare(tiny_request(tmp_path, "megatron.transformer_impl=transformer_engine"))
    with pytest.raises(ConfigError, match="needs CUDA and the transformer-engine package"):
        MegatronBackend(p.options["backend"], RunContext(p.config, ["a"], tmp_path))
