"""Output directories of a conversion: checked before any heavy work, written atomically.

Everything is written into a hidden ``.NAME.partial-*`` directory next to the target and renamed
into place when complete. A partial left by a killed conversion (its owner process is gone) is
removed at the next conversion to the same target, with a message. ``--overwrite`` replaces only
an earlier conversion's output: a directory holding anything a conversion does not write is refused.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from scalebio import owner
from scalebio.checkpointing import CheckpointError

# files a tokenizer may consist of; copied both ways so a checkpoint carries its own tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt")
INDEX = "model.safetensors.index.json"

# what each direction writes: --overwrite replaces a directory that holds nothing else
OUTPUTS = {
    "checkpoint": ("scalebio_checkpoint.json", {"scalebio_checkpoint.json", "model.yaml", "hf", INDEX,
                                                "model.safetensors"} | set(TOKENIZER_FILES)),
    "huggingface": ("config.json", {"config.json", "generation_config.json", INDEX, "model.safetensors"}
                    | set(TOKENIZER_FILES)),
}
PARTIAL = ".{}.partial-"


def _foreign(target: Path, kind: str) -> list:
    """Entries of ``target`` that a conversion writing ``kind`` does not write."""
    marker, names = OUTPUTS[kind]
    out = [p.name for p in sorted(target.iterdir())
           if p.name not in names and not (p.is_file() and p.name.startswith("model-") and p.suffix == ".safetensors")]
    if not out and not (target / marker).is_file():
        out = [f"(no {marker}: not an earlier conversion's output)"]
    return out


def check_output(target, overwrite: bool, kind: str, inputs=()) -> None:
    """Everything that can be said about ``--out`` before any tensor is read: not one of the
    inputs nor inside or around one, not a file or under a file, writable, and new or empty (or,
    with ``overwrite``, an earlier output of this kind and nothing else)."""
    target = Path(target)
    resolved = target.resolve()
    for src in inputs:
        src_r = Path(src).resolve()
        if resolved == src_r or src_r in resolved.parents or resolved in src_r.parents:
            how = "is" if resolved == src_r else ("lies inside" if src_r in resolved.parents else "contains")
            raise CheckpointError(f"--out {target} {how} the input {src}: converting would destroy it; choose "
                                  f"another --out")
    parent = resolved
    while not parent.exists():
        parent = parent.parent
    if parent != resolved and not parent.is_dir():
        raise CheckpointError(f"--out {target}: {parent} is a file, so nothing can be written under it")
    if parent == resolved:
        if not resolved.is_dir():
            raise CheckpointError(f"--out {target} exists and is not a directory")
        if any(resolved.iterdir()):
            if not overwrite:
                raise CheckpointError(f"output directory {target} exists and is not empty; choose another --out "
                                      f"or pass --overwrite")
            foreign = _foreign(resolved, kind)
            if foreign:
                raise CheckpointError(f"--overwrite replaces only an earlier conversion's output, and {target} "
                                      f"holds files a conversion does not write ({', '.join(foreign[:3])}"
                                      + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                                      + "); choose another --out")
        parent = resolved.parent
    try:  # the real test: a read-only mount or a full disk says so here, before anything is read
        os.rmdir(tempfile.mkdtemp(prefix=".scalebio-probe-", dir=parent))
    except OSError as exc:
        raise CheckpointError(f"--out {target}: cannot write in {parent} ({exc.strerror or exc})") from None


def remove_stale_partials(target: Path, log=print) -> None:
    """Partial directories of ``target`` whose conversion was killed (its process is gone)."""
    for d in sorted(target.parent.glob(PARTIAL.format(target.name) + "*")):
        if d.is_dir() and not owner.alive(d):
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            shutil.rmtree(d, ignore_errors=True)
            log(f"removed {d}, left by an interrupted conversion to {target} ({size / 1024**2:.1f} MiB)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(target, overwrite: bool = False, kind: str = "checkpoint", inputs=(), log=print):
    """Yield a temporary directory next to ``target``; rename it to ``target`` when the block ends
    without error, remove it otherwise. A failed conversion leaves nothing behind."""
    target = Path(target)
    check_output(target, overwrite, kind, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target, log)
    tmp = Path(tempfile.mkdtemp(prefix=PARTIAL.format(target.name), dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would become the output's mode
        owner.claim(tmp)
        yield tmp
        owner.release(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists() and any(target.iterdir()):
        check_output(target, overwrite, kind, inputs)  # nothing else appeared there meanwhile
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
    elif target.exists():
        target.rmdir()
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer_files(src: Path, dst: Path) -> list:
    """Copy whatever tokenizer files ``src`` has (a directory, or a sentencepiece .model file)."""
    src, copied = Path(src), []
    if src.is_file():  # a bare sentencepiece model
        shutil.copyfile(src, Path(dst) / ("tokenizer.model" if src.suffix == ".model" else src.name))
        return [src.name]
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, Path(dst) / name)
            copied.append(name)
    return copied
