"""kernels.route against route_ref, the model's torch router and megatron-core.

On CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1)
at small shapes; the gpu-marked tests repeat it at DeepSeek-V3's routing shape.
Each case is commented with the edge case it covers.
"""

import pytest
import torch

import kernels
from kernel_tolerances import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"

ROUTE_CASES = [
    # (T, E, K, n_groups, topk_groups, score_fn, bias)
    (100, 8, 2, 1, 1, "sigmoid", None),      # T not a multiple of the token block (64 at E=8)
    (37, 8, 1, 1, 1, "sigmoid", "mixed"),    # k = 1: gates NOT normalised (w = scale * s)
    (37, 6, 1, 1, 1, "softmax", None),       # k = 1 softmax; E = 6 not a power of two
    (40, 12, 3, 1, 1, "softmax", "mixed"),   # E = 12 not a power of two, softmax + bias
    (33, 16, 4, 4, 2, "sigmoid", "neg"),     # groups, K/topk_groups == 2; every biased score < 0
    (33, 16, 3, 4, 1, "sigmoid", "mixed"),   # groups, K/topk_groups == 3 (rules differ from megatron)
    (25, 24, 6, 6, 3, "softmax", "mixed"),   # groups of 4 in E = 24 (not a power of two)
    (30, 8, 2, 8, 4, "sigmoid", "mixed"),    # groups of ONE expert: group score = its value
    (9, 6, 6, 3, 3, "sigmoid", None),        # k = E: every expert chosen
    (20, 256, 8, 8, 4, "sigmoid", "mixed"),  # DeepSeek-V3 routing (E=256, G=8, 4 groups, k=8)
]


def _bias(kind, E, gen):
    if kind is None:
        return None
    if kind == "neg":
        return (-1.0 - torch.rand(E, generator=gen)).to(DEV)
    return ((torch.rand(E, generator=gen) - 0.5) * 0.5).to(DEV)


