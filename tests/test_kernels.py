"""Triton kernels against their torch references: forward and every gradient.

On CPU these run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), at
small shapes; the gpu-marked tests repeat them at real expert shapes on CUDA.
Each shape is commented with the edge case it covers.
"""

import pytest
import torch

import kernels
from kernel_tolerances import TOL
from moe import MoEConfig
from moe.moe_layer import MoEFeedForward
from moe.router import route as moe_route

DEV = "cuda" if torch.cuda.is_available() else "cpu"

ROUTE_CASES = [
    # (T, E, K, n_groups, topk_groups, score_fn, bias)
    (37, 8, 2, 1, 1, "sigmoid", None),      # T not a multiple of the token block
    (37, 8, 1, 1, 1, "sigmoid", "mixed"),   # k = 1: gates not normalised
    (40, 12, 3, 1, 1, "softmax", "mixed"),  # E not a power of two, softmax
    (33, 16, 4, 4, 2, "sigmoid", "neg"),    # groups, K/topk_groups == 2, all biased scores < 0
    (33, 16, 3, 4, 1, "sigmoid", "mixed"),  # groups, K/topk_groups == 3
    (25, 24, 6, 6, 3, "softmax", "mixed"),  # groups with softmax, E = 24
    (9, 6, 6, 3, 3, "sigmoid", None),       # k = E: every expert chosen, group size 2
]


def _bias(kind, E, gen):
    if kind is None:
        return None
    if kind == "neg":
        return -1.0 - torch.rand(E, generator=gen)
    return (torch.rand(E, generator=gen) - 0.5) * 0.5


@pytest.mark.parametrize("T,E,K,G,TG,fn,bias", ROUTE_CASES)
def test_route_matches_reference_and_model_router(T, E, K, G, TG, fn, bias):
    gen = torch.Generator().manual_seed(T + E + K)
    logits = (torch.randn(T, E, generator=gen) * 2).to(DEV).requires_grad_(True)
    b = _bias(bias, E, gen)
    b = b.to(DEV) if b is not None else None
    kw = dict(top_k=K, score_fn=fn, expert_bias=b, n_groups=G, topk_groups=TG, route_scale=2.5)
    w, i, c = kernels.route(logits, **kw)
    wr, ir, cr = kernels.route_ref(logits, **kw)
    wm, im = moe_route(logits, **kw)
    assert torch.equal(i, ir) and torch.equal(i, im) and torch.equal(c, cr)
    torch.testing.assert_close(w, wr, **TOL[torch.float32])
    g = torch.randn_like(w)
    (gl,) = torch.autograd.grad(w, logits, g)
    (glr,) = torch.autograd.grad(wr, logits, g)
    torch.testing.assert_close(gl, glr, **TOL[torch.float32])


def test_route_ties_lowest_id():
    # sigmoid(30) == sigmoid(40) == 1.0 in fp32: real ties
    logits = torch.tensor([[30.0, 40.0, 30.0, -5.0, 40.0, 35.0]], device=DEV)
    assert kernels.route(logits, top_k=3)[1].tolist() == [[0, 1, 2]]
    assert kernels.route(torch.zeros(5, 7, device=DEV), top_k=4, score_fn="softmax")[1].tolist() == [[0, 1, 2, 3]] * 5


def _routing(T, K, E, gen, skew=None):
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if skew == "one":      # every token's first choice is expert 0
        idx[:, 0] = 0
        idx[:, 1:] = torch.where(idx[:, 1:] == 0, 1, idx[:, 1:]) if K > 1 else idx[:, 1:]
    if skew == "empty":    # the last expert receives zero tokens
        idx = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])
    return idx


PERM_CASES = [
    (29, 2, 6, 20, None),     # T, D not multiples of the blocks; E not a power of two
    (16, 1, 4, 32, "one"),    # k = 1, all tokens to one expert
    (33, 3, 8, 24, "empty"),  # an expert with zero tokens
]


@pytest.mark.parametrize("T,K,E,D,skew", PERM_CASES)
def test_permute_unpermute_forward_and_grads(T, K, E, D, skew):
    gen = torch.Generator().manual_seed(T)
    idx = _routing(T, K, E, gen, skew).to(DEV)
    x = torch.randn(T, D, generator=gen).to(DEV).requires_grad_(True)
    xm, rm, offs = kernels.permute(x, idx, E)
    xr, rr, ofr = kernels.permute_ref(x, idx, E)
    assert torch.equal(xm, xr) and torch.equal(rm, rr) and torch.equal(offs, ofr)
    y = torch.randn(T * K, D, generator=gen).to(DEV).requires_grad_(True)
    w = torch.rand(T, K, generator=gen).to(DEV).requires_grad_(True)
    out = kernels.unpermute(y, rm, w, T)
    ref = kernels.unpermute_ref(y, rr, w, T)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (y, w), g), torch.autograd.grad(ref, (y, w), g)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    gx = torch.randn_like(xm)
    (a,) = torch.autograd.grad(xm, x, gx)
    (b,) = torch.autograd.grad(xr, x, gx)
    torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_permute_then_unpermute_is_identity():
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 5, (21, 1), generator=gen).to(DEV)  # k = 1, weights 1
    x = torch.randn(21, 13, generator=gen).to(DEV)
    xm, rm, _ = kernels.permute(x, idx, 5)
    assert torch.equal(kernels.unpermute(xm, rm, torch.ones(21, 1, device=DEV), 21), x)


