"""The data path: every format's loss mask against hand-written expectations, and file types."""
from __future__ import annotations

import json

import pytest

from data_helpers import CHATML, data_cfg, make_hf_tokenizer, runs
from helpers import write_jsonl
from scalebio.config import ConfigError, SourceConfig, TokenizerConfig
from scalebio.data import DataError, RunData, encode_record
from scalebio.tokenizer import ChatTemplate, load_tokenizer


# --------------------------------------------------------------------------- formats and masks


def test_prompt_response_supervises_only_the_response_and_eos(tok):
    p, r = tok.encode("Return the"), tok.encode("sum of the values.")
    sample, cut = encode_record({"prompt": "Return the", "response": "sum of the values."}, "prompt_response", tok, 64)
    assert not cut
    assert sample.ids.tolist() == [tok.bos_id] + p + r + [tok.eos_id]
    targets = sample.ids[1:]
    # target j is ids[j + 1]: the prompt's own tokens are never targets, the response and EOS are
    assert targets[sample.mask].tolist() == r + [tok.eos_id]
    assert sample.mask.tolist() == [False] * len(p) + [True] * (len(r) + 1)


def test_text_supervises_every_token_and_truncates(tok):
    ids = tok.encode("Examples of containers are tuples, lists and dictionaries.")
    sample, cut = encode_record({"text": "Examples of containers are tuples, lists and dictionaries."}, "text", tok, 5)
    assert cut and len(sample.ids) == 6 and sample.mask.all()
    assert sample.ids.tolist() == ([tok.bos_id] + ids)[:6]


def test_alpaca_uses_the_alpaca_prompt_and_supervises_the_output(tok):
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                  "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers."
                  "\n\n### Input:\n2 and 3\n\n### Response:\n")
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    sample, _ = encode_record(rec, "alpaca", tok, 512)
    p, r = tok.encode(with_input), tok.encode("5")
    assert sample.ids.tolist() == [tok.bos_id] + p + r + [tok.eos_id]
    assert sample.mask.tolist() == [False] * len(p) + [True] * (len(r) + 1)
    no_input = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    for rec in ({"instruction": "Say hi.", "input": "", "output": "Hi."}, {"instruction": "Say hi.", "output": "Hi."}):
        sample, _ = encode_record(rec, "alpaca", tok, 512)
        p = tok.encode(no_input)
        assert sample.ids.tolist() == [tok.bos_id] + p + tok.encode("Hi.") + [tok.eos_id]
        assert sample.mask.sum() == len(tok.encode("Hi.")) + 1 and not sample.mask[: len(p)].any()


CONVERSATION = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "More"),
                ("assistant", "Sure.")]


def test_chat_without_a_template_uses_the_plain_one_and_supervises_assistant_turns(tok):
    e = tok.encode
    # hand-written: "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.<eos>\n\nUser: More\n\nAssistant: Sure.<eos>"
    pieces = [([tok.bos_id], False), (e("System: Be brief."), False), (e("\n\nUser: Hi"), False),
              (e("\n\nAssistant: "), False), (e("Hello."), True), ([tok.eos_id], True),
              (e("\n\nUser: More"), False), (e("\n\nAssistant: "), False), (e("Sure."), True), ([tok.eos_id], True)]
    ids = [t for p, _ in pieces for t in p]
    flags = [f for p, f in pieces for _ in p]
    messages = {"messages": [{"role": r, "content": c} for r, c in CONVERSATION]}
    sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": c}
                                  for r, c in CONVERSATION]}
    for rec, fmt in ((messages, "messages"), (sharegpt, "sharegpt")):
        sample, cut = encode_record(rec, fmt, tok, 512)
        assert not cut
        assert sample.ids.tolist() == ids
        assert sample.mask.tolist() == flags[1:]
        assert runs(sample) == [e("Hello.") + [tok.eos_id], e("Sure.") + [tok.eos_id]]


def test_chat_template_supervises_exactly_the_assistant_turns(chatml_tok):
    tok = chatml_tok
    chat = ChatTemplate(CHATML, tok.bos_token, tok.eos_token)
    rec = {"messages": [{"role": r, "content": c} for r, c in CONVERSATION[1:]]}  # no system: the template adds one
    sample, _ = encode_record(rec, "messages", tok, 512, chat=chat)
    text = tok.decode(sample.ids)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n"
                    "<|im_start|>assistant\nSure.<|im_end|>\n")
    # the assistant's content and its end-of-turn marker; not the header, not the newline after it
    assert [tok.decode(r) for r in runs(sample)] == ["Hello.<|im_end|>", "Sure.<|im_end|>"]
    assert sample.ids[0] != tok.eos_id and tok.tk.token_to_id("<|im_end|>") == tok.eos_id


def test_the_tokenizers_own_template_is_used_and_bos_is_not_doubled(tmp_path, tok):
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    hf = make_hf_tokenizer(tmp_path / "llama_like", {"bos_token": "<s>", "eos_token": "<|im_end|>",
                                                     "chat_template": template})
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                              {"role": "assistant", "content": "Hello."}]}])
    data = RunData(data_cfg(tmp_path, {"chat": SourceConfig(str(src), format="messages")}), hf, 0)
    assert data.chat is not None and data.chat.source == template
    sample = data.train[0].sample(0)
    assert sample.ids.tolist().count(hf.bos_id) == 1 and sample.ids[0] == hf.bos_id
    assert [hf.decode(r) for r in runs(sample)] == ["Hello.<|im_end|>"]
    # chat_template: plain overrides the tokenizer's own
    cfg = data_cfg(tmp_path, {"chat": SourceConfig(str(src), format="messages")})
    cfg.tokenizer = TokenizerConfig(path=str(tmp_path / "llama_like"), chat_template="plain")
    sample = RunData(cfg, hf, 0).train[0].sample(0)
    assert hf.decode(sample.ids) == "<s>User: Hi\n\nAssistant: Hello.<|im_end|>"


