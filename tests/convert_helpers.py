"""Tiny random Hugging Face models per family, and Megatron logits at any layout, for the conversion tests.

The models are built by ``transformers`` from configs (no download), with norms and biases moved
away from their init values so that a mapping that drops or swaps one of them shows in the logits.
Module-level functions only: spawned ranks import this module.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from scalebio.request import DEMO_DIR, RunRequest

SEQ = 32
BATCH = 2
# the toy configs' vocabularies are not a multiple of 128: the backend pads them (and TP2 cuts inside
# the padding); the tokenizers have fewer pieces than that
BPE_VOCAB = 240
FAMILIES = ("qwen2", "llama", "mistral", "gpt2", "gemma2", "gpt_neox")


def hf_config(family: str, **over):
    """The family's toy config (families/<family>.py, every feature of the family switched on) as a
    transformers config object; ``over`` replaces fields."""
    from transformers import AutoConfig

    fields = dict(get_family(family).toy_config(), **over)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def get_family(name: str):
    from scalebio_plugins.megatron import families

    return families.get(name)


def vocab(family: str) -> int:
    return get_family(family).toy_config()["vocab_size"]


def build_hf(family: str, folder: Path, dtype=torch.float32, max_shard_size=None, seed: int = 0, **over):
    """Save a tiny random model and its tokenizer to ``folder``; returns the in-memory model (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, **over)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)  # not the init values: a dropped norm or bias shows
    folder = Path(folder)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(folder, **kw)
    model.float()
    if get_family(family).toy_tokenizer == "sentencepiece":
        sentencepiece_tokenizer(folder)
    else:
        bpe_tokenizer(folder)
    return model


def toy_checkpoint(family: str, root: Path, **build) -> tuple:
    """A tiny random HF model of ``family`` under ``root`` and its scalebio conversion: (hf_dir, ckpt)."""
    from scalebio_plugins.megatron import hf

    hf_dir, ckpt = Path(root) / f"hf-{family}", Path(root) / f"ckpt-{family}"
    build_hf(family, hf_dir, **build)
    hf.hf_to_megatron(hf_dir, ckpt, progress=False, log=lambda *a: None)
    return hf_dir, ckpt


def bpe_tokenizer(folder: Path) -> None:
    """A byte-level BPE ``tokenizer.json`` with Qwen2-style special tokens (no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>", "<|im_end|>"])
    lines = [json.loads(line)["response"] for line in (DEMO_DIR / "clean.jsonl").read_text().splitlines()[:300]]
    tk.train_from_iterator(lines, trainer)
    tk.save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def sentencepiece_tokenizer(folder: Path) -> None:
    """Llama-2/Mistral style: a sentencepiece ``tokenizer.model`` only."""
    shutil.copyfile(DEMO_DIR / "tokenizer.model", Path(folder) / "tokenizer.model")


def data_yaml(folder: Path, max_samples: int = 6) -> Path:
    """Two sources and a validation set from the demo data, without a tokenizer (the checkpoint's is used)."""
    path = Path(folder) / "data.yaml"
    text = Path(folder) / "typos-text.jsonl"  # plain text: loss on every token
    recs = [json.loads(line) for line in (DEMO_DIR / "typos.jsonl").read_text().splitlines()[:max_samples]]
    text.write_text("".join(json.dumps({"text": r["prompt"] + " " + r["response"]}) + "\n" for r in recs))
    path.write_text(
        f"seq_length: {SEQ}\n"
        "sources:\n"
        f"  clean: {{path: {DEMO_DIR / 'clean.jsonl'}, format: prompt_response, max_samples: {max_samples}}}\n"
        f"  typos: {{path: {text}, format: text, max_samples: {max_samples - 1}}}\n"
        f"validation: {{path: {DEMO_DIR / 'validation.jsonl'}, format: prompt_response, "
        f"max_samples: {max_samples}}}\n")
    return path


RUN_SETS = ("run.progress=false", "run.global_batch=4", "run.micro_batch=2", "run.val_batch=4")


def request(ckpt, data, out, *sets) -> RunRequest:
    return RunRequest(data=str(data), load=str(ckpt), out=str(out), sets=RUN_SETS + tuple(sets), steps=2)


def tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(folder, toks) -> torch.Tensor:
    """Logits of a Hugging Face directory as transformers loads it (fp32, eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    return model.eval()(input_ids=toks).logits


def megatron_logits(backend, toks, model: str = "w"):
    """Full-vocabulary logits of a loaded backend at any TP x PP layout (no VPP); None off the last
    stage (the code of ``scalebio convert verify``)."""
    from scalebio_plugins.megatron.verify import full_logits

    return full_logits(backend, toks, model)


def tp1_logit_error(hf_dir, ckpt, data, out, *sets) -> float:
    """Max |logit difference| of a checkpoint loaded by the backend at TP1 and transformers' model."""
    from scalebio.runner import open_run, prepare

    with open_run(prepare(request(ckpt, data, out, *sets)), verbose=False) as (ctx, _):
        toks = tokens(ctx.config.model.vocab_size)
        got = megatron_logits(ctx.backend, toks)
    return float((got - hf_logits(hf_dir, toks)).abs().max())


@torch.no_grad()
def hf_token_losses(folder, data) -> dict:
    """Token-mean cross-entropy per set with transformers, on exactly the samples a run tokenizes."""
    from transformers import AutoModelForCausalLM

    from scalebio.data import collate

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    out = {}
    for name, tset in [(t.name, t) for t in data.train] + [("validation", data.val)]:
        batch = collate(tset.samples, [-1] * len(tset.samples), data.seq_length, data.pad_id)
        logits = model(input_ids=batch.tokens).logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                               reduction="none")
        mask = batch.loss_mask.reshape(-1)
        out[name] = float((ce * mask).sum() / mask.sum())
    return out


def hf_losses(hf_dir, ckpt, data, tmp_path) -> dict:
    """transformers' token-mean losses on the samples a run with this checkpoint tokenizes."""
    from scalebio.data import RunData
    from scalebio.runner import prepare
    from scalebio.tokenizer import load_tokenizer

    cfg = prepare(request(ckpt, data, Path(tmp_path) / "unused")).config
    return hf_token_losses(hf_dir, RunData(cfg.data, load_tokenizer(cfg.data.tokenizer), cfg.run.seed))


def parallel_case(rank: int, world: int, cases: dict, tp: int, pp: int, save_root: str, vpp=None) -> dict:
    """On every rank: load each converted checkpoint at TP x PP (x VPP), return logits (not with VPP),
    eval losses, and save it back."""
    import datetime
    import os

    import torch.distributed as dist

    from scalebio.evaluate import evaluate_sets
    from scalebio.runner import open_run, prepare

    # one process group for all cases; each run builds (and tears down) only its model-parallel groups
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    results = {}
    try:
        for family, (ckpt, data, vocab) in cases.items():
            sets = (f"megatron.tp={tp}", f"megatron.pp={pp}") + ((f"megatron.vpp={vpp}",) if vpp else ())
            req = request(ckpt, data, os.path.join(save_root, f"run-{family}"), *sets)
            with open_run(prepare(req), verbose=False) as (ctx, rundata):
                logits = None if vpp else megatron_logits(ctx.backend, tokens(vocab))
                losses = evaluate_sets(ctx, rundata)
                ctx.backend.save_model("w", Path(save_root) / f"saved-{family}")
            results[family] = {"logits": logits, "losses": {k: v["loss"] for k, v in losses.items()}}
    finally:
        dist.destroy_process_group()
    return results
