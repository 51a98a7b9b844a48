"""Tokenizers that need no download: sentencepiece and a Hugging Face tokenizer directory."""
from __future__ import annotations

import json

import pytest

from helpers import DEMO_DIR
from scalebio.config import ConfigError, TokenizerConfig
from scalebio.data import encode_record
from scalebio.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer saved the way Hugging Face checkpoints ship it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf_tok")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    lines = [json.loads(line)["response"] for line in (DEMO_DIR / "clean.jsonl").read_text().splitlines()[:300]]
    tk.train_from_iterator(lines, trainer)
    tk.save(str(d / "tokenizer.json"))
    # Qwen2 style: no BOS, EOS and pad are special tokens spelled as strings or {"content": ...}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return d


def test_auto_detects_the_kind():
    tok = load_tokenizer(TokenizerConfig(path=str(DEMO_DIR / "tokenizer.model")))
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 2048


def test_huggingface_directory(hf_dir):
    tok = load_tokenizer(TokenizerConfig(path=str(hf_dir)))
    assert isinstance(tok, HuggingFaceTokenizer)
    assert tok.bos_id == -1 and not tok.add_bos
    assert tok.eos_id == tok.tk.token_to_id("<|im_end|>") and tok.pad_id == tok.tk.token_to_id("<|endoftext|>")
    assert tok.chat_template.startswith("{% for")
    ids = tok.encode("Return the sum of the values.")
    assert ids and tok.decode(ids) == "Return the sum of the values."
    sample, _ = encode_record({"prompt": "Return the", "response": " sum."}, "prompt_response", tok, 64)
    assert sample.ids[0] != tok.bos_id and sample.ids[-1] == tok.eos_id  # no BOS to add, EOS appended


def test_missing_or_broken_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path)))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read Hugging Face tokenizer"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path)))


def test_a_malformed_tokenizer_config_or_model_is_a_clear_error(tmp_path, hf_dir):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(hf_dir, d)
    for settings, message in [({"bos_token": 5, "eos_token": "<|im_end|>"}, "a special token must be a string"),
                              ({"eos_token": "<|im_end|>", "chat_template": 123}, "chat_template must be a Jinja"),
                              ({"eos_token": "<|nope|>"}, r"eos_token '<\|nope\|>' is not in the vocabulary"),
                              ([1, 2], "expected a JSON object of settings, got list")]:
        (d / "tokenizer_config.json").write_text(json.dumps(settings))
        with pytest.raises(ConfigError, match=message):
            load_tokenizer(TokenizerConfig(path=str(d)))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<pad>"}))
    assert load_tokenizer(TokenizerConfig(path=str(d))).pad_id == 2  # an unknown pad falls back to EOS
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"garbage\.model is not a sentencepiece model"):
        load_tokenizer(TokenizerConfig(path=str(garbage)))
