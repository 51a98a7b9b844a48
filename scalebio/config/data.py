"""The ``data:`` section: sources, formats, tokenizer, validation and test sets."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Literal, Optional

from .layers import ConfigError


FORMATS = ("text", "prompt_response", "alpaca", "sharegpt", "messages")
# the fields each format reads; ``columns`` may map any of them to another name in the data
FORMAT_FIELDS = {
    "text": ("text",),
    "prompt_response": ("prompt", "response"),
    "alpaca": ("instruction", "input", "output"),
    "sharegpt": ("conversations", "from", "value"),
    "messages": ("messages", "role", "content"),
}
FILE_TYPES = ("jsonl", "json", "csv", "tsv", "txt", "parquet", "arrow")


@dataclass
class SourceConfig:
    """One training source, the validation set or the test set: local files or a Hub dataset."""

    path: Optional[str] = None  # a file, a directory of files, a glob, or a `datasets` save_to_disk folder
    dataset: Optional[str] = None  # a Hugging Face Hub dataset name (needs the network)
    subset: Optional[str] = None  # the Hub dataset's configuration name
    split: str = "train"  # split of a Hub dataset or a save_to_disk folder
    revision: Optional[str] = None  # Hub revision (a commit hash pins the data)
    format: Literal["text", "prompt_response", "alpaca", "sharegpt", "messages"] = "text"
    # null: from the extension
    file_type: Optional[Literal["jsonl", "json", "csv", "tsv", "txt", "parquet", "arrow"]] = None
    columns: dict[str, str] = field(default_factory=dict)  # format field -> the name in this data
    max_samples: Optional[int] = None  # keep the first N valid records
    on_error: Optional[Literal["error", "skip"]] = None  # a malformed record; null: data.on_error
    on_empty: Optional[Literal["skip", "keep", "error"]] = None  # an empty response; null: data.on_empty

    def validate(self):
        if (self.path is None) == (self.dataset is None):
            raise ConfigError("a source needs exactly one of 'path' (local files) and 'dataset' (a Hub name)")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1, got {self.max_samples}")
        unknown = sorted(set(self.columns) - set(FORMAT_FIELDS[self.format]))
        if unknown:
            raise ConfigError(f"columns: {', '.join(unknown)} not read by format '{self.format}' (it reads "
                              f"{', '.join(FORMAT_FIELDS[self.format])})")


@dataclass
class TokenizerConfig:
    # auto: a directory with tokenizer.json -> huggingface; a .model file (or a directory with
    # tokenizer.model) -> sentencepiece
    type: Literal["auto", "sentencepiece", "huggingface"] = "auto"
    path: str = ""
    add_bos: bool = True
    add_eos: bool = True
    # chat formats: null = the tokenizer's own template when it has one, else the plain template;
    # "plain" = always the plain template; anything else is a Jinja chat template
    chat_template: Optional[str] = None


# the names of the held-out sets, wherever sets are named together (evaluation, exports, reports)
RESERVED_SOURCE_NAMES = ("validation", "test")


def source_name_problems(names) -> list:
    """Why these training-source names cannot be used (empty when they can): a name must be
    non-empty, free of control characters and path separators (exports name files after it), not
    ``validation`` or ``test`` in any case (the held-out sets' names: such a source would be
    exported, and scored, as if it were one), and different from every other name in more than
    case (files named after them would collide on case-insensitive file systems)."""
    problems, seen = [], {}
    for name in names:
        if not isinstance(name, str) or not name.strip():
            problems.append(f"a source name is empty ({name!r}): name every source")
            continue
        control = [c for c in name if unicodedata.category(c) == "Cc"]
        if control:
            problems.append(f"source name {name!r} holds a control character (U+{ord(control[0]):04X}); rename it")
        if "/" in name or "\\" in name:
            problems.append(f"source name {name!r} holds a path separator; exports name files after sources, "
                            f"rename it (e.g. {name.replace('/', '-').replace(chr(92), '-')!r})")
        if name.casefold() in RESERVED_SOURCE_NAMES:
            problems.append(f"source name {name!r} is reserved for the held-out set of that name: put held-out data "
                            f"under data.validation or data.test, and give a training source another name (a source "
                            f"called {name!r} would be exported into the mixture and reported as the held-out set)")
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            problems.append(f"source names {other!r} and {name!r} differ only in case; rename one")
    return problems


@dataclass
class DataConfig:
    """``data:`` named training sources, the validation and test sets, the tokenizer, batching."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    validation: Optional[SourceConfig] = None
    test: Optional[SourceConfig] = None
    tokenizer: Optional[TokenizerConfig] = None
    seq_length: int = 1024
    packing: bool = False  # several samples per row, with per-sample boundaries kept
    # weighted: rows drawn with pi as sampling probabilities (scalebio train), not weighted in the loss
    sampling: Literal["uniform", "stratified", "weighted"] = "uniform"
    batch_counts: dict[str, int] = field(default_factory=dict)  # stratified: samples per source per batch
    on_error: Literal["error", "skip"] = "error"  # a malformed record: stop, or skip and count it
    # a record whose response is empty (only EOS or the end-of-turn marker would be supervised)
    on_empty: Literal["skip", "keep", "error"] = "skip"
    overlap: Literal["error", "warn"] = "error"  # validation/test examples duplicated in a training source
    cache: bool = True  # keep tokenized sources on disk
    cache_dir: Optional[str] = None  # null: $SCALEBIO_CACHE or ~/.cache/scalebio

    def validate(self):
        problems = source_name_problems(self.sources)
        if problems:
            raise ConfigError("; ".join(problems))
        if self.seq_length < 2:
            raise ConfigError(f"seq_length must be at least 2, got {self.seq_length}")
        if self.batch_counts and self.sampling != "stratified":
            raise ConfigError("batch_counts is only used with sampling: stratified")
        unknown = sorted(set(self.batch_counts) - set(self.sources))
        if unknown:
            raise ConfigError(f"batch_counts names {', '.join(unknown)}, not among the sources "
                              f"({', '.join(sorted(self.sources))})")
        if self.batch_counts and set(self.batch_counts) != set(self.sources):
            missing = sorted(set(self.sources) - set(self.batch_counts))
            raise ConfigError(f"batch_counts must give a count for every source; missing: {', '.join(missing)}")
        if any(c < 1 for c in self.batch_counts.values()):
            raise ConfigError(f"batch_counts must be at least 1 per source, got {self.batch_counts}")
        seen = {}
        for name in sorted(self.sources):
            src = self.sources[name]
            same = (src.path, src.dataset, src.subset, src.split, src.revision, src.format, src.file_type,
                    tuple(sorted(src.columns.items())))
            if same in seen:
                raise ConfigError(f"sources '{seen[same]}' and '{name}' read the same data ({src.path or src.dataset}, "
                                  f"format {src.format}): their weights would split one source's share; remove one",
                                  keys=("sources",))
            seen[same] = name
        if self.packing and self.sampling == "stratified":
            raise ConfigError("packing and sampling: stratified do not combine (a packed batch has a fixed number "
                              "of rows, not of samples per source); choose one")
