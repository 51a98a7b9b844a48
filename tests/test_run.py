"""A whole short run: observers see the end and the checkpoint, the test set is scored, and the
final w is a checkpoint that loads again."""
from __future__ import annotations

import importlib.metadata
import json
import math
import textwrap

from helpers import DEMO_DIR, tiny_request
from scalebio.plugins import Plugins, discover
from scalebio.runner import execute, prepare

OBSERVER = """
import json
from scalebio import hookimpl

EVENTS = []

@hookimpl
def scalebio_checkpoint_saved(run, step, path):
    EVENTS.append(("checkpoint_saved", step, path))

@hookimpl
def scalebio_run_end(run, result):
    EVENTS.append(("run_end", result["steps"], sorted(result["weights"])))
"""


def test_observers_test_set_and_final_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "run_observer.py").write_text(textwrap.dedent(OBSERVER))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = list(importlib.metadata.entry_points(group="scalebio"))
    eps.append(importlib.metadata.EntryPoint("watch", "run_observer", "scalebio"))
    plugins = Plugins(["watch"], infos=discover(eps))  # an observer runs when named

    # the demo data plus a test set: a slice of held-out clean pairs
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join((DEMO_DIR / "validation.jsonl").read_text().splitlines(True)[-40:]))
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text((DEMO_DIR / "data.yaml").read_text().replace("path: ", f"path: {DEMO_DIR}/")
                         + f"test: {{path: {test_file}, format: prompt_response}}\n"
                         + "overlap: warn\n")  # the test slice is also in the validation set
    req = tiny_request(tmp_path, "run.save_final=true", data=data_yaml, steps=2)
    result = execute(prepare(req, plugins=plugins))

    import run_observer

    out = tmp_path / "run"
    assert run_observer.EVENTS == [("checkpoint_saved", 2, str(out / "final")),
                                   ("run_end", 2, ["clean", "shuffled", "typos"])]
    test = json.loads((out / "test.json").read_text())
    assert test == result["test"] and math.isfinite(test["loss"]) and test["samples"] == 40
    # the final w is a complete checkpoint: scored again from disk, it gives the same test loss
    assert not (out / "final.partial").exists()
    from scalebio.evaluate import evaluate

    req = tiny_request(tmp_path / "eval", data=data_yaml)
    req.model, req.load = None, str(out / "final" / "w")
    scored = evaluate(req)
    assert abs(scored["test"]["loss"] - test["loss"]) < 1e-5 and scored["test"]["tokens"] == test["tokens"]
