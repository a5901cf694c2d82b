"""Patch embedding on the path measured fastest for the batch's shape.

timm's ``PatchEmbed`` projects patches with a convolution whose stride is
its kernel. The same map is one matmul of the unfolded patches
``[B P, C_in ph pw]`` with the kernel as a ``[C, C_in ph pw]`` matrix. On
the CPU, which is faster depends on the shape and the machine (measured on
the 2-core AVX-512 BF16 machine, DeiT-S's 16x16x3 -> 384 projection, median
of 300 calls: one 224 image 0.60 ms by convolution against 0.37 ms by matmul
in bf16, 0.86 against 0.75 ms in fp32; one 112 image 0.37 against 0.17 ms
in bf16; 32 images of 224 in fp32 29.0 against 35.1 ms), so the choice is
measured per shape (:data:`PATCH_EMBED`, :mod:`adaptok.tuning`); CUDA, calls
that cannot be timed (autograd) and projections with hooks keep the
convolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tuning import Choice, bucket, compute_dtype, measurable

# timm's convolution or one matmul over unfolded patches
# (ADAPTOK_PATCH_EMBED=conv|matmul fixes it; see adaptok.tuning).
PATCH_EMBED = Choice("patch_embed", ("conv", "matmul"))


def embed_patches(module: nn.Module, images: Tensor) -> Tensor:
    """timm ``PatchEmbed`` ``module``'s projection and norm on ``images [B,
    C_in, H, W]``, H and W multiples of the patch size (not checked against
    the module's image size): patch tokens ``[B, (H / ph) (W / pw), C]`` in
    row-major patch order, by the convolution or by one matmul, whichever
    :data:`PATCH_EMBED` holds faster for the shape."""
    proj = module.proj
    if not _unfoldable(proj, images):
        return module.norm(_project("conv", proj, images))
    path = PATCH_EMBED.forced()
    if path is None:
        if not measurable(images, params=(proj.weight, proj.bias)):
            path = PATCH_EMBED.default  # untimed calls: timm's convolution, whatever was measured
        else:
            B, C_in, H, W = images.shape
            key = (compute_dtype(images), bucket(B), C_in, H, W, proj.out_channels, tuple(proj.kernel_size))
            path = PATCH_EMBED.get(key)
            if path is None:
                return module.norm(PATCH_EMBED.measure(key, lambda p: _project(p, proj, images)))
    return module.norm(_project(path, proj, images))


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or global ones) that a
    formulation bypassing its ``forward`` would skip."""
    from torch.nn.modules import module as m

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks)


def _unfoldable(proj: nn.Module, images: Tensor) -> bool:
    """Whether ``proj`` on ``images`` is a map of non-overlapping patches
    that tile the images exactly, with no hook that the matmul would skip."""
    if type(proj) is not nn.Conv2d or proj.groups != 1 or proj.padding_mode != "zeros" or images.dim() != 4:
        return False
    if has_hooks(proj):
        return False
    kh, kw = proj.kernel_size
    return (tuple(proj.stride) == (kh, kw) and tuple(proj.padding) == (0, 0) and tuple(proj.dilation) == (1, 1)
            and images.shape[-2] % kh == 0 and images.shape[-1] % kw == 0)


def _project(path: str, proj: nn.Conv2d, images: Tensor) -> Tensor:
    """``[B, C_in, H, W]`` -> ``[B, P, C]``: ``proj`` as a convolution, or
    as one matmul of the unfolded patches."""
    if path == "conv":
        return proj(images).flatten(2).transpose(1, 2)
    B, C_in, H, W = images.shape
    kh, kw = proj.kernel_size
    gh, gw = H // kh, W // kw
    patches = images.reshape(B, C_in, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C_in * kh * kw)
    return F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)
