"""The mixture export: counts per source, draws without replacement while a source lasts, a fixed
shuffle, records written in their own format, and clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from helpers import REPO, write_jsonl
from scalebio.data import DataError
from scalebio.data.export import export_mixture, mixture_counts, read_weights
from scalebio.data.prepare import load_data_config


def test_mixture_counts_round_and_top_up_to_the_size():
    assert mixture_counts({"a": 0.9895, "b": 0.0064, "c": 0.0042}, 1000) == {"a": 990, "b": 6, "c": 4}
    # rounding gives 2 + 2 = 4 > 3: the source with the smallest remainder gives one back (ties: sorted order)
    assert mixture_counts({"a": 0.5, "b": 0.5}, 3) == {"a": 1, "b": 2}
    # rounding gives 3 + 3 + 3 = 9 < 10: the largest remainder (ties: first in sorted order) gets the top-up
    assert mixture_counts({"c": 1, "b": 1, "a": 1}, 10) == {"a": 4, "b": 3, "c": 3}
    assert mixture_counts({"a": 2.0, "b": 6.0}, 8) == {"a": 2, "b": 6}  # not normalised: normalised first
    assert mixture_counts({"a": 1.0, "b": 0.0}, 5) == {"a": 5, "b": 0}
    for size in (1, 7, 99, 1000):
        assert sum(mixture_counts({"a": 0.123, "b": 0.456, "c": 0.421}, size).values()) == size


@pytest.fixture
def sources(tmp_path):
    """Three sources in three formats (with extra keys), one malformed line skipped, and a validation set."""
    alpaca = [{"instruction": f"Task a{i}", "input": "", "output": f"Done a{i}", "id": f"a{i}"} for i in range(20)]
    share = [{"conversations": [{"from": "human", "value": f"Hi b{i}"}, {"from": "gpt", "value": f"Hello b{i}"}],
              "id": f"b{i}"} for i in range(5)]
    text = [{"text": f"plain c{i}", "id": f"c{i}"} for i in range(10)]
    write_jsonl(tmp_path / "a.jsonl", alpaca)
    write_jsonl(tmp_path / "b.jsonl", share)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text) + "{broken\n")
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": f"val {i}", "id": f"v{i}"} for i in range(3)])
    (tmp_path / "data.yaml").write_text(
        "tokenizer: {path: unused.model}\n"
        "sources:\n  alpaca: {path: a.jsonl, format: alpaca}\n  chat: {path: b.jsonl, format: sharegpt}\n"
        "  text: {path: c.jsonl, format: text, on_error: skip}\n"
        f"validation: {{path: {val}, format: text}}\n")
    (tmp_path / "weights.json").write_text(json.dumps({"alpaca": 0.5, "chat": 0.3, "text": 0.2}))
    originals = {r["id"]: r for r in alpaca + share + text}
    return tmp_path, originals


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_draws_round_n_pi_per_source_in_their_own_format(sources):
    d, originals = sources
    cfg, weights = load_data_config(d / "data.yaml"), read_weights(d / "weights.json")
    lines = []
    counts = export_mixture(weights, cfg, 30, d / "mix.jsonl", say=lines.append)
    assert counts == {"alpaca": 15, "chat": 9, "text": 6}
    out = _read(d / "mix.jsonl")
    assert len(out) == 30
    assert all(r == originals[r["id"]] for r in out)  # the records as they were, extra keys included
    per_source = Counter(r["id"][0] for r in out)
    assert per_source == {"a": 15, "b": 9, "c": 6}
    ids = Counter(r["id"] for r in out)
    # without replacement while a source lasts: 15 of 20 distinct; chat (5 records, 9 asked) once or twice each
    assert all(ids[f"a{i}"] <= 1 for i in range(20)) and all(ids[f"c{i}"] <= 1 for i in range(10))
    assert sorted(ids[f"b{i}"] for i in range(5)) == [1, 2, 2, 2, 2]
    # shuffled: the sources are interleaved, not in blocks
    assert len({r["id"][0] for r in out[:10]}) > 1
    table = "\n".join(lines)
    assert "chat" in table and "1.80 passes over the source" in table and "wrote 30 records" in table
    # a fixed seed gives the same file; another seed another one
    export_mixture(weights, cfg, 30, d / "again.jsonl", say=lambda *a: None)
    assert (d / "again.jsonl").read_bytes() == (d / "mix.jsonl").read_bytes()
    export_mixture(weights, cfg, 30, d / "other.jsonl", seed=7, say=lambda *a: None)
    assert (d / "other.jsonl").read_bytes() != (d / "mix.jsonl").read_bytes()


def test_export_appends_the_validation_set_and_writes_parquet(sources):
    import pyarrow.parquet as pq

    d, originals = sources
    cfg, weights = load_data_config(d / "data.yaml"), read_weights(d / "weights.json")
    counts = export_mixture(weights, cfg, 12, d / "mix.parquet", with_validation=True, say=lambda *a: None)
    assert counts["validation"] == 3 and sum(v for k, v in counts.items() if k != "validation") == 12
    rows = pq.read_table(d / "mix.parquet").to_pylist()
    assert len(rows) == 15 and [r["id"] for r in rows[-3:]] == ["v0", "v1", "v2"]
    for r in rows[:12]:  # columns of other formats are null in a shared table
        assert {k: v for k, v in r.items() if v is not None} == originals[r["id"]]
    with pytest.raises(DataError, match="exists; give another --out or pass --overwrite"):
        export_mixture(weights, cfg, 12, d / "mix.parquet", say=lambda *a: None)


def test_weights_must_name_exactly_the_sources(sources):
    d, _ = sources
    cfg = load_data_config(d / "data.yaml")
    with pytest.raises(DataError, match="no weight for text; weights for unknown sources txt"):
        export_mixture({"alpaca": 0.5, "chat": 0.3, "txt": 0.2}, cfg, 10, d / "x.jsonl", say=lambda *a: None)
    (d / "bad.json").write_text('{"alpaca": -1}')
    with pytest.raises(DataError, match="finite and non-negative"):
        read_weights(d / "bad.json")
    (d / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"alpaca": 1.0}).encode())  # saved by a Windows editor
    assert read_weights(d / "bom.json") == {"alpaca": 1.0}


def test_the_export_tool_prints_per_source_counts(sources):
    d, _ = sources
    cmd = [sys.executable, str(REPO / "tools" / "export_mixture.py"), "--weights", str(d / "weights.json"),
           "--data", str(d / "data.yaml"), "--size", "20", "--out", str(d / "tool.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.split()}
    assert rows["alpaca"][2] == "10" and rows["chat"][2] == "6" and rows["text"][2] == "4" and rows["total"][1] == "20"
    assert len(_read(d / "tool.jsonl")) == 20
    (d / "weights.json").write_text(json.dumps({"alpaca": 1.0}))
    proc = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no weight for chat, text" in proc.stderr


def test_weights_that_do_not_add_up_to_one_are_normalised_with_a_warning(sources):
    d, _ = sources
    cfg = load_data_config(d / "data.yaml")
    lines = []
    counts = export_mixture({"alpaca": 0.7, "chat": 0.4, "text": 0.3}, cfg, 14, d / "x.jsonl", say=lines.append)
    assert counts == {"alpaca": 7, "chat": 4, "text": 3}
    assert lines[0] == "warning: the weights add up to 1.4, not 1; the mixture uses them normalised (each divided by 1.4)"
    lines = []  # a run's weights.json adds up to 1 within rounding: no warning
    export_mixture({"alpaca": 0.5, "chat": 0.3, "text": 0.2000004}, cfg, 14, d / "y.jsonl", say=lines.append)
    assert not any("warning" in line for line in lines)


def test_out_never_names_an_input_even_with_overwrite(sources):
    d, _ = sources
    cfg, weights = load_data_config(d / "data.yaml"), read_weights(d / "weights.json")
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    for out, message in [(d / "a.jsonl", r"is a data file of source 'alpaca'"),
                         (d / "v.jsonl", r"is a data file of validation set"),
                         (d / "." / "c.jsonl", r"is a data file of source 'text'"),
                         (d / "weights.json", r"is the export's own input"),
                         (d / "data.yaml", r"is the export's own input")]:
        with pytest.raises(DataError, match=message):
            export_mixture(weights, cfg, 10, out, overwrite=True, inputs=(d / "weights.json", d / "data.yaml"),
                           say=lambda *a: None)
    import os

    os.link(d / "b.jsonl", d / "hardlink.jsonl")  # the same file under another name
    with pytest.raises(DataError, match=r"is a data file of source 'chat'"):
        export_mixture(weights, cfg, 10, d / "hardlink.jsonl", overwrite=True, say=lambda *a: None)
    os.unlink(d / "hardlink.jsonl")
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before
