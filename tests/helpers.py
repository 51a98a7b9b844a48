"""Helpers shared by the tests: a tiny but real configuration (megatron-core on CPU, demo data)."""
from __future__ import annotations

import json
from pathlib import Path

from scalebio.request import DEMO_DIR, RunRequest

REPO = Path(__file__).resolve().parents[1]

# 4 layers so LISA has something to choose; 32 tokens, batches of 8 in micro-batches of 4
TINY = (
    "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2",
    "run.global_batch=8", "run.micro_batch=4", "run.val_batch=4", "run.progress=false",
    "data.seq_length=32",
)


def tiny_request(tmp_path: Path, *sets, plugins=(), data=None, steps=3, configs=()) -> RunRequest:
    return RunRequest(model="tiny", data=None if data is None else str(data), configs=tuple(configs),
                      sets=TINY + tuple(sets), plugins=tuple(plugins), steps=steps,
                      out=str(tmp_path / "run"), seed=1234)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def demo_data_yaml(tmp_path: Path, **sources) -> Path:
    """A data YAML using the demo tokenizer; ``sources`` maps name -> (path, format)."""
    lines = ["seq_length: 32", f"tokenizer: {{type: sentencepiece, path: {DEMO_DIR / 'tokenizer.model'}}}",
             "sources:"]
    lines += [f"  {n}: {{path: {p}, format: {f}}}" for n, (p, f) in sources.items() if n != "validation"]
    vp, vf = sources["validation"]
    lines.append(f"validation: {{path: {vp}, format: {vf}}}")
    path = tmp_path / "data.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
