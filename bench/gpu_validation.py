"""Which (op, backend) pairs passed their GPU tests, from the JUnit XML of a
GPU test run, as ``adaptok/gpu_validated.json`` (the file automatic backend
choice on CUDA tensors reads; see :mod:`adaptok.backends`).

Usage (``bench/run_gpu.sh`` runs it)::

    pytest tests --junitxml OUT/tests.xml
    python bench/gpu_validation.py OUT/tests.xml --out OUT/gpu_validated.json

The tests of an op live in ``tests/test_<stem>.py`` where ``<stem>`` is the
module ``adaptok/ops/<stem>.py`` that registers it; a case runs on a CUDA
backend when its id holds ``cuda-<backend>`` (``conftest.DEVICE_BACKENDS``).
An (op, backend) pair is validated when its stem's file ran at least one
such case and none of them failed or errored. Skipped cases count for
neither. Copy the output over ``adaptok/gpu_validated.json`` and commit it
with the run's results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

import torch

from adaptok.backends import GPU_KERNEL_BACKENDS, REGISTRY, VALIDATION_FILE


def op_stems() -> dict[str, list[str]]:
    """``{stem: [op names]}`` for every registered op (the module that
    registered its implementations)."""
    import adaptok.ops  # noqa: F401  registers every op

    stems: dict[str, list[str]] = defaultdict(list)
    for name, op in REGISTRY.items():
        module = next(iter(op.impls.values())).fn.__module__
        stems[module.rsplit(".", 1)[-1]].append(name)
    return dict(stems)


def outcomes(xml_path: str) -> dict[tuple[str, str], dict[str, int]]:
    """``{(stem, backend): {"passed": n, "failed": n}}`` over the CUDA cases."""
    counts: dict = defaultdict(lambda: {"passed": 0, "failed": 0})
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        stem = re.search(r"test_(\w+)$", case.get("classname", "").split(".")[-1] or "")
        params = re.search(r"\[(.*)\]$", case.get("name", ""))
        if stem is None or params is None:
            continue
        for backend in GPU_KERNEL_BACKENDS:
            if re.search(rf"(^|-)cuda-{backend}(-|$)", params.group(1)):
                if case.find("skipped") is not None:
                    continue
                bad = case.find("failure") is not None or case.find("error") is not None
                counts[(stem.group(1), backend)]["failed" if bad else "passed"] += 1
    return dict(counts)


def validated(xml_path: str, gpu: str, commit: str) -> list[dict]:
    stems = op_stems()
    rows = []
    for (stem, backend), n in sorted(outcomes(xml_path).items()):
        if n["passed"] == 0 or n["failed"]:
            continue
        for op in stems.get(stem, ()):
            if backend in REGISTRY[op].impls:
                rows.append({"op": op, "backend": backend, "gpu": gpu, "commit": commit, "tests_passed": n["passed"]})
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("junit_xml")
    parser.add_argument("--out", default=None, help=f"where to write (default: stdout; the registry reads {VALIDATION_FILE})")
    parser.add_argument("--gpu", default=None, help="the GPU's name (default: torch.cuda.get_device_name())")
    args = parser.parse_args(argv)
    gpu = args.gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else "unknown GPU")
    with open(VALIDATION_FILE) as f:
        about = json.load(f)["about"]
    data = {"about": about, "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "validated": validated(args.junit_xml, gpu, _commit())}
    text = json.dumps(data, indent=1) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
