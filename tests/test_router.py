"""moe.route against an independent loop reference and megatron-core's unfused router."""

import pytest
import torch

from moe import route
from moe.moe_layer.router import (compute_scores, max_violation, sequence_balance_loss,
                                  switch_aux_loss)


def route_loop_reference(logits_TE, *, top_k, score_fn="sigmoid", expert_bias=None,
                         n_groups=1, topk_groups=1, route_scale=1.0):
    """Token-by-token Python reference of :func:`route` (slow; for tests)."""
    T, E = logits_TE.shape
    per = E // n_groups
    weights, indices = [], []
    for t in range(T):
        s = compute_scores(logits_TE[t:t + 1], score_fn)[0].tolist()
        b = expert_bias.tolist() if expert_bias is not None else [0.0] * E
        sel = [s[i] + b[i] for i in range(E)]
        if n_groups > 1:
            gscore = []
            for g in range(n_groups):
                vals = sorted(sel[g * per:(g + 1) * per], reverse=True)
                gscore.append(sum(vals[:2]))
            order = sorted(range(n_groups), key=lambda g: (-gscore[g], g))
            keep = set(order[:topk_groups])
            sel = [sel[i] if i // per in keep else float("-inf") for i in range(E)]
        chosen = sorted(range(E), key=lambda i: (-sel[i], i))[:top_k]
        g = [s[i] for i in chosen]
        if top_k > 1:
            tot = sum(g) + 1e-20
            g = [x / tot for x in g]
        weights.append([route_scale * x for x in g])
        indices.append(chosen)
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(indices, dtype=torch.int64)

# (T, E, K, n_groups, topk_groups, score_fn, bias) -- each case names its edge
CASES = [
    (37, 8, 2, 1, 1, "sigmoid", None),          # plain top-2, T odd
    (37, 8, 1, 1, 1, "sigmoid", None),          # k=1: gates not normalised
    (37, 8, 1, 1, 1, "softmax", None),          # k=1 softmax
    (40, 12, 3, 1, 1, "softmax", None),         # E not a power of two
    (33, 16, 4, 4, 2, "sigmoid", "neg"),        # groups, K/topk_groups == 2 (V3 regime), negative bias
    (33, 16, 3, 4, 1, "sigmoid", "mixed"),      # groups, K/topk_groups == 3 (rules disagree)
    (33, 24, 6, 6, 3, "softmax", "mixed"),      # groups with softmax, E = 24
    (20, 8, 8, 1, 1, "sigmoid", "mixed"),       # k = E: every expert chosen
]


def _bias(kind, E, gen):
    if kind is None:
        return None
    if kind == "neg":
        return -1.0 - torch.rand(E, generator=gen)  # all biased scores negative
    return (torch.rand(E, generator=gen) - 0.5) * 0.5


@pytest.mark.parametrize("T,E,K,G,TG,fn,bias", CASES)
def test_route_matches_loop_reference(T, E, K, G, TG, fn, bias):
    gen = torch.Generator().manual_seed(T * E + K)
    logits = torch.randn(T, E, generator=gen) * 2
    b = _bias(bias, E, gen)
    kw = dict(top_k=K, score_fn=fn, expert_bias=b, n_groups=G, topk_groups=TG, route_scale=2.5)
    w, i = route(logits, **kw)
    wr, ir = route_loop_reference(logits, **kw)
    assert torch.equal(i, ir)
    torch.testing.assert_close(w, wr, rtol=1e-6, atol=1e-7)


def test_ties_go_to_lowest_expert_id():
    # sigmoid(30) == sigmoid(40) == 1.0 exactly in fp32: a real tie in the scores
    logits = torch.tensor([[30.0, 40.0, 30.0, -5.0, 40.0, 35.0]])
    assert torch.sigmoid(logits)[0, 0] == torch.sigmoid(logits)[0, 1] == 1.0
    _, idx = route(logits, top_k=3)
    assert idx.tolist() == [[0, 1, 2]]
    _, idx = route(torch.zeros(5, 7), top_k=4, score_fn="softmax")
    assert idx.tolist() == [[0, 1, 2, 3]] * 5


def test_masked_groups_lose_even_with_negative_biased_scores():
    # With bias -10 every biased score is negative; a 0.0 mask (the HF/vLLM bug) would make
    # the masked experts win. -inf masking keeps selection inside the chosen groups.
    gen = torch.Generator().manual_seed(0)
    T, E, G = 64, 16, 4
    logits = torch.randn(T, E, generator=gen)
    bias = torch.full((E,), -10.0)
    _, idx = route(logits, top_k=2, expert_bias=bias, n_groups=G, topk_groups=1)
    groups = idx // (E // G)
    assert (groups == groups[:, :1]).all()  # both picks from the one kept group


def test_bias_changes_selection_not_gate_values():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 8, generator=gen)
    bias = torch.zeros(8)
    bias[7] = 5.0  # forces expert 7 into every selection
    w, i = route(logits, top_k=2, expert_bias=bias)
    assert (i == 7).any(-1).all()
    s = torch.sigmoid(logits).gather(1, i)
    torch.testing.assert_close(w, s / s.sum(-1, keepdim=True))


