"""End to end: the cases of ``adaptok-bench`` under pytest-benchmark. DeiT-S
(random weights) as timm runs it, patched by adaptok (parity and EViT), EViT
as its public code computes it, and a 50/50 batch of 7x7 and 14x14 images
packed, padded and as two timm batches, and every image at a 7x7 grid against
timm at 112 pixels; each at the benchmark batch (256 in bfloat16 on a GPU, 512
mixed; 32 on the CPU, in bfloat16 where it computes bf16 natively) and at batch
size 1."""
import argparse
import functools

import pytest
import torch

from adaptok.bench.e2e import build
from adaptok.devices import cpu_has_bf16

from conftest import DEVICE, ON_GPU

DTYPE = torch.bfloat16 if ON_GPU or cpu_has_bf16() else torch.float32
ARGS = argparse.Namespace(model="deit_small_patch16_224", checkpoint=None, batch=256 if ON_GPU else 32,
                          mix_batch=512 if ON_GPU else 32, mix=0.5, keep_rate=0.7, compile=False)


@functools.lru_cache(maxsize=None)
def variants():
    return {v.name: v for v in build(ARGS, DEVICE, DTYPE)}


NAMES = ["timm", "adaptok parity", "EViT 0.7 adaptok", "EViT 0.7 public code", "mix packed adaptok", "mix padded",
         "mix 2 batches", "grid 7 adaptok", "timm at grid 7"]


@pytest.mark.parametrize("mode", ["batch", "bs1"])
@pytest.mark.parametrize("variant", NAMES)
def bench_vit(bench, benchmark, variant, mode):
    v = variants()[variant]
    images = v.images if mode == "batch" else v.single_images
    benchmark.group = f"vit {'mixed ' if variant.startswith('mix') else ''}{mode}"
    benchmark.extra_info.update(
        op="vit", provider=variant, family=v.family, images=images, model=ARGS.model, dtype=str(DTYPE).replace("torch.", ""),
        flops=2 * v.macs * images,
        # A floor on the bytes: the images, read once.
        bytes=images * 3 * 224 * 224 * torch.finfo(DTYPE).bits // 8,
    )
    with torch.inference_mode():
        bench(v.batch if mode == "batch" else v.single)
