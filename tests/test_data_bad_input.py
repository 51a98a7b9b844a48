"""The data path's bad input: malformed lines name their file and line, empty or unsupervised
sources, overlaps between validation, test and training sources."""
from __future__ import annotations

import pytest

from data_helpers import data_cfg, load_one
from helpers import write_jsonl
from scalebio.config import ConfigError, DataConfig, Layers, SourceConfig, parse
from scalebio.data import DataError, RunData


# --------------------------------------------------------------------------- bad input


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
