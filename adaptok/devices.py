"""Facts about this machine and this build, for the command-line tools and
the benchmarks' provenance: the default device, its name, native bf16 on
the CPU, package versions and the extension's build status."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import _ext


def default_device() -> torch.device:
    """The GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 units
    (Ampere or newer), or a CPU with AVX-512 BF16 or AMX. Elsewhere bf16 is
    emulated, and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_bf16()


def package_version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def extension_status() -> str:
    """Whether ``adaptok._C`` loaded, with which kernels, or why not."""
    err = _ext.error()
    if err is not None:
        return err
    info = _ext.build_info()
    kinds = "CPU + CUDA kernels (archs " + info["cuda_archs"].replace("_", ", ") + ")" if info["cuda"] else "CPU kernels only"
    return f"loaded: {kinds}, built against torch {info['torch']}"
