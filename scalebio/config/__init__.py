"""Run configuration: typed dataclasses loaded from layered YAML with provenance.

One module per part: ``layers`` (YAML, provenance, typed parsing), ``run`` (``run:``, ``optim:``
and the whole :class:`RunConfig`), ``model`` (``model:`` and the shipped model YAMLs), ``data``
(``data:``). Everything is importable from here.

Layers, lowest priority first: dataclass defaults, the model YAML (``model:``), the data YAML
(``data:``), ``--config`` files, ``--set section.key=value`` overrides. Every key is checked
against its dataclass; an unknown key is an error that names the key and the file (or the
``--set`` flag) it came from. Plugin option sections are named after the plugin (``lisa:``,
``minimax:``) and parsed into that plugin's ``Options`` dataclass once plugins are selected.
"""
from __future__ import annotations

from .layers import ConfigError, load_yaml, Layers, field_aliases, parse, to_dict
from .model import ModelConfig, model_configs_dir, available_models, find_model, load_model
from .data import (
    FORMATS,
    FORMAT_FIELDS,
    FILE_TYPES,
    SourceConfig,
    TokenizerConfig,
    RESERVED_SOURCE_NAMES,
    source_name_problems,
    DataConfig,
)
from .run import (
    RunOptions,
    OUT_PLACEHOLDERS,
    check_out_template,
    OptimOptions,
    CORE_SECTIONS,
    RunConfig,
    parse_layers,
)

__all__ = ['ConfigError', 'load_yaml', 'Layers', 'field_aliases', 'parse', 'to_dict', 'ModelConfig', 'model_configs_dir', 'available_models', 'find_model', 'load_model', 'FORMATS', 'FORMAT_FIELDS', 'FILE_TYPES', 'SourceConfig', 'TokenizerConfig', 'RESERVED_SOURCE_NAMES', 'source_name_problems', 'DataConfig', 'RunOptions', 'OUT_PLACEHOLDERS', 'check_out_template', 'OptimOptions', 'CORE_SECTIONS', 'RunConfig', 'parse_layers']