def _kw(K, G, TG, fn, b):
    return dict(top_k=K, score_fn=fn, expert_bias=b, n_groups=G, topk_groups=TG, route_scale=2.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,G,TG,fn,bias", ROUTE_CASES)
def test_route_forward_and_grad_match_reference(T, E, K, G, TG, fn, bias, dtype):
    gen = torch.Generator().manual_seed(T + E + K)
    logits = (torch.randn(T, E, generator=gen) * 2).to(DEV, dtype).requires_grad_(True)
    kw = _kw(K, G, TG, fn, _bias(bias, E, gen))
    w, i, c = kernels.route(logits, **kw)
    wr, ir, cr = kernels.route_ref(logits, **kw)
    assert w.dtype == torch.float32 and i.dtype == torch.int64 and c.dtype == torch.int32
    assert torch.equal(i, ir) and torch.equal(c, cr)
    assert int(c.sum()) == T * K
    # scores are fp32 from the (rounded) logits in both: fp32 tolerance even for bf16 logits
    assert_close(w, wr, torch.float32)
    g = torch.randn(w.shape, generator=gen).to(DEV)
    (gl,) = torch.autograd.grad(w, logits, g)
    (glr,) = torch.autograd.grad(wr, logits, g)
    assert gl.dtype == dtype
    assert_close(gl, glr, dtype)


@pytest.mark.parametrize("T,E,K,G,TG,fn,bias", ROUTE_CASES)
def test_route_indices_equal_model_router(T, E, K, G, TG, fn, bias):
    from moe.moe_layer.router import route as moe_route  # the model's torch implementation

    gen = torch.Generator().manual_seed(T * E)
    logits = (torch.randn(T, E, generator=gen) * 2).to(DEV)
    kw = _kw(K, G, TG, fn, _bias(bias, E, gen))
    w, i, _ = kernels.route(logits, **kw)
    wm, im = moe_route(logits, **kw)
    assert torch.equal(i, im)
    assert_close(w, wm, torch.float32)


def test_route_ties_lowest_expert_id_wins():
    # sigmoid(30) == sigmoid(40) == 1.0 exactly in fp32: real ties among experts 0, 1, 2, 4
    logits = torch.tensor([[30.0, 40.0, 30.0, -5.0, 40.0, 35.0]], device=DEV)
    assert kernels.route(logits, top_k=3)[1].tolist() == [[0, 1, 2]]
    # equal logits under softmax: identical scores, ids ascending
    z = torch.zeros(5, 7, device=DEV)
    assert kernels.route(z, top_k=4, score_fn="softmax")[1].tolist() == [[0, 1, 2, 3]] * 5
    # equal group scores (all experts tie): the lowest group ids are kept
    assert kernels.route(torch.zeros(3, 8, device=DEV), top_k=2, n_groups=4,
                         topk_groups=2)[1].tolist() == [[0, 1]] * 3
    # ties under a negative bias: the bias shifts all selection values below 0 equally
    b = torch.full((6,), -3.0, device=DEV)
    assert kernels.route(logits, top_k=3, expert_bias=b)[1].tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("fn", ["sigmoid", "softmax"])
def test_route_ties_random_match_reference(fn):
    # many exact ties: logits from a few saturating values, plus equal logits per row
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randint(0, 3, (50, 12), generator=gen).float() * 20 - 20).to(DEV)
    logits = logits.requires_grad_(True)
    b = torch.tensor([-0.5, 0.0] * 6, device=DEV)
    for kw in (dict(top_k=4), dict(top_k=4, expert_bias=b), dict(top_k=3, n_groups=4, topk_groups=2)):
        w, i, c = kernels.route(logits, score_fn=fn, **kw)
        wr, ir, cr = kernels.route_ref(logits, score_fn=fn, **kw)
        assert torch.equal(i, ir) and torch.equal(c, cr)
        assert_close(w, wr, torch.float32)
        g = torch.randn_like(w)
        assert_close(torch.autograd.grad(w, logits, g)[0], torch.autograd.grad(wr, logits, g)[0],
                     torch.float32)


def test_group_rule_is_top2_sum_not_megatron_topk_over_groups():
    # E=8 in 2 groups, K=3, one group kept. Selection values (bias on zero logits, s = 0.5):
    # group 0 = [.9, .9, 0, 0]: top-2 sum 1.8 (ours wins), top-3 sum 1.8
    # group 1 = [.85, .85, .85, 0]: top-2 sum 1.7, top-3 sum 2.55 (megatron's K/TG rule wins)
    sel = torch.tensor([0.9, 0.9, 0.0, 0.0, 0.85, 0.85, 0.85, 0.0], device=DEV)
    _, i, _ = kernels.route(torch.zeros(1, 8, device=DEV), top_k=3, expert_bias=sel - 0.5,
                            n_groups=2, topk_groups=1)
    assert i.tolist() == [[0, 1, 2]]


MEGATRON_CASES = [
    # (T, E, K, n_groups, topk_groups, score_fn, bias): group rules agree (K / TG == 2)
    (40, 16, 4, 4, 2, "sigmoid", "mixed"),   # DeepSeek-style: sigmoid, bias, groups
    (40, 16, 4, 4, 2, "sigmoid", "neg"),     # negative biases: the -inf group mask matters
    (40, 12, 2, 1, 1, "sigmoid", None),      # no groups, E not a power of two
    (40, 12, 3, 1, 1, "softmax", None),      # softmax (megatron: pre-softmax, unnormalised)
    (40, 8, 1, 1, 1, "sigmoid", "mixed"),    # k = 1: neither normalises
]


