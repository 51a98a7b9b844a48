"""scalebio: ScaleBiO data reweighting for LLM fine-tuning, as a pluggy framework.

The core (this package) defines the roles and runs the loop; every algorithmic or
model-specific piece is a plugin registered under the ``scalebio`` entry-point group.
"""
import pluggy

__version__ = "0.1.0"

#: Decorate plugin functions with this to implement a hook (see scalebio.hookspecs).
hookimpl = pluggy.HookimplMarker("scalebio")

__all__ = ["__version__", "hookimpl"]
