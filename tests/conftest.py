"""Shared test setup. The same files run on a CPU-only machine (Triton under
its interpreter) and on a GPU machine (every backend, every device)."""
import os

import torch

# Triton reads this at import; on a machine without a GPU its kernels run in
# the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from adaptok import _ext  # noqa: E402
from adaptok.backends import triton_interpreted  # noqa: E402

DEVICES = ["cpu", "cuda"]
# Backends that serve each device, fastest first (the registry's preference).
DEVICE_BACKENDS = [("cpu", "cpu"), ("cpu", "torch"), ("cpu", "triton"),
                   ("cuda", "cuda"), ("cuda", "triton"), ("cuda", "torch")]


def device_backend_id(pair):
    return f"{pair[0]}-{pair[1]}"


def backend_pairs(op):
    """The (device, backend) pairs for which ``op`` has an implementation."""
    return [pair for pair in DEVICE_BACKENDS if pair[1] in op.impls]


def use_device_backend(pair):
    """Skip the (device, backend) pairs this machine cannot run: CUDA without a
    GPU, Triton on CPU tensors outside the interpreter, a missing extension
    (a failure when ADAPTOK_REQUIRE_EXTENSION=1, as in CI). Returns ``pair``."""
    device, backend = pair
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device == "cpu" and backend == "triton" and not triton_interpreted():
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set on machines without a GPU)")
    if backend in ("cpu", "cuda") and _ext.error() is not None:
        message = f"extension unavailable: {_ext.error()}"
        if os.environ.get("ADAPTOK_REQUIRE_EXTENSION") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return pair


@pytest.fixture(params=DEVICE_BACKENDS, ids=device_backend_id)
def device_backend(request):
    """Every (device, backend) pair; see :func:`use_device_backend`."""
    return use_device_backend(request.param)


def require(op, backend, *args):
    """Fail (not skip) if ``backend`` cannot serve ``args``: the fixture already
    skipped every case a machine legitimately cannot run."""
    reason = op.why_not(backend, *args)
    assert reason is None, f"{backend} cannot serve {op.name}: {reason}"
