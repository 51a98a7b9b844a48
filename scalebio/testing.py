"""A conformance kit for scalebio plugins: the contract of :mod:`scalebio.roles`, as checks a
third party runs in its own tests (and scalebio runs on its built-ins, tests/test_conformance.py).

    # tests/test_conformance.py of your plugin package, installed with pip install -e .
    from scalebio.testing import check_weights

    def test_fixed_weights_conform():
        check_weights("fixed", options={"weights": {"a": 0.5, "b": 0.3, "c": 0.2}}, learns=False)

Each check takes the name the plugin is installed under (its ``scalebio`` entry point), builds it
as a run does, and raises :class:`ConformanceError` (an ``AssertionError``) naming the rule it
broke. :func:`check_backend` and :func:`check_solver` run on the ``tiny`` model and the embedded
demo data (CPU, seconds), with the built-in defaults for the other roles; pass ``sets``
(``"section.key=value"``) for the options your plugin needs. Nothing here imports pytest.
"""
from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import torch

from .roles import MODELS, SOLVER_METRICS, PassResult, Selection

__all__ = ["ConformanceError", "check_weights", "check_layer_selection", "check_backend", "check_solver"]

# the tiny model on the demo data: 4 layers (something for a layer selection to choose), batches of 8
TINY = ("model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", "run.global_batch=8", "run.micro_batch=4", "run.val_batch=4",
        "run.progress=false", "data.seq_length=32")


class ConformanceError(AssertionError):
    """A plugin breaks the contract of :mod:`scalebio.roles`; the message names the rule."""


def _check(ok, rule: str) -> None:
    if not ok:
        raise ConformanceError(rule)


def _role_class(name: str, role: str):
    from .plugins import Plugins, discover

    infos = discover()
    info = infos.get(name)
    _check(info is not None, f"no plugin '{name}' is installed (entry-point group 'scalebio'); install your "
                             f"package first (pip install -e .)")
    _check(info.error is None, f"plugin '{name}' does not import: {info.error}")
    _check(role in info.roles, f"plugin '{name}' does not take the {role.replace('_', ' ')} role (its hooks: "
                               f"{', '.join(info.hooks)})")
    return Plugins([name], infos=infos).role_class(role)


def _options(name: str, cls, options):
    from .config import parse

    return parse(cls.Options, options or {}, lambda path: f"options of '{name}'", (name,))


