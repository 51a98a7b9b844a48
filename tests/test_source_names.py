"""Training-source names that would leak, collide or break files are refused when the data YAML is
read (issue 11/12), and console headers stay distinct when names share a prefix."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import DEMO_DIR, tiny_request
from scalebio.config import ConfigError
from scalebio.data.prepare import load_data_config
from scalebio.outputs import column_labels


def _data_yaml(tmp_path, *names):
    lines = ["seq_length: 32", f"tokenizer: {{type: sentencepiece, path: {DEMO_DIR / 'tokenizer.model'}}}", "sources:"]
    lines += [f"  {n}: {{path: {DEMO_DIR / f}, format: prompt_response}}"
              for n, f in zip(names, ["clean.jsonl", "shuffled.jsonl", "typos.jsonl"])]
    lines.append(f"validation: {{path: {DEMO_DIR / 'validation.jsonl'}, format: prompt_response}}")
    path = tmp_path / "data.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("names,message", [
    (["validation", "web"], "source name 'validation' is reserved for the held-out set"),
    (["test", "web"], "source name 'test' is reserved"),
    (["Validation", "web"], "source name 'Validation' is reserved"),
    (["Web", "web"], "source names 'Web' and 'web' differ only in case"),
    (['""', "web"], "a source name is empty"),
    (['"  "', "web"], "a source name is empty"),
    (['"we\\u0007b"', "web2"], r"source name 'we\\x07b' holds a control character \(U\+0007\)"),
    (['"tab\\there"', "web"], r"holds a control character \(U\+0009\)"),
    (["web/en", "web"], "source name 'web/en' holds a path separator"),
])
def test_bad_source_names_are_refused(tmp_path, names, message):
    with pytest.raises(ConfigError, match=message):
        load_data_config(_data_yaml(tmp_path, *names))


def test_good_names_pass_including_unicode_and_spaces(tmp_path):
    cfg = load_data_config(_data_yaml(tmp_path, "données", "web en", "test_set"))
    assert sorted(cfg.sources) == ["données", "test_set", "web en"]


def test_the_cli_refuses_with_one_line(tmp_path):
    path = _data_yaml(tmp_path, "validation", "web")
    proc = subprocess.run([sys.executable, "-m", "scalebio", "prepare", "--data", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "reserved" in proc.stderr


def test_column_labels_are_distinct_and_fit():
    names = ["instruction_following_clean", "instruction_following_noisy", "instruction_following_noisier",
             "short", "abcdefghijkl", "abcdefghijklm"]
    labels = column_labels(names, 12)
    assert len(set(labels)) == len(labels) and all(len(lab) <= 12 for lab in labels)
    assert labels[3] == "short" and labels[4] == "abcdefghijkl"  # what fits is left alone
    assert labels[0] == "instru~clean" and labels[1] == "instru~noisy"
    # the plain 12-character cut the console used before gives one header for three sources
    assert len({n[:12] for n in names[:3]}) == 1
    same = column_labels(["x" * 20 + "a" + "y" * 10, "x" * 20 + "b" + "y" * 10], 12)  # same head and tail
    assert len(set(same)) == 2 and all(len(lab) <= 12 for lab in same)


def test_run_console_headers_are_distinct(tmp_path, capsys):
    from scalebio.runner import execute, prepare

    data = _data_yaml(tmp_path, "instruction_following_clean", "instruction_following_noisy",
                      "instruction_following_typos")
    execute(prepare(tiny_request(tmp_path, "data.overlap=warn", data=data, steps=1)))
    header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.lstrip().startswith("step"))
    assert len(set(header.split()[3:])) == 3, header
