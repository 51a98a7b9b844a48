"""issue 11, conversion: bad output paths and sizes are one-line errors before any tensor is read,
nothing the user has is changed, --overwrite replaces only an earlier conversion's output, the
output directory gets the umask's mode, and partials of a killed conversion are cleaned."""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import convert_helpers as ch
from scalebio.cli import main
from scalebio_plugins.megatron import checkpoint as ck
from scalebio_plugins.megatron import hf
from test_bad_input import read_only_dir


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    w = tmp_path_factory.mktemp("convert-bad")
    ch.build_hf("gpt2", w / "hfm")
    hf.hf_to_megatron(w / "hfm", w / "ckpt", progress=False, log=lambda *a: None)
    (w / "afile").write_text("not a directory")
    (w / "mine").mkdir()
    (w / "mine" / "notes.txt").write_text("my notes")
    return w


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


H2M = "convert hf-to-megatron --hf {w}/hfm --no-progress --out "
M2H = "convert megatron-to-hf --ckpt {w}/ckpt --no-progress --out "
CASES = [
    ("h2m-out-is-the-input", H2M + "{w}/hfm --overwrite", r"--out .*hfm is the input .*hfm: converting would destroy it"),
    ("h2m-out-inside-the-input", H2M + "{w}/hfm/sub", r"--out .*hfm/sub lies inside the input"),
    ("h2m-out-contains-the-input", H2M + "{w} --overwrite", r"contains the input .*hfm"),
    ("m2h-out-is-the-input", M2H + "{w}/ckpt --overwrite", r"--out .*ckpt is the input .*ckpt"),
    ("m2h-out-inside-the-input", M2H + "{w}/ckpt/hf --overwrite", r"--out .*ckpt/hf lies inside the input"),
    ("h2m-overwrite-foreign-dir", H2M + "{w}/mine --overwrite",
     r"--overwrite replaces only an earlier conversion's output, and .*mine holds files a conversion does not "
     r"write \(notes\.txt\)"),
    ("m2h-overwrite-a-checkpoint", M2H + "{w}/other-ckpt --overwrite", r"other-ckpt holds files a conversion does "
     r"not write \(hf, model\.yaml, scalebio_checkpoint\.json\)"),
    ("h2m-existing-dir", H2M + "{w}/mine", r"mine exists and is not empty; choose another --out or pass --overwrite"),
    ("h2m-out-is-a-file", H2M + "{w}/afile", r"--out .*afile exists and is not a directory"),
    ("m2h-out-under-a-file", M2H + "{w}/afile/hf", r"afile is a file, so nothing can be written under it"),
    ("h2m-out-read-only", H2M + "{ro}/ckpt", r"--out .*ro/ckpt: cannot write in .*ro \("),
    ("max-shard-size-zero", H2M + "{w}/new --max-shard-size 0", r"--max-shard-size must be positive, got 0 bytes"),
    ("max-shard-size-negative", M2H + "{w}/new --max-shard-size=-5M", r"--max-shard-size must be positive"),
    ("max-shard-size-garbage", H2M + "{w}/new --max-shard-size lots",
     r"argument --max-shard-size: 'lots' is not a size \(bytes, or a number with K, M or G\)"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_output_is_one_line_and_changes_nothing(ws, tmp_path, capsys, argv, message):
    if "other-ckpt" in argv and not (ws / "other-ckpt").exists():  # a checkpoint is no Hugging Face output
        hf.hf_to_megatron(ws / "hfm", ws / "other-ckpt", progress=False, log=lambda *a: None)
    with read_only_dir(tmp_path / "ro") as ro:
        if "{ro}" in argv and ro is None:
            pytest.skip("no read-only directory can be made here (root without mount permission)")
        before = _hashes(ws)
        line = argv.format(w=ws, ro=ro)
        try:
            rc = main(shlex.split(line))
        except SystemExit as exc:  # argparse
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = [x for x in err.splitlines() if x.strip() and not x.startswith("usage:") and not x.startswith(" ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert re.search(message, lines[0]), lines[0]
        assert _hashes(ws) == before  # nothing changed, nothing added (no partial directory)
        assert not (ws / "new").exists() and not (ws / "hfm" / "sub").exists()


def test_output_directory_gets_the_umask_mode(ws, tmp_path):
    """The output was the temporary directory renamed, with mkdtemp's mode 0700 (fails before the fix)."""
    old = os.umask(0o022)
    try:
        hf.hf_to_megatron(ws / "hfm", tmp_path / "ckpt", progress=False, log=lambda *a: None)
        hf.megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False, log=lambda *a: None)
    finally:
        os.umask(old)
    for d in (tmp_path / "ckpt", tmp_path / "back"):
        assert (d.stat().st_mode & 0o777) == 0o755, oct(d.stat().st_mode)
        assert not (d / ".scalebio-owner").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partials_of_a_killed_conversion_are_cleaned_with_a_message(ws, tmp_path):
    import socket

    out = tmp_path / "ckpt"
    stale = [tmp_path / ".ckpt.partial-killed", tmp_path / ".ckpt.partial-old-version"]
    for d in stale:
        d.mkdir()
        (d / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 2**20)
    (stale[0] / ".scalebio-owner").write_text(f"{socket.gethostname()} {_dead_pid()}\n")
    live = tmp_path / ".ckpt.partial-running"  # a conversion still in progress (this process) is left alone
    live.mkdir()
    (live / ".scalebio-owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    other = tmp_path / ".other.partial-killed"  # another target's partial is not this conversion's business
    other.mkdir()
    lines = []
    hf.hf_to_megatron(ws / "hfm", out, progress=False, log=lines.append)
    assert not any(d.exists() for d in stale) and live.is_dir() and other.is_dir()
    removed = [line for line in lines if line.startswith("removed")]
    assert len(removed) == 2 and all("left by an interrupted conversion to" in r and "1.0 MiB" in r for r in removed)
    assert (out / ck.META_FILE).is_file()


def test_a_kill_during_conversion_is_cleaned_by_the_next_one(ws, tmp_path):
    """A real SIGKILL while writing (the writer is slowed by a tiny shard size and a sleep per tensor)."""
    import signal
    import time

    out = tmp_path / "ckpt"
    code = ("import sys, time; from scalebio_plugins.megatron import tensorio; real = tensorio.StreamWriter.write\n"
            "def slow(self, *a):\n    time.sleep(0.2); return real(self, *a)\n"
            "tensorio.StreamWriter.write = slow\n"
            "from scalebio.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "convert", "hf-to-megatron", "--hf", str(ws / "hfm"),
                             "--out", str(out), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".ckpt.partial-*/*.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".ckpt.partial-*")), "the kill left no partial directory to clean"
    lines = []
    hf.hf_to_megatron(ws / "hfm", out, progress=False, log=lines.append)
    assert not list(tmp_path.glob(".ckpt.partial-*"))
    assert any(line.startswith("removed") for line in lines), lines
