"""An output folder holds one run (issue 27, item 1): a lock while a run trains, the world size in the
compared configuration, and no command writes over a file it reads."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from petal_fast.training import run_lock, state as training_state
from petal_fast.training.run_lock import RunLock, RunLocked
from petal_fast.train import Trainer

from test_train import ROOT, tiny_cfg

HOLDER = textwrap.dedent("""
    import sys, time
    from petal_fast.training.run_lock import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def _train_cli(out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["train", "mode=lora", "backbone=tiny", "batch_size=8", "epochs=1", "data.num_identities=4",
            "data.images_per_identity=4", f"output={out}", "progress=false", *extra]
    return subprocess.run([sys.executable, "-m", "petal_fast.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_second_run_on_a_locked_folder_is_refused(tmp_path):
    """Another process trains in the folder: a second `petal-fast train` exits 2 naming it, writes nothing
    (before: both ran, one result was lost and log.jsonl interleaved)."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = _train_cli(out)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"is in use by another run (pid {holder.pid} on " in proc.stderr and "Traceback" not in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    finally:
        holder.kill()
        holder.wait()
    proc = _train_cli(out)  # the holder died: its lock went with it
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "run.lock").exists() and (out / "model.pt").exists()
    for line in (out / "log.jsonl").read_text().splitlines():
        json.loads(line)


def test_lock_in_process_and_released_after_fit(tmp_path):
    cfg = tiny_cfg(tmp_path, mode="lora", max_steps=1, epochs=1)
    with RunLock(cfg.output):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            Trainer(cfg).fit()
        assert not (Path(cfg.output) / "log.jsonl").exists()
    Trainer(cfg).fit()
    assert not (Path(cfg.output) / run_lock.LOCK).exists()


def test_stale_lock_file_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / run_lock.LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    with RunLock(folder) as lock:  # flock: nobody holds it, whatever the file says
        assert json.loads((folder / run_lock.LOCK).read_text())["pid"] == os.getpid() and lock.flock


def test_without_flock_the_file_is_the_lock(tmp_path, monkeypatch):
    import fcntl

    def no_flock(*_):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / run_lock.LOCK
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = os.uname().nodename
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": host}))
    with RunLock(folder) as lock:  # a dead process on this host: stale, taken over
        assert not lock.flock and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on {host}"):
            RunLock(folder).acquire()
    assert not path.exists()
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "today"}))
    with pytest.raises(RunLocked, match=f"pid 1 on elsewhere, since today.*delete {path}"):
        RunLock(folder).acquire()


@pytest.fixture()
def finished(tmp_path):
    cfg = tiny_cfg(tmp_path, mode="lora", max_steps=2, epochs=1)
    Trainer(cfg).fit()
    return cfg, Path(cfg.output)


def test_finished_run_of_another_world_size_is_refused(finished):
    """A 2-process run rerun as one process trained again from scratch and overwrote model.pt: the world
    size was not compared. Its files are emulated here (two-process runs are test_train.py's)."""
    cfg, out = finished
    raw = torch.load(out / "model.pt", weights_only=True)
    assert raw["metadata"]["world"] == 1
    raw["metadata"]["world"] = 2
    torch.save(raw, out / "model.pt")
    before = (out / "model.pt").read_bytes()
    state = training_state.load(out / training_state.LAST)
    state["world"] = 2
    torch.save(state, out / "checkpoint_last.rank0.pt")  # what a sharded 2-rank run leaves
    (out / training_state.LAST).unlink()
    with pytest.raises(ValueError, match=r"world size \(processes\): 2 there, 1 now"):
        Trainer(cfg).fit()
    (out / "checkpoint_last.rank0.pt").unlink()  # the finished run's model.pt alone says it too
    with pytest.raises(ValueError, match=r"world size \(processes\): 2 there, 1 now"):
        Trainer(cfg).fit()
    assert (out / "model.pt").read_bytes() == before


def test_export_and_eval_do_not_write_over_their_inputs(finished, capsys):
    from petal_fast.cli import main
    cfg, out = finished
    before = (out / "model.pt").read_bytes()
    for target, expect in ((out / "model.pt", "which this command reads"),
                           (out / "checkpoint_last.pt", "which this command reads"), (out, "is a folder")):
        assert main(["export", "--checkpoint", str(out), "--format", "pt2", "--alpha", "0.5",
                     "--output", str(target)]) == 2
        assert expect in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--data", "synthetic:ids=3,per_id=2,size=40",
                 "--out", str(out / "model.pt")]) == 2
    assert "which this command reads" in capsys.readouterr().err
    assert (out / "model.pt").read_bytes() == before


def test_eval_report_not_inside_an_imagefolder_it_reads(tmp_path):
    import argparse
    from PIL import Image
    from petal_fast.eval import add_eval_arguments, run_eval
    root = tmp_path / "faces"
    for ident in ("a", "b"):
        (root / ident).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (40 * i, 90, 30)).save(root / ident / f"{i}.png")
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        ["--data", str(root), "--out", str(root / "a"), "--image-size", "20"])
    with pytest.raises(ValueError, match="lies inside an ImageFolder data set"):
        run_eval(lambda x: x.flatten(1), args)
    assert sorted(p.name for p in (root / "a").iterdir()) == ["0.png", "1.png"]


def test_train_refuses_an_output_over_its_inputs(tmp_path, finished):
    cfg, out = finished
    from dataclasses import replace
    with pytest.raises(ValueError, match="is the pretrained checkpoint"):
        Trainer(replace(cfg, pretrained=str(out / "model.pt"), resume=False))
    (tmp_path / "faces" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"lies inside the training data \(an ImageFolder root\)"):
        Trainer(replace(cfg, output=str(tmp_path / "faces" / "run"), data=replace(cfg.data, kind="imagefolder",
                                                                                    path=str(tmp_path / "faces"))))
