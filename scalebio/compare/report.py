"""What ``scalebio compare`` reports: test loss per arm over seeds (mean and sample standard
deviation), the per-seed difference to ``uniform``, the weights of every arm, and the data budget
each train run actually saw. It states measured numbers and their spread, never a verdict."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import yaml

from ..outputs import atomic_write


def read_run(out: Path, is_train: bool) -> dict:
    """The numbers compare needs from one finished run directory."""
    if not is_train:
        return {"weights": json.loads((out / "weights.json").read_text()), "out": str(out)}
    scores = json.loads((out / "eval.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())
    return {"test": json.loads((out / "test.json").read_text()), "weights": scores["weights"],
            "trained_on": scores["trained_on"], "global_batch": config["run"]["global_batch"], "out": str(out)}


def spread(values: list) -> dict:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n, "values": values}


def summarize(req, runs: list, cfg, same=None) -> dict:
    """``same``: {arm: other arm} for arms not run because their weights equal the other's."""
    same = same or {}
    train = [r for r in runs if r.is_train]
    arms = list(dict.fromkeys(r.arm for r in train))
    seeds = list(dict.fromkeys(r.seed for r in train))
    by_arm = {a: sorted((r for r in train if r.arm == a), key=lambda r: r.seed) for a in arms}
    def trained(key):
        return {a: [r.result["trained_on"][key] for r in by_arm[a]] for a in arms}

    out = {
        "data": str(Path(req.data).resolve()), "model": cfg.model.name, "load": req.load, "seeds": seeds,
        "weight_runs": {r.name: {"solver": r.arm, "seed": r.seed, "out": r.result["out"],
                                 "weights": r.result["weights"], "seconds": r.result["seconds"],
                                 "command": r.result["command"]}
                        for r in runs if not r.is_train},
        "weights": {a: by_arm[a][0].result["weights"] for a in arms},
        "budget": {"train_steps": train[0].result["trained_on"]["steps"],
                   "global_batch": train[0].result["global_batch"],
                   "samples": trained("samples"), "supervised_tokens": trained("supervised_tokens")},
        "test_tokens": train[0].result["test"]["tokens"],
        "arms": {a: {"test_loss": spread([r.result["test"]["loss"] for r in by_arm[a]]),
                     "runs": [{"seed": r.seed, "out": r.result["out"], "test": r.result["test"],
                               "seconds": r.result["seconds"], "command": r.result["command"]} for r in by_arm[a]]}
                 for a in arms},
    }
    if "uniform" in by_arm:  # paired by seed: the same seed orders the data and draws LISA layers alike
        base = {r.seed: r.result["test"]["loss"] for r in by_arm["uniform"]}
        out["minus_uniform"] = {a: spread([r.result["test"]["loss"] - base[r.seed] for r in by_arm[a]])
                                for a in arms if a != "uniform"}
    for a, b in same.items():  # the same weights and seeds: the other arm's runs are this arm's
        out["weights"][a] = out["weights"][b]
        out["arms"][a] = {"same_as": b, "test_loss": out["arms"][b]["test_loss"], "runs": []}
    return out


def _pm(s: dict, digits: int = 4) -> str:
    sd = "n/a" if s["sd"] is None else f"{s['sd']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {sd}"


def table(result: dict) -> str:
    arms = list(result["arms"])
    names = list(next(iter(result["weights"].values())))
    n = len(result["seeds"])
    b = result["budget"]
    lines = [f"Test loss of the fine-tuned model (token mean over {result['test_tokens']} test tokens), "
             f"{n} seed{'s' if n > 1 else ''} per arm ({', '.join(map(str, result['seeds']))}); every train run: "
             f"{b['train_steps']} steps x {b['global_batch']} rows", ""]
    width = max(8, *(len(a) for a in arms))
    head = f"{'arm':<{width}}  {'test loss (mean ± sd)':>22}  {'minus uniform (paired)':>23}  " + \
        "  ".join(f"{nm[:10]:>10}" for nm in names)
    lines += [head, "-" * len(head)]
    for a in arms:
        diff = result.get("minus_uniform", {}).get(a)
        same = result["arms"][a].get("same_as")
        loss = f"= {same} (not run)" if same else _pm(result['arms'][a]['test_loss'])
        row = f"{a:<{width}}  {loss:>22}  {(_pm(diff) if diff else '-'):>23}  "
        lines.append(row + "  ".join(f"{result['weights'][a][nm]:>10.4f}" for nm in names))
    lines.append("")
    lines.append("weights: the sampling probability of each source in that arm's train runs; 'learned' is the "
                 "bilevel run's weights.json")
    for a in arms:
        if result["arms"][a].get("same_as"):
            lines.append(f"{a}: the same weights as {result['arms'][a]['same_as']} (within 1e-12), so the same rows "
                         f"with the same seeds; its runs are {result['arms'][a]['same_as']}'s")
    for a, s in result.get("minus_uniform", {}).items():
        lines.append(f"{a} - uniform: {_pm(s)} (mean ± sd over {s['n']} seeds of the per-seed difference in test "
                     f"loss; negative = lower test loss than uniform)")
    tokens = {a: sum(v) / len(v) for a, v in b["supervised_tokens"].items()}  # arms that ran
    lines.append("supervised tokens per train run (mean over seeds): "
                 + ", ".join(f"{a} {t:,.0f}" for a, t in tokens.items())
                 + "; samples: " + ", ".join(f"{a} {sum(v) / len(v):,.0f}" for a, v in b["samples"].items()))
    return "\n".join(lines)


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["arms"])
    names = list(next(iter(result["weights"].values())))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, a in enumerate(arms):
        s = result["arms"][a]["test_loss"]
        ax.scatter([i] * s["n"], s["values"], color="0.6", s=14, zorder=2)
        ax.errorbar([i], [s["mean"]], yerr=[s["sd"] or 0.0], fmt="o", color="black", capsize=4, zorder=3)
    # an arm not run shows the runs of the arm it equals, and says so
    ax.set_xticks(range(len(arms)), [f"{a}\n(= {result['arms'][a]['same_as']})" if result["arms"][a].get("same_as")
                                     else a for a in arms])
    ax.set_ylabel("test loss of the fine-tuned model")
    ax.set_title(f"mean ± sd over {len(result['seeds'])} seeds (grey: each seed)")
    ax.grid(alpha=0.3, axis="y")
    left = [0.0] * len(arms)
    for nm in names:
        vals = [result["weights"][a][nm] for a in arms]
        bx.barh(range(len(arms)), vals, left=left, label=nm)
        left = [x + v for x, v in zip(left, vals)]
    bx.set_yticks(range(len(arms)), arms)
    bx.set_xlim(0, 1)
    bx.set_xlabel("sampling weight")
    bx.set_title("weights of each arm")
    bx.legend(loc="best", fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "compare.json", json.dumps(result, indent=2) + "\n")
    plot(out / "compare.png", result)
