"""``scalebio convert verify``: a converted checkpoint against the Hugging Face model it came from.

Two checks (docs/conversion.md, "Verifying a conversion"):

1. tensors: every Hugging Face tensor, mapped to the checkpoint's Megatron tensor and back by the
   family adapter, must equal the original cast to the checkpoint's dtype (bit for bit);
2. logits: the megatron backend (the code path of a run: ``--load``, any TP x PP layout) and
   ``transformers`` (fp32, eager attention) on the same prompts: the maximum absolute logit
   difference, relative to the largest |logit| of the prompt, must be at most ``tolerance``.

Both models run in fp32 whatever the stored dtype, so the only difference left is the order of
floating-point operations. TP x PP > 1 runs ``tp * pp`` local processes over gloo (NCCL on GPUs),
like a run under torchrun; the Hugging Face side runs in this process.
"""
from __future__ import annotations

import io
import os
import socket
from pathlib import Path
from typing import Optional

import torch

from scalebio.extras import optional_import

from . import families
from .checkpoint import CheckpointError, TensorDir, dtype_name, open_checkpoint, read_meta

# max |logit difference| / max |logit| per prompt. fp32 with the same weights: the toy models give
# about 1e-6, SmolLM2-135M (30 layers, logits up to about 40) 1e-5; a wrong rope base, a dropped
# bias or norm gives 1e-3 and more (docs/conversion.md)
DEFAULT_TOLERANCE = 1e-4
PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1905, Albert Einstein published four papers that changed physics.",
)
RANDOM_PROMPTS, RANDOM_LENGTH, RANDOM_SEED = 3, 24, 0
FAILED = 1  # the exit status of a verification that ran and found a difference


