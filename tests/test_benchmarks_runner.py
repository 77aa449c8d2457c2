"""The benchmark runner, charts and the docs/performance.md report: quick CPU run into a temporary --out folder."""
from __future__ import annotations

import csv
import re
import os
import sys
from pathlib import Path

import pytest

import torch

from benchmarks import bench_petal_linear, common, merge, plots, report, suites, tables
from benchmarks.__main__ import main as runner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent


def _row(device: str, suite: str, shape: str, provider: str, median: float, ratio: float | str,
         metric: str = "time", unit: str = "ms", baseline: str = "base") -> dict:
    return {"date": "2026-01-02T03:04:05+00:00", "commit": "abc1234", "device": device, "torch": "2.x",
            "triton": "", "suite": suite, "case": "c", "shape": shape, "dtype": "float32", "provider": provider,
            "mode": "fwd", "metric": metric, "median": f"{median}", "q20": f"{median * 0.9}",
            "q80": f"{median * 1.1}", "unit": unit, "baseline": baseline, "ratio": f"{ratio}", "notes": ""}


def test_quick_run_writes_well_formed_csv_and_chart(tmp_path, capsys):
    committed = common.RESULTS / "linear.csv"
    before = committed.read_bytes() if committed.exists() else None
    assert runner(["--suite", "linear", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== PetalLinear" in out and common.device_name("cpu") in out

    with open(tmp_path / "linear.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == common.COLUMNS
        body = list(reader)
    assert body and all(len(r) == len(common.COLUMNS) for r in body)
    rows = [dict(zip(common.COLUMNS, r)) for r in body]
    assert {r["provider"] for r in rows} >= {"base", "fused", "reference"}
    assert "fused_onepass" not in {r["provider"] for r in rows}  # a Triton design: CUDA only
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "full"}
    time_rows = [r for r in rows if r["metric"] == "time"]
    tflops_rows = {_measurement(r): r for r in rows if r["metric"] == "tflops"}
    assert len(time_rows) == len(tflops_rows) == len(rows) / 2
    for r in time_rows:
        assert r["suite"] == "linear" and r["device"] == common.device_name("cpu") and r["unit"] == "ms"
        med, q20, q80, ratio = (float(r[k]) for k in ("median", "q20", "q80", "ratio"))
        assert 0 < q20 <= med <= q80 and ratio > 0
        if r["provider"] == r["baseline"]:
            assert ratio == 1.0
        t = tflops_rows[_measurement(r)]  # every time row has its throughput row
        assert t["unit"] == "TFLOP/s" and t["ratio"] == t["baseline"] == ""
        m, k, n = (int(v.split("=")[1]) for v in r["shape"].split()[:3])
        work = bench_petal_linear.flops(m, k, n, 0 if r["provider"] == "base" else 16, r["mode"])
        assert float(t["median"]) == pytest.approx(work / med * 1e-9, rel=2e-3)
        assert float(t["q20"]) == pytest.approx(work / q80 * 1e-9, rel=2e-3)  # slowest time, lowest TFLOP/s
        assert float(t["q80"]) == pytest.approx(work / q20 * 1e-9, rel=2e-3)
        assert 0 < float(t["q20"]) <= float(t["median"]) <= float(t["q80"])
    chart = tmp_path / f"linear_{plots.slug(common.device_name('cpu'))}_speedup.png"
    assert chart.read_bytes()[:8] == PNG_MAGIC
    assert (committed.read_bytes() if committed.exists() else None) == before  # --out kept results/ untouched


def _measurement(row: dict) -> tuple:
    return tuple(row[k] for k in ("case", "shape", "dtype", "mode", "provider"))


def test_flop_counts_follow_the_docstring_formula():
    m, k, n = 512, 128, 384
    base = 2 * m * n * k
    lora = 2 * m * 16 * (k + n)  # R = 16: two branches of rank 8, or one of rank 16
    assert bench_petal_linear.flops(m, k, n, 0, "fwd") == bench_petal_linear.flops(m, k, n, 0, "bwd") == base
    assert bench_petal_linear.flops(m, k, n, 16, "fwd") == base + lora
    assert bench_petal_linear.flops(m, k, n, 16, "bwd") == base + 2 * lora
    assert bench_petal_linear.flops(m, k, n, 16, "full") == 2 * base + 3 * lora


def test_summary_rows_tflops_from_time_quantiles():
    samples = {"base": [4.0, 1.0, 2.0], "fused": [3.0, 5.0, 2.0]}
    rows = common.summary_rows("linear", "cpu", "c", "s", "float32", "fwd", samples, "base",
                               flops={"base": 2e9, "fused": 3e9})
    assert [(r["provider"], r["metric"]) for r in rows] == [("base", "time"), ("base", "tflops"),
                                                            ("fused", "time"), ("fused", "tflops")]
    base_t = rows[1]
    assert (base_t["median"], base_t["q20"], base_t["q80"]) == ("1", "0.5", "2")  # 2 GFLOP over 2, 4, 1 ms
    assert base_t["unit"] == "TFLOP/s" and base_t["ratio"] == base_t["baseline"] == ""
    assert float(rows[3]["median"]) == pytest.approx(1.0) and rows[2]["ratio"] == "1.5000"
    assert all(r["metric"] == "time" for r in common.summary_rows("l", "cpu", "c", "s", "f", "m", samples, "base"))


class _Counted(torch.autograd.Function):
    """y = x·w, counting forward and backward calls."""
    calls: list[str] = []

    @staticmethod
    def forward(ctx, x, w):
        _Counted.calls.append("forward")
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, dy):
        _Counted.calls.append("backward")
        x, w = ctx.saved_tensors
        return dy * w, (dy * x).sum(0)


@pytest.mark.parametrize("mode", bench_petal_linear.MODES)
def test_timed_call_modes(mode):
    _Counted.calls = []
    w = torch.randn(4, requires_grad=True)
    seen: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    w.register_hook(grads.append)

    def forward(x, a):
        seen.append(x)
        return _Counted.apply(x, w)
    provider = bench_petal_linear.Provider(forward, (w,), 1)
    xs = [torch.randn(3, 4, requires_grad=mode != "fwd") for _ in range(2)]
    call = bench_petal_linear._timed_call(provider, mode, xs, [torch.rand(1)] * 2, [torch.randn(3, 4)] * 2)
    built = list(_Counted.calls)
    for _ in range(3):
        call()
    timed = _Counted.calls[len(built):]
    if mode == "bwd":  # graphs built once per input set, outside the timed call; no .grad accumulates
        assert built == ["forward"] * 2 and timed == ["backward"] * 3
        assert len(grads) == 3 and w.grad is None and xs[0].grad is None
    else:
        assert built == []
        assert timed == (["forward"] * 3 if mode == "fwd" else ["forward", "backward"] * 3)
        if mode == "full":  # the gradients are produced, none accumulate into .grad
            assert len(grads) == 3 and w.grad is None and xs[0].grad is None
    assert [x is xs[i % 2] for i, x in enumerate(seen)] == [True] * len(seen)  # inputs rotate per provider


def test_cuda_providers_force_the_triton_designs():
    from petal_fast import backend
    from petal_fast.kernels.petal_linear import DIRECTIONS, design_for
    layer = bench_petal_linear.PetalLinear(8, 8, rank=2)
    assert list(bench_petal_linear._fused(layer, torch.device("cpu"))) == ["fused"]
    on_cuda = bench_petal_linear._fused(layer, torch.device("cuda"))  # builds no CUDA tensor
    assert list(on_cuda) == ["fused", "fused_onepass"]
    for name, design in (("fused", "split"), ("fused_onepass", "onepass")):
        assert on_cuda[name].trainable == (layer.lora_A, layer.lora_B) and on_cuda[name].lora_rank == 4
        with on_cuda[name].context():
            assert [design_for(torch.device("cpu"), d) for d in DIRECTIONS] == [design] * len(DIRECTIONS)
            assert backend.requested_backend() == "triton"


def test_cuda_timing_pools_every_do_bench_call(monkeypatch):
    import triton.testing
    reps: list[int] = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "all"
        reps.append(rep)
        fn()
        return [1.0, 2.0, 3.0]
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    calls: list[str] = []
    samples = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                      "cuda", warmup=1, repeat=10, rep_ms=25)
    assert samples == {"a": [1.0, 2.0, 3.0] * 2, "b": [1.0, 2.0, 3.0] * 2}
    assert reps == [25] * 4 and calls == ["a", "b", "a", "b", "a", "b"]  # warm-up, then interleaved rounds