@pytest.mark.parametrize("T,E,K,G,TG,fn,bias", MEGATRON_CASES)
def test_route_ref_matches_megatron_core(T, E, K, G, TG, fn, bias):
    mu = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    gen = torch.Generator().manual_seed(7 + E)
    logits = torch.randn(T, E, generator=gen).to(DEV)  # continuous: no ties
    b = _bias(bias, E, gen)
    w, i, _ = kernels.route_ref(logits, **_kw(K, G, TG, fn, b))
    probs_TE, map_TE = mu.topk_routing_with_score_function(
        logits, K, use_pre_softmax=True, num_groups=G if G > 1 else None,
        group_topk=TG if G > 1 else None, scaling_factor=2.5, score_function=fn,
        expert_bias=b, fused=False)
    mine_map = torch.zeros_like(map_TE).scatter_(1, i, True)
    assert torch.equal(mine_map, map_TE)  # same expert SETS (megatron's order is topk's)
    if fn == "softmax" and K > 1:  # megatron leaves pre-softmax top-k probs unnormalised
        probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True) * 2.5
    assert_close(torch.zeros_like(probs_TE).scatter_(1, i, w), probs_TE, torch.float32)
    # the kernel agrees with the reference it is tested against
    wk, ik, _ = kernels.route(logits, **_kw(K, G, TG, fn, b))
    assert torch.equal(ik, i)


def test_route_bad_inputs_give_clear_errors():
    x = torch.randn(3, 8, device=DEV)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        kernels.route(torch.zeros(3, 4, dtype=torch.int64), top_k=1)
    with pytest.raises(ValueError, match="2-D"):
        kernels.route(torch.randn(3, 4, 2), top_k=1)
    with pytest.raises(ValueError, match="n_groups=3"):
        kernels.route(x, top_k=2, n_groups=3)
    with pytest.raises(ValueError, match="top_k=9"):
        kernels.route(x, top_k=9)
    with pytest.raises(ValueError, match="top_k=5"):  # more than topk_groups * group size
        kernels.route(x, top_k=5, n_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match="score_fn"):
        kernels.route(x, top_k=2, score_fn="relu")
    with pytest.raises(ValueError, match="expert_bias has shape"):
        kernels.route(x, top_k=2, expert_bias=torch.zeros(7, device=DEV))
    with pytest.raises(ValueError, match="E=2048"):
        kernels.route(torch.randn(2, 2048), top_k=2)


def test_route_non_contiguous_logits():
    # a transposed view is copied to contiguous memory (documented), same result
    lt = torch.randn(12, 30, device=DEV).t()
    assert torch.equal(kernels.route(lt, top_k=3)[1], kernels.route_ref(lt, top_k=3)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("fn,G,TG", [("sigmoid", 8, 4), ("softmax", 1, 1)])
def test_route_real_shape_gpu(fn, G, TG):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32768, 256, generator=gen).cuda().requires_grad_(True)
    bias = ((torch.rand(256, generator=gen) - 0.5) * 0.1).cuda()
    kw = _kw(8, G, TG, fn, bias)
    w, i, c = kernels.route(logits, **kw)
    wr, ir, cr = kernels.route_ref(logits, **kw)
    # GPU exp differs from torch's by an ulp, which can flip an exact near-tie
    same = (i == ir).all(-1)
    assert same.float().mean() > 0.999
    assert_close(w[same], wr[same], torch.float32)
    assert int(c.sum()) == 32768 * 8
    g = torch.randn_like(w)
    gl, glr = (torch.autograd.grad(o, logits, g)[0] for o in (w, wr))
    assert_close(gl[same], glr[same], torch.float32)


def test_imports_stay_light():
    # `import kernels` pulls in neither triton (until a kernel is used) nor deepspeed /
    # megatron-core / moe, so a GPU box with only torch + triton runs the kernels.
    import subprocess
    import sys

    code = ("import sys, kernels; "
            "bad = [m for m in ('triton', 'deepspeed', 'megatron', 'moe') if m in sys.modules]; "
            "assert not bad, bad; kernels.moe_layer_triton; "
            "bad = [m for m in ('deepspeed', 'megatron', 'moe') if m in sys.modules]; "
            "assert not bad, bad; assert 'triton' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