def test_a_tokenizer_directory_gives_its_chat_template_in_either_place(tmp_path):
    named = make_hf_tokenizer(tmp_path / "named", {"eos_token": "<|im_end|>", "chat_template": [
        {"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": CHATML}]})
    assert named.chat_template == CHATML and named.eos_token == "<|im_end|>" and named.bos_token is None
    make_hf_tokenizer(tmp_path / "file", {"eos_token": "<|im_end|>"})
    (tmp_path / "file" / "chat_template.jinja").write_text(CHATML)  # where newer transformers save it
    assert load_tokenizer(TokenizerConfig(path=str(tmp_path / "file"))).chat_template == CHATML
    assert make_hf_tokenizer(tmp_path / "none", {"eos_token": "<|im_end|>"}).chat_template is None
    with pytest.raises(ConfigError, match="data.tokenizer.chat_template: the chat template does not compile"):
        from scalebio.tokenizer import chat_template_for

        chat_template_for(named, "{% for m in messages %}")


def test_a_template_that_is_not_prefix_consistent_is_rejected_with_the_record(tmp_path, chatml_tok):
    cfg = data_cfg(tmp_path, {"chat": SourceConfig(str(write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}])),
        format="messages")})
    # the generation prompt differs from how an assistant turn is rendered
    cfg.tokenizer = TokenizerConfig(chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                                  "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with pytest.raises(DataError, match=r"c\.jsonl:1: the chat template does not render conversations prefix by "
                                        r"prefix .*chat_template: plain"):
        RunData(cfg, chatml_tok, 0)


def test_columns_map_format_fields_to_other_names(tmp_path, tok):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Add 2 and 3.", "answer": "5", "id": 7}])
    cfg = data_cfg(tmp_path, {"qa": SourceConfig(str(src), format="alpaca",
                                                 columns={"instruction": "question", "output": "answer"})})
    sample = RunData(cfg, tok, 0).train[0].sample(0)
    want, _ = encode_record({"instruction": "Add 2 and 3.", "output": "5"}, "alpaca", tok, 64)
    assert sample.ids.tolist() == want.ids.tolist() and sample.mask.tolist() == want.mask.tolist()
    with pytest.raises(ConfigError, match="columns: question not read by format 'text'"):
        SourceConfig(str(src), columns={"question": "q"}).validate()


# --------------------------------------------------------------------------- file types


def test_every_file_type_reads_the_same_records(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(5)]
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", recs)
    (d / "a.json").write_text(json.dumps(recs, indent=2))
    (d / "a.csv").write_text("prompt,response\n" + "".join(f'"{r["prompt"]}","{r["response"]}"\n' for r in recs))
    (d / "a.tsv").write_text("prompt\tresponse\n" + "".join(f'{r["prompt"]}\t{r["response"]}\n' for r in recs))
    pq.write_table(pa.Table.from_pylist(recs), d / "a.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", recs[:2])
    write_jsonl(shards / "part-1.jsonl", recs[2:])
    paths = {"jsonl": d / "a.jsonl", "json": d / "a.json", "csv": d / "a.csv", "tsv": d / "a.tsv",
             "parquet": d / "a.parquet", "dir": shards, "glob": tmp_path / "shards" / "part-*.jsonl"}
    cfg = data_cfg(tmp_path, {k: SourceConfig(str(p), format="prompt_response") for k, p in paths.items()})
    data = RunData(cfg, tok, 0)
    want = [encode_record(r, "prompt_response", tok, 64)[0].ids.tolist() for r in recs]
    for t in data.train:
        assert [s.ids.tolist() for s in t.samples] == want, t.name
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    cfg = data_cfg(tmp_path, {"txt": SourceConfig(str(tmp_path / "lines.txt"))})
    assert [s.ids.tolist() for s in RunData(cfg, tok, 0).train[0].samples] == \
        [encode_record({"text": t}, "text", tok, 64)[0].ids.tolist() for t in ("first line", "second line")]


def test_a_saved_datasets_folder_is_a_source(tmp_path, tok):
    import datasets

    recs = [{"text": f"saved example {i}"} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(str(tmp_path / "saved"))
    cfg = data_cfg(tmp_path, {"saved": SourceConfig(str(tmp_path / "saved"))})
    assert len(RunData(cfg, tok, 0).train[0].samples) == 3
    cfg = data_cfg(tmp_path, {"saved": SourceConfig(str(tmp_path / "saved"), split="test")})
    with pytest.raises(DataError, match="no split 'test'; splits: train"):
        RunData(cfg, tok, 0)


def test_an_unreachable_hub_dataset_is_a_clear_error(tmp_path, tok, monkeypatch):
    import datasets
    import huggingface_hub

    # as on a machine without network, but without waiting for connection retries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = data_cfg(tmp_path, {"hub": SourceConfig(dataset="someone/not-downloaded-data")})
    with pytest.raises(DataError, match="cannot load dataset 'someone/not-downloaded-data' from the Hugging Face Hub"
                                        ".*give its local 'path'"):
        RunData(cfg, tok, 0)


