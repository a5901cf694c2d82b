"""Build adaptok: the Python package, the Triton kernels (installed as
adaptok.kernels) and the C++/CUDA extension adaptok._C.

Install with ``pip install --no-build-isolation .`` so the build uses the torch
already installed instead of fetching another one.

Environment:
  ADAPTOK_NO_EXTENSION=1   pure-Python install (ops run through Triton and torch)
  ADAPTOK_NO_CUDA=1        build the CPU kernels only
  ADAPTOK_CUDA_ARCHS       CUDA archs, default "8.0;9.0" (sm_80, sm_90)
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "adaptok", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("__version__ not found in adaptok/__init__.py")


def _arch_tokens(archs):
    """'8.0;9.0' -> '80_90': one token, safe for the shell and nvcc's -D lists."""
    return "_".join(a.replace(".", "").replace("+", "") for a in archs.replace(" ", ";").split(";") if a)


def _find_cuda_home():
    """A CUDA toolkit with nvcc and headers. torch guesses it from nvcc's
    folder, which is wrong when nvcc is a wrapper (/usr/local/bin/nvcc)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
                os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def _extension():
    if os.environ.get("ADAPTOK_NO_EXTENSION") == "1":
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
        and os.environ.get("ADAPTOK_NO_CUDA") != "1"
    )
    # OpenMP: at::parallel_for in the CPU kernels is inline code that runs
    # serially unless the extension itself is compiled with it. Linux only
    # (Apple's clang has no -fopenmp); torch's wheels bundle a libgomp.so.1
    # that the loader shares with the extension (same soname).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", *openmp]
    link = openmp
    if with_cuda:
        archs = os.environ.get("ADAPTOK_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        ext = CUDAExtension(
            "adaptok._C",
            sources + cu_sources,
            define_macros=[("ADAPTOK_WITH_CUDA", None), ("ADAPTOK_CUDA_ARCHS", _arch_tokens(archs))],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("adaptok._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    name="adaptok",
    version=_version(),
    description="Fused variable-length attention, token selection and ragged batching for adaptive-token Vision Transformers",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["adaptok", "adaptok.bench", "adaptok.kernels", "adaptok.models", "adaptok.nn", "adaptok.ops",
              "adaptok.train"],
    package_dir={"adaptok.kernels": "kernels"},
    package_data={"adaptok": ["gpu_validated.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton"],
        "vit": ["timm>=1.0"],  # adaptok.patch and adaptok-bench
        "bench": ["timm>=1.0", "tqdm", "matplotlib", "pytest-benchmark"],
        "test": ["timm>=1.0", "pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["adaptok-bench=adaptok.bench:main", "adaptok-train=adaptok.train.cli:main",
                                     "adaptok-eval=adaptok.evaluate:main"]},
)