def _roundtrip(state):
    """``state`` through torch.save/torch.load, as a checkpoint stores it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# --------------------------------------------------------------------------- weights


def _check_simplex(pi, k: int, what: str) -> None:
    _check(isinstance(pi, torch.Tensor) and pi.dtype == torch.float64 and tuple(pi.shape) == (k,),
           f"{what}: probs() must return a float64 tensor of length {k}, got "
           f"{getattr(pi, 'dtype', type(pi))} {tuple(getattr(pi, 'shape', ()))}")
    _check(bool(torch.isfinite(pi).all()) and bool((pi >= 0).all()) and abs(float(pi.sum()) - 1.0) < 1e-9,
           f"{what}: probs() must be on the simplex (finite, non-negative, sum 1), got {pi.tolist()}")


def check_weights(name: str, options: dict | None = None, sources=("a", "b", "c"), learns: bool = True) -> None:
    """A weights plugin: pi on the simplex (float64, one entry per source, in the order given),
    never aliased by ``probs()``, still on the simplex after updates, moved by ``lr_scale=0`` not at
    all, and a ``state_dict`` that survives torch.save and resumes exactly. With ``learns``, a
    positive dF/dpi_k lowers pi_k and a negative one raises it (descent on the objective)."""
    cls = _role_class(name, "weights")
    opts = _options(name, cls, options)
    names = list(sources)
    k = len(names)
    w = cls(opts, names)
    pi0 = w.probs()
    _check_simplex(pi0, k, name)
    pi0.fill_(0.0)  # the caller's copy: the plugin's own pi must not change
    _check_simplex(w.probs(), k, f"{name} (after the caller changed the tensor probs() returned)")
    pi0 = w.probs()
    grad = torch.linspace(1.0, -1.0, k, dtype=torch.float64)  # source 0 hurts the objective, source k-1 helps
    if learns:
        w.update(grad, 0.0)
        _check(torch.allclose(w.probs(), pi0, rtol=0, atol=1e-12),
               f"{name}: update(grad, lr_scale=0) must not move pi (lr_scale multiplies the learning rate)")
    for step in range(20):
        w.update(grad, 1.0)
        _check_simplex(w.probs(), k, f"{name} after {step + 1} updates")
    if learns:
        pi = w.probs()
        _check(pi[0] < pi0[0] and pi[-1] > pi0[-1],
               f"{name}: after 20 updates with dF/dpi = {grad.tolist()}, pi went {pi0.tolist()} -> {pi.tolist()}; "
               f"the first source must lose weight and the last gain it")
    resumed = cls(opts, names)
    resumed.load_state_dict(_roundtrip(w.state_dict()))
    _check(torch.equal(resumed.probs(), w.probs()), f"{name}: a state_dict loaded into a new instance must give "
                                                    f"the same pi")
    for _ in range(3):
        w.update(grad, 0.5)
        resumed.update(grad, 0.5)
    _check(torch.equal(resumed.probs(), w.probs()), f"{name}: after load_state_dict, updates must continue exactly "
                                                    f"(optimizer state included in the state_dict)")


# --------------------------------------------------------------------------- layer selection


def check_layer_selection(name: str, options: dict | None = None, num_layers: int = 8, seed: int = 1234,
                          steps: int = 60) -> None:
    """A layer selection: ``select(step)`` returns ``(Selection, changed)`` with layers for u and w
    (frozensets of indices in ``range(num_layers)``) and ``changed`` True at step 0; between
    switches the set in force does not change; and it is a pure function of the step: another
    instance with the same seed gives the same answers (every rank draws for itself), asked in any
    order (a resumed run asks for the set at its checkpoint first)."""
    cls = _role_class(name, "layer_selection")
    opts = _options(name, cls, options)
    answers = []
    sel = cls(opts, num_layers, seed)
    for step in range(steps):
        got = sel.select(step)
        _check(isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], Selection)
               and isinstance(got[1], bool),
               f"{name}: select({step}) must return (Selection, changed: bool), got {got!r}")
        selection, changed = got
        _check(set(selection.layers) >= set(MODELS),
               f"{name}: step {step}: a Selection must give layers for {', '.join(MODELS)}, got {selection!r}")
        _check(isinstance(selection.keep_state, bool), f"{name}: step {step}: keep_state must be a bool")
        for m in MODELS:
            layers = selection.layers[m]
            _check(isinstance(layers, frozenset) and all(isinstance(i, int) and 0 <= i < num_layers for i in layers),
                   f"{name}: step {step}: layers of {m} must be a frozenset of indices in range({num_layers}), "
                   f"got {layers!r}")
        if step == 0:
            _check(changed, f"{name}: select(0) must report a switch (changed=True): the backend applies it")
        elif not changed:
            _check(selection == answers[-1][0], f"{name}: step {step} is no switch (changed=False) but the set in "
                                                f"force differs from step {step - 1}'s")
        answers.append(got)
    other = cls(opts, num_layers, seed)
    backwards = [other.select(s) for s in reversed(range(steps))][::-1]
    _check(backwards == answers, f"{name}: select(step) must be a pure function of the step: another instance "
                                 f"with the same seed, asked from the last step down, answered differently")


# --------------------------------------------------------------------------- backend and solver


def _request(plugin: str, sets, out: str, steps: int = 2):
    from .runner import RunRequest

    return RunRequest(model="tiny", plugins=(plugin,), sets=TINY + tuple(sets), out=out, steps=steps, seed=1234)


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _grad_norm(backend, model: str, *args) -> float:
    """The gradient norm of one ``forward_backward``, read from an optimizer step at lr 0 (which
    moves no weight)."""
    backend.forward_backward(model, *args)
    return float(backend.optimizer_step(model, 0.0, 0.0)["grad_norm"])


def check_backend(name: str, sets=()) -> None:
    """A backend, built for a tiny run: u and w start identical; ``forward_backward`` counts every
    source's samples exactly, *replaces* gradients (two calls give one call's gradient) and applies
    the coefficients inside the pass (doubling them doubles the gradient); ``evaluate`` gives the
    same statistics without gradients; optimizer steps lower the loss; and the declared attributes
    (``num_layers``, ``is_main``, ``device``, ``layout``, the collectives, ``save_model``) behave."""
    from .runner import open_run, prepare

    _role_class(name, "backend")
    with tempfile.TemporaryDirectory(prefix="scalebio-conformance-") as tmp:
        with open_run(prepare(_request(name, sets, str(Path(tmp) / "run"))), verbose=False) as (ctx, data):
            be, cfg = ctx.backend, ctx.config
            k = len(ctx.source_names)
            _check(be.num_layers == cfg.model.num_layers,
                   f"{name}: num_layers is {be.num_layers}, the model has {cfg.model.num_layers}")
            _check(isinstance(be.is_main, bool) and isinstance(be.device, torch.device),
                   f"{name}: is_main must be a bool and device a torch.device")
            _check(be.layout is None or all(hasattr(be.layout, a) for a in ("tp", "pp", "dp")),
                   f"{name}: layout must be None or have tp, pp and dp")
            _check(be.broadcast_object({"x": 1}) == {"x": 1} and be.all_gather_object(7) == [7],
                   f"{name}: broadcast_object and all_gather_object (one process) must return the object, and [object]")
            every = frozenset(range(be.num_layers))
            for m in MODELS:
                be.set_trainable(m, every, False)
            batch, val = data.next_train(cfg.run.global_batch), data.next_val(cfg.run.val_batch)
            counts = batch.source_counts(k)
            coef = torch.where(counts > 0, (1.0 / k) / counts.clamp(min=1), torch.zeros_like(counts))

            ru, rw = be.evaluate("u", batch), be.evaluate("w", batch)
            _check(isinstance(ru, PassResult), f"{name}: evaluate must return a PassResult, got {type(ru).__name__}")
            _check(torch.equal(ru.count.double(), counts), f"{name}: evaluate counts {ru.count.tolist()}, the "
                                                           f"batch has {counts.tolist()} samples per source")
            _check(torch.allclose(ru.loss_sum, rw.loss_sum, rtol=1e-6, atol=0),
                   f"{name}: u and w must start from the same weights (losses {ru.loss_sum.tolist()} and "
                   f"{rw.loss_sum.tolist()})")
            res = be.forward_backward("u", batch, coef)
            _check(isinstance(res, PassResult) and torch.equal(res.count.double(), counts),
                   f"{name}: forward_backward must return a PassResult counting every source's samples")
            _check(torch.allclose(res.loss_sum, ru.loss_sum, rtol=1e-5, atol=0),
                   f"{name}: forward_backward and evaluate disagree on the same weights: {res.loss_sum.tolist()} "
                   f"vs {ru.loss_sum.tolist()}")
            be.optimizer_step("u", 0.0, 0.0)

            once = _grad_norm(be, "u", batch, coef)
            be.forward_backward("u", batch, coef)
            twice = _grad_norm(be, "u", batch, coef)
            _check(math.isfinite(once) and once > 0, f"{name}: the gradient norm must be positive and finite, got {once}")
            _check(_close(twice, once, 1e-5), f"{name}: forward_backward must replace the gradients: two calls gave "
                                              f"norm {twice}, one call {once}")
            be.forward_backward("u", batch, coef)
            first, second = be.grad_norm("u"), be.grad_norm("u")
            stepped = float(be.optimizer_step("u", 0.0, 0.0)["grad_norm"])
            _check(_close(first, once, 1e-6) and second == first and stepped == first,
                   f"{name}: grad_norm must be the norm optimizer_step then returns, and change nothing: "
                   f"{first}, again {second}, optimizer_step {stepped}, earlier {once}")
            doubled = _grad_norm(be, "u", batch, 2 * coef)
            _check(_close(doubled, 2 * once, 1e-4), f"{name}: doubling source_coef must double the gradient (the "
                                                    f"coefficients belong inside the pass): {doubled} vs 2 x {once}")

            val_tokens = val.supervised_tokens()
            res = be.forward_backward("w", batch, coef, val, 1.0 / val_tokens)
            _check(res.val_tokens == val_tokens, f"{name}: forward_backward counted {res.val_tokens} validation "
                                                 f"tokens, the batch has {val_tokens}")
            be.optimizer_step("w", 0.0, 0.0)
            ev = be.evaluate("w", val)
            _check(ev.val_tokens == val_tokens and _close(ev.val_loss_sum, res.val_loss_sum, 1e-5),
                   f"{name}: evaluate on validation rows gave {ev.val_loss_sum} over {ev.val_tokens} tokens, "
                   f"forward_backward {res.val_loss_sum} over {res.val_tokens}")

            before = float(be.evaluate("u", batch).loss_sum.sum())
            for _ in range(5):
                be.forward_backward("u", batch, coef)
                out = be.optimizer_step("u", 1e-3, 1.0)
                _check("grad_norm" in out, f"{name}: optimizer_step must return at least grad_norm, got {out}")
            after = float(be.evaluate("u", batch).loss_sum.sum())
            _check(after < before, f"{name}: five optimizer steps on one batch must lower its loss ({before} -> {after})")
            _check(torch.allclose(be.evaluate("w", batch).loss_sum, rw.loss_sum, rtol=1e-6, atol=0),
                   f"{name}: training u must not change w")

            path = Path(tmp) / "saved-w"
            be.save_model("w", path)
            be.barrier()
            _check(path.is_dir() and any(path.iterdir()), f"{name}: save_model must write the model under {path}")


def check_solver(name: str, sets=(), steps: int = 2) -> None:
    """A solver: ``models`` names copies among u and w; each ``step`` returns JSON-serialisable
    metrics with the keys the run loop reads (:data:`scalebio.roles.SOLVER_METRICS`: a finite
    ``val_loss``, ``loss_u`` and ``loss_w`` by source name); pi stays on the simplex; and the real
    run loop completes with it."""
    from .runner import execute, open_run, prepare

    cls = _role_class(name, "solver")
    _check(len(cls.models) > 0 and set(cls.models) <= set(MODELS),
           f"{name}: models must name copies among {MODELS}, got {cls.models!r}")
    with tempfile.TemporaryDirectory(prefix="scalebio-conformance-") as tmp:
        p = prepare(_request(name, sets, str(Path(tmp) / "run"), steps))
        with open_run(p, verbose=False, models=cls.models) as (ctx, data):
            cfg = ctx.config
            for m in cls.models:
                ctx.backend.set_trainable(m, frozenset(range(ctx.backend.num_layers)), False)
            for step in range(steps):
                metrics = ctx.solver.step(step, data.next_train(cfg.run.global_batch), data.next_val(cfg.run.val_batch))
                _check(isinstance(metrics, dict), f"{name}: step must return a dict, got {type(metrics).__name__}")
                missing = sorted(set(SOLVER_METRICS) - set(metrics))
                _check(not missing, f"{name}: step {step} returned no {', '.join(missing)} (the run loop reads "
                                    f"{', '.join(SOLVER_METRICS)})")
                _check(isinstance(metrics["val_loss"], float) and math.isfinite(metrics["val_loss"]),
                       f"{name}: val_loss must be a finite float, got {metrics['val_loss']!r}")
                for key in ("loss_u", "loss_w"):
                    losses = metrics[key]
                    _check(isinstance(losses, dict) and set(losses) == set(ctx.source_names)
                           and all(v is None or isinstance(v, float) for v in losses.values()),
                           f"{name}: {key} must map every source name ({', '.join(ctx.source_names)}) to a float "
                           f"or None, got {losses!r}")
                try:
                    json.dumps(metrics)
                except (TypeError, ValueError) as exc:
                    raise ConformanceError(f"{name}: step metrics must be JSON-serialisable ({exc})") from None
                _check_simplex(ctx.weights.probs(), len(ctx.source_names), f"weights under solver {name}")
        p = prepare(_request(name, sets, str(Path(tmp) / "loop"), steps))
        result = execute(p)
        _check(result["steps"] == steps and (Path(tmp) / "loop" / "weights.json").is_file(),
               f"{name}: the run loop did not complete {steps} steps")
