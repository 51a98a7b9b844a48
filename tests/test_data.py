"""The data path: every format's loss mask against hand-written expectations, file types, bad input,
and sampling (determinism, stratified counts, exact resume)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import DEMO_DIR, demo_data_yaml, tiny_request, write_jsonl
from scalebio.config import ConfigError, DataConfig, Layers, SourceConfig, TokenizerConfig, parse
from scalebio.data import DataError, EpochSampler, RunData, encode_record
from scalebio.runner import prepare
from scalebio.tokenizer import ChatTemplate, load_tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # Qwen2-Instruct's template


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TokenizerConfig(path=str(DEMO_DIR / "tokenizer.model")))


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


@pytest.fixture(scope="module")
def chatml_tok(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("chatml"), {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML})


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


# --------------------------------------------------------------------------- bad input


def load_one(tmp_path, tok, path, fmt="text", **kw):
    return RunData(data_cfg(tmp_path, {"s": SourceConfig(str(path), format=fmt)}, **kw), tok, 0)


def test_malformed_line_names_file_and_line(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON .*on_error: skip"):
        load_one(tmp_path, tok, f)
    f.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: key 'response' is missing"):
        load_one(tmp_path, tok, f, "prompt_response")
    f.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: key 'text' is not a string \(int\)"):
        load_one(tmp_path, tok, f)
    f.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object, got list"):
        load_one(tmp_path, tok, f)
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_one(tmp_path, tok, f)
    f.write_text('{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: turn 2: 'from' is 'bot'; expected one of"):
        load_one(tmp_path, tok, f, "sharegpt")
    obj = tmp_path / "obj.json"
    obj.write_text('{\n  "data": [{"text": "one"}]\n}\n')
    with pytest.raises(DataError, match=r"obj\.json:1: malformed JSON .*read as an array of records or as JSON lines"):
        load_one(tmp_path, tok, obj)
    arr = tmp_path / "bad.json"
    arr.write_text('[\n  {"text": "one"},\n  {"text": 2}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:3: key 'text' is not a string"):
        load_one(tmp_path, tok, arr)
    arr.write_text('[\n  {"text": "one"},\n  {"text": "two"\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:4: malformed JSON"):
        load_one(tmp_path, tok, arr)
    csvf = tmp_path / "bad.csv"
    csvf.write_text('prompt,response\n"a ""quoted""\nprompt",fine\nonly one field\n')
    with pytest.raises(DataError, match=r"bad\.csv:4: 1 fields, but the header has 2"):
        load_one(tmp_path, tok, csvf, "prompt_response")


def test_skip_mode_counts_and_reports_skipped_records(tmp_path, tok):
    f = tmp_path / "noisy.jsonl"
    f.write_text('{"text": "good one"}\n{"text": \n{"txt": "wrong key"}\n{"text": "good two"}\n')
    data = load_one(tmp_path, tok, f, on_error="skip")
    t = data.train[0]
    assert len(t.samples) == 2 and t.skipped == 2
    line = data.summary()[0]
    assert "2 malformed records skipped (first: " in line and "noisy.jsonl:2: malformed JSON" in line
    # per source: the validation set still errors
    cfg = data_cfg(tmp_path, {"s": SourceConfig(str(f), on_error="skip")},
                   validation=SourceConfig(str(f)))
    with pytest.raises(DataError, match=r"noisy\.jsonl:2: malformed JSON .*validation set"):
        RunData(cfg, tok, 0)


def test_empty_missing_and_unsupervised_sources_are_clear(tmp_path, tok):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="source 's' .*empty.jsonl.* has no samples"):
        load_one(tmp_path, tok, empty)
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_one(tmp_path, tok, tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no data files .* in directory"):
        load_one(tmp_path, tok, tmp_path / "cache")
    # every response lies beyond seq_length: nothing left to learn from
    long_prompt = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 80, "response": "answer"}] * 3)
    with pytest.raises(DataError, match="source 's' .* has no supervised tokens after tokenization"):
        load_one(tmp_path, tok, long_prompt, "prompt_response")
    only_system = write_jsonl(tmp_path / "sys.jsonl", [{"messages": [{"role": "user", "content": "no reply"}]}])
    with pytest.raises(DataError, match="has no supervised tokens"):
        load_one(tmp_path, tok, only_system, "messages")


def test_records_without_supervised_tokens_are_dropped_and_counted(tmp_path, tok):
    f = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "short", "response": "fine"},
                                               {"prompt": "word " * 80, "response": "cut off"}])
    data = load_one(tmp_path, tok, f, "prompt_response")
    assert len(data.train[0].samples) == 1 and data.train[0].dropped == 1 and data.train[0].truncated == 1
    assert "1 truncated to 65 tokens, 1 dropped (no supervised token within seq_length)" in data.summary()[0]


def test_unknown_format_and_keys_are_config_errors(tmp_path):
    y = tmp_path / "data.yaml"
    y.write_text("sources:\n  a: {path: a.jsonl, format: chatml}\nvalidation: {path: v.jsonl}\n")
    layers = Layers()
    layers.add_file(y, "data")
    with pytest.raises(ConfigError, match=r"data.yaml: 'data.sources.a.format' must be one of 'text', "
                                          r"'prompt_response', 'alpaca', 'sharegpt', 'messages', got 'chatml'"):
        parse(DataConfig, layers.data["data"], layers.where, ("data",))
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        parse(DataConfig, {"sources": {"a": {"format": "text"}}})


def test_validation_overlapping_a_training_source_is_reported_with_counts(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"example {i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"other {i}"} for i in range(10)])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "example 3"}, {"text": "example 4"}, {"text": "other 9"},
                                             {"text": "fresh"}])
    sources = {"a": SourceConfig(str(a)), "b": SourceConfig(str(b))}
    with pytest.raises(DataError, match="validation set overlaps .* of its 4 examples, .*: 2 in source 'a', "
                                        "1 in source 'b'. Remove them"):
        RunData(data_cfg(tmp_path, sources, validation=SourceConfig(str(val))), tok, 0)
    data = RunData(data_cfg(tmp_path, sources, validation=SourceConfig(str(val)), overlap="warn"), tok, 0)
    assert any(line.startswith("warning: the validation set overlaps") for line in data.summary())
    # the same example in another format is still a duplicate (compared after normalisation)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": "a"}]}])
    share = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                                      {"from": "gpt", "value": "a"}]}])
    with pytest.raises(DataError, match="1 in source 'c'"):
        RunData(data_cfg(tmp_path, {"c": SourceConfig(str(chat), format="messages")},
                         validation=SourceConfig(str(share), format="sharegpt")), tok, 0)
    # a test set is checked against the sources and the validation set
    clean_val = write_jsonl(tmp_path / "v2.jsonl", [{"text": "fresh"}])
    test = write_jsonl(tmp_path / "t.jsonl", [{"text": "fresh"}, {"text": "example 1"}])
    with pytest.raises(DataError, match="test set overlaps .*1 in source 'a', 1 in the validation set"):
        RunData(data_cfg(tmp_path, sources, validation=SourceConfig(str(clean_val)), test=SourceConfig(str(test))),
                tok, 0)


def test_test_set_batches_cover_it_once_in_order(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"example {i}"} for i in range(10)])
    test = write_jsonl(tmp_path / "t.jsonl", [{"text": f"test {i}"} for i in range(5)])
    data = RunData(data_cfg(tmp_path, {"a": SourceConfig(str(a))}, test=SourceConfig(str(test))), tok, 0)
    batches = list(data.ordered_batches(data.test, 4))
    assert len(batches) == 2 and all(len(b) == 4 and (b.source == -1).all() for b in batches)
    assert batches[1].loss_mask[1:].sum() == 0  # padding rows carry no loss
    assert sum(b.supervised_tokens() for b in batches) == data.test.supervised_tokens


# --------------------------------------------------------------------------- sampling


def test_source_ids_follow_sorted_names_not_yaml_order(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha beta"}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "gamma delta"}] * 5)
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "alpha"}])
    data_yaml = demo_data_yaml(tmp_path, zeta=(a, "text"), alpha=(b, "text"), validation=(val, "text"))
    p = prepare(tiny_request(tmp_path, data=data_yaml))
    data = RunData(p.config.data, tok, 0)
    assert data.source_names == ["alpha", "zeta"]
    assert [len(t.samples) for t in data.train] == [5, 3]


def test_sampler_is_deterministic_covers_epochs_and_restores():
    a, b = EpochSampler(10, seed=5, stream=1), EpochSampler(10, seed=5, stream=1)
    first = a.take(7)
    assert np.array_equal(first, b.take(7))
    rest = a.take(3)
    assert sorted(first.tolist() + rest.tolist()) == list(range(10))  # one epoch without replacement
    state = a.state_dict()
    c = EpochSampler(10, seed=5, stream=1)
    c.load_state_dict(state)
    assert np.array_equal(a.take(13), c.take(13))
    assert not np.array_equal(EpochSampler(10, seed=6, stream=1).take(10), EpochSampler(10, seed=5, stream=1).take(10))


def _demo_cfg(tmp_path, max_samples=None, **kw):
    return DataConfig(sources={n: SourceConfig(str(DEMO_DIR / f"{n}.jsonl"), format="prompt_response",
                                               max_samples=max_samples) for n in ("clean", "shuffled", "typos")},
                      validation=SourceConfig(str(DEMO_DIR / "validation.jsonl"), format="prompt_response"),
                      seq_length=32, cache_dir=str(tmp_path / "cache"), **kw)


def _same(x, y) -> bool:
    return all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("tokens", "labels", "loss_mask", "source"))


@pytest.mark.parametrize("mode", [{}, {"sampling": "stratified"},
                                  {"sampling": "stratified", "batch_counts": {"clean": 5, "shuffled": 2, "typos": 2}}])
def test_a_resumed_run_sees_exactly_the_batches_it_would_have_seen(tmp_path, tok, mode):
    cfg = _demo_cfg(tmp_path, max_samples=40, **mode)
    n = 120  # several epochs of every stream: 40 samples per source, 9 per step
    full = RunData(cfg, tok, seed=11, global_batch=9)
    want = [(full.next_train(9), full.next_val(4)) for _ in range(n)]
    first = RunData(cfg, tok, seed=11, global_batch=9)
    for _ in range(n // 2):
        first.next_train(9), first.next_val(4)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = RunData(cfg, tok, seed=11, global_batch=9)
    resumed.load_state_dict(state)
    for train, val in want[n // 2:]:
        assert _same(resumed.next_train(9), train) and _same(resumed.next_val(4), val)
    other = RunData(cfg, tok, seed=12, global_batch=9)
    assert not _same(other.next_train(9), want[0][0])


def test_stratified_batches_hold_fixed_counts_per_source(tmp_path, tok):
    data = RunData(_demo_cfg(tmp_path, sampling="stratified", batch_counts={"clean": 2, "shuffled": 1, "typos": 5}),
                   tok, seed=0, global_batch=8)
    seen = set()
    for _ in range(200):  # 200 x 1 of shuffled's 700 samples: without replacement within its epoch
        b = data.next_train(8)
        assert b.source_counts(3).tolist() == [2.0, 1.0, 5.0]
        seen.add(b.tokens[b.source == 1][0].numpy().tobytes())
    assert len(seen) >= 199  # (two samples of the source may tokenize alike)
    even = RunData(_demo_cfg(tmp_path, sampling="stratified"), tok, seed=0)
    assert even.next_train(9).source_counts(3).tolist() == [3.0, 3.0, 3.0]
    with pytest.raises(DataError, match="splits run.global_batch=8 evenly over 3 sources"):
        RunData(_demo_cfg(tmp_path, sampling="stratified"), tok, seed=0, global_batch=8)
    with pytest.raises(DataError, match="batch_counts add up to 8 samples, but run.global_batch is 16"):
        RunData(_demo_cfg(tmp_path, sampling="stratified", batch_counts={"clean": 2, "shuffled": 1, "typos": 5}),
                tok, seed=0, global_batch=16)
    with pytest.raises(ConfigError, match="batch_counts must give a count for every source; missing: typos"):
        parse(DataConfig, {"sources": {"clean": {"path": "x"}, "typos": {"path": "y"}}, "sampling": "stratified",
                           "batch_counts": {"clean": 1}})


def test_restoring_a_state_from_other_data_is_refused(tmp_path, tok):
    data = RunData(_demo_cfg(tmp_path), tok, seed=0)
    state = data.state_dict()
    state["sizes"] = [10, 20, 30]
    with pytest.raises(DataError, match="the data changed since the state was saved"):
        RunData(_demo_cfg(tmp_path), tok, seed=0).load_state_dict(state)


def test_validation_batches_are_fresh_every_step(tmp_path, tok):
    p = prepare(tiny_request(tmp_path))
    data = RunData(p.config.data, tok, 0)
    v1, v2 = data.next_val(4), data.next_val(4)
    assert not np.array_equal(v1.tokens.numpy(), v2.tokens.numpy())
    assert (v1.source == -1).all()
    t = data.next_train(8)
    assert t.tokens.shape == (8, 32) and t.loss_mask.shape == (8, 32)
    # padding (the <pad> piece, never produced by encoding) carries no loss
    assert (t.tokens == tok.pad_id).any() and ((t.tokens == tok.pad_id) & (t.loss_mask > 0)).sum() == 0


def test_a_malformed_line_is_reported_where_the_parser_stopped(tmp_path, tok):
    f = tmp_path / "cut.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "cut off", \n{"text": "fine"}\r\n{"text" "x"}\r\n')
    with pytest.raises(DataError, match=r"cut\.jsonl:2: malformed JSON \(Expecting property name enclosed in double "
                                        r"quotes at column 21\)"):
        load_one(tmp_path, tok, f)
    f.write_text('{"text": "fine"}\r\n{"text" "x"}\r\n')  # Windows line endings
    with pytest.raises(DataError, match=r"cut\.jsonl:2: malformed JSON \(Expecting ':' delimiter at column 9\)"):
        load_one(tmp_path, tok, f)
    f.write_bytes(b'{"text": "a\x00b"}\n')  # the parser's own "... at" is not doubled
    with pytest.raises(DataError, match=r"cut\.jsonl:1: malformed JSON \(Invalid control character at column 12\)"):
        load_one(tmp_path, tok, f)


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, tok):
    for name, body in (("bom.jsonl", '{"text": "first"}\n{"text": "second"}\n'), ("bom.txt", "first\nsecond\n")):
        f = tmp_path / name
        f.write_bytes(b"\xef\xbb\xbf" + body.encode())
        data = load_one(tmp_path, tok, f)
        assert tok.decode(data.train[0].sample(0).ids[1:-1]) == "first"


def test_empty_responses_are_counted_and_skipped_kept_or_refused(tmp_path, tok):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Say hi.", "response": "Hi."},
                                               {"prompt": "Say nothing.", "response": ""},
                                               {"prompt": "Say hello.", "response": "Hello."},
                                               {"prompt": "Blank.", "response": " \n"}])
    data = load_one(tmp_path, tok, f, "prompt_response")  # the default: skip, and say so
    assert len(data.train[0].samples) == 2
    assert "2 with an empty response skipped (first: " in data.summary()[0] and "pairs.jsonl:2)" in data.summary()[0]
    data = load_one(tmp_path, tok, f, "prompt_response", on_empty="keep")
    assert len(data.train[0].samples) == 4 and "2 with an empty response kept" in data.summary()[0]
    kept = data.train[0].sample(1)
    assert kept.mask.sum() == 1 and kept.ids[-1] == tok.eos_id  # only EOS is supervised
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: the response is empty, .*set on_empty: skip"):
        load_one(tmp_path, tok, f, "prompt_response", on_empty="error")
    # per source, like on_error; chat turns: empty when every assistant turn is blank
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": "B"}, {"role": "assistant", "content": "Bee"}]}])
    cfg = data_cfg(tmp_path, {"c": SourceConfig(str(chat), format="messages", on_empty="error")}, on_empty="keep")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: the response is empty"):
        RunData(cfg, tok, 0)
    cfg.sources["c"].on_empty = None
    assert len(RunData(cfg, tok, 0).train[0].samples) == 3
    # the export draws from the same records as the run
    from scalebio.data.sources import RecordReader

    reader = RecordReader("source 'p'", SourceConfig(str(f), format="prompt_response"), "error", on_empty="skip")
    assert [raw["response"] for _, raw, _ in reader] == ["Hi.", "Hello."] and reader.empties.count == 2
