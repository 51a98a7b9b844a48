"""Bad input on real file systems: a full disk is refused up front and mid-run leaves no temporary
file, a read-only shared cache is still read, a kill during prepare --force keeps the good entry."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bad_input_helpers import data_yaml, fill, full_fs, mount_tmpfs, records, tiny_run, umount
from helpers import REPO, write_jsonl
from scalebio.cli import main


def test_a_full_disk_is_refused_up_front_and_mid_run_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    from scalebio.config import ConfigError
    from scalebio.outputs import RunWriter, atomic_write

    monkeypatch.setenv("SCALEBIO_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", records(10, "a"))
    pr = "format: prompt_response"
    data = data_yaml(d / "data.yaml", {"a": f"path: a.jsonl, {pr}"}, f"path: a.jsonl, {pr}", "overlap: warn\n")
    with full_fs(tmp_path / "full") as full:
        if full is None:
            pytest.skip("needs root to mount a small tmpfs")
        assert tiny_run(full / "run", data) == 2
        err = capsys.readouterr().err
        assert "run directory" in err and "is full" in err and "Traceback" not in err
        assert not (tmp_path / "cache" / "tokenized").exists()  # refused before the data was read
        assert main(["export", "--weights", str(_weights(tmp_path)), "--data", str(data), "--size", "5",
                     "--out", str(full / "mix.jsonl")]) == 2
        assert "is full" in capsys.readouterr().err
        (tmp_path / "ckpt").mkdir()  # eval checks --output before it opens the checkpoint
        assert main(["eval", "--load", str(tmp_path / "ckpt"), "--data", str(data),
                     "--output", str(full / "scores.json")]) == 2
        err = capsys.readouterr().err
        assert "--output" in err and "is full" in err and "Traceback" not in err
        # the disk fills up during a run: each write fails with a message, leaving no temporary file
        os.truncate(full / "filler", (full / "filler").stat().st_size - (256 << 10))  # room for the run to start
        writer = RunWriter(full / "run", ["a"])
        writer.write_config({"run": {}})
        try:
            writer.step({"step": 0, "pi": {"a": 1.0}, "val_loss": 1.0})
            fill(full / "filler")  # now full again
            with pytest.raises(ConfigError, match=r"cannot write .*big\.json: No space left on device"):
                atomic_write(full / "run" / "big.json", "x" * (1 << 20))
            with pytest.raises(ConfigError, match=r"No space left on device"):
                writer.finish(1, [1.0], {"val_loss": ([0], [1.0])})
        finally:
            writer.close()
        assert sorted(p.name for p in (full / "run").iterdir()) == ["config.yaml", "metrics.jsonl"]


def _weights(tmp_path) -> Path:
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"a": 1.0}))
    return path


@pytest.mark.slow
def test_a_kill_during_prepare_force_keeps_the_good_entry(tmp_path):
    """prepare --force builds the new entry aside: SIGTERM while it tokenizes leaves the old entry,
    verified and reported as cached by the next prepare."""
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "big.jsonl", records(8000, "x"))
    write_jsonl(d / "val.jsonl", records(5, "v"))
    pr = "format: prompt_response"
    data = data_yaml(d / "data.yaml", {"big": f"path: big.jsonl, {pr}"}, f"path: val.jsonl, {pr}")
    env = {**os.environ, "SCALEBIO_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--data", str(data), "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    tokenized = tmp_path / "cache" / "tokenized"
    entries = sorted(p.name for p in tokenized.iterdir() if p.is_dir() and not p.name.startswith("."))
    proc = subprocess.Popen(cmd + ["--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while not list(tokenized.glob(".*.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)  # waits for the rebuild to start (not a timed assertion)
    assert proc.poll() is None, "the rebuild ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert sorted(p.name for p in tokenized.iterdir() if p.is_dir() and not p.name.startswith(".")) == entries
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already cached") == 2, again.stdout
    assert not list(tokenized.glob(".*"))  # the killed build's temporary directory is gone


def test_a_read_only_prepared_cache_is_read_and_a_full_one_is_a_message(tmp_path):
    """A cache prepared elsewhere and shared read-only still serves its entries (no lock can be
    taken there, and none is needed); a cache that fills up is a message, and leaves no partial entry."""
    from scalebio.data import DataError, RunData
    from scalebio.data.prepare import load_data_config, prepare_data
    from scalebio.tokenizer import load_tokenizer

    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", records(400, "a"))
    write_jsonl(d / "val.jsonl", records(5, "v"))
    pr = "format: prompt_response"
    data = data_yaml(d / "data.yaml", {"a": f"path: a.jsonl, {pr}"}, f"path: val.jsonl, {pr}")
    built, shared = tmp_path / "built", tmp_path / "shared"
    prepare_data(load_data_config(data, [f"cache_dir={built}"]), progress=False, say=lambda *a: None)
    shared.mkdir()
    if not mount_tmpfs(tmp_path / "probe", "size=64k"):
        pytest.skip("needs root to mount file systems")
    umount(tmp_path / "probe")
    subprocess.run(["mount", "--bind", str(built), str(shared)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(shared)], check=True)
        cfg = load_data_config(data, [f"cache_dir={shared}"])
        run_data = RunData(cfg, load_tokenizer(cfg.tokenizer), seed=0)
        assert all("from cache" in line for line in run_data.summary()[:2])
        cfg.seq_length = 16  # same entries: truncation is not part of the key
        RunData(cfg, load_tokenizer(cfg.tokenizer), seed=0)
    finally:
        umount(shared)
    with full_fs(tmp_path / "full", "64k") as full:
        cfg = load_data_config(data, [f"cache_dir={full}"])
        with pytest.raises(DataError, match=r"source 'a': cannot write its tokenized cache entry in .*\(No space left "
                                            r"on device\); free some space"):
            RunData(cfg, load_tokenizer(cfg.tokenizer), seed=0)
        assert not list((full / "tokenized").glob(".*"))  # no partial entry left behind
