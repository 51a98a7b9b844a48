"""Seeded sample streams and batch assembly: epochs without replacement, the weighted draw, and
collation of samples (or packed rows) into a :class:`~scalebio.roles.Batch`. The streams and
what the sampling modes mean: :mod:`.loader`."""
from __future__ import annotations

import numpy as np
import torch

from ..roles import Batch
from .formats import DataError


class EpochSampler:
    """Indices of ``size`` items without replacement within an epoch, reshuffled each epoch.

    The permutation of epoch e comes from a generator seeded with (seed, stream, e), so draws are
    identical on every rank and reproducible from (epoch, position) alone.
    """

    def __init__(self, size: int, seed: int, stream: int):
        self.size, self.seed, self.stream = size, seed, stream
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.size)

    def peek(self) -> int:
        """The next index, without taking it."""
        return int(self._perm[self.pos])

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            chunk = self._perm[self.pos: self.pos + n]
            out.append(chunk)
            n -= len(chunk)
            self.pos += len(chunk)
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)


class WeightedSampler:
    """Flat indices into the pooled sources (offsets ``offsets``), each drawn from source k with
    probability ``pi[k]``.

    Draw d picks its source with a generator seeded by (seed, stream, d), then takes the next
    sample of that source's own :class:`EpochSampler`, so a source gives every sample once before
    any repeats. The state is the draw count plus the per-source samplers' states; ``pi`` is set
    before each batch (the weights plugin's current pi).
    """

    def __init__(self, sources: list, offsets: np.ndarray, seed: int, stream: int):
        self.sources, self.offsets, self.seed, self.stream = sources, offsets, seed, stream
        self.draws = 0
        self._cdf = None

    def set_probs(self, pi) -> None:
        pi = np.asarray(pi, dtype=np.float64)
        if pi.shape != (len(self.sources),) or not np.isfinite(pi).all() or (pi < 0).any() or pi.sum() <= 0:
            raise DataError(f"weighted sampling needs one finite, non-negative weight per source "
                            f"({len(self.sources)}), not all zero; got {pi.tolist()}")
        self._cdf = np.cumsum(pi / pi.sum())
        self._last = int(np.flatnonzero(pi > 0)[-1])  # rounding never lands on a zero-weight source

    def _source(self, draw: int) -> int:
        if self._cdf is None:
            raise DataError("data.sampling: weighted needs sampling probabilities (the weights plugin's pi)")
        u = np.random.default_rng([self.seed, self.stream, draw]).random()
        return min(int(np.searchsorted(self._cdf, u, side="right")), self._last)

    def peek(self) -> int:
        k = self._source(self.draws)
        return int(self.offsets[k]) + self.sources[k].peek()

    def take(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        for j in range(n):
            k = self._source(self.draws)
            out[j] = self.offsets[k] + self.sources[k].take(1)[0]
            self.draws += 1
        return out


def collate(samples: list, sources: list, seq_length: int, pad_id: int) -> Batch:
    """Right-padded [B, seq_length] batch; padding carries no loss and, attention being causal,
    does not change the outputs at real positions."""
    b = len(samples)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq_length), dtype=torch.float32)
    for i, s in enumerate(samples):
        n = len(s.ids) - 1
        tokens[i, :n] = torch.from_numpy(s.ids[:-1])
        labels[i, :n] = torch.from_numpy(s.ids[1:])
        loss_mask[i, :n] = torch.from_numpy(s.mask.astype(np.float32))
    return Batch(tokens, labels, loss_mask, torch.as_tensor(sources, dtype=torch.long))


def collate_packed(rows: list, seq_length: int, pad_id: int) -> Batch:
    """Rows of several samples each: ``rows[i]`` is a list of ``(Sample, source id)`` (source -1
    for validation). Fills the packing fields of :class:`~scalebio.roles.Batch`."""
    b = len(rows)
    m = max(1, max(len(r) for r in rows))
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq_length), dtype=torch.float32)
    segment = torch.full((b, seq_length), -1, dtype=torch.long)
    position_ids = torch.zeros((b, seq_length), dtype=torch.long)
    segment_source = torch.full((b, m), -1, dtype=torch.long)
    source = torch.full((b,), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        pos = 0
        for j, (s, src) in enumerate(row):
            n = len(s.ids) - 1
            end = pos + n
            if end > seq_length:
                raise ValueError(f"packed row {i} overflows seq_length={seq_length}")
            tokens[i, pos:end] = torch.from_numpy(s.ids[:-1])
            labels[i, pos:end] = torch.from_numpy(s.ids[1:])
            loss_mask[i, pos:end] = torch.from_numpy(s.mask.astype(np.float32))
            segment[i, pos:end] = j
            position_ids[i, pos:end] = torch.arange(n)
            segment_source[i, j] = src
            pos = end
        if row:
            source[i] = row[0][1]
    return Batch(tokens, labels, loss_mask, source, segment, position_ids, segment_source)


def pack_rows(sampler: EpochSampler, positions: np.ndarray, rows: int, seq_length: int) -> list:
    """First-fit packing of the sampler's next items into ``rows`` rows of ``seq_length``
    positions; stops (without taking it) at the first item that fits in no row."""
    free = np.full(rows, seq_length, dtype=np.int64)
    out = [[] for _ in range(rows)]
    while True:
        i = sampler.peek()
        room = np.flatnonzero(free >= positions[i])
        if len(room) == 0:
            return out
        r = int(room[0])
        sampler.take(1)
        out[r].append(i)
        free[r] -= positions[i]
