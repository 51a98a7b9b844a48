"""Helpers of the bad-input tests: real file systems that are read-only or full (tmpfs mounts as
root, no mocks), and a small data YAML over prompt/response records."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from helpers import DEMO_DIR, TINY
from scalebio.cli import main

TOKENIZER = DEMO_DIR / "tokenizer.model"


def mount_tmpfs(path: Path, options: str) -> bool:
    """A tmpfs at ``path`` (root only): a real read-only or full file system, no mocks."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)  # lazy: even with a file still open


def fill(path: Path) -> None:
    """Write to ``path`` until the file system is full (unbuffered: nothing is left to flush)."""
    with open(path, "ab", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


@contextlib.contextmanager
def read_only_dir(path: Path):
    """A directory nothing can be written in: a read-only mount as root (root ignores mode bits),
    else mode 0555. Yields None when neither is possible here."""
    if os.geteuid() != 0:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o555)
        try:
            yield path
        finally:
            os.chmod(path, 0o755)
    elif mount_tmpfs(path, "ro,size=1m"):
        try:
            yield path
        finally:
            umount(path)
    else:
        yield None


@contextlib.contextmanager
def full_fs(path: Path, size: str = "2m"):
    """A small tmpfs filled to the last byte (root only; yields None elsewhere)."""
    if not mount_tmpfs(path, f"size={size}"):
        yield None
        return
    try:
        fill(path / "filler")
        yield path
    finally:
        umount(path)


def data_yaml(path: Path, sources: dict, validation: str, extra: str = "", tokenizer=TOKENIZER) -> Path:
    lines = ["seq_length: 32", f"tokenizer: {{type: sentencepiece, path: {tokenizer}}}", "sources:"]
    lines += [f"  {n}: {{{spec}}}" for n, spec in sources.items()]
    lines.append(f"validation: {{{validation}}}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def records(n, tag):
    return [{"prompt": f"Question {tag}{i} about lists", "response": f"Answer {i}: use append."} for i in range(n)]


def tiny_run(out: Path, data: Path, *extra) -> int:
    """``scalebio run`` of one tiny step."""
    return main(["run", "--data", str(data), "--steps", "1", "--out", str(out), *extra]
                + [a for s in TINY for a in ("--set", s)])
