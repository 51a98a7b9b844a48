"""Peak RSS of ``scalebio convert`` both ways on a 7B-shaped checkpoint (not a test: docs/conversion.md).

    python tools/bench_convert_memory.py --layers 2 --dir /tmp/rss7b

builds a random Llama-2-7B-shaped Hugging Face directory (hidden 4096, 32 heads, ffn 11008,
vocabulary 32000, untied, bf16) with ``--layers`` decoder layers, one safetensors shard per layer,
then runs each direction in its own process and prints that process's peak RSS (``wait4``). The
largest tensors are the embedding and the head (32000 x 4096 bf16, 250 MiB each); a streaming
converter's peak is about one of them plus the interpreter, whatever the number of layers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000)


def build(folder: Path, layers: int, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    folder.mkdir(parents=True)
    shards = [{"model.embed_tokens.weight": rnd(v, h)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(h, h),
                       p + "self_attn.v_proj.weight": rnd(h, h), p + "self_attn.o_proj.weight": rnd(h, h),
                       p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                       p + "mlp.down_proj.weight": rnd(h, f), p + "input_layernorm.weight": rnd(h),
                       p + "post_attention_layernorm.weight": rnd(h)})
    shards.append({"model.norm.weight": rnd(h), "lm_head.weight": rnd(v, h)})
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for t_name, t in shard.items():
            weight_map[t_name] = name
            total += t.numel() * t.element_size()
        shard.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = dict(SHAPE, architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=layers,
               hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
               tie_word_embeddings=False, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def peak_rss(cmd: list) -> tuple:
    """(peak RSS in bytes, wall seconds) of one command in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed with status {proc.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/rss7b")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.dir)
    if args.build_only:
        build(root / "hf", args.layers)
        return
    shutil.rmtree(root, ignore_errors=True)
    # built in a child: a forked child's peak RSS starts at its parent's, so this process stays small
    subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--dir", str(root), "--build-only"],
                   check=True)
    scalebio = [sys.executable, "-m", "scalebio", "convert"]
    runs = {
        "interpreter + imports": [sys.executable, "-c", "import torch, safetensors, scalebio_plugins.megatron.hf"],
        "hf-to-megatron": scalebio + ["hf-to-megatron", "--hf", str(root / "hf"), "--out", str(root / "ckpt"),
                                      "--no-progress"],
        "megatron-to-hf": scalebio + ["megatron-to-hf", "--ckpt", str(root / "ckpt"), "--out", str(root / "back"),
                                      "--no-progress"],
    }
    size = sum(p.stat().st_size for p in (root / "hf").glob("*.safetensors"))
    print(f"checkpoint: {args.layers} layers of Llama-2-7B shape, bf16, {size / 2**30:.2f} GiB")
    for what, cmd in runs.items():
        rss, secs = peak_rss(cmd)
        print(f"{what:24s} peak RSS {rss / 2**30:.2f} GiB   {secs:.1f} s")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
