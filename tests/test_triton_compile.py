"""Every Triton kernel compiles to GPU code (sm_80 and sm_90) with the launch
configurations the host code uses, also on a machine without a GPU.

The interpreter runs kernels as NumPy and so misses what only the compiler
checks (types in control flow, dot shapes, constexpr use, register and
shared-memory limits). Compiling needs no device: Triton ships ptxas. The
check runs in a subprocess because the test process may have
``TRITON_INTERPRET=1`` set, which replaces kernels with interpreted ones.
"""
import os
import subprocess
import sys

# Most shared memory one block may use (bytes): A100 and H100.
SHARED_MEMORY = {80: 166912, 90: 232448}


def _signature(fn, pointers, floats, constexprs):
    return {name: pointers.get(name, "fp32" if name in floats else "i32")
            for name in fn.arg_names if name not in constexprs}


def _configs():
    """(name, kernel, signature, constexprs, archs): every kernel with the
    configurations the host code launches. All on sm_90, the bf16 ones also
    on sm_80; a sample of head dims (powers of two and one that is not) and
    of the optional outputs, to keep the check near a minute."""
    import torch

    from adaptok.kernels import pack_patches as pp
    from adaptok.kernels import ragged
    from adaptok.kernels import segment_layer_norm as sln
    from adaptok.kernels import topk_select as ts
    from adaptok.kernels import varlen_attention as va

    for kernel in (ragged.pack_kernel, ragged.unpack_kernel, ragged.cls_tokens_kernel, ragged.select_sequences_kernel):
        pointers = {"x": "*fp32", "values": "*fp32", "out": "*fp32", "cu_seqlens": "*i32", "cu_seqlens_out": "*i32",
                    "seq_idx": "*i64"}
        constexprs = {"BLOCK_R": 16, "BLOCK_W": 256}
        yield f"ragged.{kernel.fn.__name__}", kernel, _signature(kernel, pointers, {"pad_value"}, constexprs), constexprs, (90,)

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    for dtype, t in names.items():
        archs = (80, 90) if dtype == torch.bfloat16 else (90,)
        pointers = {**{n: f"*{t}" for n in ("q", "k", "v", "out", "dout", "dq", "dk", "dv")},
                    **{n: "*fp32" for n in ("lse", "cls", "dlse", "dcls", "delta")}, "cu_seqlens": "*i32"}
        precision = va._precision(dtype)
        for head_dim, max_seqlen, cls in ((32, 16, False), (64, 197, True), (80, 197, True), (128, 197, False)):
            block_m, block_n, _ = va.fwd_config(head_dim, max_seqlen)
            constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": va._block_d(head_dim),
                          "STORE_CLS": cls, "PRECISION": precision}
            yield (f"varlen_attention._fwd_kernel {t} D={head_dim} N={max_seqlen} cls={cls}", va._fwd_kernel,
                   _signature(va._fwd_kernel, pointers, {"qk_scale"}, constexprs), constexprs, archs)
        for head_dim, dcls in ((64, True), (128, False)):
            block, _ = va.bwd_config(head_dim)
            constexprs = {"BLOCK": block, "BLOCK_D": va._block_d(head_dim), "HAS_DLSE": True, "HAS_DCLS": dcls}
            yield (f"varlen_attention._bwd_preprocess_kernel {t} D={head_dim} dcls={dcls}", va._bwd_preprocess_kernel,
                   _signature(va._bwd_preprocess_kernel, pointers, set(), constexprs), constexprs, archs)
            constexprs = {"BLOCK": block, "BLOCK_D": va._block_d(head_dim), "HAS_DCLS": dcls, "PRECISION": precision}
            yield (f"varlen_attention._bwd_kernel {t} D={head_dim} dcls={dcls}", va._bwd_kernel,
                   _signature(va._bwd_kernel, pointers, {"qk_scale", "scale"}, constexprs), constexprs, archs)

    for dtype, t in names.items():
        archs = (80, 90) if dtype == torch.bfloat16 else (90,)
        pointers = {"x": f"*{t}", "out": f"*{t}", "kept_index": "*i64", "cls_attn": "*fp32", "cu_seqlens": "*i32",
                    "cu_seqlens_out": "*i32", "keep": "*i32"}
        for channels, max_seqlen, fuse, renormalize in ((384, 197, True, False), (768, 197, True, True),
                                                        (192, 50, False, False), (1024, 4096, True, True)):
            block_i, block_j, block_c, _ = ts.config(channels, max_seqlen)
            constexprs = {"BLOCK_I": block_i, "BLOCK_J": block_j, "BLOCK_C": block_c, "FUSE": fuse,
                          "RENORMALIZE": renormalize}
            yield (f"topk_select._fwd_kernel {t} C={channels} N={max_seqlen} fuse={fuse} renormalize={renormalize}",
                   ts._fwd_kernel, _signature(ts._fwd_kernel, pointers, set(), constexprs), constexprs, archs)

    for dtype, t in names.items():
        archs = (80, 90) if dtype == torch.bfloat16 else (90,)
        pointers = {**{n: f"*{t}" for n in ("x", "residual", "weight", "bias", "y", "h_out")},
                    "mean": "*fp32", "rstd": "*fp32", "cu_seqlens": "*i32", "group": "*i32"}
        for channels, residual, weight, bias in ((192, False, False, False), (384, True, True, True),
                                                 (768, True, True, False), (768, False, True, True),
                                                 (384, False, False, True), (8192, True, True, True)):
            block_t, block_c, _ = sln.config(channels)
            constexprs = {"BLOCK_T": block_t, "BLOCK_C": block_c, "SINGLE_TILE": block_c >= channels,
                          "HAS_RESIDUAL": residual, "HAS_WEIGHT": weight, "HAS_BIAS": bias}
            yield (f"segment_layer_norm._fwd_kernel {t} C={channels} residual={residual} weight={weight} bias={bias}",
                   sln._fwd_kernel, _signature(sln._fwd_kernel, pointers, {"eps"}, constexprs), constexprs, archs)

    for dtype, t in names.items():
        archs = (80, 90) if dtype == torch.bfloat16 else (90,)
        pointers = {n: f"*{t}" for n in ("patches", "pos", "prefix", "out")}
        # stride_p = 1 as for a convolution's output: Triton specializes it,
        # and the kernel is then compiled with a transposed load.
        for channels, pos, prefix, stride_p in ((384, True, True, 1), (384, False, False, 384), (3, True, False, 1)):
            block_r, block_c, _ = pp.config(channels)
            constexprs = {"BLOCK_R": block_r, "BLOCK_C": block_c, "HAS_POS": pos, "HAS_PREFIX": prefix}
            if stride_p == 1:
                constexprs["stride_p"] = 1
            yield (f"pack_patches._pack_kernel {t} C={channels} pos={pos} prefix={prefix} stride_p={stride_p}",
                   pp._pack_kernel, _signature(pp._pack_kernel, pointers, set(), constexprs), constexprs, archs)


def _compile(index: int) -> list[str]:
    """Compile configuration ``index`` for its archs; the failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, kernel, signature, constexprs, archs = list(_configs())[index]
    failures = []
    for arch in archs:
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))
            if compiled.metadata.shared > SHARED_MEMORY[arch]:
                failures.append(f"FAILED sm_{arch} {name}: needs {compiled.metadata.shared} bytes of shared memory, "
                                f"more than the {SHARED_MEMORY[arch]} a block can have")
        except Exception as e:  # noqa: BLE001 - report every failing configuration
            failures.append(f"FAILED sm_{arch} {name}: {type(e).__name__}: {str(e)[-2000:]}")
    return failures


def compile_all() -> int:
    """Compile every configuration on all cores; print failures; return their number."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        failures = [f for fs in pool.map(_compile, range(len(list(_configs())))) for f in fs]
    print("\n".join(failures))
    return len(failures)


def test_triton_kernels_compile_for_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(1 if compile_all() else 0)
