"""The routed-experts ops (kernels.experts) equal their readable references."""
from __future__ import annotations

import pytest
import torch

from kernels.experts import TOPK_MIN_TOKENS, routed_experts, routed_experts_reference, segment_running_sums, segment_running_sums_reference

D_IN, I, E, R = 24, 40, 4, 3


def _case(n: int, routing: str, missing: str | None, dtype: torch.dtype, seed: int, adapters: int = 1):
    g = torch.Generator().manual_seed(seed)
    A = adapters

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    gate_up, sg, su = rnd(A, n, 2 * I), rnd(A, n, E * R), rnd(A, n, E * R)
    blocks = {"gate": rnd(A, E * R, I, scale=0.3), "up": rnd(A, E * R, I, scale=0.3), "down": rnd(A, E * R, I, scale=0.3)}
    for module in (missing or "").split("+"):
        if module:
            blocks[module] = None
    sg = sg if blocks["gate"] is not None else None  # a module without expert rows has no shrink either
    su = su if blocks["up"] is not None else None
    logits = torch.randn(A, n, E, generator=g)
    if routing == "dense":
        experts, weights = None, torch.sigmoid(logits)
    else:
        top, experts = logits.softmax(-1).topk(int(routing[-1]), -1)
        weights = top / top.sum(-1, keepdim=True)
    return gate_up, sg, su, blocks["gate"], blocks["up"], blocks["down"], experts, weights.to(dtype)


@pytest.mark.parametrize("n", [0, 1, 5, TOPK_MIN_TOKENS - 1, TOPK_MIN_TOKENS, 3 * TOPK_MIN_TOKENS + 1])
@pytest.mark.parametrize("routing", ["top2", "top1", "top4", "dense"])
@pytest.mark.parametrize("missing", [None, "gate", "up", "down", "gate+up"])
@pytest.mark.parametrize("adapters", [1, 3])
def test_routed_experts_equals_the_reference(n, routing, missing, adapters):
    if adapters > 1 and n > TOPK_MIN_TOKENS:
        pytest.skip("the reference's loop is slow; groups of adapters are a decode-sized layout")
    gate_up, sg, su, gb, ub, da, experts, weights = _case(n, routing, missing, torch.float32, n * 7 + len(routing), adapters)
    ref, fast = torch.full((adapters, n, I), float("nan")), torch.full((adapters, n, I), float("nan"))  # rows must be overwritten
    z_ref = routed_experts_reference(ref, gate_up, sg, su, gb, ub, da, experts, weights, E)
    z = routed_experts(fast, gate_up, sg, su, gb, ub, da, experts, weights, E)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    if "down" in (missing or ""):
        assert z is None and z_ref is None
    else:
        torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)


