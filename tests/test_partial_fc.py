"""Partial FC sampling (``sample_rate < 1``): every positive kept, uniform negatives, a sample size that
depends on sizes only, so the margin head compiles with ``fullgraph=True`` and a dynamic batch."""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import rel_err
from petal_fast.nn.margin_loss import MarginSoftmaxLoss
from petal_fast.ops.margin_loss import partial_fc_count, partial_fc_sample
from petal_fast.reference import margin_loss as ref

C, D, RATE = 24, 16, 0.5  # ⌈0.5·24⌉ = 12 classes sampled unless the batch is larger


def check_sample(labels: torch.Tensor, index: torch.Tensor, local: torch.Tensor, num_classes: int,
                 rate: float) -> None:
    k = partial_fc_count(num_classes, labels.numel(), rate)
    assert index.shape == (k,) and local.shape == labels.shape
    assert torch.equal(index, torch.unique(index)), "kept classes: sorted, no repeats"
    assert 0 <= int(index.min()) and int(index.max()) < num_classes
    assert torch.equal(index[local], labels), "every positive kept, labels mapped onto it"


@pytest.fixture(scope="module")
def compiled_sample():
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    fn = torch.compile(partial_fc_sample, fullgraph=True, dynamic=True, backend=counter)
    fn(torch.randint(0, C, (3,)), C, RATE)  # compiled once, before any example
    return (lambda labels: fn(labels, C, RATE)), counter, counter.frame_count


labels_strategy = st.integers(1, 40).flatmap(
    lambda b: st.lists(st.integers(0, C - 1), min_size=b, max_size=b)).map(torch.tensor)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(labels=labels_strategy)
@example(labels=torch.arange(C))                        # all distinct, batch (24) > sample count (12)
@example(labels=torch.full((30,), 7))                   # all equal, batch > sample count
@example(labels=torch.tensor([C - 1]))                  # one row
@example(labels=torch.arange(C).repeat(2))              # every class, batch 48 > C: all classes kept
def test_every_positive_is_sampled(labels, compiled_sample):
    """Eager and compiled (one graph for every batch size ≥ 2, labels of any pattern)."""
    compiled, counter, frames = compiled_sample
    check_sample(labels, *partial_fc_sample(labels, C, RATE), C, RATE)
    if labels.numel() > 1:  # torch.compile specialises sizes 0 and 1
        check_sample(labels, *compiled(labels), C, RATE)
        assert counter.frame_count == frames  # no recompile: the labels' values never set a shape


def test_sample_count():
    """k = min(C, max(⌈rate·C⌉, B)): the rate's share unless the batch needs more (then at most C)."""
    assert partial_fc_count(100, 8, 0.25) == 25
    assert partial_fc_count(100, 30, 0.25) == 30
    assert partial_fc_count(100, 300, 0.25) == 100
    assert partial_fc_count(10, 1, 0.01) == 1


def test_negatives_are_uniform():
    """The negatives are a uniform sample without replacement: each negative class is kept with
    probability (k − #positives)/(C − #positives)."""
    labels = torch.tensor([3, 3, 11])
    g = torch.Generator().manual_seed(1)
    draws = 4000
    counts = torch.zeros(C)
    for _ in range(draws):
        index, _ = partial_fc_sample(labels, C, RATE, g)
        counts[index] += 1
    assert counts[3] == draws and counts[11] == draws
    negatives = torch.ones(C, dtype=torch.bool)
    negatives[[3, 11]] = False
    p = (partial_fc_count(C, 3, RATE) - 2) / (C - 2)
    sd = math.sqrt(p * (1 - p) / draws)
    assert (counts[negatives] / draws - p).abs().max() < 5 * sd


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    return MarginSoftmaxLoss(D, C, loss="arcface", sample_rate=RATE)


def test_head_compiles_fullgraph_without_graph_breaks(head):
    e, y = torch.randn(6, D), torch.randint(0, C, (6,))
    ex = torch._dynamo.explain(head)(e, y)
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    assert ex.graph_count == 1


def test_compiled_head_matches_eager_and_reference(head):
    """Same RNG state → the same sample, loss and gradients compiled as eager; the loss equals the float64
    reference margin loss over the sampled classes (labels re-indexed). Batches below and above the
    sample count, one compile. AOTAutograd with eager kernels: Inductor would draw its own random numbers
    (unless ``torch._inductor.config.fallback_random``), and the capture is what is tested here."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(head, fullgraph=True, dynamic=True, backend=counter)
    frames = None
    for b in (4, 9, 30):
        e, y = torch.randn(b, D), torch.randint(0, C, (b,))
        y[0] = y[-1]  # a repeated positive
        state = torch.get_rng_state()
        index, local = partial_fc_sample(y, C, RATE)
        results = []
        for fn in (head, compiled):
            torch.set_rng_state(state)
            ee = e.clone().requires_grad_()
            head.weight.grad = None
            loss = fn(ee, y)
            loss.backward()
            results.append((loss.detach(), ee.grad, head.weight.grad))
        frames = frames or counter.frame_count
        (loss, de, dw), (closs, cde, cdw) = results
        assert rel_err(closs, loss) < 1e-5 and rel_err(cde, de) < 1e-5 and rel_err(cdw, dw) < 1e-5
        w_ref = head.weight.detach().double()[index]
        expect = ref.margin_loss(e.double(), w_ref, local, "arcface")
        assert rel_err(loss, expect) < 1e-5
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[index] = False
        assert (dw[untouched] == 0).all() and index.numel() == partial_fc_count(C, b, RATE)
    assert counter.frame_count == frames  # no recompile across batch sizes (30 > C)
