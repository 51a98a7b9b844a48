"""Let megatron-core's local (non Transformer Engine) layer spec run on a CPU-only torch build.

megatron-core assumes CUDA in a handful of places even when no fused kernel is asked for. This
module patches exactly those, and only when ``torch.cuda.is_available()`` is false, so a GPU run
never sees it. Checked against megatron-core 0.16.1 (the version pyproject pins); the patched
names are private, so a version bump must rerun tests/test_megatron_backend.py.

What needs CUDA on CPU and why (see docs/megatron-on-cpu.md for the measurements):
- ``torch.cuda.current_device()`` is passed as ``device=`` when buffers are allocated;
- ``torch.cuda.synchronize()`` is called by the pipeline p2p code;
- the tensor-parallel RNG tracker saves and restores CUDA generator state;
- schedules, optimizer and grad clipping create tensors with a literal ``device="cuda"`` and
  check ``tensor.type() == 'torch.cuda.FloatTensor'``.
The last group is handled by a TorchFunctionMode entered once for the life of the process.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def _is_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare int means cuda:<int> to torch
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaAsCpu(TorchFunctionMode):
    """Map every CUDA device argument to the CPU and report CPU tensor types as CUDA ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _patch_rng_tracker() -> None:
    """Back megatron's CUDA RNG tracker with the CPU generator (attention enters it even at dropout 0)."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker.add = add


def install() -> bool:
    """Install the CPU patches once per process. Returns True when they are active."""
    global _installed
    if _installed:
        return True
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    _patch_rng_tracker()
    _CudaAsCpu().__enter__()  # stays entered: megatron allocates on "cuda" at any time
    _installed = True
    return True
