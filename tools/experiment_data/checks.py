"""The check each experiment must pass, applied to learned weights.

A generator writes its claim to ``experiment.json`` next to the data YAML; ``check DATA_DIR RUN``
reads it and RUN's ``weights.json`` (a run directory, a ``compare`` directory, whose bilevel run
learned the weights, or the file itself) and says PASS or FAIL with the numbers.
"""
from __future__ import annotations

import json
from pathlib import Path


class CheckError(RuntimeError):
    pass


def ranks(values: list) -> list:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    at = 0
    while at < len(order):
        end = at
        while end + 1 < len(order) and values[order[end + 1]] == values[order[at]]:
            end += 1
        for i in order[at:end + 1]:
            out[i] = (at + end) / 2 + 1
        at = end + 1
    return out


def spearman(x: list, y: list) -> float:
    """Spearman's rank correlation (Pearson's on the ranks); 0 where either is constant."""
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else 0.0


def weights_file(run: Path) -> Path:
    for path in (run, run / "weights.json", run / "bilevel" / "weights.json"):
        if path.is_file():
            return path
    raise CheckError(f"{run}: no weights.json in it (nor in {run / 'bilevel'}); give a run directory, a "
                     f"compare directory or a weights.json")


def read_claim(data_dir: Path) -> dict:
    path = data_dir / "experiment.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise CheckError(f"{path} is missing: give the directory tools/make_experiment_data.py wrote "
                         f"(its --out)") from None


def evaluate(claim: dict, weights: dict) -> tuple:
    """(passed, one line with the numbers) for ``weights`` (source -> pi) against ``claim``."""
    if sorted(weights) != sorted(claim["sources"]):
        raise CheckError(f"the weights name sources {sorted(weights)}, the experiment's data has "
                         f"{sorted(claim['sources'])}: a run on other data")
    pi = "pi " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(weights.items(), key=lambda kv: -kv[1]))
    kind = claim["check"]["kind"]
    if kind == "total_below":
        total = sum(weights[s] for s in claim["check"]["sources"])
        limit = claim["check"]["limit"]
        return total < limit, f"{' + '.join(claim['check']['sources'])} = {total:.4f} (limit < {limit}); {pi}"
    if kind == "top":
        want = claim["check"]["source"]
        top = max(weights, key=weights.get)
        runner_up = max((v for k, v in weights.items() if k != want), default=0.0)
        return top == want, f"top {top}, {want} leads by {weights[want] - runner_up:+.4f}; {pi}"
    if kind == "spearman_below":
        noise = claim["check"]["noise"]
        names = sorted(noise)
        rho = spearman([weights[n] for n in names], [noise[n] for n in names])
        limit = claim["check"]["limit"]
        return rho < limit, f"Spearman(pi, noise) = {rho:+.3f} (limit < {limit}); {pi}"
    raise CheckError(f"experiment.json: unknown check kind {kind!r}")


def check(data_dir: Path, runs: list) -> int:
    """Print a PASS/FAIL line per run; 0 when all pass, 1 when one fails."""
    claim = read_claim(data_dir)
    failed = 0
    for run in runs:
        path = weights_file(Path(run))
        try:
            weights = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckError(f"{path}: not JSON ({exc})") from None
        passed, line = evaluate(claim, weights)
        failed += not passed
        print(f"{claim['experiment']} ({claim['check']['text']}) {path}: {'PASS' if passed else 'FAIL'}: {line}")
    return 1 if failed else 0
