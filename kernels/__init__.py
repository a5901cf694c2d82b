"""Triton kernels of adaptok (installed as ``adaptok.kernels``), one module
per op; each module's docstring states its layout and launch grid. Loaded
only when a Triton backend first runs (:func:`adaptok.ops.common.triton_kernels`)."""
import contextlib


def on_device(t):
    """Triton launches on the current CUDA device: make it ``t``'s."""
    import torch

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