def test_tflops_rows_in_tables_report_and_charts(tmp_path):
    gpu, cpu = "NVIDIA Test GPU", "CPU Test x2 threads"
    rows = []
    for device in (gpu, cpu):
        for provider, ms, ratio in (("base", 1.0, 1.0), ("fused", 1.25, 1.25)):
            rows += [_row(device, "linear", "M=8 K=4 N=4", provider, ms, ratio),
                     _row(device, "linear", "M=8 K=4 N=4", provider, 600 / ms, "", "tflops", "TFLOP/s", "")]
    entries = tables.merged(rows)
    assert len(entries) == 4 and all(e["time"] and e["tflops"] and not e["memory"] and not e["other"]
                                     for e in entries)
    text = tables.format_table(rows)
    assert "TFLOP/s" in text.splitlines()[0] and "480" in text and "1.25 ms" in text
    assert report._pivot(rows, "memory") == []
    assert all("TFLOP/s" not in line for line in report._pivot(rows, "time"))

    results = tmp_path / "results"
    common.append_rows("linear", rows, path=results / "linear.csv")
    section = report.render(results, tmp_path)
    gpu_part, cpu_part = section.split(f"— {gpu}")[1], section.split(f"— {cpu}")[1].split(f"— {gpu}")[0]
    assert "Achieved TFLOP/s" in gpu_part and "| 600 TFLOP/s | 480 TFLOP/s |" in gpu_part
    assert "Achieved TFLOP/s" not in cpu_part and "1.25 ms (1.25×)" in cpu_part
    only_tflops = [r for r in rows if r["metric"] == "tflops"]
    assert plots.speedup_chart("linear", gpu, only_tflops, tmp_path / "none.png") is None
    assert plots.make_plots(results) == [results / f"linear_{plots.slug(d)}_speedup.png" for d in (gpu, cpu)]


