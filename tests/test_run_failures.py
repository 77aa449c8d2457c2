"""A run that cannot train says so (issue 27, item 6): no applied step → exit 1 and no model.pt; a
diverging run names the step and learning rate and keeps the last finite checkpoint; every JSON file
stays JSON (a non-finite number is written as a string)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from petal_fast.jsonio import dumps, finite
from petal_fast.nn.margin_loss import MarginSoftmaxLoss
from petal_fast.training import state as training_state
from petal_fast.training.result import TrainingFailed
from petal_fast.train import Trainer

from test_train import ROOT, tiny_cfg


def _strict_lines(path: Path) -> list[dict]:
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) for line in
            path.read_text().splitlines()]


@pytest.fixture()
def nan_loss(monkeypatch):
    real = MarginSoftmaxLoss.forward
    monkeypatch.setattr(MarginSoftmaxLoss, "forward", lambda self, e, y, **kw: real(self, e, y, **kw) * math.nan)


def test_run_without_an_applied_step_fails_and_writes_no_model(tmp_path, nan_loss):
    """Before: exit 0, a model.pt equal to the initial weights, and `Infinity`/`NaN` in log.jsonl."""
    cfg = tiny_cfg(tmp_path, mode="lora", max_steps=3, epochs=1, log_every=1)
    with pytest.raises(TrainingFailed, match="no optimisation step was applied: all 3 steps had a non-finite loss"):
        Trainer(cfg).fit()
    out = Path(cfg.output)
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()
    records = _strict_lines(out / "log.jsonl")
    assert [r["loss"] for r in records] == ["nan"] * 3 and not any(r["applied"] for r in records)


def test_cli_exit_status_1_without_traceback(tmp_path, nan_loss, capsys):
    from petal_fast.cli import main
    code = main(["train", "mode=lora", "backbone=tiny", "batch_size=8", "epochs=1", "data.num_identities=4",
                 "data.images_per_identity=4", f"output={tmp_path / 'run'}", "progress=false"])
    err = capsys.readouterr().err
    assert code == 1 and "petal-fast train: error: no optimisation step was applied" in err and "Traceback" not in err


def test_diverging_run_names_step_and_lr_and_keeps_a_finite_checkpoint(tmp_path):
    """Before: "embeddings contain non-finite values" with no step or lr, and a checkpoint of NaN weights
    that could not be resumed."""
    cfg = tiny_cfg(tmp_path, mode="lora", lr=1e20, warmup=0.0, grad_clip=1e10, max_steps=6, epochs=2, dropout=0.0)
    with pytest.raises(TrainingFailed) as err:
        Trainer(cfg).fit()
    message = str(err.value)
    assert "training diverged at step" in message and "learning rate 1e+20" in message and "lr (now 1e+20)" in message
    out = Path(cfg.output)
    assert not (out / "model.pt").exists()
    if "no checkpoint was written" not in message:
        state = training_state.load(out / training_state.LAST)
        assert f"(step {state['step']}) is kept" in message
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    for record in _strict_lines(out / "log.jsonl"):
        assert isinstance(record["loss"], (float, str))


def test_summary_and_eval_reports_are_strict_json(tmp_path):
    from petal_fast.eval.report import save_report
    from petal_fast.training.result import TrainResult
    summary = TrainResult(final_loss=math.nan, seconds=math.inf).to_summary()
    assert json.loads(dumps(summary))["final_loss"] == "nan"
    save_report({"x": {"accuracy": math.nan, "accuracy_std": math.nan, "auc": 0.5, "num_pairs": 2,
                       "tar_at_far": {"0.1": {"tar": math.nan}}, "roc": {"fpr": [0.0, math.inf]}}}, str(tmp_path))
    text = (tmp_path / "eval.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c))["x"]["roc"]["fpr"] == [0.0, "inf"]


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                       max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(obj=JSONISH)
def test_dumps_is_strict_json_and_keeps_finite_values(obj):
    text = dumps(obj)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(c))

    def same(a, b):
        if isinstance(a, float) and not math.isfinite(a):
            return b == ("nan" if math.isnan(a) else "inf" if a > 0 else "-inf")
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b
    assert same(obj, back) and finite(back) == back


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, torch
    from pathlib import Path
    from petal_fast.atomic_files import atomic_save
    from petal_fast.cli import main
    out = Path(sys.argv[1])
    atomic_save({"x": torch.zeros(10)}, out / "small.pt")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit write() fails with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    try:
        atomic_save({"x": torch.zeros(100_000)}, out / "small.pt")
    except OSError as err:
        print("save:", err)
    sys.exit(main(["train", "mode=lora", "backbone=tiny", "batch_size=8", "epochs=1", "data.num_identities=4",
                   "data.images_per_identity=4", f"output={out / 'run'}", "progress=false"]))
""")


def test_full_disk_during_a_checkpoint_is_one_clear_line(tmp_path):
    """Before: a zip-writer traceback ("[enforce fail at inline_container.cc] ... unexpected pos")."""
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"save: cannot write {tmp_path / 'small.pt'}: File too large" in proc.stdout
    assert torch.load(tmp_path / "small.pt", weights_only=True)["x"].shape == (10,)  # the previous file is intact
    assert "petal-fast train: error: cannot write" in proc.stderr and "Nothing was replaced" in proc.stderr
    assert "Traceback" not in proc.stderr and not list((tmp_path / "run").glob(".*.tmp*"))
