"""The CPU calls suite (benchmarks/bench_cpu_calls.py): the demo's layer shapes, a smoke run, the summary line."""
from __future__ import annotations

import csv

from benchmarks import bench_cpu_calls as calls
from benchmarks import common


def test_demo_layers_follow_the_demo_model():
    """Read from the model the demo trains: two-branch qkv layers of both Swin stages, the one-branch feature layer."""
    layers = calls.demo_layers(batch=4)
    two = [(m, k, n) for m, k, n, images, branches in layers if branches == 2]
    one = [(m, k, n) for m, k, n, images, branches in layers if branches == 1]
    assert all(n == 3 * k for _, k, n in two) and len(two) == 2  # attn.qkv of each stage
    assert all(m % 4 == 0 for m, _, _ in two)
    assert len(one) == 1 and one[0][0] == 4  # the feature Linear: one row per image
    assert all(images == 4 for *_, images, _ in layers)


def test_cases_cover_batch_image_and_row():
    found = calls.cases(quick=False)
    assert {c[0] for c in found} == {"batch64", "batch1", "row1"}
    assert all(m == 1 for case, m, *_ in found if case == "row1")
    assert all(m % images == 0 for _, m, _, _, images, _ in found)


def test_smoke_run_writes_rows_and_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(calls, "cases", lambda quick: [("row1", 1, 8, 24, 1, 2), ("batch64", 8, 8, 24, 2, 2),
                                                        ("row1", 1, 16, 8, 1, 1)])
    with common.results_dir(tmp_path):
        rows = calls.run(quick=True)
    with open(tmp_path / "calls.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) > 0
    providers = {(r["shape"], r["provider"]) for r in written}
    assert ("M=1 K=8 N=24 images=1 branches=2", "fused") in providers
    assert ("M=1 K=16 N=8 images=1 branches=1", "fused_1b") in providers
    assert all(r["baseline"] == "base" for r in written if r["metric"] == "time")
    line = calls.summary_line(rows)
    assert line.startswith("calls: fixed cost +") and "fwd+bwd" in line and "demo batch" in line


def test_summary_line_takes_the_worst_layer():
    def row(case, shape, mode, provider, ms):
        return {"metric": "time", "case": case, "shape": shape, "mode": mode, "provider": provider, "median": str(ms)}
    rows = [row("row1", "a", "fwd", "base", 0.01), row("row1", "a", "fwd", "fused", 0.05),
            row("row1", "b", "fwd", "base", 0.01), row("row1", "b", "fwd", "fused_1b", 0.03),
            row("batch64", "c", "full", "base", 2.0), row("batch64", "c", "full", "fused", 5.0),
            row("batch64", "d", "full", "base", 1.0), row("batch64", "d", "full", "fused", 1.5)]
    assert calls.summary_line(rows) == "calls: fixed cost +40 us fwd over F.linear; demo batch 2.50x fwd+bwd (worst layer)"
