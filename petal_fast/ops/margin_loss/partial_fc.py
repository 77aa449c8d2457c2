"""Partial FC sampling (as insightface's PartialFC_V2, with a size from shapes only): which classes a
margin-loss call keeps, k = min(C, max(⌈sample_rate·C⌉, B)) of them, every positive among them."""
from __future__ import annotations

import math

import torch


def partial_fc_count(num_classes: int, batch: int, sample_rate: float) -> int:
    """k = min(C, max(⌈sample_rate·C⌉, B)): how many classes one Partial FC call keeps.

    A function of sizes only (a symbolic int under ``torch.compile(dynamic=True)``), and at least the
    batch size, so every positive fits whatever the labels are."""
    return torch.sym_min(num_classes, torch.sym_max(math.ceil(sample_rate * num_classes), batch))


def partial_fc_sample(labels: torch.Tensor, num_classes: int, sample_rate: float,
                      generator: torch.Generator | None = None,
                      owned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept class ids, sorted; labels re-indexed into them): every positive plus uniform random
    negatives, k = :func:`partial_fc_count` classes in all (Partial FC).

    score_j ~ U[0, 1) for every class, score_y = 2 for the positives, keep the top k: the positives
    always, and the k − #positives negatives a uniform sample without replacement (as insightface's
    PartialFC_V2). Labels map into the kept set through a lookup table. No step depends on the
    labels' values for a shape, so the whole draw stays in a compiled graph. ``owned`` (a class shard):
    only the labels where it is true are positives of these classes; the others map to 0 (mask them).

    Where it differs from insightface: there k = max(#positives, ⌊sample_rate·C⌋), which depends on
    how many distinct labels the batch holds (a data-dependent size); here k = max(⌈sample_rate·C⌉, B)
    (capped at C). Whenever the batch fits in the sample (B ≤ ⌈sample_rate·C⌉, the usual case: C is
    large) the two agree up to the rounding; with B > ⌈sample_rate·C⌉ this keeps B classes, i.e.
    B − #positives negatives where insightface keeps none beyond the positives.
    """
    labels = labels.long()
    keep = partial_fc_count(num_classes, labels.shape[0], sample_rate)
    if owned is not None:  # other shards' positives: parked on an extra slot C, never kept
        labels = torch.where(owned, labels, num_classes)
    # rand's generator overload takes concrete sizes only: without a generator, C may be symbolic
    gen = {} if generator is None else {"generator": generator}
    score = torch.rand(num_classes, device=labels.device, **gen)
    score = torch.cat([score, score.new_zeros(1)]).index_fill(0, labels, 2.0)[:num_classes]  # positives first
    index = score.topk(keep, sorted=False).indices.sort().values  # sorted: the set, in class order
    table = torch.zeros(num_classes + 1, dtype=torch.long, device=labels.device)
    table = table.index_copy(0, index, torch.arange(index.shape[0], device=labels.device))
    return index, table[labels]
