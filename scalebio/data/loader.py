"""The tokenized sources of a run and their seeded batch streams.

Source ids are the positions of the source names in sorted order, so they never depend on the
file system or the order of the YAML. Sampling (SPEC §2):

- ``uniform`` (default): batches drawn from the pooled training samples, a seeded permutation
  per epoch, so a source's share of a batch follows its size;
- ``stratified``: a fixed number of samples per source per batch (``data.batch_counts``, or the
  global batch split evenly), each source with its own seeded epochs; the rows are then shuffled
  with a seed that depends on the step;
- ``weighted``: each row's source drawn with the weights plugin's pi as sampling probabilities,
  then that source's next sample from its own seeded epochs (without replacement inside a source
  until it is exhausted). This is how ``scalebio train`` fine-tunes on a mixture.

With ``uniform`` and ``stratified`` pi enters only through the loss coefficients (the bilevel
solvers); with ``weighted`` it enters only through the sampling. Every rank draws the same global batch
from the same seed and takes its own part in the backend; the sampler state (epoch and position
of each stream) is all a resumed run needs to see exactly the batches it would have seen.

With ``data.packing`` a row holds several samples: samples are taken in sampler order and put
in the first row with room (first fit); a batch is complete when the next sample fits nowhere,
and that sample opens the next batch. Attention stays inside each sample (see ``Batch``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..roles import Batch
from .batching import EpochSampler, WeightedSampler, collate, collate_packed, pack_rows
from .cache import load_or_build
from .formats import DataError, encode, normalize
from .sources import describe

_STREAM_TRAIN, _STREAM_VAL, _STREAM_ROWS, _STREAM_WEIGHTED, _STREAM_SOURCE = 1, 2, 3, 4, 100


@dataclass
class Sample:
    ids: np.ndarray  # int64, at most seq_length + 1 tokens
    mask: np.ndarray  # bool, len(ids) - 1: is the target ids[j + 1] supervised


def encode_record(rec: dict, fmt: str, tokenizer, seq_length: int, chat=None, columns=None):
    """Token ids and target mask of one record; returns (Sample, was_truncated)."""
    ids, flags = encode(normalize(rec, fmt, columns), tokenizer, chat)
    truncated = len(ids) > seq_length + 1
    ids, flags = ids[: seq_length + 1], flags[: seq_length + 1]
    return Sample(ids.astype(np.int64), flags[1:].astype(bool)), truncated


class _Samples:
    """``TokenizedSet.samples``: a read-only sequence of Samples, read from the store on access."""

    def __init__(self, owner):
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner.index)

    def __getitem__(self, k) -> Sample:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return self.owner.sample(int(k))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class TokenizedSet:
    """One tokenized source (or the validation / test set), truncated to ``seq_length + 1`` tokens.

    Records whose supervised targets all fall beyond the truncation (or that have none) are
    dropped and counted: their per-sample loss would be 0 by definition and would only dilute
    their source's mean loss."""

    def __init__(self, name: str, path: str, store, seq_length: int, status: dict | None = None):
        self.name, self.path, self.store, self.seq_length = name, path, store, seq_length
        self.status = status or {}
        limit = seq_length + 1
        lengths, first = store.lengths, store.first_target
        keep = (first >= 1) & (first <= seq_length)
        self.index = np.flatnonzero(keep)
        self.truncated = int((lengths > limit).sum())
        self.dropped = len(store) - len(self.index)
        self.supervised_tokens = int(store.supervised_within(limit)[self.index].sum())
        # positions a sample takes in a row: its tokens but the last (which is only a target)
        self.positions = np.minimum(lengths[self.index], limit) - 1
        self.samples = _Samples(self)

    @property
    def skipped(self) -> int:
        return int(self.store.info.get("skipped", 0))

    def sample(self, k: int) -> Sample:
        ids, flags = self.store.sample(self.index[k], self.seq_length + 1)
        return Sample(np.asarray(ids, dtype=np.int64), np.asarray(flags[1:], dtype=bool))

    def describe(self) -> str:
        line = (f"{self.name}: {len(self.index)} samples, {self.supervised_tokens} supervised tokens, "
                f"{self.truncated} truncated to {self.seq_length + 1} tokens")
        if self.dropped:
            line += f", {self.dropped} dropped (no supervised token within seq_length)"
        if self.skipped:
            examples = self.store.info.get("skip_examples") or []
            line += f", {self.skipped} malformed records skipped" + (f" (first: {examples[0]})" if examples else "")
        empty = int(self.store.info.get("empty", 0))
        if empty:  # data.on_empty: skipped by default, or kept
            how = "kept" if self.store.info.get("on_empty") == "keep" else "skipped"
            first = (self.store.info.get("empty_examples") or ["?"])[0]
            line += f", {empty} with an empty response {how} (first: {first})"
        if self.status.get("cached"):
            how = "from cache"
        elif self.status.get("key"):
            how = f"tokenized in {self.status.get('seconds', 0):.1f}s, cached"
        else:
            how = f"tokenized in {self.status.get('seconds', 0):.1f}s"
        return line + f" ({self.path}; {how})"


