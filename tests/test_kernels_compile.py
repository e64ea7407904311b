"""Every Triton kernel compiles for an H100 (sm_90) without a GPU: triton.compile lowers
to PTX and runs ptxas ahead of time, which catches what the CPU interpreter cannot
(typing, layouts, unsupported constructs, register/shared-memory limits per config).
Signatures are the bf16 ones the GPU path uses; every autotune config is compiled.
Slow (tens of seconds): marked ``slow``.
"""

import os

import pytest

pytestmark = pytest.mark.slow


def _compile(jit_fn, types: dict, constexprs: dict, num_warps=4, num_stages=3):
    """Compile as the JIT does at the real shapes: every pointer 16-byte aligned and every
    integer argument a multiple of 16 carry ``tt.divisibility=16`` (the JIT's
    specialisation; it enables the vectorised, deeper-pipelined kernel that needs up to
    ~160 KB of shared memory), and integer arguments equal to 1 (unit strides) are passed
    in ``constexprs``, as the JIT turns them into constants."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(types)
    sig.update({k: "constexpr" for k in constexprs})
    missing = set(jit_fn.arg_names) - set(sig)
    assert not missing, missing
    names = jit_fn.arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items()
             if t.startswith("*") or t == "i32"}
    src = ASTSource(fn=jit_fn, signature={k: sig[k] for k in names},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


#: Spill bound for the configs the autotuner may pick: measured at most 164 bytes per
#: thread for a kept config (SwiGLU forward, 128x64, 4 warps) where the pruned ones spill
#: 520-2308 bytes (kernels/grouped_mlp.py, _MAX_LIVE_PER_THREAD).
MAX_SPILL_BYTES = 192


def _spill_bytes(kernel) -> int:
    """Spill stores per thread of a compiled kernel: ptxas -v on its PTX, with the ptxas
    triton itself uses for sm_90."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(kernel.asm["ptx"])
        r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx, "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    m = re.findall(r"(\d+) bytes spill stores", out)
    assert m, out[-2000:]
    return max(int(v) for v in m)


def _gpu_module(name):
    """Import a kernel module as on a GPU box: this file runs in a subprocess without
    TRITON_INTERPRET, so the GPU autotune lists are built and nothing leaks into the
    interpreter-mode modules of the other tests."""
    import importlib

    assert os.environ.get("TRITON_INTERPRET") != "1"
    return importlib.import_module(f"kernels.{name}")


