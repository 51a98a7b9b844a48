"""Training sources, the validation and test sets: files or Hub datasets -> token ids with a loss
mask (cached on disk) -> seeded batches; and the export of a reweighted mixture.

- :mod:`.formats`: record formats, normalisation, chat templates -> ids and supervision flags;
- :mod:`.sources`: reading records from files and ``datasets``, with file:line error reports;
- :mod:`.cache`: the tokenized cache and its parallel builder; :mod:`.store`: one entry on disk
  (megatron-core indexed datasets); :mod:`.entry`: verifying and swapping entries;
- :mod:`.loader`: samples and ``RunData``, the run's seeded streams (uniform / stratified / weighted);
  :mod:`.batching`: the samplers, collation and packing;
- :mod:`.export`: the mixture export (``scalebio export``);
- :mod:`.prepare`: tokenize every source ahead of a run (``scalebio prepare``).

docs/data.md describes the formats and the YAML.
"""
from .formats import FORMATS, DataError, RecordError, encode, normalize
from .batching import EpochSampler, WeightedSampler, collate, collate_packed, pack_rows
from .loader import RunData, Sample, TokenizedSet, encode_record

__all__ = ["FORMATS", "DataError", "RecordError", "encode", "normalize", "EpochSampler", "WeightedSampler", "RunData", "Sample",
           "TokenizedSet", "collate", "collate_packed", "encode_record", "pack_rows"]