def test_k1_keeps_router_gradient():
    logits = torch.randn(10, 4, requires_grad=True)
    w, _ = route(logits, top_k=1)
    w.sum().backward()
    assert logits.grad.abs().sum() > 0  # normalising at k=1 would make this exactly 0


def test_group_rules_differ_when_k_over_topk_groups_is_not_2():
    # Group A = experts 0-3 has top-2 sum 1.8 but top-3 sum 1.8 (third is 0);
    # group B = 4-7 has top-2 sum 1.6 and top-3 sum 2.4. Our rule (top-2) keeps A;
    # megatron's (top K/topk_groups = 3) would keep B. Documented in moe/moe_layer/router.py.
    s = torch.tensor([[0.9, 0.9, 0.0, 0.0, 0.8, 0.8, 0.8, 0.0]])
    logits = torch.logit(s.clamp(1e-6, 1 - 1e-6))
    _, idx = route(logits, top_k=3, n_groups=2, topk_groups=1)
    assert set(idx[0].tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("E,K,G,TG,with_bias", [(16, 4, 4, 2, True), (16, 4, 1, 1, True),
                                                (8, 1, 1, 1, False), (32, 8, 8, 4, True)])
def test_sigmoid_matches_megatron_core(E, K, G, TG, with_bias):
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    gen = torch.Generator().manual_seed(E + K)
    T = 48
    logits = torch.randn(T, E, generator=gen)  # continuous: no ties, so topk order is moot
    bias = (torch.rand(E, generator=gen) - 0.5) if with_bias else None
    w, i = route(logits, top_k=K, expert_bias=bias, n_groups=G, topk_groups=TG, route_scale=2.5)
    probs, rmap = moe_utils.topk_routing_with_score_function(
        logits, K, num_groups=G if G > 1 else None, group_topk=TG if G > 1 else None,
        scaling_factor=2.5, score_function="sigmoid", expert_bias=bias, fused=False)
    dense = torch.zeros(T, E).scatter_(1, i, w)
    assert torch.equal(dense > 0, rmap)
    torch.testing.assert_close(dense, probs.float(), rtol=1e-5, atol=1e-6)


def test_softmax_matches_megatron_core():
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    logits = torch.randn(40, 12, generator=torch.Generator().manual_seed(3))
    w, i = route(logits, top_k=3, score_fn="softmax")
    # megatron: top-k of logits, softmax over the chosen = softmax normalised over selected
    probs, rmap = moe_utils.topk_routing_with_score_function(logits, 3, score_function="softmax")
    dense = torch.zeros(40, 12).scatter_(1, i, w)
    assert torch.equal(dense > 0, rmap)
    torch.testing.assert_close(dense, probs.float(), rtol=1e-5, atol=1e-6)


def test_route_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k=9"):
        route(torch.randn(3, 8), top_k=9)
    with pytest.raises(ValueError, match="n_groups=3"):
        route(torch.randn(3, 8), top_k=2, n_groups=3)
    with pytest.raises(ValueError, match="2-D"):
        route(torch.randn(3), top_k=1)
    with pytest.raises(ValueError, match="expert_bias"):
        route(torch.randn(3, 8), top_k=2, expert_bias=torch.zeros(7))


def test_balance_losses_and_maxvio():
    T, E, K = 64, 8, 2
    # perfectly balanced uniform scores: switch aux = coef, sequence loss = alpha
    scores = torch.full((T, E), 0.5)
    idx = (torch.arange(T * K) % E).view(T, K)
    assert switch_aux_loss(scores, idx, 0.01).item() == pytest.approx(0.01)
    # uniform scores tie everywhere, stable top-k picks experts 0,1 for every token:
    # f = E/K for those two, P = 1/E each -> sum f P = 2 * (E/K) * (1/E) = 1 -> alpha * 1
    assert sequence_balance_loss(scores.view(2, 32, E), K, 1e-4).item() == pytest.approx(1e-4)
    assert max_violation(torch.tensor([10, 10, 10, 10])) == 0.0
    assert max_violation(torch.tensor([40, 0, 0, 0])) == pytest.approx(3.0)


def test_megatron_switch_aux_loss_agrees():
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    gen = torch.Generator().manual_seed(5)
    T, E, K = 64, 8, 2
    logits = torch.randn(T, E, generator=gen)
    probs = torch.softmax(logits, -1)
    _, idx = route(logits, top_k=K, score_fn="softmax")
    counts = torch.bincount(idx.flatten(), minlength=E)
    ours = switch_aux_loss(probs, idx, 0.01)
    ref = moe_utils.switch_load_balancing_loss_func(
        probs=probs, tokens_per_expert=counts, total_num_tokens=T, topk=K,
        num_experts=E, moe_aux_loss_coeff=0.01)
    torch.testing.assert_close(ours, ref.float())


def test_fast_stable_topk_equals_full_stable_sort():
    from moe.moe_layer.router import _stable_topk

    gen = torch.Generator().manual_seed(7)
    # small integer values: many ties inside the top-k and straddling the k-th place
    for E, k in [(8, 2), (16, 5), (64, 8), (7, 7)]:
        v = torch.randint(0, 4, (300, E), generator=gen).float()
        ref = torch.sort(v, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(_stable_topk(v, k), ref)