class RunData:
    """The tokenized sources, validation and test sets of a run, and their seeded batch streams.

    ``global_batch``, when given, is checked against stratified batch counts up front.
    ``sampling_probs`` (a callable returning pi, e.g. the weights plugin's ``probs``) is what
    ``sampling: weighted`` draws by. Without ``data.validation``, ``val`` is None and
    ``next_val`` returns None (the bilevel solvers refuse such a run before it starts)."""

    def __init__(self, cfg, tokenizer, seed: int, global_batch: int | None = None, progress: bool = False,
                 sampling_probs=None):
        from ..tokenizer import chat_template_for

        if not cfg.sources:
            raise DataError("data.sources is empty: name at least one training source")
        self.cfg, self.seed = cfg, seed
        self.seq_length = cfg.seq_length
        self.pad_id = tokenizer.pad_id
        self.packing, self.sampling = cfg.packing, cfg.sampling
        self.chat = chat_template_for(tokenizer, cfg.tokenizer.chat_template if cfg.tokenizer else None)
        self.source_names = sorted(cfg.sources)
        load = self._load_set
        self.train = [load(f"source '{n}'", n, cfg.sources[n], tokenizer, progress) for n in self.source_names]
        self.val = load("validation set", "validation", cfg.validation, tokenizer, progress) \
            if cfg.validation is not None else None
        self.test = load("test set", "test", cfg.test, tokenizer, progress) if cfg.test is not None else None
        self.warnings: list = []
        self._check_overlap()
        sizes = [len(t.samples) for t in self.train]
        self._offsets = np.cumsum([0] + sizes)
        self._train_positions = np.concatenate([t.positions for t in self.train])
        self._train_sampler = EpochSampler(int(self._offsets[-1]), seed, _STREAM_TRAIN)
        self._val_sampler = EpochSampler(self.val_size, seed, _STREAM_VAL)
        self._source_samplers = [EpochSampler(n, seed, _STREAM_SOURCE + k) for k, n in enumerate(sizes)]
        # weighted draws take from the same per-source streams as stratified ones (the modes exclude each other)
        self._weighted = WeightedSampler(self._source_samplers, self._offsets, seed, _STREAM_WEIGHTED)
        self._sampling_probs = sampling_probs
        self._step = 0
        if global_batch is not None and self.sampling == "stratified":
            self.batch_counts(global_batch)

    @property
    def val_size(self) -> int:
        return len(self.val.samples) if self.val is not None else 0

    def source_sizes(self) -> dict:
        """Samples per source after tokenization (what ``natural`` weights are proportional to)."""
        return {t.name: len(t.samples) for t in self.train}

    def _load_set(self, label, name, scfg, tokenizer, progress) -> TokenizedSet:
        store, status = load_or_build(label, scfg, self.cfg, tokenizer, self.chat, progress=progress)
        out = TokenizedSet(name, describe(scfg), store, self.seq_length, status)
        if len(out.index) == 0:
            raise DataError(f"{label} ({describe(scfg)}) has no supervised tokens after tokenization "
                            f"(seq_length={self.seq_length}: are all responses truncated away?)")
        return out

    def _check_overlap(self) -> None:
        """Validation and test examples that are exact duplicates of training examples (after
        normalisation, so the same conversation in ShareGPT and messages form counts)."""
        val = [self.val] if self.val is not None else []
        held = [(self.val, "validation set", self.train)] if self.val is not None else []
        if self.test is not None:
            held.append((self.test, "test set", self.train + val))
        for data, what, others in held:
            hits = []
            for other in others:
                n = int(np.isin(data.store.hashes, other.store.hashes).sum())
                if n:
                    where = "the validation set" if other is self.val else f"source '{other.name}'"
                    hits.append(f"{n} in {where}")
            if hits:
                msg = (f"the {what} overlaps other data: of its {len(data.store)} examples, these are exact duplicates "
                       f"of examples elsewhere: {', '.join(hits)}")
                if self.cfg.overlap == "error":
                    raise DataError(msg + ". Remove them from one side, or set data.overlap: warn to go on")
                self.warnings.append("warning: " + msg)

    # ------------------------------------------------------------------ batches

    def _train_item(self, flat: int) -> tuple:
        src = int(np.searchsorted(self._offsets, flat, side="right") - 1)
        return self.train[src].sample(int(flat - self._offsets[src])), src

    def batch_counts(self, n: int) -> list:
        """Stratified samples per source (sorted source order) for a global batch of ``n``."""
        k = len(self.source_names)
        if self.cfg.batch_counts:
            counts = [self.cfg.batch_counts[name] for name in self.source_names]
            if sum(counts) != n:
                raise DataError(f"data.batch_counts add up to {sum(counts)} samples, but run.global_batch is {n}")
            return counts
        if n % k:
            raise DataError(f"stratified sampling splits run.global_batch={n} evenly over {k} sources, which does not "
                            f"divide; give data.batch_counts (samples per source, adding up to {n})")
        return [n // k] * k

    def next_train(self, n: int) -> Batch:
        if self.sampling == "stratified":
            items = []
            for k, count in enumerate(self.batch_counts(n)):
                items += [(k, int(i)) for i in self._source_samplers[k].take(count)]
            order = np.random.default_rng([self.seed, _STREAM_ROWS, self._step]).permutation(n)
            self._step += 1
            items = [items[o] for o in order]
            samples = [self.train[k].sample(i) for k, i in items]
            return collate(samples, [k for k, _ in items], self.seq_length, self.pad_id)
        sampler = self._train_sampler
        if self.sampling == "weighted":
            if self._sampling_probs is None:
                raise DataError("data.sampling: weighted needs sampling probabilities (the weights plugin's pi)")
            sampler = self._weighted
            sampler.set_probs(self._sampling_probs())
        if self.packing:
            rows = pack_rows(sampler, self._train_positions, n, self.seq_length)
            return collate_packed([[self._train_item(i) for i in row] for row in rows], self.seq_length, self.pad_id)
        flat = sampler.take(n)
        items = [self._train_item(int(i)) for i in flat]
        return collate([s for s, _ in items], [k for _, k in items], self.seq_length, self.pad_id)

    def next_val(self, n: int) -> Batch | None:
        if self.val is None:
            return None
        if self.packing:
            rows = pack_rows(self._val_sampler, self.val.positions, n, self.seq_length)
            return collate_packed([[(self.val.sample(i), -1) for i in row] for row in rows], self.seq_length,
                                  self.pad_id)
        idx = self._val_sampler.take(n)
        return collate([self.val.sample(int(i)) for i in idx], [-1] * n, self.seq_length, self.pad_id)

    def ordered_batches(self, tset, n: int):
        """Every sample of ``tset`` (a source, the validation or the test set) once, in order, ``n``
        rows per batch as validation-kind batches (source -1, token sums). The last batch is filled
        with empty rows, which carry no loss and no tokens."""
        total = len(tset.samples)
        empty = Sample(np.array([self.pad_id], dtype=np.int64), np.zeros(0, dtype=bool))
        for start in range(0, total, n):
            samples = [tset.sample(i) for i in range(start, min(start + n, total))]
            samples += [empty] * (n - len(samples))
            yield collate(samples, [-1] * n, self.seq_length, self.pad_id)

    # ------------------------------------------------------------------ reporting and state

    def summary(self) -> list:
        rows = [t.describe() for t in self.train + [s for s in (self.val, self.test) if s is not None]]
        how = self.sampling
        if self.cfg.batch_counts:
            how += " (" + ", ".join(f"{n} {self.cfg.batch_counts[n]}" for n in self.source_names) + " per batch)"
        rows.append(f"sampling: {how}" + (", packed rows" if self.packing else ""))
        return rows + self.warnings

    def state_dict(self) -> dict:
        return {"sampling": self.sampling, "packing": self.packing, "sizes": [len(t.samples) for t in self.train],
                "val_size": self.val_size, "step": self._step, "draws": self._weighted.draws,
                "train": self._train_sampler.state_dict(), "val": self._val_sampler.state_dict(),
                "sources": [s.state_dict() for s in self._source_samplers]}

    def load_state_dict(self, state: dict) -> None:
        sizes = [len(t.samples) for t in self.train]
        saved = state.get("sizes", sizes)
        if state.get("sampling", self.sampling) != self.sampling or state.get("packing", self.packing) != self.packing:
            raise DataError(f"the saved data state is for sampling={state.get('sampling')}, packing="
                            f"{state.get('packing')}; this run has sampling={self.sampling}, packing={self.packing}")
        if saved != sizes or state.get("val_size", self.val_size) != self.val_size:
            raise DataError(f"the data changed since the state was saved (samples per source {saved} then, {sizes} "
                            f"now): a resumed run could not see the batches it would have seen")
        self._train_sampler.load_state_dict(state["train"])
        self._val_sampler.load_state_dict(state["val"])
        for s, st in zip(self._source_samplers, state.get("sources", [])):
            s.load_state_dict(st)
        self._step = int(state.get("step", 0))
        self._weighted.draws = int(state.get("draws", 0))
