"""``scalebio prepare``: tokenize every source of a data YAML into the cache ahead of a run, with
worker processes and a progress bar, then run every check a run would (empty sources, records
without supervised tokens, validation overlap), so that a run starts from the cache at once."""
from __future__ import annotations

import time

from ..config import DataConfig, Layers, parse
from .cache import cache_root, load_or_build, worker_pool
from .formats import DataError
from .loader import RunData, TokenizedSet
from .sources import describe


def load_data_config(path, sets=()) -> DataConfig:
    """A data YAML (the file ``--data`` takes), checked like a run checks it; ``sets`` are
    ``key=value`` overrides of its keys (``cache_dir=/scratch/cache``)."""
    layers = Layers()
    layers.add_file(path, "data")
    for assignment in sets:
        layers.add_override(f"data.{assignment}")
    return parse(DataConfig, layers.data.get("data"), layers.where, ("data",))


def data_sets(cfg: DataConfig) -> list:
    """``(label, name, SourceConfig)`` of the sources, the validation and the test set."""
    out = [(f"source '{n}'", n, cfg.sources[n]) for n in sorted(cfg.sources)]
    if cfg.validation is not None:
        out.append(("validation set", "validation", cfg.validation))
    if cfg.test is not None:
        out.append(("test set", "test", cfg.test))
    return out


def prepare_data(cfg: DataConfig, workers: int = 1, force: bool = False, progress: bool = True, say=print) -> list:
    """Build (or find) the cache of every set; returns one status dict per set."""
    from ..tokenizer import chat_template_for, load_tokenizer

    if not cfg.cache:
        raise DataError("data.cache is false: there is nothing to prepare (set it to true)")
    tokenizer = load_tokenizer(cfg.tokenizer)
    chat = chat_template_for(tokenizer, cfg.tokenizer.chat_template)
    say(f"cache: {cache_root(cfg) / 'tokenized'}  (workers: {workers})")
    statuses = []
    pool = worker_pool(workers, cfg.tokenizer) if workers > 1 else None
    try:
        for label, name, scfg in data_sets(cfg):
            statuses.append(_prepare_one(label, name, scfg, cfg, tokenizer, chat, pool, force, progress, say))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if cfg.validation is not None:  # every check of a run, now from the cache
        data = RunData(cfg, tokenizer, seed=0)
        for line in data.summary():
            say("  data  " + line)
    return statuses


def _prepare_one(label, name, scfg, cfg, tokenizer, chat, pool, force, progress, say) -> dict:
    start = time.perf_counter()
    store, status = load_or_build(label, scfg, cfg, tokenizer, chat, progress=progress, pool=pool, force=force)
    seconds = time.perf_counter() - start
    ts = TokenizedSet(name, describe(scfg), store, cfg.seq_length, status)
    if status["cached"]:
        say(f"  {name}: already cached ({status['records']} records, key {status['key']})")
    else:
        say(f"  {name}: {status['records']} records, {status['tokens']} tokens in {seconds:.1f}s "
            f"({status['records'] / seconds:,.0f} records/s, {status['tokens'] / seconds:,.0f} tokens/s)"
            + (f", {status['skipped']} malformed records skipped" if status["skipped"] else "")
            + (f", {status['empty']} with an empty response {'kept' if status['on_empty'] == 'keep' else 'skipped'}"
               if status.get("empty") else "")
            + (" (rebuilt: the cached entry was damaged)" if status.get("rebuilt") else ""))
    return {"name": name, "supervised_tokens": ts.supervised_tokens, **status, "wall_s": seconds}
