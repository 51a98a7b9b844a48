"""Training sources, the validation and test sets: files or Hub datasets -> token ids with a loss
mask (cached on disk) -> seeded batches; and the export of a reweighted mixture.

- :mod:`.formats`: record formats, normalisation, chat templates -> ids and supervision flags;
- :mod:`.sources`: reading records from files and ``datasets``, with file:line error reports;
- :mod:`.cache`: the tokenized cache (megatron-core indexed datasets) and its parallel builder;
- :mod:`.loader`: samples, sampling (uniform / stratified), packing, ``RunData``;
- :mod:`.export`: the mixture export (``scalebio export``);
- :mod:`.prepare`: tokenize every source ahead of a run (``scalebio prepare``).

docs/data.md describes the formats and the YAML.
"""
from .formats import FORMATS, DataError, RecordError, encode, normalize
from .loader import EpochSampler, RunData, Sample, TokenizedSet, collate, collate_packed, encode_record, pack_rows

__all__ = ["FORMATS", "DataError", "RecordError", "encode", "normalize", "EpochSampler", "RunData", "Sample",
           "TokenizedSet", "collate", "collate_packed", "encode_record", "pack_rows"]
