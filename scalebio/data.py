"""Training sources and the validation set: local JSONL -> token ids with a loss mask -> batches.

Formats (one JSON object per line):
- ``text``: ``{"text": ...}``, loss on every token;
- ``prompt_response``: ``{"prompt": ..., "response": ...}``, loss on the response (and EOS) only.

Source ids are the positions of the source names in sorted order, so they never depend on the
file system or the order of the YAML. Batches are drawn uniformly from the pooled training
samples (a seeded permutation per epoch), so a source's share of a batch follows its size; its
weight pi only enters through the loss coefficients (SPEC §2). Every rank draws the same global
batch from the same seed and takes its own part in the backend.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig, SourceConfig
from .roles import Batch

FORMAT_KEYS = {"text": ("text",), "prompt_response": ("prompt", "response")}
_STREAM_TRAIN, _STREAM_VAL = 1, 2


class DataError(ValueError):
    """Bad input data; the message names the file (and line)."""


@dataclass
class Sample:
    ids: np.ndarray  # int64, at most seq_length + 1 tokens
    mask: np.ndarray  # bool, len(ids) - 1: is the target ids[j + 1] supervised


@dataclass
class TokenizedSet:
    name: str
    path: str
    samples: list
    truncated: int

    @property
    def supervised_tokens(self) -> int:
        return int(sum(s.mask.sum() for s in self.samples))


def read_records(path, fmt: str, max_samples=None) -> list:
    """Records of a JSONL file, checked for the keys ``fmt`` needs; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    keys = FORMAT_KEYS[fmt]
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in keys:
                if not isinstance(rec.get(key), str):
                    problem = "missing" if key not in rec else f"not a string ({type(rec[key]).__name__})"
                    raise DataError(f"{path}:{lineno}: key '{key}' is {problem}; format '{fmt}' needs "
                                    f"{', '.join(repr(k) for k in keys)}")
            records.append(rec)
            if max_samples is not None and len(records) >= max_samples:
                break
    return records


def encode_record(rec: dict, fmt: str, tokenizer, seq_length: int):
    """Token ids and target mask of one record; returns (Sample, was_truncated)."""
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id >= 0 else []
    eos = [tokenizer.eos_id] if tokenizer.add_eos and tokenizer.eos_id >= 0 else []
    if fmt == "text":
        ids = bos + tokenizer.encode(rec["text"]) + eos
        first_target = 1  # every token after the first is a target
    else:
        prompt = bos + tokenizer.encode(rec["prompt"])
        ids = prompt + tokenizer.encode(rec["response"]) + eos
        first_target = len(prompt)  # predict the response, not the prompt
    truncated = len(ids) > seq_length + 1
    ids = np.asarray(ids[: seq_length + 1], dtype=np.int64)
    mask = np.arange(1, len(ids)) >= first_target
    return Sample(ids, mask), truncated


def tokenize_source(name: str, cfg: SourceConfig, tokenizer, seq_length: int) -> TokenizedSet:
    records = read_records(cfg.path, cfg.format, cfg.max_samples)
    if not records:
        raise DataError(f"source '{name}' ({cfg.path}) has no samples")
    samples, truncated = [], 0
    for rec in records:
        sample, cut = encode_record(rec, cfg.format, tokenizer, seq_length)
        samples.append(sample)
        truncated += cut
    out = TokenizedSet(name, str(cfg.path), samples, truncated)
    if out.supervised_tokens == 0:
        raise DataError(f"source '{name}' ({cfg.path}) has no supervised tokens after tokenization "
                        f"(seq_length={seq_length}: are all responses truncated away?)")
    return out


class EpochSampler:
    """Indices of ``size`` items without replacement within an epoch, reshuffled each epoch.

    The permutation of epoch e comes from a generator seeded with (seed, stream, e), so draws are
    identical on every rank and reproducible from (epoch, position) alone.
    """

    def __init__(self, size: int, seed: int, stream: int):
        self.size, self.seed, self.stream = size, seed, stream
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.size)

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            chunk = self._perm[self.pos: self.pos + n]
            out.append(chunk)
            n -= len(chunk)
            self.pos += len(chunk)
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)


def collate(samples: list, sources: list, seq_length: int, pad_id: int) -> Batch:
    """Right-padded [B, seq_length] batch; padding carries no loss and, attention being causal,
    does not change the outputs at real positions."""
    b = len(samples)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq_length), dtype=torch.float32)
    for i, s in enumerate(samples):
        n = len(s.ids) - 1
        tokens[i, :n] = torch.from_numpy(s.ids[:-1])
        labels[i, :n] = torch.from_numpy(s.ids[1:])
        loss_mask[i, :n] = torch.from_numpy(s.mask.astype(np.float32))
    return Batch(tokens, labels, loss_mask, torch.as_tensor(sources, dtype=torch.long))


class RunData:
    """The tokenized sources and validation set of a run, and their seeded batch streams."""

    def __init__(self, cfg: DataConfig, tokenizer, seed: int):
        if not cfg.sources:
            raise DataError("data.sources is empty: name at least one training source")
        if cfg.validation is None:
            raise DataError("data.validation is not set: the bilevel objective needs a validation set")
        self.seq_length = cfg.seq_length
        self.pad_id = tokenizer.pad_id
        self.source_names = sorted(cfg.sources)
        self.train = [tokenize_source(n, cfg.sources[n], tokenizer, cfg.seq_length) for n in self.source_names]
        self.val = tokenize_source("validation", cfg.validation, tokenizer, cfg.seq_length)
        sizes = [len(t.samples) for t in self.train]
        self._offsets = np.cumsum([0] + sizes)
        self._train_sampler = EpochSampler(int(self._offsets[-1]), seed, _STREAM_TRAIN)
        self._val_sampler = EpochSampler(len(self.val.samples), seed, _STREAM_VAL)

    def next_train(self, n: int) -> Batch:
        flat = self._train_sampler.take(n)
        src = np.searchsorted(self._offsets, flat, side="right") - 1
        samples = [self.train[s].samples[i - self._offsets[s]] for s, i in zip(src, flat)]
        return collate(samples, src.tolist(), self.seq_length, self.pad_id)

    def next_val(self, n: int) -> Batch:
        idx = self._val_sampler.take(n)
        return collate([self.val.samples[i] for i in idx], [-1] * n, self.seq_length, self.pad_id)

    def summary(self) -> list:
        rows = []
        for t in self.train + [self.val]:
            rows.append(f"{t.name}: {len(t.samples)} samples, {t.supervised_tokens} supervised tokens, "
                        f"{t.truncated} truncated to {self.seq_length + 1} tokens ({t.path})")
        return rows

    def state_dict(self) -> dict:
        return {"train": self._train_sampler.state_dict(), "val": self._val_sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._train_sampler.load_state_dict(state["train"])
        self._val_sampler.load_state_dict(state["val"])