MLP_CASES = [
    # (M per-expert counts, D, F)
    ([7, 0, 20, 3, 1, 9], 20, 12),   # ragged segments, an empty expert, D and F not multiples of 16
    ([40, 0, 0], 16, 16),            # all rows to one expert, two empty experts
    ([70, 5], 24, 8),                # a segment longer than one row tile (BLOCK_M = 64)
]


@pytest.mark.parametrize("counts,D,Fh", MLP_CASES)
def test_grouped_mlp_forward_and_grads(counts, D, Fh):
    gen = torch.Generator().manual_seed(sum(counts))
    E, M = len(counts), sum(counts)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32).to(DEV)
    x = torch.randn(M, D, generator=gen).to(DEV).requires_grad_(True)
    w13 = (torch.randn(E, D, 2 * Fh, generator=gen) * 0.3).to(DEV).requires_grad_(True)
    w2 = (torch.randn(E, Fh, D, generator=gen) * 0.3).to(DEV).requires_grad_(True)
    y = kernels.grouped_swiglu_mlp(x, offs, w13, w2)
    yr = kernels.grouped_swiglu_mlp_ref(x, offs, w13, w2)
    torch.testing.assert_close(y, yr, **TOL[torch.float32])
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, w13, w2), g), torch.autograd.grad(yr, (x, w13, w2), g)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_moe_layer_triton_backend_equals_torch():
    torch.manual_seed(0)
    kw = dict(n_routed=6, n_shared=1, expert_ffn_dim=12, top_k=2, n_groups=3, topk_groups=2)
    a = MoEFeedForward(20, MoEConfig(kernels="torch", **kw)).to(DEV)
    b = MoEFeedForward(20, MoEConfig(kernels="triton", **kw)).to(DEV)
    for p in a.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 11, 20, device=DEV, requires_grad=True)
    xb = x.detach().clone().requires_grad_(True)
    oa, _ = a(x)
    ob, _ = b(xb)
    torch.testing.assert_close(oa, ob, **TOL[torch.float32])
    g = torch.randn_like(oa)
    oa.backward(g)
    ob.backward(g)
    torch.testing.assert_close(x.grad, xb.grad, **TOL[torch.float32])
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **TOL[torch.float32], msg=n)
    assert torch.equal(a.last_counts_E, b.last_counts_E)


def test_bad_inputs_give_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        kernels.permute(x, torch.tensor([[0], [1], [2], [3]]), 3)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        kernels.route(torch.zeros(3, 4, dtype=torch.int64), top_k=1)
    with pytest.raises(ValueError, match="n_groups=3"):
        kernels.route(torch.randn(3, 8), top_k=2, n_groups=3)
    w13, w2 = torch.randn(2, 8, 6), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="non-decreasing"):
        kernels.grouped_swiglu_mlp(x, torch.tensor([3, 2], dtype=torch.int32), w13, w2)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.grouped_swiglu_mlp(torch.randn(4, 7), torch.tensor([2, 4], dtype=torch.int32), w13, w2)
    with pytest.raises(TypeError, match="dtypes differ"):
        kernels.grouped_swiglu_mlp(x.to(torch.bfloat16), torch.tensor([2, 4], dtype=torch.int32), w13, w2)


@pytest.mark.gpu
@pytest.mark.parametrize("D,Fh,E,K", [(2048, 768, 128, 8), (2048, 1024, 64, 8)])  # Qwen3-30B-A3B, OLMoE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_mlp_real_shapes_gpu(D, Fh, E, K, dtype):
    T = 4096
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, E, (T, K), generator=gen).cuda()
    x = (torch.randn(T, D, generator=gen) * 0.5).cuda().to(dtype)
    xm, rm, offs = kernels.permute(x, idx, E)
    w13 = (torch.randn(E, D, 2 * Fh, generator=gen) * 0.02).cuda().to(dtype)
    w2 = (torch.randn(E, Fh, D, generator=gen) * 0.02).cuda().to(dtype)
    y = kernels.grouped_swiglu_mlp(xm, offs, w13, w2)
    yr = kernels.grouped_swiglu_mlp_ref(xm.float(), offs, w13.float(), w2.float())
    torch.testing.assert_close(y.float(), yr, **TOL[dtype])


@pytest.mark.gpu
def test_route_real_shape_gpu():
    logits = torch.randn(32768, 256, device="cuda")
    bias = (torch.rand(256, device="cuda") - 0.5) * 0.1
    kw = dict(top_k=8, expert_bias=bias, n_groups=8, topk_groups=4, route_scale=2.5)
    w, i, _ = kernels.route(logits, **kw)
    wr, ir, _ = kernels.route_ref(logits, **kw)
    assert (i == ir).float().mean() > 0.9999  # ulp-level sigmoid differences may flip near-ties
    torch.testing.assert_close(w[(i == ir).all(-1)], wr[(i == ir).all(-1)], **TOL[torch.float32])


def test_imports_stay_light():
    # STYLE habit 12: `import moe` / `import kernels` pull in neither triton (until a kernel
    # is used) nor deepspeed / megatron-core, so a GPU box with only torch + triton works.
    import subprocess
    import sys

    code = ("import sys, moe, kernels, moe.router; "
            "bad = [m for m in ('triton', 'deepspeed', 'megatron') if m in sys.modules]; "
            "assert not bad, bad; kernels.route; assert 'triton' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
