"""The four roles a plugin can play, and the small data types they exchange.

A role hook (see :mod:`scalebio.hookspecs`) returns one of these classes. Each class declares
its options as a dataclass in ``Options``; the run config section named after the plugin is
parsed into it (unknown keys are errors) and passed to the constructor.

This module is the whole contract: every method and attribute the core (the run loop,
evaluation, the benchmarks) calls or reads is declared here, with what it must do, and
docs/plugins.md says the same. :mod:`scalebio.testing` checks a plugin against it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

MODELS = ("u", "w")  # the two model copies of the minimax problem (SPEC §2)


class NonFiniteError(RuntimeError):
    """A loss or gradient norm became NaN or inf. A solver raises it before it changes any state
    (weights, optimizer states, the weights plugin, its own accumulators), so the run can stop
    (exit code 3) or skip the step (``run.on_nonfinite``) with nothing half-updated.
    ``step``, ``model`` and ``quantity`` say where (None where the raiser did not say)."""

    def __init__(self, message: str, step: Optional[int] = None, model: Optional[str] = None,
                 quantity: Optional[str] = None):
        super().__init__(message)
        self.step, self.model, self.quantity = step, model, quantity


def check_finite(step: int, model: str, quantities: Mapping[str, float],
                 hint: str = "lower the learning rates or check the data") -> None:
    """Raise :class:`NonFiniteError` for the first of ``quantities`` (name -> value of ``model``
    at ``step``) that is NaN or inf, naming the step, the model and the quantity."""
    for name, value in quantities.items():
        value = float(value)
        if not math.isfinite(value):
            raise NonFiniteError(f"step {step}: {name} of model {model} is {value}; {hint}",
                                 step=step, model=model, quantity=name)


@dataclass
class NoOptions:
    """Options of a plugin that takes none."""


# --------------------------------------------------------------------------- data types


@dataclass
class Batch:
    """A global batch, identical on every rank; the backend takes its own share of it.

    Row i is one sample: ``tokens[i]`` are the inputs, ``labels[i]`` the next-token targets,
    ``loss_mask[i]`` is 1 where the target is supervised, ``source[i]`` the source id
    (index into the sorted source names) or -1 for a validation row.

    Packed rows (``data.packing``) hold several samples each, and three more fields:
    ``segment[i, t]`` is the index of the sample token t belongs to within row i (-1 on padding),
    ``position_ids[i, t]`` restarts at 0 for each sample, and ``segment_source[i, j]`` is the
    source id of sample j of row i (-1 where row i has no sample j, and on validation rows).
    Attention stays inside a sample, so per-sample losses are those of unpacked rows; then
    ``source[i]`` is the source of row i's first sample (-1 for a validation row).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    source: torch.Tensor
    segment: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    segment_source: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def packed(self) -> bool:
        return self.segment is not None

    def rows(self, index) -> "Batch":
        def part(t):
            return None if t is None else t[index]

        return Batch(self.tokens[index], self.labels[index], self.loss_mask[index], self.source[index],
                     part(self.segment), part(self.position_ids), part(self.segment_source))

    def source_counts(self, num_sources: int) -> torch.Tensor:
        """Samples per source (float64, length ``num_sources``); validation rows are not counted."""
        src = self.source if self.segment_source is None else self.segment_source.reshape(-1)
        src = src[src >= 0]
        return torch.bincount(src, minlength=num_sources).to(torch.float64)

    def supervised_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


@dataclass
class PassResult:
    """Detached statistics of one pass, summed over the global batch and identical on all ranks.

    ``loss_sum[k]`` is the sum over source-k samples of the per-sample loss (token mean over
    that sample's supervised tokens), ``count[k]`` the number of such samples. Validation rows
    contribute token sums: ``val_loss_sum`` over ``val_tokens`` supervised tokens.
    """

    loss_sum: torch.Tensor
    count: torch.Tensor
    val_loss_sum: float = 0.0
    val_tokens: float = 0.0

    def mean(self) -> torch.Tensor:
        """Mean per-sample loss by source; NaN for a source absent from the batch."""
        out = torch.full_like(self.loss_sum, float("nan"))
        present = self.count > 0
        out[present] = self.loss_sum[present] / self.count[present]
        return out

    @property
    def val_loss(self) -> float:
        return self.val_loss_sum / self.val_tokens if self.val_tokens else float("nan")


@dataclass(frozen=True)
class Selection:
    """Trainable decoder layers (global indices, 0-based) per model, from a layer selection.

    ``keep_state``: whether a layer trainable both before and after this switch keeps its
    optimizer moments (``False`` resets every body layer). Embeddings, the final norm and the
    output layer are always trainable and always keep their state.
    """

    layers: Mapping[str, frozenset]
    keep_state: bool = False