def _run_in_subprocess(check):
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default; set to silence triton's notice
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, __file__, check], cwd=root, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def check_routing():
    R = _gpu_module("routing")
    for fn, sm, G, TG in (("sigmoid", False, 8, 4), ("softmax", True, 1, 1)):
        _compile(R._route_fwd_kernel,
                 dict(logits_ptr="*fp32", bias_ptr="*fp32", w_ptr="*fp32", idx_ptr="*i64",
                      counts_ptr="*i32", T="i32", E="i32", stride_t="i32", route_scale="fp32"),
                 dict(K=8, BLOCK_K=8, BLOCK_T=16, BLOCK_E=256, SOFTMAX=sm, HAS_BIAS=not sm,
                      N_GROUPS=G, BLOCK_G=G, TOPK_GROUPS=TG, GROUP_SIZE=256 // G, NORMALIZE=True))
        _compile(R._route_bwd_kernel,
                 dict(logits_ptr="*fp32", idx_ptr="*i64", dw_ptr="*fp32", dl_ptr="*fp32", T="i32",
                      E="i32", stride_t="i32", route_scale="fp32"),
                 dict(K=8, BLOCK_T=16, BLOCK_E=256, SOFTMAX=sm, NORMALIZE=True))


def check_permute():
    P = _gpu_module("permute")
    _compile(P._slot_hist_kernel, dict(idx_ptr="*i64", hist_ptr="*i32", S="i32", E="i32"),
             dict(BLOCK_S=32, BLOCK_E=256))
    _compile(P._slot_rank_kernel, dict(idx_ptr="*i64", base_ptr="*i32", row_map_ptr="*i64",
                                       slot_of_row_ptr="*i32", S="i32", E="i32"),
             dict(BLOCK_S=32, BLOCK_E=256))
    _compile(P._gather_rows_kernel, dict(x_ptr="*bf16", slot_of_row_ptr="*i32", out_ptr="*bf16",
                                         M="i32", D="i32"), dict(K=8, BLOCK_M=32, BLOCK_D=256))
    _compile(P._combine_kernel, dict(y_ptr="*bf16", row_map_ptr="*i64", w_ptr="*fp32",
                                     out_ptr="*bf16", T="i32", D="i32"),
             dict(K=8, HAS_W=True, BLOCK_T=16, BLOCK_D=256))
    _compile(P._combine_bwd_kernel, dict(dout_ptr="*bf16", y_ptr="*bf16", row_map_ptr="*i64",
                                         w_ptr="*fp32", dy_ptr="*bf16", dw_ptr="*fp32", S="i32",
                                         D="i32"),
             dict(K=8, NEED_DY=True, NEED_DW=True, BLOCK_S=16, BLOCK_D=256))


def check_grouped_mlp():
    G = _gpu_module("grouped_mlp")
    gemm = G._grouped_gemm_kernel
    types = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", h_ptr="*bf16", offs_ptr="*i32",
                 gidx_ptr="*i32", M="i32", N="i32", K="i32", E="i32", stride_am="i32", stride_ak="i32",
                 stride_be="i32", stride_bk="i32", stride_bn="i32")
    assert len(gemm.configs) > 1  # the GPU list, not the interpreter's single config
    # (epilogue, gather in the prologue): the forward's first GEMM may gather its rows
    # a and b contiguous: stride_ak = stride_bn = 1 become constants under the JIT
    types_jit = {k: v for k, v in types.items() if k not in ("stride_ak", "stride_bn")}
    unit = dict(stride_ak=1, stride_bn=1)
    # the SwiGLU backward keeps 3 fp32 tiles live: its 128x128 / 4-warp tile must be pruned
    assert len(G._prune_gemm_configs(gemm.configs, {}, EPILOGUE=2)) < len(gemm.configs)
    for epi, gather in ((0, False), (1, False), (2, False), (1, True)):
        for cfg in G._prune_gemm_configs(gemm.configs, {}, EPILOGUE=epi):
            k = _compile(gemm.fn, types_jit, dict(EPILOGUE=epi, IEEE=False, UPCAST=False,
                                                  BLOCK_E=128, GATHER=gather, GATHER_DIV=8,
                                                  **unit, **cfg.kwargs),
                         cfg.num_warps, cfg.num_stages)
            assert k.metadata.shared <= 227 * 1024, (epi, gather, cfg, k.metadata.shared)
            assert _spill_bytes(k) <= MAX_SPILL_BYTES, (epi, gather, cfg, _spill_bytes(k))
    # the fp32 (IEEE) variant used by fp32 tests on GPU
    _compile(gemm.fn, {k: v.replace("bf16", "fp32") for k, v in types.items()},
             dict(EPILOGUE=1, IEEE=True, UPCAST=False, GATHER=False, GATHER_DIV=1, BLOCK_E=128,
                  BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), 4, 3)
    wgrad = G._grouped_wgrad_kernel
    for cfg in wgrad.configs:
        for gather in (False, True):
            k = _compile(wgrad.fn, dict(a_ptr="*bf16", g_ptr="*bf16", dw_ptr="*bf16",
                                        offs_ptr="*i32", gidx_ptr="*i32", KA="i32", N="i32"),
                         dict(IEEE=False, UPCAST=False, GATHER=gather, GATHER_DIV=8, **cfg.kwargs),
                         cfg.num_warps, cfg.num_stages)
            assert k.metadata.shared <= 227 * 1024, (gather, cfg)
            assert _spill_bytes(k) <= MAX_SPILL_BYTES, (gather, cfg, _spill_bytes(k))


@pytest.mark.parametrize("check", ["routing", "permute", "grouped_mlp"])
def test_kernels_compile_for_sm90(check):
    _run_in_subprocess(check)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.getcwd())
    globals()[f"check_{sys.argv[1]}"]()
