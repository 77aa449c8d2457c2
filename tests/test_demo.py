"""The demo (`make demo`): every stage at the tiny preset, determinism, its data, report and CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petal_fast.demo import PRESETS, main, run_demo
from petal_fast.demo.data import HIGH, LOW, adaptation_set, eval_sets
from petal_fast.demo.evaluate import ALPHA_BINS, alpha_bin_index
from petal_fast.demo.presets import METHODS, method_overrides
from petal_fast.demo.report import mean_std, verdict
from petal_fast.demo.run import LOG_NAME

TIMINGS = ("seconds", "load", "images_per_second")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The tiny preset twice with the same seed (each a few seconds)."""
    outs = [tmp_path_factory.mktemp(f"demo{i}") for i in range(2)]
    return outs, [run_demo("tiny", out, progress=False) for out in outs]


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_tiny_demo_runs_every_stage(tiny_runs):
    (out, _), (results, _) = tiny_runs
    p = PRESETS["tiny"]
    assert set(results["runs"]) == {"pretrained", *METHODS}
    for method in METHODS:
        runs = results["runs"][method]
        assert [r["seed"] for r in runs] == list(range(p.seeds))
        for r in runs:
            assert r["images_per_second"] > 0 and math.isfinite(r["final_loss"])
            for key in ("hr_ver", "hr_tar", "xq_rank1", "xq_rank5", "mixed_ver"):
                assert 0.0 <= r[key] <= 1.0, (method, key)
            assert r["xq_rank1"] <= r["xq_rank5"]
            assert sum(r["bin_counts"]) == 2 * p.eval_identities * p.eval_probes  # low-quality + mixed probes
    # LoRA's one branch of rank 2r has as many parameters as PETALface's two of rank r
    trainable = {m: results["runs"][m][0]["trainable"] for m in METHODS}
    assert trainable["lora"] == trainable["petalface"] == trainable["petalface_fixed"] < trainable["full_ft"]
    assert all("tau" in r for r in results["runs"]["petalface"])
    assert not any("tau" in r for r in results["runs"]["petalface_fixed"])
    lines = (out / LOG_NAME).read_text().splitlines()
    assert len(lines) == 5 + len(METHODS) * p.seeds and all(line.startswith("[demo ") for line in lines)
    for name in ("results.json", "results.md", "alpha_hist.png", "alpha_bins.png", "summary.png",
                 "cross_quality_cmc.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text())["runs"].keys() == results["runs"].keys()


def test_tiny_demo_is_deterministic(tiny_runs):
    _, (a, b) = tiny_runs
    assert _without_timings(a) == _without_timings(b)


def test_adaptation_data_spreads_alpha(tiny_runs):
    """The mixed-quality set is what BRISQUE sees as mixed: the higher-quality images get a larger α."""
    _, (results, _) = tiny_runs
    alpha = results["alpha"]
    assert alpha["train_hq"]["mean"] > alpha["train_lq"]["mean"] + 0.2
    assert alpha["train"]["std"] > 0.1
    assert sum(alpha["hist"]["counts"]) == sum(alpha["hist"]["counts_hq"]) + sum(alpha["hist"]["counts_lq"])


def test_adaptation_set_levels_and_seed():
    ds, levels = adaptation_set(3, 1, 2, 40, seed=5)
    assert len(ds) == 9 and ds.num_classes == 3
    assert levels.tolist() == [HIGH, LOW, LOW] * 3
    again, _ = adaptation_set(3, 1, 2, 40, seed=5)
    other, _ = adaptation_set(3, 1, 2, 40, seed=6)
    assert np.array_equal(ds.images, again.images) and not np.array_equal(ds.images, other.images)


def test_eval_sets_layout():
    s = eval_sets(4, 2, 3, 40, seed=0)
    assert len(s.hr) == len(s.mixed) == 12 and len(s.gallery) == 4 + 3 and len(s.lq_probes) == 8
    assert (s.gallery_labels == -1).sum() == 3 and sorted(s.gallery_labels[:4]) == [0, 1, 2, 3]
    images, labels = s.alpha_probes()
    assert len(images) == len(labels) == 8 + 8  # the mixed set's image 0 of each identity is the gallery's render


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1.0))
def test_alpha_bin_holds_its_alpha(a):
    b = int(alpha_bin_index(np.array([a]))[0])
    assert 0 <= b < len(ALPHA_BINS) - 1
    assert ALPHA_BINS[b] <= a <= ALPHA_BINS[b + 1]


def test_mean_std_and_verdict():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([0.1, 0.2, 0.3, float("nan")])
    assert m == pytest.approx(0.2) and s == pytest.approx(0.1)
    runs = {"petalface": [{"xq_rank1": v} for v in (0.30, 0.31, 0.32)],
            "lora": [{"xq_rank1": v} for v in (0.20, 0.21, 0.22)]}
    v = verdict({"runs": runs})
    assert v["delta"] == pytest.approx(0.10) and v["sigma"] == pytest.approx(math.sqrt(2) * 0.01)
    assert v["se"] == pytest.approx(v["sigma"] / math.sqrt(3))
    assert v["beyond"]
    runs["lora"] = [{"xq_rank1": v} for v in (0.25, 0.31, 0.37)]
    assert not verdict({"runs": runs})["beyond"]
    assert verdict({"runs": {"lora": runs["lora"]}}) is None


def test_methods_are_train_settings():
    p = PRESETS["cpu"]
    assert method_overrides("lora", p)["rank"] == 2 * method_overrides("petalface", p)["rank"]
    assert method_overrides("petalface_fixed", p)["fixed_alpha"] == 0.5
    with pytest.raises(ValueError, match="method must be one of"):
        method_overrides("dora", p)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="preset must be one of"):
        run_demo("huge", tmp_path)
    with pytest.raises(ValueError, match="methods must be among"):
        run_demo("tiny", tmp_path, methods=("lora", "dora"))
    with pytest.raises(SystemExit):
        main(["--preset", "huge"])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_gives_valid_train_configs(preset):
    """The GPU presets cannot run here: at least each of their training configs validates."""
    from petal_fast.config import TrainConfig
    from petal_fast.demo.data import LOW, level_degrade
    p = PRESETS[preset]
    for method in METHODS:
        cfg = TrainConfig(backbone=p.backbone, batch_size=p.batch_size, epochs=p.adapt_epochs, pretrained="b.pt",
                          calibrate_batches=p.calibrate_batches, **method_overrides(method, p)).validate()
        assert cfg.mode in ("full_ft", "lora", "petalface")
    low = level_degrade(LOW, 120 if p.backbone == "small" else 40)
    assert 4 <= low.resolution[0] < low.resolution[1]
    assert p.adapt_identities * (p.adapt_hq + p.adapt_lq) >= p.batch_size * p.calibrate_batches


def test_readme_demo_table_is_generated_from_the_committed_run():
    """The README's demo table is readme_table(docs/demo/results.json) (python -m petal_fast.demo.readme)."""
    import json
    from pathlib import Path

    from petal_fast.demo import readme

    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "docs" / "demo" / "results.json").read_text())
    text = (root / "README.md").read_text()
    assert readme.rewrite(text, results) == text, "stale: run python -m petal_fast.demo.readme <run folder>"
    for f in readme.FILES:
        assert (root / "docs" / "demo" / f).is_file(), f
    with pytest.raises(ValueError, match="once each"):
        readme.rewrite(text.replace(readme.END, ""), results)
