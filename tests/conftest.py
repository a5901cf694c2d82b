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


@pytest.fixture(params=DEVICE_BACKENDS, ids=device_backend_id)
def device_backend(request):
    """(device, backend) pairs. CUDA cases are skipped without a GPU and run
    with one; a missing extension fails when ADAPTOK_REQUIRE_EXTENSION=1 (CI)."""
    device, backend = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device == "cpu" and backend == "triton" and not triton_interpreted():
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set on machines without a GPU)")
    if backend in ("cpu", "cuda") and _ext.error() is not None:
        message = f"extension unavailable: {_ext.error()}"
        if os.environ.get("ADAPTOK_REQUIRE_EXTENSION") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return request.param


def require(op, backend, *args):
    """Fail (not skip) if ``backend`` cannot serve ``args``: the fixture already
    skipped every case a machine legitimately cannot run."""
    reason = op.why_not(backend, *args)
    assert reason is None, f"{backend} cannot serve {op.name}: {reason}"
