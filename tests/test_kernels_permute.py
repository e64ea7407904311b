"""kernels.permute / unpermute against permute_ref / unpermute_ref: forward and every
gradient, plus the identity invariant. Each case is commented with its edge case.
On CPU the kernels run under the Triton interpreter at small shapes; gpu-marked tests
repeat them at a real shape.
"""

import pytest
import torch

import kernels
from kernel_tolerances import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _routing(T, K, E, gen, skew=None):
    """(T, K) distinct expert ids per token; skew: 'one' (every token's first choice is
    expert 0), 'empty' (the last expert gets no token), 'zipf' (popular low ids)."""
    if skew == "empty":
        return torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])
    if skew == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float)
        return torch.multinomial(p.expand(T, E), K, replacement=False, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if skew == "one":
        if K == 1:
            idx[:] = 0
        else:  # put expert 0 first, keep the ids distinct
            idx = torch.stack([torch.cat([torch.tensor([0]), 1 + torch.randperm(E - 1, generator=gen)[:K - 1]])
                               for _ in range(T)])
    return idx


PERM_CASES = [
    # (T, K, E, D, skew, pad_to)
    (29, 2, 6, 20, None, 1),     # T, D not multiples of the blocks; E = 6 not a power of two
    (16, 1, 4, 32, "one", 1),    # k = 1, all tokens to one expert (3 experts get zero tokens)
    (33, 3, 8, 24, "empty", 1),  # an expert with zero tokens
    (50, 8, 64, 16, "zipf", 1),  # 400 slots over several slot blocks (128 at E=64): block prefix sums
    (20, 8, 256, 16, None, 1),   # E = 256: 5 slot blocks of 32
    (29, 2, 6, 20, None, 8),     # pad_to = 8: zero padding rows inside and after the segments
    (40, 4, 12, 13, "empty", 4), # pad_to with an empty expert (padded size stays 0); D = 13
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,E,D,skew,pad_to", PERM_CASES)
def test_permute_unpermute_forward_and_grads(T, K, E, D, skew, pad_to, dtype):
    gen = torch.Generator().manual_seed(T + E)
    idx = _routing(T, K, E, gen, skew).to(DEV)
    x = torch.randn(T, D, generator=gen).to(DEV, dtype).requires_grad_(True)
    xm, rm, offs = kernels.permute(x, idx, E, pad_to=pad_to)
    xr, rr, ofr = kernels.permute_ref(x, idx, E, pad_to=pad_to)
    # an exact copy: bit-equal rows, maps and offsets
    assert torch.equal(xm, xr) and torch.equal(rm, rr) and torch.equal(offs, ofr)
    assert offs.dtype == torch.int32 and rm.dtype == torch.int64
    seg = torch.diff(offs, prepend=offs.new_zeros(1))
    assert bool((seg % pad_to == 0).all())
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    assert torch.equal((seg.long() + 0), (counts + pad_to - 1) // pad_to * pad_to)
    # permute backward
    gx = torch.randn(xm.shape, generator=gen).to(DEV, dtype)
    assert_close(torch.autograd.grad(xm, x, gx)[0], torch.autograd.grad(xr, x, gx)[0], dtype)
    # unpermute forward and both gradients (y, weights)
    y = torch.randn(xm.shape, generator=gen).to(DEV, dtype).requires_grad_(True)
    w = torch.rand(T, K, generator=gen).to(DEV).requires_grad_(True)
    out = kernels.unpermute(y, rm, w, T)
    ref = kernels.unpermute_ref(y, rr, w, T)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    g = torch.randn(out.shape, generator=gen).to(DEV, dtype)
    dy, dw = torch.autograd.grad(out, (y, w), g)
    dyr, dwr = torch.autograd.grad(ref, (y, w), g)
    assert_close(dy, dyr, dtype)
    assert_close(dw, dwr, dtype)
    if pad_to > 1:  # padding rows get exactly zero gradient
        used = torch.zeros(y.shape[0], dtype=torch.bool, device=DEV)
        used[rm.reshape(-1)] = True
        assert bool((dy[~used] == 0).all())


def test_permute_is_stable_within_an_expert():
    # rows of one expert follow slot order t*K+k (deterministic, independent of threads)
    idx = torch.tensor([[2, 0], [0, 2], [2, 1], [0, 1]], device=DEV)
    x = torch.arange(4.0, device=DEV)[:, None].expand(4, 16).contiguous()
    xm, rm, offs = kernels.permute(x, idx, 3)
    assert offs.tolist() == [3, 5, 8]
    assert xm[:, 0].tolist() == [0, 1, 3, 2, 3, 0, 1, 2]
    assert rm.tolist() == [[5, 0], [1, 6], [7, 3], [2, 4]]


def test_permute_then_unpermute_is_identity():
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 5, (21, 1), generator=gen).to(DEV)  # k = 1, weights 1
    x = torch.randn(21, 13, generator=gen).to(DEV)
    for pad_to in (1, 4):
        xm, rm, _ = kernels.permute(x, idx, 5, pad_to=pad_to)
        assert torch.equal(kernels.unpermute(xm, rm, torch.ones(21, 1, device=DEV), 21), x)


def test_permute_accepts_int32_indices_and_non_contiguous_x():
    gen = torch.Generator().manual_seed(3)
    idx = _routing(17, 2, 5, gen).to(DEV)
    xt = torch.randn(24, 17, generator=gen).to(DEV).t()  # (17, 24) transposed view
    a = kernels.permute(xt, idx.to(torch.int32), 5)
    b = kernels.permute_ref(xt, idx, 5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_permute_bad_inputs_give_clear_errors():
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        kernels.permute(x, torch.tensor([[0], [1], [2], [3]], device=DEV), 3)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        kernels.permute(x, torch.tensor([[0], [-1], [2], [1]], device=DEV), 3)
    with pytest.raises(TypeError, match="dtype torch.float32"):
        kernels.permute(x, torch.zeros(4, 1, device=DEV), 3)
    with pytest.raises(ValueError, match="different numbers of tokens"):
        kernels.permute(x, torch.zeros(5, 1, dtype=torch.long, device=DEV), 3)
    with pytest.raises(ValueError, match="pad_to=0"):
        kernels.permute(x, torch.zeros(4, 1, dtype=torch.long, device=DEV), 3, pad_to=0)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        kernels.permute(x.long(), torch.zeros(4, 1, dtype=torch.long, device=DEV), 3)
    rm = torch.arange(8, device=DEV).view(4, 2)
    with pytest.raises(ValueError, match="weights_TK has shape"):
        kernels.unpermute(torch.randn(8, 3, device=DEV), rm, torch.ones(4, 3, device=DEV), 4)
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        kernels.unpermute(torch.randn(8, 3, device=DEV), rm + 1, torch.ones(4, 2, device=DEV), 4)
    with pytest.raises(ValueError, match="at least T\\*K"):
        kernels.unpermute(torch.randn(6, 3, device=DEV), rm, torch.ones(4, 2, device=DEV), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("E,K,pad_to", [(128, 8, 1), (32, 8, 128)])  # Qwen3 / DeepSeek-V3 share
def test_permute_real_shape_gpu(E, K, pad_to):
    T, D = 16384, 2048
    gen = torch.Generator().manual_seed(0)
    idx = torch.rand(T, E, generator=gen).argsort(-1)[:, :K].cuda()
    x = torch.randn(T, D, generator=gen).cuda().bfloat16().requires_grad_(True)
    a, b = kernels.permute(x, idx, E, pad_to=pad_to), kernels.permute_ref(x, idx, E, pad_to=pad_to)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    w = torch.rand(T, K, device="cuda", requires_grad=True)
    out, ref = kernels.unpermute(a[0], a[1], w, T), kernels.unpermute_ref(b[0], b[1], w, T)
    assert_close(out, ref, torch.bfloat16)
    g = torch.randn_like(out)
    for u, v in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        assert_close(u, v, torch.bfloat16)