@dataclass
class RunContext:
    """What a plugin can see of the run. Filled in by :mod:`scalebio.runner` as it builds."""

    config: Any  # scalebio.config.RunConfig
    source_names: list
    out_dir: Path
    hooks: Any = None  # pluggy hook relay, for observer hooks
    backend: Optional["Backend"] = None
    weights: Optional["Weights"] = None
    layers: Optional["LayerSelection"] = None
    solver: Optional["Solver"] = None
    data: Any = None  # scalebio.data.RunData: the sources, validation and test sets of the run
    resume_from: Optional[Path] = None  # the checkpoint directory a resumed run continues from
    extra: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.backend.is_main if self.backend is not None else True


# --------------------------------------------------------------------------- roles


class Role:
    """Common base: declared options and checkpointable state."""

    Options: type = NoOptions
    #: the plugin (entry-point) name that provided this class; set by the plugin manager
    plugin_name: str = ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Weights(Role):
    """Source weights pi on the simplex, and the update of their parameters."""

    #: whether ``update`` changes pi (False for weights given by the user, e.g. ``fixed``); the run's
    #: final table says "learned" only when it does
    learns: bool = True

    def __init__(self, options, source_names: list):
        self.options = options
        self.source_names = list(source_names)

    def probs(self) -> torch.Tensor:
        """Current pi: float64, length K, non-negative, sums to 1."""
        raise NotImplementedError

    def update(self, grad_pi: torch.Tensor, lr_scale: float) -> None:
        """One update from ``grad_pi`` = dF/dpi (float64, length K).

        ``lr_scale`` is the learning-rate schedule factor of this step (warmup/cosine), to be
        multiplied into the plugin's own learning rate.
        """
        raise NotImplementedError

    def output(self) -> torch.Tensor:
        """The weights the run reports at the end (``weights.json``): by default the current pi;
        a method that averages its iterates (DoReMi) returns the average."""
        return self.probs()


class LayerSelection(Role):
    """Which decoder layers of u and w train at each step."""

    def __init__(self, options, num_layers: int, seed: int):
        self.options = options
        self.num_layers = num_layers
        self.seed = seed

    def select(self, step: int) -> tuple:
        """``(selection, changed)``: the trainable set at ``step``, and whether it is a switch.

        A pure function of ``step`` (and the constructor's arguments), identical on every rank,
        so a resumed run can ask for the set at any step. ``changed`` is True at step 0 and at
        every step where the backend must apply a new set (even one equal to the last, with
        ``keep_state=False`` it still resets the body layers' optimizer moments).
        """
        raise NotImplementedError


