"""The built-in logging observers, through the CLI as a user runs them: TensorBoard event files and
a W&B offline run, read back and compared with metrics.jsonl."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import yaml

from helpers import TINY

STEPS = 3
# what every step must log (issue 12): pi and the losses of u and w per source, validation loss,
# learning rates, grad norms, tokens per second, step time, peak memory
PER_STEP = ["pi/clean", "pi/typos", "loss_u/clean", "loss_w/shuffled", "val_loss", "lr_u", "lr_w", "grad_norm_u",
            "grad_norm_w", "tokens_per_s", "time_s", "peak_memory_bytes/rank0"]


def _run(out, *plugins, env=None):
    cmd = [sys.executable, "-m", "scalebio", "run", "--steps", str(STEPS), "--out", str(out)]
    if plugins:
        cmd += ["--plugins", ",".join(plugins)]
    for s in TINY:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((out / "weights.json").read_text())


def _scalar(record, tag):
    value = record
    for part in tag.split("/"):
        value = value[int(part[4:])] if part.startswith("rank") else value[part]
    return value


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    records, weights = _run(out, "tensorboard")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not (out / "wandb").exists()  # installed, not named: off
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(PER_STEP) <= tags, sorted(set(PER_STEP) - tags)
    for tag in PER_STEP:
        events = [e for e in acc.Scalars(tag) if e.step < STEPS]
        assert [e.step for e in events] == list(range(STEPS)), tag
        for e, r in zip(events, records):
            assert e.value == pytest.approx(_scalar(r, tag), rel=1e-6), tag  # stored as float32
    final = {e.step: e.value for e in acc.Scalars("pi/clean")}[STEPS]  # the final pi, as in pi.csv
    assert final == pytest.approx(weights["clean"], rel=1e-6)
    texts = set(acc.Tags()["tensors"])  # add_text is stored as a tensor summary
    assert {"config/text_summary", "weights/text_summary"} <= texts
    yaml_config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "metadata:" in yaml_config and "observers:\n  - tensorboard" in yaml_config


def _wandb_records(path):
    """The records of a W&B ``.wandb`` transaction log (LevelDB log framing: a 7-byte file header,
    32 KiB blocks, each record a 7-byte header and a protobuf that may span blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = data if kind in (1, 2) else parts + data
        if kind in (1, 4):  # full, or the last piece of a spanning record
            rec = pb.Record()
            rec.ParseFromString(parts)
            yield rec


def test_wandb_offline_run_files_read_back(tmp_path):
    pytest.importorskip("wandb")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wbconfig"),
               WANDB_CACHE_DIR=str(tmp_path / "wbcache"), WANDB_DATA_DIR=str(tmp_path / "wbdata"))
    env.pop("WANDB_DIR", None)
    out = tmp_path / "run"
    records, weights = _run(out, "wandb", env=env)
    (run_dir,) = (out / "wandb").glob("offline-run-*")  # WANDB_DIR defaults to the run directory
    assert not (out / "tensorboard").exists()  # installed, not named: off
    (log,) = run_dir.glob("run-*.wandb")
    history, config = [], {}
    for rec in _wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert config["run"] == resolved["run"] and config["metadata"] == resolved["metadata"]
    steps = [h for h in history if h["_step"] < STEPS]
    assert [h["_step"] for h in steps] == list(range(STEPS))
    for h, r in zip(steps, records):
        for tag in PER_STEP:
            assert h[tag] == pytest.approx(_scalar(r, tag), rel=1e-12), tag
    (final,) = [h for h in history if h["_step"] == STEPS]
    assert final["weights/_type"] == "table-file"
    table = json.loads((run_dir / "files" / final["weights/path"]).read_text())
    assert table["columns"][:3] == ["source", "initial_pi", "final_pi"]
    assert {row[0]: row[2] for row in table["data"]} == pytest.approx(weights)
