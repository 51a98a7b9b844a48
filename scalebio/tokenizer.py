"""Tokenizers that need no download: a local sentencepiece model, or a Hugging Face tokenizer
directory (``tokenizer.json`` read with the ``tokenizers`` library, special tokens from
``tokenizer_config.json``), so a run can use a checkpoint's own tokenizer.

Every tokenizer exposes ``encode(text) -> ids`` *without* special tokens, ``bos_id``, ``eos_id``,
``pad_id`` (-1 when absent), ``vocab_size`` and the ``add_bos`` / ``add_eos`` settings; the data
path adds BOS/EOS itself, so behaviour does not depend on a tokenizer's post-processor.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError, TokenizerConfig


class SentencePieceTokenizer:
    def __init__(self, path, add_bos: bool = True, add_eos: bool = True):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.add_bos = add_bos and self.bos_id >= 0
        self.add_eos = add_eos and self.eos_id >= 0
        self.chat_template = None
        # padded positions carry no loss, so any valid id works when the model has no pad piece
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def _token_text(value):
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HuggingFaceTokenizer:
    def __init__(self, path, add_bos: bool = True, add_eos: bool = True):
        from tokenizers import Tokenizer

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no tokenizer.json at {path}")
        try:
            self.tk = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise ConfigError(f"cannot read Hugging Face tokenizer {file}: {exc}") from None
        self.path = file
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            f = folder / name
            if f.is_file():
                try:
                    settings.update(json.loads(f.read_text()))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{f}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
        self.chat_template = settings.get("chat_template")
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._id(settings.get("bos_token"))
        self.eos_id = self._id(settings.get("eos_token"))
        pad = self._id(settings.get("pad_token"))
        self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)
        self.add_bos = add_bos and self.bos_id >= 0  # Qwen2 has no BOS token
        self.add_eos = add_eos and self.eos_id >= 0

    def _id(self, token) -> int:
        text = _token_text(token)
        if not text:
            return -1
        tid = self.tk.token_to_id(text)
        return -1 if tid is None else tid

    def encode(self, text: str) -> list:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(cfg: TokenizerConfig):
    if cfg is None or not cfg.path:
        raise ConfigError("data.tokenizer.path is not set: give a sentencepiece .model file or a Hugging Face "
                          "tokenizer directory in the data YAML")
    path = Path(cfg.path)
    kind = cfg.type
    if kind == "auto":
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                kind = "huggingface"
            elif (path / "tokenizer.model").is_file():
                kind, path = "sentencepiece", path / "tokenizer.model"
            else:
                raise ConfigError(f"tokenizer directory {path} has neither tokenizer.json nor tokenizer.model")
        else:
            kind = "huggingface" if path.suffix == ".json" else "sentencepiece"
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, add_bos=cfg.add_bos, add_eos=cfg.add_eos)
    return HuggingFaceTokenizer(path, add_bos=cfg.add_bos, add_eos=cfg.add_eos)
