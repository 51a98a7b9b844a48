"""The tokenized cache: a restart does not retokenize, a changed input does, an interrupted build
leaves nothing behind, worker processes write the same cache, and the user's data directory is
never written to (by a run, by prepare, by export)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DEMO_DIR, REPO, tiny_request, write_jsonl
from scalebio.config import DataConfig, SourceConfig, TokenizerConfig
from scalebio.data import DataError, RunData
from scalebio.data.cache import cache_root, source_key
from scalebio.data.prepare import load_data_config, prepare_data
from scalebio.tokenizer import load_tokenizer


class CountingTokenizer:
    """The real demo tokenizer, counting its encode calls (raising after ``fail_after`` of them)."""

    def __init__(self, fail_after=None, **settings):
        self.tok = load_tokenizer(TokenizerConfig(path=str(DEMO_DIR / "tokenizer.model"), **settings))
        self.calls, self.fail_after = 0, fail_after

    def encode(self, text):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of tokenization
        return self.tok.encode(text)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _cfg(tmp_path, src, **kw) -> DataConfig:
    val = tmp_path / "val.jsonl"
    if not val.exists():
        write_jsonl(val, [{"prompt": "held", "response": "out"}])
    source = {k: kw.pop(k) for k in ("max_samples", "format") if k in kw}
    source.setdefault("format", "prompt_response")
    return DataConfig(sources={"s": SourceConfig(str(src), **source)},
                      validation=SourceConfig(str(val), format="prompt_response"),
                      seq_length=kw.pop("seq_length", 32), cache_dir=str(tmp_path / "cache"), **kw)


def _records(n, tag="r"):
    return [{"prompt": f"Question {tag}{i} about lists", "response": f"Answer {i}: use append."} for i in range(n)]


def test_a_restart_reads_the_cache_without_tokenizing(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", _records(30))
    tok = CountingTokenizer()
    first = RunData(_cfg(tmp_path, src), tok, seed=0)
    assert tok.calls == 2 * 31  # prompt and response of 30 records and the validation record
    again = CountingTokenizer()
    second = RunData(_cfg(tmp_path, src), again, seed=0)
    assert again.calls == 0
    assert all("from cache" in line for line in second.summary()[:2])
    for _ in range(3):
        a, b = first.next_train(8), second.next_train(8)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
    # the cache entry is megatron-core's indexed dataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    key = first.train[0].status["key"]
    ids = IndexedDataset(str(tmp_path / "cache" / "tokenized" / key / "ids"))
    assert len(ids) == 30 and ids[0].tolist() == first.train[0].sample(0).ids.tolist()


def test_a_changed_input_invalidates_the_cache(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", _records(10))

    def load(cfg=None, **settings):
        tok = CountingTokenizer(**settings)
        data = RunData(cfg or _cfg(tmp_path, src), tok, seed=0)
        return data, tok.calls

    base, calls = load()
    assert calls > 0 and len(base.train[0].samples) == 10
    assert load()[1] == 0
    write_jsonl(src, _records(12))  # new content
    data, calls = load()
    assert calls > 0 and len(data.train[0].samples) == 12
    assert load()[1] == 0
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, touched: rebuilt
    assert load()[1] > 0
    data, calls = load(add_eos=False)  # another tokenizer setting
    assert calls > 0 and data.train[0].sample(0).ids[-1] != CountingTokenizer().eos_id
    assert load(_cfg(tmp_path, src, max_samples=5))[1] > 0
    # seq_length only truncates cached sequences: no retokenization
    data, calls = load(_cfg(tmp_path, src, seq_length=12))
    assert calls == 0 and data.train[0].truncated == 12 and base.train[0].truncated == 0
    # a chat template is part of the key only for chat formats
    cfg = _cfg(tmp_path, src)
    cfg.tokenizer = TokenizerConfig(chat_template="{{ messages }}")
    assert load(cfg)[1] == 0


def test_an_interrupted_build_leaves_no_cache_entry(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", _records(50))
    cfg = _cfg(tmp_path, src)
    tokenized = tmp_path / "cache" / "tokenized"
    with pytest.raises(KeyboardInterrupt):
        RunData(cfg, CountingTokenizer(fail_after=40), seed=0)
    assert not [p for p in tokenized.iterdir() if p.is_dir()]  # neither an entry nor a temporary directory
    tok = CountingTokenizer()
    key, _ = source_key(cfg.sources["s"], "error", tok, None, cache_root(cfg) / "hf")
    # what a kill -9 leaves: a temporary directory, and (say, after a bad copy) an entry without info.json
    (tokenized / f".{key}.tmp-12345-abcdef12").mkdir()
    (tokenized / key).mkdir()
    (tokenized / key / "ids.bin").write_bytes(b"garbage")
    data = RunData(cfg, tok, seed=0)
    assert tok.calls > 0 and len(data.train[0].samples) == 50
    assert sorted(p.name for p in tokenized.iterdir() if p.is_dir()) == sorted(
        t.status["key"] for t in data.train + [data.val])


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_prepare_with_workers_writes_the_same_cache_as_one_process(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "data"
    d.mkdir()
    recs = _records(600)
    lines = [json.dumps(r) for r in recs]
    lines[100] = '{"prompt": "broken'
    (d / "big.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(_records(40, "p")), d / "cols.parquet")
    write_jsonl(d / "val.jsonl", [{"prompt": "held", "response": "out"}])
    (d / "data.yaml").write_text(
        f"seq_length: 32\ntokenizer: {{path: {DEMO_DIR / 'tokenizer.model'}}}\non_error: skip\n"
        "sources:\n  big: {path: big.jsonl, format: prompt_response}\n"
        "  cols: {path: cols.parquet, format: prompt_response}\n"
        "validation: {path: val.jsonl, format: prompt_response}\n")
    before = _snapshot(d)
    one = prepare_data(load_data_config(d / "data.yaml", [f"cache_dir={tmp_path / 'c1'}"]), workers=1,
                       progress=False, say=lambda *a: None)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "--data", str(d / "data.yaml"),
                           "--workers", "2", "--cache-dir", str(tmp_path / "c2"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "big: 599 records" in proc.stdout and "records/s" in proc.stdout
    assert "1 malformed records skipped" in proc.stdout
    assert _snapshot(d) == before  # nothing written next to the data (datasets' cache is in the cache dir)
    for status in one:
        a, b = tmp_path / "c1" / "tokenized" / status["key"], tmp_path / "c2" / "tokenized" / status["key"]
        for name in ("ids.bin", "ids.idx", "flags.bin", "flags.idx"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        ma, mb = np.load(a / "meta.npz"), np.load(b / "meta.npz")
        assert all(np.array_equal(ma[k], mb[k]) for k in ma.files)
        assert json.loads((b / "info.json").read_text())["skipped"] == status["skipped"]
    assert [s["skipped"] for s in one] == [1, 0, 0]


def test_a_run_and_an_export_leave_the_data_directory_untouched(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scalebio.data.export import export_mixture, read_weights
    from scalebio.runner import run

    d = tmp_path / "user_data"
    d.mkdir()
    write_jsonl(d / "forum.jsonl", _records(30, "f"))
    (d / "manual.csv").write_text("prompt,response\n" + "".join(f"How to {i},Like this {i}.\n" for i in range(20)))
    pq.write_table(pa.Table.from_pylist(_records(25, "w")), d / "web.parquet")
    write_jsonl(d / "val.jsonl", _records(8, "v"))
    (d / "data.yaml").write_text(
        f"seq_length: 32\ntokenizer: {{type: sentencepiece, path: {DEMO_DIR / 'tokenizer.model'}}}\n"
        "sources:\n  forum: {path: forum.jsonl, format: prompt_response}\n"
        "  manual: {path: manual.csv, format: prompt_response}\n"
        "  web: {path: web.parquet, format: prompt_response}\n"
        "validation: {path: val.jsonl, format: prompt_response}\n")
    os.chmod(d, 0o555)  # read-only, as a shared data directory often is
    try:
        before = _snapshot(d)
        result = run(tiny_request(tmp_path, data=d / "data.yaml", steps=1))
        assert set(result["weights"]) == {"forum", "manual", "web"}
        weights = read_weights(Path(result["out_dir"]) / "weights.json")
        counts = export_mixture(weights, load_data_config(d / "data.yaml"), 30, tmp_path / "mix.jsonl",
                                say=lambda *a: None)
        assert sum(counts.values()) == 30
        assert _snapshot(d) == before
    finally:
        os.chmod(d, 0o755)


def test_cache_false_keeps_everything_in_memory(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", _records(5))
    data = RunData(_cfg(tmp_path, src, cache=False), CountingTokenizer(), seed=0)
    assert len(data.train[0].samples) == 5 and not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match="nothing to prepare"):
        prepare_data(_cfg(tmp_path, src, cache=False), say=lambda *a: None)


def test_supervised_counts_of_truncated_samples_are_exact_and_kept(tmp_path):
    # 1 BOS + 40 words: truncated to seq_length + 1 = 17 tokens, 16 supervised targets each
    src = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(["word"] * 40)}] * 3)
    cfg = _cfg(tmp_path, src, format="text", seq_length=16)
    data = RunData(cfg, CountingTokenizer(), seed=0)
    assert data.train[0].truncated == 3 and data.train[0].supervised_tokens == 3 * 16
    entry = tmp_path / "cache" / "tokenized" / data.train[0].status["key"]
    assert np.load(entry / "supervised-17.npy").tolist() == [16, 16, 16]
    again = RunData(cfg, CountingTokenizer(), seed=0)
    assert again.train[0].supervised_tokens == 48


def test_a_truncated_or_changed_entry_is_rebuilt_with_a_message(tmp_path):
    from scalebio.data.cache import load_or_build

    src = write_jsonl(tmp_path / "s.jsonl", _records(30))
    cfg = _cfg(tmp_path, src, tokenizer=TokenizerConfig(path=str(DEMO_DIR / "tokenizer.model")))
    tok = load_tokenizer(cfg.tokenizer)
    first = RunData(cfg, tok, seed=0)
    entry = tmp_path / "cache" / "tokenized" / first.train[0].status["key"]
    good = (entry / "ids.bin").read_bytes()
    key = json.loads((entry / "key.json").read_text())
    assert key["files"]["ids.bin"][0] == len(good)  # sizes and checksums of every file in the key file
    assert all(s["cached"] for s in prepare_data(cfg, progress=False, say=lambda *a: None))
    for damage in (good[: len(good) // 2], good[:100] + bytes([good[100] ^ 1]) + good[101:]):  # truncated, one bit
        (entry / "ids.bin").write_bytes(damage)
        said, lines = [], []
        status = prepare_data(cfg, progress=False, say=lines.append)  # not reported as cached
        assert not status[0]["cached"] and status[0]["rebuilt"] and "(rebuilt: " in lines[1]
        assert (entry / "ids.bin").read_bytes() == good
        (entry / "ids.bin").write_bytes(damage)
        store, st = load_or_build("source 's'", cfg.sources["s"], cfg, tok, None, say=said.append)
        assert not st["cached"] and len(said) == 1
        assert "source 's': the cache entry" in said[0] and "is damaged (ids.bin " in said[0]
        assert store.sample(0, 64)[0].tolist() == first.train[0].sample(0).ids.tolist()


def test_file_checksums_read_a_sample_of_large_files(tmp_path):
    from scalebio.data.entry import file_checksum

    big = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 20 << 20, dtype=np.uint8).tobytes())
    big.write_bytes(data)
    base = file_checksum(big)
    for at in (5, (1 << 20) + 5, len(data) - 1):  # the head, the first sampled block, the tail
        data[at] ^= 1
        big.write_bytes(data)
        assert file_checksum(big) != base
        data[at] ^= 1
    big.write_bytes(data)
    assert file_checksum(big) == base
