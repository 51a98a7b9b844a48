"""Layer-selection plugin ``full``: every decoder layer trains at every step (no LISA)."""
from __future__ import annotations

from scalebio import hookimpl
from scalebio.roles import MODELS, LayerSelection, Selection


class Full(LayerSelection):
    def select(self, step: int):
        every = frozenset(range(self.num_layers))
        return Selection({m: every for m in MODELS}, keep_state=True), step == 0


@hookimpl
def scalebio_layer_selection():
    return Full