def test_routed_experts_in_bfloat16_tracks_the_float32_reference():
    gate_up, sg, su, gb, ub, da, experts, weights = _case(2 * TOPK_MIN_TOKENS, "top2", None, torch.bfloat16, 3)
    ref, fast = torch.empty(1, 2 * TOPK_MIN_TOKENS, I, dtype=torch.bfloat16), torch.empty(1, 2 * TOPK_MIN_TOKENS, I, dtype=torch.bfloat16)
    z_ref = routed_experts_reference(ref, gate_up, sg, su, gb, ub, da, experts, weights, E)
    z = routed_experts(fast, gate_up, sg, su, gb, ub, da, experts, weights, E)
    torch.testing.assert_close(fast.float(), ref.float(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(z.float(), z_ref.float(), atol=0.1, rtol=0.05)


def test_routed_experts_refuses_shapes_that_do_not_fit():
    gate_up, sg, su, gb, ub, da, experts, weights = _case(4, "top2", None, torch.float32, 0)
    with pytest.raises(ValueError):
        routed_experts(torch.empty(1, 4, I), gate_up, sg, su, gb[:, :-1], ub, da, experts, weights, E)
    with pytest.raises(ValueError):
        routed_experts(torch.empty(1, 4, I), gate_up, sg, su, gb, ub, da, experts, weights[..., :1], E)
    with pytest.raises(ValueError):  # a shrink without its row block
        routed_experts(torch.empty(1, 4, I), gate_up, sg, su, None, ub, da, experts, weights, E)
    with pytest.raises(ValueError):  # one adapter's rows for two adapters' tokens
        routed_experts(torch.empty(2, 4, I), gate_up.expand(2, 4, 2 * I), sg.expand(2, 4, E * R), su.expand(2, 4, E * R), gb, ub, da, None, weights.expand(2, 4, 2), E)


@pytest.mark.parametrize("lengths", [[1], [5], [1, 1, 1], [3, 1, 7, 1], [200, 2]])
def test_segment_running_sums_equal_the_reference(lengths):
    g = torch.Generator().manual_seed(len(lengths))
    n, d = sum(lengths), 6
    x = torch.randn(n, d, generator=g) * 10
    seg = torch.tensor([i for i, k in enumerate(lengths) for _ in range(k)])
    first = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))])
    base = torch.randn(len(lengths), d, generator=g, dtype=torch.float64) * 100
    ref = segment_running_sums_reference(x, seg, first, base)
    fast = segment_running_sums(x, seg, first, base)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, ref, atol=1e-9, rtol=0)


def test_segment_running_sums_do_not_depend_on_other_segments_or_chunking():
    """A sequence's sums are the same whatever precedes it in the batch and however its tokens were split."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g)
    alone = segment_running_sums(x, torch.zeros(40, dtype=torch.long), torch.tensor([0]), torch.zeros(1, 8, dtype=torch.float64))
    other = torch.randn(300, 8, generator=g) * 1e3
    both = segment_running_sums(torch.cat([other, x]), torch.tensor([0] * 300 + [1] * 40), torch.tensor([0, 300]), torch.zeros(2, 8, dtype=torch.float64))
    assert torch.equal(both[300:], alone)
    head = segment_running_sums(x[:13], torch.zeros(13, dtype=torch.long), torch.tensor([0]), torch.zeros(1, 8, dtype=torch.float64))
    tail = segment_running_sums(x[13:], torch.zeros(27, dtype=torch.long), torch.tensor([0]), head[-1:])
    assert torch.equal(torch.cat([head, tail]), alone)


def test_a_non_finite_input_stays_in_its_own_segment():
    """Segments are separate sequences, often of other tenants: an inf or NaN in one (a request whose
    numbers blew up, failing alone) must leave every other segment's sums as they are."""
    g = torch.Generator().manual_seed(2)
    lengths = [3, 4, 1, 5]
    n, d = sum(lengths), 6
    x = torch.randn(n, d, generator=g)
    seg = torch.tensor([i for i, k in enumerate(lengths) for _ in range(k)])
    first = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))])
    base = torch.randn(len(lengths), d, generator=g, dtype=torch.float64)
    clean = segment_running_sums(x, seg, first, base)
    x[4, 2], x[5, 0], x[7, 1] = float("inf"), float("nan"), float("-inf")  # rows of segments 1 and 2
    fast, ref = segment_running_sums(x, seg, first, base), segment_running_sums_reference(x, seg, first, base)
    torch.testing.assert_close(fast, ref, atol=1e-9, rtol=0, equal_nan=True)
    for s in (0, 3):  # the other segments: exactly as without the bad inputs
        rows = seg == s
        assert torch.equal(fast[rows], clean[rows])
    # in the bad segments, an element is NaN from its non-finite input on, and only there
    assert not fast[3].isnan().any() and not fast[4, 0].isnan()
    assert fast[4:7, 2].isnan().all() and fast[5:7, 0].isnan().all() and fast[7, 1].isnan()
    assert fast[4:7].isnan().sum() == 3 + 2 and fast[7].isnan().sum() == 1
