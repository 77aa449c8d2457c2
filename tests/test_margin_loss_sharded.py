"""Class-sharded margin loss on 2 gloo processes equals the single-process loss over all classes."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import petal_fast
from petal_fast import _ext
from petal_fast.nn.margin_loss_sharded import ShardedMarginSoftmaxLoss, shard_range
from petal_fast.ops.margin_loss import partial_fc_sample
from petal_fast.reference import margin_loss as ref

from conftest import rel_err

WORLD, B, C, D = 2, 5, 37, 16  # odd C: shards of 19 and 18 classes
RATE = 0.3  # ⌈0.3·19⌉ = 6 < B·world = 10: each shard keeps 10 classes
CASES = [("cosface", "exact", 0.1), ("arcface", "straight_through", 0.0), ("adaface", "exact", 0.0)]
BACKENDS = ["torch"] + (["cpp"] if _ext.has_op("margin_loss") else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, inputs: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {}
        rows = slice(rank * B, (rank + 1) * B)
        for backend in BACKENDS:
            for loss, grad, ls in CASES:
                head = ShardedMarginSoftmaxLoss(D, C, loss=loss, grad=grad, label_smoothing=ls)
                with torch.no_grad():
                    head.weight.copy_(inputs["w"][head.start:head.end])
                e = inputs["e"][rows].clone().requires_grad_()
                with petal_fast.use_backend(backend):
                    out = head(e, inputs["labels"][rows])
                out.backward()
                stats = (head.norm_mean.clone(), head.norm_std.clone()) if loss == "adaface" else None
                results[(backend, loss)] = (out.detach(), e.grad, head.weight.grad, stats)
        # Partial FC: replay this rank's draw (same seed) to know the classes it keeps
        head = ShardedMarginSoftmaxLoss(D, C, loss="arcface", label_smoothing=0.1, sample_rate=RATE)
        with torch.no_grad():
            head.weight.copy_(inputs["w"][head.start:head.end])
        local = inputs["labels"] - head.start
        owned = (local >= 0) & (local < head.end - head.start)
        torch.manual_seed(100 + rank)
        index, _ = partial_fc_sample(local, head.end - head.start, RATE, owned=owned)
        torch.manual_seed(100 + rank)
        e = inputs["e"][rows].clone().requires_grad_()
        out = head(e, inputs["labels"][rows])
        out.backward()
        results["sampled"] = (out.detach(), e.grad, head.weight.grad, head.start + index)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    e = torch.randn(WORLD * B, D) * 3.0
    w = torch.randn(C, D)
    labels = torch.randint(0, C, (WORLD * B,))
    labels[0], labels[-1], labels[B] = 0, C - 1, 20  # both shards, both ends
    inputs = {"e": e, "w": w, "labels": labels}
    mp.spawn(worker, args=(free_port(), inputs, str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for backend in BACKENDS:
        for loss, grad, ls in CASES:
            e64, w64 = e.double().requires_grad_(), w.double().requires_grad_()
            kw = {}
            if loss == "adaface":
                mean, std = ref.adaface_update(e64.detach().norm(dim=1), torch.tensor(20.0, dtype=torch.float64),
                                               torch.tensor(100.0, dtype=torch.float64))
                kw = {"norm_mean": mean, "norm_std": std}
            exp = ref.margin_loss(e64, w64, labels, loss, grad=grad, label_smoothing=ls, **kw)
            exp.backward()
            for r in range(WORLD):
                out, de, dw, stats = res[r][(backend, loss)]
                start, end = shard_range(C, WORLD, r)
                assert rel_err(out, exp) < 1e-5, (backend, loss, r)
                assert rel_err(de, e64.grad[r * B:(r + 1) * B]) < 1e-5, (backend, loss, r)
                assert rel_err(dw, w64.grad[start:end]) < 1e-5, (backend, loss, r)
                if stats is not None:
                    assert torch.allclose(stats[0].double(), kw["norm_mean"]) and torch.allclose(stats[1].double(), kw["norm_std"])
    # Partial FC over the shards: the loss over the union of the kept classes (every positive in it)
    kept = torch.cat([res[r]["sampled"][3] for r in range(WORLD)])
    assert torch.isin(labels, kept).all() and kept.numel() == WORLD * min(18, WORLD * B)
    table = torch.full((C,), -1)
    table[kept] = torch.arange(kept.numel())
    e64, w64 = e.double().requires_grad_(), w.double()[kept].requires_grad_()
    exp = ref.margin_loss(e64, w64, table[labels], "arcface", label_smoothing=0.1)
    exp.backward()
    offset = 0
    for r in range(WORLD):
        out, de, dw, index = res[r]["sampled"]
        start, end = shard_range(C, WORLD, r)
        assert rel_err(out, exp) < 1e-5 and rel_err(de, e64.grad[r * B:(r + 1) * B]) < 1e-5
        mine = torch.zeros(end - start, dtype=torch.bool)
        mine[index - start] = True
        assert rel_err(dw[mine], w64.grad[offset:offset + index.numel()]) < 1e-5 and (dw[~mine] == 0).all()
        offset += index.numel()


def test_shard_range_covers_all_classes():
    for c, world in [(37, 2), (10, 3), (4, 4)]:
        ranges = [shard_range(c, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == c
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_needs_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedMarginSoftmaxLoss(8, 10)


def unequal_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        head = ShardedMarginSoftmaxLoss(D, C)
        rows = B - rank  # rank 1 holds one row fewer (an incomplete last batch)
        try:
            head(torch.randn(rows, D), torch.randint(0, C, (rows,)))
            message = "no error"
        except ValueError as err:
            message = str(err)
        loss = head(torch.randn(B, D), torch.randint(0, C, (B,)))  # the group still works afterwards
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{message}\n{bool(torch.isfinite(loss))}")
    finally:
        dist.destroy_process_group()


def test_unequal_batch_sizes_are_a_clear_error_on_every_rank(tmp_path):
    """Unequal per-rank batches: a ValueError with the sizes on every rank (it aborted the process inside
    gloo), and the process group stays usable."""
    mp.spawn(unequal_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        message, finite = (tmp_path / f"rank{r}.txt").read_text().rsplit("\n", 1)
        assert "same batch size" in message and f"got [{B}, {B - 1}]" in message, message
        assert finite == "True"
