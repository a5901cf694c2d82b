"""``python -m adaptok.info``: versions, device, extension build status, and
which backend can serve each op (and why not).

Options: ``--device cpu|cuda`` and ``--dtype float32|float16|bfloat16`` choose
the sample inputs the table is computed for (default: the GPU if there is
one, else the CPU; float32 on the CPU, bfloat16 on a GPU).
"""
from __future__ import annotations

import argparse
import platform

import torch

import adaptok
from adaptok.backends import BACKENDS, REGISTRY, backend_unavailable, forced_backend, triton_interpreted, unvalidated
from adaptok.devices import default_device, device_name, extension_status, package_version


def triton_status() -> str:
    missing = backend_unavailable("triton")
    if missing:
        return missing
    if triton_interpreted():
        return "kernels run in the interpreter on CPU tensors (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return "kernels compiled for the GPU"
    return "runs on CUDA tensors only here (no GPU; TRITON_INTERPRET=1 runs it on the CPU)"


def report(device: torch.device, dtype: torch.dtype) -> str:
    lines = [
        f"adaptok {adaptok.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"timm {package_version('timm')}",
        f"device: {device_name(device)}",
        f"extension adaptok._C: {extension_status()}",
        f"triton {package_version('triton')}: {triton_status()}",
        f"forced backend: {forced_backend() or 'none (automatic choice)'}",
        "",
        backend_table(device, dtype),
    ]
    return "\n".join(lines)


def backend_table(device: torch.device, dtype: torch.dtype) -> str:
    """Each op's backends for sample ``device``/``dtype`` inputs: the
    automatic choice, the others that can serve them, and why not the rest."""
    lines = [f"Backends per op for {device.type} {str(dtype).replace('torch.', '')} inputs "
             "(* = automatic choice, + = can serve, - = cannot):"]
    width = max(len(name) for name in REGISTRY)
    for name, op in REGISTRY.items():
        args = op.example(device, dtype)
        reasons = op.reasons(*args)
        try:
            chosen = op.select(*args).backend
        except adaptok.BackendError:
            chosen = None
        for i, b in enumerate(BACKENDS):
            mark = "*" if b == chosen else "+" if reasons[b] is None else "-"
            note = op.impls[b].note if reasons[b] is None and op.impls[b].note else None
            if reasons[b] is None and unvalidated(name, b, device.type):
                note = "; ".join(filter(None, (note, unvalidated(name, b, device.type))))
            status = reasons[b] or (f"ok: {note}" if note else "ok")
            lines.append(f"  {name if i == 0 else '':{width}s}  {b:7s} {mark} {status}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adaptok.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(report(device, dtype))


if __name__ == "__main__":
    main()
