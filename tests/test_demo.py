"""The embedded demo, shortened: it must learn to down-weight the corrupted sources."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import yaml

from helpers import REPO


def test_demo_learns_to_drop_corrupted_sources(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "run.py"), "--steps", "80", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = json.loads((out / "weights.json").read_text())
    assert set(weights) == {"clean", "shuffled", "typos"}
    # from 1/3 each: the corrupted sources end small, the clean one takes the mass
    assert weights["shuffled"] < 0.15 and weights["typos"] < 0.15, weights
    assert weights["clean"] > 0.7, weights
    # the table of learned weights by source name
    assert "Learned source weights" in proc.stdout and "clean" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(80))
    first = records[0]
    for key in ("pi", "loss_u", "loss_w", "val_loss"):
        assert key in first
    assert set(first["loss_u"]) == set(weights)
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 1.0
    rows = list(csv.reader((out / "pi.csv").open()))
    assert rows[0] == ["step", "clean", "shuffled", "typos"] and len(rows) == 82
    assert (out / "pi.png").stat().st_size > 10_000
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["run"]["steps"] == 80 and resolved["plugins"]["solver"] == "minimax"
