"""Record formats: checking one record, and turning it into token ids with supervision flags.

A record is first *normalised* to one of three shapes, whatever its format:

- ``{"text": str}``: plain text, every token supervised;
- ``{"prompt": str, "response": str}``: prompt/response and Alpaca, the response (and EOS)
  supervised;
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: ShareGPT and
  OpenAI-style chat, the assistant turns supervised.

Encoding gives ``ids`` and ``flags`` of equal length: ``flags[j]`` is 1 when token j is a
supervised *target* (predicted from the tokens before it); the loss mask of a sample is ``flags[1:]``.
Text pieces are encoded one by one and concatenated, so a supervised span starts and ends exactly
at a piece boundary (a token never straddles prompt and response).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from ..config import FORMAT_FIELDS, FORMATS  # noqa: F401  (re-exported)


class DataError(ValueError):
    """Bad input data; the message names the file (and line)."""


class RecordError(ValueError):
    """What is wrong with one record; the reader prefixes the file and line."""


ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# ShareGPT speakers -> roles; anything else is an error rather than a silent guess
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}
CHAT_ROLES = ("system", "user", "assistant")
# the plain chat template (tokenizers without their own): "User: ...\n\nAssistant: ...<EOS>"
PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_TURN_SEPARATOR = "\n\n"

_MISSING = object()


def _string(rec: dict, key: str, column: str, optional: bool = False) -> str:
    value = rec.get(column, _MISSING)
    if value is _MISSING or value is None:
        if optional:
            return ""
        raise RecordError(f"key '{column}' is missing")
    if not isinstance(value, str):
        raise RecordError(f"key '{column}' is not a string ({type(value).__name__})")
    return value


def _turns(rec: dict, fmt: str, columns: dict) -> list:
    list_key, role_key, text_key = FORMAT_FIELDS[fmt]
    col = {k: columns.get(k, k) for k in (list_key, role_key, text_key)}
    turns = rec.get(col[list_key], _MISSING)
    if turns is _MISSING or turns is None:
        raise RecordError(f"key '{col[list_key]}' is missing")
    if not isinstance(turns, list):
        raise RecordError(f"key '{col[list_key]}' is not a list of turns ({type(turns).__name__})")
    if not turns:
        raise RecordError(f"key '{col[list_key]}' is an empty conversation")
    messages = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {i} of '{col[list_key]}' is not an object ({type(turn).__name__})")
        speaker = turn.get(col[role_key])
        if fmt == "sharegpt":
            role = SHAREGPT_ROLES.get(speaker if isinstance(speaker, str) else None)
            accepted = ", ".join(sorted(SHAREGPT_ROLES))
        else:
            role = speaker if speaker in CHAT_ROLES else None
            accepted = ", ".join(CHAT_ROLES)
        if role is None:
            raise RecordError(f"turn {i}: '{col[role_key]}' is {speaker!r}; expected one of {accepted}")
        content = turn.get(col[text_key], _MISSING)
        if not isinstance(content, str):
            what = "missing" if content is _MISSING else f"not a string ({type(content).__name__})"
            raise RecordError(f"turn {i}: key '{col[text_key]}' is {what}")
        messages.append({"role": role, "content": content})
    return messages


def normalize(rec, fmt: str, columns: dict | None = None) -> dict:
    """Check ``rec`` against ``fmt`` and return its normalised form (see the module docstring).

    ``columns`` maps a format's field names to the names used in the data."""
    columns = columns or {}
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object, got {type(rec).__name__}")

    def get(key, optional=False):
        return _string(rec, key, columns.get(key, key), optional)

    if fmt == "text":
        return {"text": get("text")}
    if fmt == "prompt_response":
        return {"prompt": get("prompt"), "response": get("response")}
    if fmt == "alpaca":
        instruction, inp, output = get("instruction"), get("input", optional=True), get("output")
        prompt = (ALPACA_PROMPT.format(instruction=instruction, input=inp) if inp.strip()
                  else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
        return {"prompt": prompt, "response": output}
    if fmt in ("sharegpt", "messages"):
        return {"messages": _turns(rec, fmt, columns)}
    raise RecordError(f"unknown format '{fmt}'; formats: {', '.join(FORMATS)}")


def is_empty(norm: dict) -> bool:
    """Whether a normalised record has nothing to learn: blank text, a blank response, or a
    conversation whose assistant turns are all blank (only EOS or the end-of-turn marker would be
    supervised). A conversation without an assistant turn is not empty: it has no supervised token
    at all and is dropped as such (see loader.TokenizedSet)."""
    if "text" in norm:
        return not norm["text"].strip()
    if "prompt" in norm:
        return not norm["response"].strip()
    replies = [m["content"] for m in norm["messages"] if m["role"] == "assistant"]
    return bool(replies) and not any(r.strip() for r in replies)


def record_hash(norm: dict) -> int:
    """64-bit hash of a normalised record: equal for exact duplicate examples (overlap checks)."""
    text = json.dumps(norm, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _pieces(norm: dict, tokenizer, chat) -> list:
    """``[(text or token id, supervised), ...]`` for one normalised record."""
    bos = [(tokenizer.bos_id, False)] if tokenizer.add_bos and tokenizer.bos_id >= 0 else []
    eos = [(tokenizer.eos_id, True)] if tokenizer.add_eos and tokenizer.eos_id >= 0 else []
    if "text" in norm:
        return bos + [(norm["text"], True)] + eos
    if "prompt" in norm:
        return bos + [(norm["prompt"], False), (norm["response"], True)] + eos
    messages = norm["messages"]
    if chat is None:  # the plain template
        out = list(bos)
        for i, m in enumerate(messages):
            header = (PLAIN_TURN_SEPARATOR if i else "") + PLAIN_ROLE_NAMES[m["role"]] + ": "
            if m["role"] == "assistant":
                out += [(header, False), (m["content"], True)] + eos
            else:
                out.append((header + m["content"], False))
        return out
    text, spans = chat.assistant_spans(messages)
    pos = 0
    if chat.bos_token and text.startswith(chat.bos_token) and tokenizer.bos_id >= 0:
        # the template writes BOS itself (Llama 3 does): use the id, never a second BOS, and never
        # the BOS text as plain characters (a sentencepiece model would not read it as the token)
        out, pos = [(tokenizer.bos_id, False)], len(chat.bos_token)
    else:
        out = list(bos)
    for start, end in spans:
        out += [(text[pos:start], False), (text[start:end], True)]
        pos = end
    out.append((text[pos:], False))
    return out


def encode(norm: dict, tokenizer, chat=None) -> tuple:
    """``(ids, flags)``: int32 token ids and uint8 supervision flags of a normalised record.

    ``chat`` is a :class:`scalebio.tokenizer.ChatTemplate` or None for the plain chat template."""
    ids, flags = [], []
    for piece, supervised in _pieces(norm, tokenizer, chat):
        if isinstance(piece, str):
            if not piece:
                continue
            piece = tokenizer.encode(piece)
        else:
            piece = [piece]
        ids += piece
        flags += [supervised] * len(piece)
    return np.asarray(ids, dtype=np.int32), np.asarray(flags, dtype=np.uint8)
