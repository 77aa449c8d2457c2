"""The benchmark runner, charts and README report: quick CPU run into a temporary --out folder."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from benchmarks import common, merge, plots, report, suites
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
    for r in rows:
        assert r["suite"] == "linear" and r["device"] == common.device_name("cpu") and r["metric"] == "time"
        med, q20, q80, ratio = (float(r[k]) for k in ("median", "q20", "q80", "ratio"))
        assert 0 < q20 <= med <= q80 and ratio > 0
        if r["provider"] == r["baseline"]:
            assert ratio == 1.0
    chart = tmp_path / f"linear_{plots.slug(common.device_name('cpu'))}_speedup.png"
    assert chart.read_bytes()[:8] == PNG_MAGIC
    assert (committed.read_bytes() if committed.exists() else None) == before  # --out kept results/ untouched


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
    readme = tmp_path / "README.md"
    head, tail = "# Title\n\nintro\n", "\n## After\nkept\n"
    readme.write_text(f"{head}{report.START}\nstale\n{report.END}\n{tail}")
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
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
    assert report.main(["--results", str(results), "--readme", str(unmarked)]) == 2
    assert unmarked.read_text() == "no markers here\n"


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
