"""Backend plugin ``megatron``: megatron-core GPTModels with tensor, pipeline and data parallelism.

The hook imports the backend lazily so that listing plugins does not import megatron-core.
"""
import warnings

from scalebio import hookimpl


@hookimpl
def scalebio_backend():
    # megatron-core warns at import that it falls back to torch kernels without TE/Apex; that is
    # the intended CPU path, and the notes would bury the run's own output
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed", category=UserWarning)
    from .backend import MegatronBackend

    return MegatronBackend