def prompt_ids(hf_dir, vocab_size: int, max_length: int) -> tuple:
    """([1 x L token tensors], where they came from): the tokenizer's encoding of :data:`PROMPTS`
    when the directory has a tokenizer, else fixed random ids (seed :data:`RANDOM_SEED`)."""
    from scalebio.config import TokenizerConfig
    from scalebio.tokenizer import load_tokenizer

    hf_dir = Path(hf_dir)
    if (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer.model").is_file():
        tok = load_tokenizer(TokenizerConfig(path=str(hf_dir), add_eos=False))
        ids = [torch.tensor([tok.encode(p)[:max_length]]) for p in PROMPTS]
        if all(int(t.max()) < vocab_size for t in ids):
            return ids, f"{len(ids)} prompts encoded by the tokenizer of {hf_dir}"
    g = torch.Generator().manual_seed(RANDOM_SEED)
    n = min(RANDOM_LENGTH, max_length)
    return ([torch.randint(0, vocab_size, (1, n), generator=g) for _ in range(RANDOM_PROMPTS)],
            f"{RANDOM_PROMPTS} random prompts of {n} tokens (seed {RANDOM_SEED}; {hf_dir} has no tokenizer)")


# --------------------------------------------------------------------------- tensors


def round_trip(hf_dir, ckpt) -> list:
    """[(HF name, shape, HF dtype, checkpoint dtype, max |difference|, equal)] for every tensor of
    ``hf_dir``: HF -> the checkpoint's Megatron tensor -> HF (the family's mapping both ways)."""
    src = TensorDir(hf_dir, "Hugging Face checkpoint")
    ckpt_tensors, model = open_checkpoint(ckpt)
    family = families.get(model.family)
    mapping = family.hf_names(model, src.names())
    rows, seen = [], set()
    for mname in ckpt_tensors.names():
        stored = ckpt_tensors.get(mname)
        shapes = family.hf_shapes(model, mname, tuple(stored.shape))
        for hname, parts, shape in zip(mapping[mname], family.from_megatron(model, mname, stored), shapes):
            # each Hugging Face tensor comes back as its row-major parts, as the converter writes it
            t = torch.cat([p.reshape(-1) for p in parts]).reshape(shape)
            seen.add(hname)
            if hname not in src:
                rows.append((hname, tuple(t.shape), None, dtype_name(stored.dtype), float("inf"), False))
                continue
            orig = src.get(hname)
            equal = tuple(orig.shape) == tuple(t.shape) and torch.equal(orig.to(t.dtype), t)
            diff = float((orig.float() - t.float()).abs().max()) if orig.shape == t.shape and t.numel() \
                else (0.0 if equal else float("inf"))
            rows.append((hname, tuple(orig.shape), dtype_name(orig.dtype), dtype_name(t.dtype), diff, equal))
    tied = model.share_embeddings_and_output_weights
    for hname in src.names():  # an HF tensor no checkpoint tensor gives back (a tied head is the embedding)
        if hname not in seen and not family.ignored_hf(hname) and not (tied and hname == "lm_head.weight"):
            rows.append((hname, src.shape(hname), dtype_name(src.dtype(hname)), None, float("inf"), False))
    return rows


# --------------------------------------------------------------------------- logits


@torch.no_grad()
def full_logits(backend, toks: torch.Tensor, model: str = "w") -> Optional[torch.Tensor]:
    """Full-vocabulary logits of a set-up backend at any TP x PP layout (no VPP); None off the last
    pipeline stage. Stages hand the hidden states on with plain send/recv; the last stage gathers
    the vocabulary-parallel logits over TP and drops the vocabulary padding."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    chunk = backend.replicas[model].chunks[0]
    toks = toks.to(backend.device)
    pos = torch.arange(toks.shape[1], device=toks.device).unsqueeze(0).expand(toks.shape[0], -1)
    pp = backend.layout.pp
    if pp > 1 and not ps.is_pipeline_first_stage():
        hidden = torch.empty(toks.shape[1], toks.shape[0], backend.run.config.model.hidden_size, device=toks.device,
                             dtype=next(chunk.parameters()).dtype)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        chunk.set_input_tensor(hidden)
    out = chunk(toks, pos, None)
    if pp > 1 and not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    if backend.layout.tp > 1:
        parts = [torch.empty_like(out) for _ in range(backend.layout.tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out[..., : backend.run.config.model.vocab_size].float().cpu()


def open_backend(ckpt, tp: int = 1, pp: int = 1, sets: tuple = ()):
    """The megatron backend of a run with ``--load ckpt`` (model w only), set up; close it after use."""
    from scalebio.roles import RunContext
    from scalebio.runner import RunRequest, prepare

    from .backend import MegatronBackend

    req = RunRequest(load=str(ckpt), sets=("run.progress=false", "megatron.precision=fp32",
                                           f"megatron.tp={tp}", f"megatron.pp={pp}") + tuple(sets))
    p = prepare(req)
    if not isinstance(p.options.get("backend"), MegatronBackend.Options):
        raise CheckpointError(f"convert verify runs the megatron backend, but this configuration selects "
                              f"{p.plugins.selected.get('backend')!r}")
    ctx = RunContext(config=p.config, source_names=sorted(p.config.data.sources), out_dir=None)
    ctx.backend = backend = MegatronBackend(p.options["backend"], ctx)
    try:
        backend.setup(("w",))
    except BaseException:
        backend.close()
        raise
    return backend


def megatron_logits_here(ckpt, prompts: list, tp: int = 1, pp: int = 1) -> Optional[list]:
    """Logits of every prompt on this rank's part of a TP x PP layout (None off the last stage and
    on TP ranks other than 0)."""
    backend = open_backend(ckpt, tp, pp)
    try:
        from megatron.core import parallel_state as ps

        out = [full_logits(backend, t) for t in prompts]
        return out if out[0] is not None and ps.get_tensor_model_parallel_rank() == 0 else None
    finally:
        backend.close()


def _rank_entry(rank: int, world: int, port: int, q, ckpt, prompts, tp, pp, threads) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    try:
        value = megatron_logits_here(ckpt, prompts, tp, pp)
        buf = io.BytesIO()
        torch.save(value, buf)
        q.put((rank, True, buf.getvalue()))
    except BaseException as exc:  # tell the parent, or it waits for a message that never comes
        msg = str(exc) if isinstance(exc, (CheckpointError, ValueError)) else f"{type(exc).__name__}: {exc}"
        q.put((rank, False, msg))


def megatron_logits(ckpt, prompts: list, tp: int = 1, pp: int = 1, timeout: float = 1800) -> list:
    """Logits of the checkpoint loaded by the megatron backend at TP x PP: in this process at TP1
    PP1, else on ``tp * pp`` spawned local ranks."""
    import queue

    import torch.multiprocessing as mp

    world = tp * pp
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CheckpointError("convert verify starts its own TP x PP processes: run it without torchrun")
    if world == 1:
        return megatron_logits_here(ckpt, prompts)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")  # never fork: megatron-core and torch threads do not survive it
    q = ctx.Queue()
    threads = max(1, torch.get_num_threads() // world)
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, q, str(ckpt), prompts, tp, pp, threads),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    result, done = None, 0
    try:
        while done < world:
            try:
                rank, ok, payload = q.get(timeout=timeout)
            except queue.Empty:
                raise CheckpointError(f"convert verify: the TP={tp} PP={pp} ranks did not finish within "
                                      f"{timeout:.0f} s") from None
            if not ok:
                raise CheckpointError(f"convert verify at TP={tp} PP={pp}: rank {rank} failed: {payload}")
            value = torch.load(io.BytesIO(payload), weights_only=False)
            result = value if value is not None else result
            done += 1
    finally:
        for p in procs:
            p.join(timeout=10 if done == world else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return result


@torch.no_grad()
def hf_logits(hf_dir, prompts: list) -> list:
    """Logits of the Hugging Face directory as ``transformers`` runs it: fp32, eager attention."""
    transformers = optional_import("transformers", "hf", "scalebio convert verify")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    return [model(input_ids=t).logits.float() for t in prompts]


# --------------------------------------------------------------------------- the report


def verify(hf_dir, ckpt, tp: int = 1, pp: int = 1, tolerance: float = DEFAULT_TOLERANCE, log=print) -> dict:
    """Both checks; logs the tensor table and the logit differences. ``ok`` is the verdict."""
    optional_import("transformers", "hf", "scalebio convert verify")  # before anything heavy
    if tolerance < 0:
        raise CheckpointError(f"--tolerance must be >= 0, got {tolerance}")
    read_meta(ckpt)
    _, model = open_checkpoint(ckpt)
    from .layout import split_problems

    problems = split_problems(model.num_layers, model.num_attention_heads,
                              model.num_query_groups or model.num_attention_heads, tp, pp)
    if tp < 1 or pp < 1 or problems:
        raise CheckpointError(f"--tp {tp} --pp {pp}: impossible for {ckpt}: " + ("; ".join(problems) or "use >= 1"))

    rows = round_trip(hf_dir, ckpt)
    width = max(len(r[0]) for r in rows)
    log(f"tensors: Hugging Face -> {ckpt} (Megatron) -> Hugging Face, max |difference|")
    log(f"  {'tensor':{width}s}  {'shape':>16s}  {'dtype (hf/ckpt)':>18s}  {'max |diff|':>10s}")
    for name, shape, hd, cd, diff, equal in rows:
        log(f"  {name:{width}s}  {str(list(shape)):>16s}  {f'{hd}/{cd}':>18s}  {diff:10.3g}"
            + ("" if equal else "  MISMATCH"))
    bad_tensors = [r[0] for r in rows if not r[5]]

    # a config.json of another model (vocabulary, layers) cannot be run on the same prompts: say so
    from .hf import derive_model_config, read_hf_config

    cfg, cfg_path = read_hf_config(hf_dir)
    derived = derive_model_config(cfg, cfg_path)
    for key in ("family", "vocab_size", "num_layers", "hidden_size"):
        if derived.get(key) != getattr(model, key):
            log(f"not the same model: {key} is {derived.get(key)!r} in {cfg_path} but {getattr(model, key)!r} in "
                f"{ckpt}; logits not compared: FAIL")
            return {"ok": False, "tensors": rows, "max_abs": float("inf"), "mean_abs": float("inf"),
                    "relative": float("inf"), "prompts": [], "tolerance": tolerance}
    max_pos = model.max_sequence_length if model.position_embedding_type == "learned_absolute" else 1 << 30
    prompts, what = prompt_ids(hf_dir, model.vocab_size, max_pos)
    got = megatron_logits(ckpt, prompts, tp, pp)
    want = hf_logits(hf_dir, prompts)
    log(f"logits: megatron backend at TP={tp} PP={pp} (fp32) vs transformers (fp32, eager), {what}")
    worst, per_prompt = 0.0, []
    for k, (g, w) in enumerate(zip(got, want)):
        d = (g - w).abs()
        rel = float(d.max()) / max(float(w.abs().max()), 1e-30)
        per_prompt.append({"tokens": int(prompts[k].shape[1]), "max": float(d.max()), "mean": float(d.mean()),
                           "scale": float(w.abs().max()), "relative": rel})
        worst = max(worst, rel)
        log(f"  prompt {k}: {prompts[k].shape[1]} tokens, max |diff| {float(d.max()):.3g}, mean {float(d.mean()):.3g}"
            f" (max |logit| {float(w.abs().max()):.3g}: relative {rel:.3g})")
    max_abs = max(p["max"] for p in per_prompt)
    mean_abs = sum(p["mean"] * p["tokens"] for p in per_prompt) / sum(p["tokens"] for p in per_prompt)
    ok = not bad_tensors and worst <= tolerance
    log(f"max |logit diff| {max_abs:.3g}, mean {mean_abs:.3g}, worst relative {worst:.3g} (tolerance {tolerance:g}); "
        f"{len(rows) - len(bad_tensors)} of {len(rows)} tensors round-trip exactly: "
        + ("PASS" if ok else "FAIL" + (f" ({len(bad_tensors)} tensors differ, first {bad_tensors[0]})"
                                       if bad_tensors else "")))
    return {"ok": ok, "tensors": rows, "max_abs": max_abs, "mean_abs": mean_abs, "relative": worst,
            "prompts": per_prompt, "tolerance": tolerance}
