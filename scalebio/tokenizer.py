"""Tokenizers that need no download: a local sentencepiece model, or a Hugging Face tokenizer
directory (``tokenizer.json`` read with the ``tokenizers`` library, special tokens from
``tokenizer_config.json``), so a run can use a checkpoint's own tokenizer.

Every tokenizer exposes ``encode(text) -> ids`` *without* special tokens, ``bos_id``, ``eos_id``,
``pad_id`` (-1 when absent), ``vocab_size`` and the ``add_bos`` / ``add_eos`` settings; the data
path adds BOS/EOS itself, so behaviour does not depend on a tokenizer's post-processor.
``bos_token`` / ``eos_token`` are the texts of those tokens (None when absent) and
``chat_template`` the tokenizer's own Jinja chat template (None when it has none).

:class:`ChatTemplate` renders chat templates the way ``transformers`` does and finds the exact
character spans of the assistant turns, so the data path can supervise those and nothing else.
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
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"{path} is not a sentencepiece model ({str(exc).splitlines()[0]}); give a tokenizer.model "
                              f"file or a Hugging Face tokenizer directory as data.tokenizer.path") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.add_bos = add_bos and self.bos_id >= 0
        self.add_eos = add_eos and self.eos_id >= 0
        self.chat_template = None
        self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id >= 0 else None
        self.eos_token = self.sp.id_to_piece(self.eos_id) if self.eos_id >= 0 else None
        # padded positions carry no loss, so any valid id works when the model has no pad piece
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def _token_text(value, where=None):
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise ConfigError(f"{where or 'tokenizer_config.json'}: a special token must be a string or "
                          f"{{\"content\": ...}}, got {value!r}")
    return text


def _own_template(folder: Path, value):
    """A checkpoint's chat template: ``chat_template.jinja`` (newer transformers save it there) or
    ``tokenizer_config.json``'s ``chat_template``, a string or a list of named templates."""
    f = folder / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{folder / 'tokenizer_config.json'}: chat_template must be a Jinja template string "
                          f"(or a list of named ones), got {type(value).__name__}")
    return value or None


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
                    loaded = json.loads(f.read_text(encoding="utf-8-sig"))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ConfigError(f"{f}: malformed JSON ({getattr(exc, 'msg', exc)} at line "
                                      f"{getattr(exc, 'lineno', 1)})") from None
                if not isinstance(loaded, dict):
                    raise ConfigError(f"{f}: expected a JSON object of settings, got {type(loaded).__name__}")
                settings.update(loaded)
        self.config_file = folder / "tokenizer_config.json"
        self.chat_template = _own_template(folder, settings.get("chat_template"))
        self.bos_token = _token_text(settings.get("bos_token"), self.config_file) or None
        self.eos_token = _token_text(settings.get("eos_token"), self.config_file) or None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._id(settings.get("bos_token"), "bos_token")
        self.eos_id = self._id(settings.get("eos_token"), "eos_token")
        pad = self._id(settings.get("pad_token"))
        self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)
        self.add_bos = add_bos and self.bos_id >= 0  # Qwen2 has no BOS token
        self.add_eos = add_eos and self.eos_id >= 0

    def _id(self, token, required_as=None) -> int:
        """The id of a special token; -1 when none is named. A BOS or EOS that is named but not in
        the vocabulary is an error (it would silently not be added); a missing pad is not (any id pads)."""
        text = _token_text(token, self.config_file)
        if not text:
            return -1
        tid = self.tk.token_to_id(text)
        if tid is None and required_as:
            raise ConfigError(f"{self.config_file}: {required_as} {text!r} is not in the vocabulary of {self.path}")
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


class ChatTemplateError(ValueError):
    """A chat template that cannot be compiled, rendered, or split into assistant spans."""


class ChatTemplate:
    """A Jinja chat template rendered as ``transformers`` renders it (sandboxed, ``trim_blocks``,
    ``lstrip_blocks``, ``tojson``, ``raise_exception``), with ``bos_token`` / ``eos_token`` set."""

    def __init__(self, source: str, bos_token=None, eos_token=None):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            import datetime

            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc}") from None
        self.source = source
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the chat template fails on this conversation: {exc}") from None

    def assistant_spans(self, messages: list) -> tuple:
        """``(text, spans)``: the rendered conversation and the ``[start, end)`` character span of
        each assistant turn: its content and the template's end-of-turn marker, without the
        whitespace that follows it.

        A turn starts where the rendering of the conversation before it, with the generation
        prompt, ends; it ends where the rendering through that turn ends. This is exact when the
        template renders every prefix of a conversation as a prefix of the whole, which is checked.
        """
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ChatTemplateError(
                    f"the chat template does not render conversations prefix by prefix (turn {i + 1}), so the "
                    f"assistant turns cannot be located exactly; set data.tokenizer.chat_template: plain or give a "
                    f"template that does")
            start, end = len(before), len(through.rstrip())
            if m["content"].strip() not in text[start:end]:
                raise ChatTemplateError(f"the chat template changes the content of assistant turn {i + 1}, so its "
                                        f"tokens cannot be located; set data.tokenizer.chat_template: plain")
            spans.append((start, end))
        return text, spans


def chat_template_for(tokenizer, setting=None):
    """The ChatTemplate for chat formats, or None for the plain template (see docs/data.md).

    ``setting`` is ``data.tokenizer.chat_template``: None uses the tokenizer's own template when
    it has one, ``"plain"`` forces the plain template, anything else is a Jinja template."""
    if setting == "plain":
        return None
    source = setting if setting is not None else getattr(tokenizer, "chat_template", None)
    if not source:
        return None
    try:
        return ChatTemplate(source, getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None))
    except ChatTemplateError as exc:
        raise ConfigError(f"data.tokenizer.chat_template: {exc}") from None