def test_malformed_results_file_is_reported_not_overwritten(tmp_path, capsys):
    bad = tmp_path / "linear.csv"
    bad.write_text("when,what\n1,2\n")
    assert runner(["--suite", "linear", "--quick", "--out", str(tmp_path)]) == 2
    assert "malformed results file" in capsys.readouterr().err
    assert bad.read_text() == "when,what\n1,2\n"
    with pytest.raises(ValueError, match="malformed"):
        common.append_rows("linear", [_row("CPU x", "linear", "s", "base", 1.0, 1.0)], path=bad)
    assert bad.read_text() == "when,what\n1,2\n"
    assert plots.main(["--results", str(tmp_path)]) == 2
    assert report.main(["--results", str(tmp_path), "--stdout"]) == 2


def test_bad_arguments_and_missing_scripts(tmp_path, capsys):
    assert runner(["--suite", "linear,nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'nonsense'" in capsys.readouterr().err
    assert [s.key for s in suites.parse_selection("brisque,margin,linear,loss")] == ["quality", "loss", "linear"]
    ghost = suites.Suite("ghost", "benchmarks.bench_ghost", "Ghost", ("ghost",), "none")
    with pytest.raises(suites.SuiteUnavailable, match="does not exist"):
        suites.load(ghost)
    assert not list(tmp_path.iterdir())


def test_charts_one_per_device_never_mixed(tmp_path, monkeypatch):
    cpu, gpu = "CPU Test x2 threads", "NVIDIA Test GPU"
    lin = [_row(d, "linear", s, p, m, m / base) for d, base in ((cpu, 2.0), (gpu, 0.5))
           for s in ("M=8 K=4 N=4", "M=16 K=4 N=4") for p, m in (("base", base), ("fused", base * 1.1))]
    loss = [_row(cpu, "margin_loss", f"B=4 C={c} D=8", p, mem, "", "peak_extra_mem", "MiB", "materialised")
            for c in (100, 1000, 10000) for p, mem in (("materialised", c / 10), ("fused", 1.0))]
    common.append_rows("linear", lin, path=tmp_path / "linear.csv")
    common.append_rows("margin_loss", loss, path=tmp_path / "margin_loss.csv")

    seen: list[set[str]] = []
    for name in ("speedup_chart", "memory_chart"):
        original = getattr(plots, name)
        monkeypatch.setattr(plots, name, lambda n, d, rows, path, f=original: (
            seen.append({r["device"] for r in rows}), f(n, d, rows, path))[1])
    charts = plots.make_plots(tmp_path)
    assert all(len(devices) == 1 for devices in seen)
    assert sorted(c.name for c in charts) == sorted([
        f"linear_{plots.slug(cpu)}_speedup.png", f"linear_{plots.slug(gpu)}_speedup.png",
        f"margin_loss_{plots.slug(cpu)}_memory.png"])
    assert all(c.read_bytes()[:8] == PNG_MAGIC for c in charts)


def test_report_rewrites_only_its_region(tmp_path):
    cpu = "CPU Test x2 threads"
    results = tmp_path / "results"
    common.append_rows("linear", [_row(cpu, "linear", "M=8 K=4 N=4", "base", 1.0, 1.0),
                                  _row(cpu, "linear", "M=8 K=4 N=4", "fused", 1.03, 1.03)],
                       path=results / "linear.csv")
    target = tmp_path / "performance.md"
    head, tail = "# Title\n\nintro\n", "\n## After\nkept\n"
    target.write_text(f"{head}{report.START}\nstale\n{report.END}\n{tail}")
    assert report.main(["--results", str(results), "--target", str(target)]) == 0
    text = target.read_text()
    assert text.startswith(head + report.START + "\n") and text.endswith(report.END + "\n" + tail)
    section = text[text.index(report.START):text.index(report.END)]
    assert "stale" not in section
    assert f"— {cpu}" in section and "1.03 ms (1.03×)" in section
    assert "No GPU results yet" in section and "no results on any device" in section

    common.append_rows("linear", [_row("NVIDIA Test GPU", "linear", "M=8 K=4 N=4", "base", 0.1, 1.0)],
                       path=results / "linear.csv")
    common.append_rows("brisque", [_row(cpu, "brisque", "B=2 H=8 W=8 C=3", "package", 5.0, 1.0, baseline="package")],
                       path=results / "brisque.csv")
    section = report.render(results, tmp_path)
    assert "No GPU results yet" not in section and "— NVIDIA Test GPU" in section and f"— {cpu}" in section
    assert "Batched BRISQUE quality: no GPU results yet." in section
    assert "PetalLinear (quality-weighted two-branch LoRA): no" not in section

    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text("no markers here\n")
    assert report.main(["--results", str(results), "--target", str(unmarked)]) == 2
    assert unmarked.read_text() == "no markers here\n"


def test_committed_tables_live_in_docs_performance_and_link_inside_the_repo():
    """The default target holds the one generated region; its links resolve to files of this repository
    (no machine path), and the README holds no generated region."""
    assert report.TARGET == REPO / "docs" / "performance.md"
    text = report.TARGET.read_text()
    section = report.render(common.RESULTS, report.TARGET.parent)
    assert report.replace_region(text, section) == text, "docs/performance.md is stale: python -m benchmarks.report"
    links = re.findall(r"\]\(([^)#]+)\)", section)
    assert links and all((report.TARGET.parent / link).resolve().is_file() for link in links)
    assert str(REPO) not in section and "`benchmarks/results/*.csv`" in section
    assert report.START not in (REPO / "README.md").read_text()


def test_benchmarks_not_in_the_normal_test_run():
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]


def test_merge_appends_new_rows_once_and_refuses_malformed(tmp_path):
    src, into = tmp_path / "gpu_out", tmp_path / "results"
    gpu = [_row("NVIDIA Test GPU", "linear", "M=8 K=4 N=4", p, m, m / 0.1) for p, m in (("base", 0.1), ("fused", 0.11))]
    cpu = [_row("CPU Test x2 threads", "linear", "M=8 K=4 N=4", "base", 1.0, 1.0)]
    common.append_rows("linear", gpu, path=src / "linear.csv")
    common.append_rows("linear", cpu, path=into / "linear.csv")
    assert merge.main([str(src), "--into", str(into)]) == 0
    assert merge.merge(src, into) == {"linear": 0}  # a second merge adds nothing
    rows = common.read_rows(into / "linear.csv")
    assert [r["device"] for r in rows] == ["CPU Test x2 threads", "NVIDIA Test GPU", "NVIDIA Test GPU"]

    (src / "margin_loss.csv").write_text("not,our,header\n")
    before = (into / "linear.csv").read_text()
    assert merge.main([str(src), "--into", str(into)]) == 2
    assert (into / "linear.csv").read_text() == before and not (into / "margin_loss.csv").exists()


def test_contention_worker_busy_processes_and_rows():
    """bench_contention's parts, small: a warm worker trains on request, busy processes are pinned to
    this process's cores and gone afterwards, and the rows carry img/s with the contended/quiet ratio."""
    from benchmarks import bench_contention as bc
    worker = bc.Worker("petal_fast", "tiny", 4, 10)
    try:
        report = worker.train(0.01)
    finally:
        worker.close()
    assert report["steps"] >= 1 and report["images"] == 4 * report["steps"] and report["wait"].startswith("passive")
    with bc.busy(1, bc.cores()) as procs:
        if hasattr(os, "sched_getaffinity"):
            assert os.sched_getaffinity(procs[0].pid) == bc.cores()
    assert procs[0].poll() is not None
    quiet = {"steps": 4, "images": 16, "wall": 0.5, "ms": [100.0, 120.0, 140.0, 140.0], "threads": 2, "wait": "passive"}
    slow = {**quiet, "wall": 2.0, "ms": [520.0] * 4}  # the quiet median is 130 ms
    rows = bc.rows_for("petal_fast", "tiny B=4 C=10", {"quiet": [quiet, quiet], bc.phase_name(2): [slow],
                                                      "load": ((1.0, 1.0, 1.0), (2.0, 1.5, 1.0))})
    assert all(set(r) == set(common.COLUMNS) for r in rows)
    got = {(r["mode"], r["metric"]): r for r in rows}
    assert float(got["quiet", "throughput"]["median"]) == 32.0
    assert float(got["beside 2 busy", "throughput"]["median"]) == 8.0
    assert float(got["beside 2 busy", "throughput"]["ratio"]) == 0.25
    assert float(got["beside 2 busy", "time"]["ratio"]) == 4.0
    assert got["quiet", "time"]["ratio"] == "1.0000" and "load average 1.0/1.0 before" in rows[0]["notes"]
