"""Tokenizers that need no download: a local sentencepiece model."""
from __future__ import annotations

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
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # padded positions carry no loss, so any valid id works when the model has no pad piece
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(cfg: TokenizerConfig):
    if cfg is None or not cfg.path:
        raise ConfigError("data.tokenizer.path is not set: give the tokenizer model file in the data YAML")
    if cfg.type == "sentencepiece":
        return SentencePieceTokenizer(cfg.path, add_bos=cfg.add_bos, add_eos=cfg.add_eos)
    raise ConfigError(f"unsupported tokenizer type {cfg.type!r}")
