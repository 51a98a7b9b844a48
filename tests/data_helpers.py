"""Data-path test helpers: a ChatML tokenizer directory, DataConfigs over sources, supervised runs."""
from __future__ import annotations

import json

from helpers import DEMO_DIR, write_jsonl
from scalebio.config import DataConfig, SourceConfig, TokenizerConfig
from scalebio.data import RunData
from scalebio.tokenizer import load_tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # Qwen2-Instruct's template


def make_hf_tokenizer(folder, config: dict):
    """A small byte-level BPE tokenizer directory with ChatML special tokens and ``config`` as
    tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"])
    lines = [json.loads(line)["response"] for line in (DEMO_DIR / "clean.jsonl").read_text().splitlines()[:300]]
    tk.train_from_iterator(lines, trainer)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(TokenizerConfig(path=str(folder)))


def data_cfg(tmp_path, sources: dict, validation=None, **kw) -> DataConfig:
    """A DataConfig over SourceConfigs, cached under tmp_path."""
    if validation is None:
        validation = SourceConfig(str(write_jsonl(tmp_path / "val.jsonl", [{"text": "held out text"}])))
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("seq_length", 64)
    return DataConfig(sources=sources, validation=validation, **kw)


def runs(sample):
    """Contiguous runs of supervised target ids: [[ids...], ...]."""
    out, cur = [], []
    for tid, m in zip(sample.ids[1:].tolist(), sample.mask.tolist()):
        if m:
            cur.append(tid)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def load_one(tmp_path, tok, path, fmt="text", **kw):
    return RunData(data_cfg(tmp_path, {"s": SourceConfig(str(path), format=fmt)}, **kw), tok, 0)
