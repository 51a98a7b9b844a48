"""What a run records about itself: per-step throughput and peak memory in metrics.jsonl, and the
software, commit, layout and machine in config.yaml."""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess

import pytest
import torch
import yaml

import scalebio
from helpers import REPO, tiny_request
from scalebio.outputs import peak_memory_bytes, source_commit
from scalebio.runner import execute, prepare


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("meta")
    execute(prepare(tiny_request(tmp, steps=2)))
    return tmp / "run"


def _vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_metrics_have_throughput_and_peak_memory_per_rank(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["tokens"] == (8 + 4) * 32  # TINY: global batch 8 + validation batch 4 rows of 32 positions
        assert r["time_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["time_s"])
        (peak,) = r["peak_memory_bytes"]  # one rank
        # the peak RSS of this process (the run ran in it): at least torch's footprint, never above
        # the kernel's own high-water mark read afterwards
        assert 100 * 2**20 < peak <= _vm_hwm()
    assert records[1]["peak_memory_bytes"][0] >= records[0]["peak_memory_bytes"][0]  # a peak never falls


def test_config_records_versions_commit_layout_and_device(run_dir):
    meta = yaml.safe_load((run_dir / "config.yaml").read_text())["metadata"]
    assert meta["versions"]["scalebio"] == scalebio.__version__
    assert meta["versions"]["torch"] == importlib.metadata.version("torch") == torch.__version__
    assert meta["versions"]["megatron-core"] == importlib.metadata.version("megatron-core")
    assert "transformer-engine" in meta["versions"]  # None without it
    assert meta["world_size"] == 1 and meta["device"] == "cpu"
    assert meta["layout"]["tp"] == 1 and meta["layout"]["pp"] == 1 and meta["layout"]["dp"] == 1
    assert meta["peak_memory"] == "peak RSS of the process"
    if shutil.which("git") and (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert meta["git_commit"] == head and isinstance(meta["git_dirty"], bool)


def test_no_commit_outside_a_scalebio_checkout(tmp_path, monkeypatch):
    """A package file inside some other repository (a venv in a user's project) records no commit."""
    if not shutil.which("git"):
        pytest.skip("git not installed")
    import scalebio.outputs as outputs

    other = tmp_path / "project"
    pkg = other / "venv" / "scalebio"
    pkg.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    monkeypatch.setattr(outputs, "__file__", str(pkg / "outputs.py"))
    assert source_commit() == {}
    # and its own checkout does record one: the check is on the repository's root, not on git's presence
    monkeypatch.setattr(outputs, "__file__", str(other / "scalebio" / "outputs.py"))
    (other / "scalebio").mkdir()
    assert len(source_commit()["git_commit"]) == 40


def test_peak_memory_reads_rss_in_bytes():
    # getrusage's peak RSS is the kernel's high-water mark: the same number, in KiB on Linux
    assert abs(peak_memory_bytes(torch.device("cpu")) - _vm_hwm()) < 16 * 2**20
