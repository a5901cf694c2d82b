"""Backend registry, forcing, the extension loader and `python -m adaptok.info`."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import adaptok
from adaptok.backends import BACKENDS, REGISTRY, BackendError

from conftest import use_device_backend


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter (imports and env vars start clean)."""
    full_env = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=full_env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def sample(device="cpu", dtype=torch.float32):
    values = torch.randn(6, 4, device=device, dtype=dtype)
    return values, torch.tensor([0, 2, 6], dtype=torch.int32, device=device)


# The backends each op is expected to have.
EXPECTED_BACKENDS = {name: set(BACKENDS) for name in (
    "pack", "unpack", "cls_tokens", "select_sequences", "varlen_attention", "varlen_attention_backward",
    "topk_select", "segment_layer_norm", "pack_patches", "fine_tokens")}


def test_every_op_has_a_reference_and_its_backends():
    assert set(REGISTRY) == set(EXPECTED_BACKENDS)
    for op in REGISTRY.values():
        assert "torch" in op.impls and set(op.impls) == EXPECTED_BACKENDS[op.name], op.name


def test_forced_backend_that_cannot_serve_lists_every_reason():
    values, cu = sample(dtype=torch.float64)
    with adaptok.backend("triton"), pytest.raises(BackendError) as info:
        adaptok.ops.cls_tokens(values, cu)
    message = str(info.value)
    assert "backend 'triton' is forced" in message and "cls_tokens" in message
    for name in BACKENDS:
        assert f"\n  {name}" in message
    assert "float64" in message  # triton's reason
    assert "runs on CUDA tensors" in message  # cuda's reason


def test_automatic_choice_follows_the_preference():
    values, cu = sample()
    op = REGISTRY["cls_tokens"]
    expected = "cpu" if adaptok._ext.error() is None else "torch"
    assert op.select(values, cu).backend == expected
    with adaptok.backend("torch"):
        assert op.select(values, cu).backend == "torch"
        with adaptok.backend(None):
            assert op.select(values, cu).backend == expected


def test_an_op_can_override_the_preference():
    """varlen_attention tries Triton before the CUDA kernel on CUDA tensors;
    other ops keep the global order."""
    from adaptok.backends import PREFERENCE

    assert REGISTRY["varlen_attention"].preference["cuda"] == ("triton", "cuda", "torch")
    assert REGISTRY["varlen_attention"].preference["cpu"] == PREFERENCE["cpu"]
    assert REGISTRY["pack"].preference == PREFERENCE


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown adaptok backend 'tpu'"):
        with adaptok.backend("tpu"):
            pass


def test_backend_from_environment():
    result = run_python("""
        import torch, adaptok
        from adaptok.backends import REGISTRY
        v = torch.randn(3, 2); cu = torch.tensor([0, 3], dtype=torch.int32)
        print(REGISTRY["cls_tokens"].select(v, cu).backend)
    """, ADAPTOK_BACKEND="torch")
    assert result.stdout.strip() == "torch"


def test_import_is_lean():
    """import adaptok and its subpackages (nn, layout, cost, models, train,
    data, evaluate, bench, devices, info) load neither triton, the extension nor timm, and
    leave CUDA uninitialized; adaptok.patch loads timm on first use."""
    result = run_python("""
        import sys, torch, adaptok
        import adaptok.bench, adaptok.cost, adaptok.devices, adaptok.info, adaptok.layout, adaptok.models
        import adaptok.models.evit, adaptok.nn, adaptok.nn.attention, adaptok.nn.prune, adaptok.train
        import adaptok.train.cli, adaptok.data, adaptok.evaluate
        print("triton" in sys.modules, "adaptok._C" in sys.modules, "timm" in sys.modules, torch.cuda.is_initialized())
        adaptok.patch
        print("timm" in sys.modules)
    """)
    assert result.stdout.split() == ["False", "False", "False", "False", "True"]


def test_broken_extension_falls_back_with_one_warning():
    """An extension that fails to load (e.g. built against another torch)
    logs one warning; every op then runs on the other backends."""
    result = run_python("""
        import importlib.abc, logging, sys
        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "adaptok._C":
                    raise ImportError("undefined symbol: _ZN3c10 (simulated)")
        sys.meta_path.insert(0, Broken())
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        import torch, adaptok
        from adaptok.backends import REGISTRY
        from adaptok.info import report
        rb = adaptok.RaggedBatch.from_list([torch.ones(2, 3), torch.zeros(1, 3)])
        assert rb.to_padded().shape == (2, 2, 3)
        assert rb.cls_tokens().tolist() == [[1.0] * 3, [0.0] * 3]
        print(REGISTRY["pack"].select(rb.to_padded(), rb.cu_seqlens, 3).backend)
        print(REGISTRY["pack"].why_not("cpu", rb.to_padded(), rb.cu_seqlens, 3))
        print("failed to load" in report(torch.device("cpu"), torch.float32))
    """)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "torch"
    assert "failed to load" in lines[1] and "simulated" in lines[1]
    assert lines[2] == "True"
    assert result.stderr.count("WARNING") == 1, result.stderr


def test_missing_extension_is_not_a_failure():
    """A pure-Python install (ADAPTOK_NO_EXTENSION=1) has no adaptok._C: no
    warning, and the cpu backend says why it is out."""
    result = run_python("""
        import importlib.abc, logging, sys
        class NotBuilt(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "adaptok._C":
                    raise ModuleNotFoundError("No module named 'adaptok._C'", name="adaptok._C")
        sys.meta_path.insert(0, NotBuilt())
        logging.basicConfig(level=logging.WARNING)
        import torch, adaptok
        from adaptok.backends import REGISTRY
        rb = adaptok.RaggedBatch.from_list([torch.ones(2, 3)])
        print(REGISTRY["cls_tokens"].select(rb.values, rb.cu_seqlens).backend)
        print(REGISTRY["cls_tokens"].why_not("cpu", rb.values, rb.cu_seqlens))
    """)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "torch" and "not built" in lines[1]
    assert "WARNING" not in result.stderr


def test_info_prints_the_table():
    result = subprocess.run([sys.executable, "-m", "adaptok.info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "extension adaptok._C:" in out and f"torch {torch.__version__}" in out
    for name in REGISTRY:
        assert name in out
    assert "* ok" in out  # an automatic choice is marked



def test_info_says_when_a_backend_runs_another_backends_code():
    result = subprocess.run([sys.executable, "-m", "adaptok.info", "--device", "cpu"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    use_device_backend(("cpu", "cpu"))  # skips, or fails in CI, without the extension
    assert "cpu     * ok: the torch reference (there is no CPU backward kernel)" in result.stdout


def test_why_not_lists_every_reason():
    """A backend refused for several reasons names all of them (the device
    and the dtype here), not only the first; the choice still falls back."""
    op = REGISTRY["pack_patches"]
    args = op.example(torch.device("cpu"), torch.float64)
    reason = op.why_not("cuda", *args)
    assert "runs on CUDA tensors, got cpu" in reason and "supports bfloat16, float16, float32, got float64" in reason
    assert reason.count("; ") >= 1
    assert not op.serves("cuda", *args)
    assert op.why_not("torch", *args) is None and op.serves("torch", *args)
    assert op.select(*args).backend == "torch"
