"""Packing keeps per-sample losses exact: packed rows give the same per-sample losses, statistics
and gradients as the same samples one per row (block-diagonal causal attention, positions
restarting per sample), for RoPE and for learned absolute positions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import DEMO_DIR
from scalebio.config import DataConfig, SourceConfig, TokenizerConfig
from scalebio.data import RunData, collate, collate_packed
from scalebio_plugins.minimax import loss_coefficients


def _short(data, source, n, limit=20):
    """Indices of ``n`` samples of ``source`` that take at most ``limit`` positions."""
    return [int(i) for i in np.flatnonzero(data.train[source].positions <= limit)[:n]]


def _packed_and_plain(data, layout):
    """The same samples as a packed batch (``layout``: rows of (source, index)) and one per row."""
    short = {s: iter(_short(data, s, 8)) for s in range(3)}
    layout = [[(s, next(short[s])) for s in row] for row in layout]
    rows = [[(data.train[s].sample(i), s) for s, i in row] for row in layout]
    packed = collate_packed(rows, data.seq_length, data.pad_id)
    flat = [item for row in rows for item in row]
    plain = collate([s for s, _ in flat], [k for _, k in flat], data.seq_length, data.pad_id)
    return packed, plain


@pytest.mark.parametrize("positions", ["rope", "learned_absolute"])
def test_packed_rows_give_the_per_sample_losses_and_gradients_of_plain_rows(tiny_run, positions):
    ctx, data = tiny_run(f"model.position_embedding_type={positions}", "data.seq_length=64")
    backend = ctx.backend
    backend.set_trainable("u", frozenset(range(4)), keep_state=False)
    # 4 packed rows (one micro-batch of 4 is the tiny layout) holding 8 samples of 3 sources
    layout = [[0, 1, 0], [2, 0], [1, 2], [0]]  # source of each sample, row by row
    packed, plain = _packed_and_plain(data, layout)
    assert (packed.segment_source >= 0).sum() == 8 and packed.tokens.shape == (4, 64)
    assert packed.source_counts(3).tolist() == plain.source_counts(3).tolist() == [4.0, 2.0, 2.0]
    # the samples really share rows (otherwise this test would test nothing)
    assert int((packed.segment == 1).any(dim=1).sum()) >= 3
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    coef, _ = loss_coefficients(pi, packed.source_counts(3))

    params = [p for p in backend.replicas["u"].chunks[0].parameters() if p.requires_grad]

    def grads(batch):
        res = backend.forward_backward("u", batch, coef)
        return res, [p.main_grad.clone() for p in params]

    res_packed, g_packed = grads(packed)
    # the plain batch has 8 rows: two micro-batches of 4
    res_plain, g_plain = grads(plain)
    assert res_packed.count.tolist() == res_plain.count.tolist() == [4.0, 2.0, 2.0]
    assert torch.allclose(res_packed.loss_sum, res_plain.loss_sum, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_packed, g_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), "packed gradient differs from the unpacked one"


def test_packed_validation_batch_has_the_token_mean_of_plain_rows(tiny_run):
    ctx, data = tiny_run("data.seq_length=64")
    backend = ctx.backend
    val = [data.val.sample(int(i)) for i in np.flatnonzero(data.val.positions <= 30)[:6]]
    rows = [[(val[0], -1), (val[1], -1)], [(val[2], -1), (val[3], -1)], [(val[4], -1)], [(val[5], -1)]]
    packed = collate_packed(rows, data.seq_length, data.pad_id)
    plain = collate(val + val[:2], [-1] * 8, data.seq_length, data.pad_id)
    plain.loss_mask[6:] = 0  # rows 6, 7 repeat samples to fill the micro-batch; take them out
    a, b = backend.evaluate("w", packed), backend.evaluate("w", plain)
    assert a.val_tokens == b.val_tokens and abs(a.val_loss - b.val_loss) < 1e-5


def test_packing_fills_rows_first_fit_and_resumes_exactly(tmp_path):
    tok_cfg = TokenizerConfig(path=str(DEMO_DIR / "tokenizer.model"))
    from scalebio.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_cfg)
    cfg = DataConfig(sources={n: SourceConfig(str(DEMO_DIR / f"{n}.jsonl"), format="prompt_response")
                              for n in ("clean", "typos")},
                     validation=SourceConfig(str(DEMO_DIR / "validation.jsonl"), format="prompt_response"),
                     seq_length=64, packing=True, cache_dir=str(tmp_path / "cache"))
    a = RunData(cfg, tok, seed=3)
    batches = [a.next_train(8) for _ in range(6)]
    for b in batches:
        assert b.packed and b.tokens.shape == (8, 64)
        per_row = (b.segment_source >= 0).sum(dim=1)
        assert (per_row >= 1).all() and per_row.sum() > 8  # more samples than rows: packing happened
        for r in range(8):  # positions restart at 0 at each sample; padding carries no loss
            seg = b.segment[r]
            starts = torch.nonzero(torch.diff(seg, prepend=torch.tensor([-2])) != 0).flatten()
            assert all(b.position_ids[r, s] == 0 for s in starts.tolist() if seg[s] >= 0)
            assert b.loss_mask[r][seg < 0].sum() == 0
    # a fresh RunData restored from the state after 3 batches sees batches 4..6
    b2 = RunData(cfg, tok, seed=3)
    for _ in range(3):
        b2.next_train(8)
    c = RunData(cfg, tok, seed=3)
    c.load_state_dict(b2.state_dict())
    for want in batches[3:]:
        got = c.next_train(8)
        for f in ("tokens", "labels", "loss_mask", "segment", "position_ids", "segment_source"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f
    # every sample of an epoch is used exactly once, in sampler order
    d = RunData(cfg, tok, seed=3)
    total = len(d.train[0].samples) + len(d.train[1].samples)
    seen = 0
    while seen < total:
        seen += int((d.next_train(8).segment_source >= 0).sum())
    assert d._train_sampler.epoch >= 1 or seen == total
    np.testing.assert_array_equal(d._train_positions[:3], np.concatenate([t.positions for t in d.train])[:3])


def _packed_pass(rank, world, tmp, sets):
    """Per-source loss sums and the gradient norm of u on the packed batch."""
    from helpers import tiny_request
    from scalebio.runner import open_run, prepare

    with open_run(prepare(tiny_request(tmp, *PARALLEL_SETS, *sets)), verbose=False) as (ctx, data):
        return _u_pass(ctx.backend, _packed_and_plain(data, PARALLEL_LAYOUT)[0])


PARALLEL_SETS = ("data.seq_length=64", "run.micro_batch=2")
PARALLEL_LAYOUT = [[0, 1, 0], [2, 0], [1, 2], [0]]


def _u_pass(backend, batch):
    backend.set_trainable("u", frozenset(range(4)), keep_state=False)
    coef, _ = loss_coefficients(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), batch.source_counts(3))
    res = backend.forward_backward("u", batch, coef)
    norm = backend.optimizer_step("u", 0.0, 1e9)["grad_norm"]  # the norm over all ranks, nothing clipped
    return res.loss_sum, res.count, norm


@pytest.mark.slow
def test_packing_is_exact_under_data_and_pipeline_parallelism(tmp_path, tiny_run):
    from distributed import run_ranks

    ctx, data = tiny_run(*PARALLEL_SETS)
    want = _u_pass(ctx.backend, _packed_and_plain(data, PARALLEL_LAYOUT)[1])  # one process, one sample per row
    for layout in ((), ("megatron.pp=2",)):  # DP=2, then PP=2 (the mask is needed on every stage)
        for loss_sum, count, norm in run_ranks(_packed_pass, 2, tmp_path / f"run{len(layout)}", layout):
            assert count.tolist() == want[1].tolist() == [4.0, 2.0, 2.0]
            assert torch.allclose(loss_sum, want[0], rtol=1e-5, atol=1e-5)
            assert abs(norm - want[2]) <= 1e-4 * want[2], layout