class Backend(Role):
    """Builds and trains u and w. All parallelism lives behind this interface.

    ``state_dict()`` (of :class:`Role`) is this rank's own small state, e.g. its random number
    generators; the run gathers it from every rank into a checkpoint and gives each rank its own
    back when a run resumes at the same world size.
    """

    #: options that may differ when a run resumes (the parallel layout): any other changed
    #: setting is an error
    layout_options: tuple = ()

    def __init__(self, options, run: RunContext):
        """Cheap: parse and validate (layout against model and batch sizes). No heavy work."""
        self.options = options
        self.run = run

    #: the parallel layout, recorded in config.yaml and in ``scalebio eval``'s output: an object
    #: with ``tp``, ``pp`` and ``dp`` attributes (a dataclass), or None for a backend without one
    layout = None

    @property
    def is_main(self) -> bool:
        """True on the one rank that writes outputs."""
        return True

    @property
    def device(self) -> torch.device:
        """Where this rank's model lives (after ``setup``); its ``type`` is recorded in config.yaml
        and decides how peak memory is measured (CUDA: max allocated; otherwise peak RSS)."""
        return torch.device("cpu")

    def setup(self, models=MODELS) -> None:
        """Heavy: start the process groups, build ``models`` (u and w) with identical weights."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model (global, across pipeline stages): what the layer selection
        chooses from. Read after ``setup``."""
        raise NotImplementedError

    def set_trainable(self, model: str, layers: frozenset, keep_state: bool) -> None:
        """Make exactly ``layers`` (global decoder-layer indices) plus embeddings, final norm and
        output layer trainable in ``model``. Frozen parameters must hold no gradient buffer and
        no optimizer state."""
        raise NotImplementedError

    def forward_backward(self, model: str, train: Optional[Batch], source_coef: Optional[torch.Tensor],
                         val: Optional[Batch] = None, val_token_coef: float = 0.0) -> PassResult:
        """Set ``model``'s gradients (replacing any earlier ones) to the gradient of

            sum_i source_coef[source_i] * loss_i  +  val_token_coef * sum_{val tokens} CE

        over the global batches (loss_i: per-sample mean loss), in one pass, and return the
        detached statistics. Everything that shapes gradients happens in this call: one call per
        model per optimizer step.
        """
        raise NotImplementedError

    def evaluate(self, model: str, batch: Batch) -> PassResult:
        """Forward only, no gradients: the statistics of ``batch`` under ``model``, as
        ``forward_backward`` returns them. A batch of validation rows (``source`` all -1) gives
        ``val_loss_sum`` and ``val_tokens`` (token sums over its supervised tokens); a batch of
        training rows gives the per-source ``loss_sum`` and ``count``."""
        raise NotImplementedError

    def token_losses(self, model: str, batch: Batch) -> torch.Tensor:
        """Forward only: the cross-entropy of every target of ``batch`` under ``model``, float32
        ``[len(batch), seq_length]``, 0 where ``loss_mask`` is 0, on the CPU and identical on every
        rank (the DoReMi solver's per-token excess loss needs it)."""
        raise NotImplementedError

    def grad_norm(self, model: str) -> float:
        """The norm (over every rank, before clipping) of the gradients the last ``forward_backward``
        of ``model`` set, without changing anything: solvers check it before any optimizer step
        (NaN or inf where the gradients are non-finite). ``optimizer_step`` returns the same value."""
        raise NotImplementedError

    def optimizer_step(self, model: str, lr: float, clip_grad: float) -> dict:
        """Clip (``clip_grad`` > 0), step ``model``'s optimizer at ``lr`` and zero its gradients.
        Returns at least ``grad_norm`` (before clipping)."""
        raise NotImplementedError

    def trainable_state_bytes(self, model: str) -> dict:
        """``{"grads": ..., "optimizer": ...}``: bytes held on this rank for ``model``'s gradient
        buffers and optimizer state (``scalebio bench``)."""
        raise NotImplementedError

    def trainable_parameters(self, model: str) -> int:
        """Trainable parameters of ``model`` on this rank (``scalebio bench``)."""
        raise NotImplementedError

    def save_model(self, model: str, path: Path) -> None:
        """Write ``model``'s weights under ``path`` (a directory the caller makes atomic)."""
        raise NotImplementedError

    def save_state(self, path: Path) -> None:
        """Collective: write everything the next step of every built model depends on (weights,
        fp32 master weights, optimizer state) under ``path``, a directory the caller creates and
        makes atomic. It must load again at another parallel layout."""
        raise NotImplementedError

    def load_state(self, path: Path) -> None:
        """Collective: restore what :meth:`save_state` wrote, possibly at another layout. The
        caller has already applied the trainable sets in force at the checkpoint (set_trainable)."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""

    def broadcast_object(self, obj):
        """The main rank's ``obj`` on every rank (identity in a single process)."""
        return obj

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
        return [obj]

    def close(self) -> None:
        pass


class Solver(Role):
    """One training step (the bilevel step for ``minimax``)."""

    #: the model copies this solver trains; the backend builds only these (a plain fine-tuning
    #: solver needs just ``("w",)``)
    models: tuple = MODELS
    #: whether a run needs ``data.validation`` (the bilevel objective does); without one,
    #: ``step`` gets ``val_batch=None``
    needs_validation: bool = True
    #: the ``data.sampling`` modes this solver accepts. ``weighted`` draws rows by pi, so a solver
    #: that also weights the loss by pi (as the bilevel ones do) must not accept it
    sampling: tuple = ("uniform", "stratified")

    def __init__(self, options, run: RunContext):
        self.options = options
        self.run = run

    def step(self, step: int, batch: Batch, val_batch: Optional[Batch]) -> dict:
        """Run step ``step`` on the train batch and a fresh validation batch; return the step's
        metrics, which go into ``metrics.jsonl``: at least the keys of :data:`SOLVER_METRICS`
        (the run loop reads them), plus any others (JSON-serialisable)."""
        raise NotImplementedError


#: what the run loop reads from the dict ``Solver.step`` returns
SOLVER_METRICS = {
    "val_loss": "float: the validation loss of the step (logged, plotted)",
    "loss_u": "{source name: float or None}: mean per-sample loss of u by source, None for a source absent "
              "from the batch (the final table's loss u)",
    "loss_w": "{source name: float or None}: the same for w (the final table's loss w)",
}


ROLE_BASES = {"solver": Solver, "layer_selection": LayerSelection, "weights": Weights, "backend": Backend}


def options_dict(options) -> dict:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
