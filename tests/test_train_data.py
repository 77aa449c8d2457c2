"""`petal-fast train` on real data formats (RecordIO, ImageFolder) and on reruns in an existing folder."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from petal_fast.atomic_files import atomic_save
from petal_fast.training import state as training_state
from petal_fast.cli import main
from petal_fast.data import RecordIO, write_recordio
from petal_fast.train import load_trained

TINY = ["backbone=tiny", "batch_size=4", "max_steps=2", "progress=false", "calibrate_batches=1", "log_every=1"]


def _faces(n_ids: int, per_id: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """Random face-sized images of mixed sizes (a real pack is not one size), grouped by identity."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (28 + 4 * (j % 3), 30, 3), dtype=np.uint8), i)
            for i in range(n_ids) for j in range(per_id)]


def _pack(tmp_path: Path, n_ids: int = 5, per_id: int = 4) -> Path:
    rec = tmp_path / "train.rec"
    write_recordio(str(rec), _faces(n_ids, per_id))
    return rec


def _train(*words: str) -> int:
    return main(["train", *TINY, *words])


@pytest.mark.parametrize("mode", ["petalface", "lora"])
def test_train_on_recordio_pack(tmp_path, mode, capsys):
    """The class count comes from the pack's header record: no `labels` attribute, no config key needed."""
    rec = _pack(tmp_path)
    out = tmp_path / "run"
    assert _train(f"mode={mode}", "data.kind=recordio", f"data.path={rec}", f"output={out}") == 0
    model = load_trained(out)
    assert model.head.num_classes == 5
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert "final loss" in capsys.readouterr().out


def test_train_on_recordio_without_header_scans_labels(tmp_path):
    """A pack without the insightface header record: the classes come from the records' labels."""
    rec, idx = tmp_path / "plain.rec", tmp_path / "plain.idx"
    blob, lines = b"", []
    for k, (img, label) in enumerate(_faces(3, 4)):
        import io
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        payload = struct.pack("<IfQQ", 0, float(label), k, 0) + buf.getvalue()
        lines.append(f"{k}\t{len(blob)}\n")
        blob += struct.pack("<II", 0xCED7230A, len(payload)) + payload + b"\0" * (-len(payload) % 4)
    rec.write_bytes(blob)
    idx.write_text("".join(lines))
    assert RecordIO(str(rec)).num_classes == 3
    out = tmp_path / "run"
    assert _train("mode=lora", "data.kind=recordio", f"data.path={rec}", "data.degrade=false", f"output={out}") == 0
    assert load_trained(out).head.num_classes == 3


def test_num_classes_overrides_and_is_checked(tmp_path, capsys):
    rec = _pack(tmp_path)
    out = tmp_path / "run"
    assert _train("mode=lora", "data.kind=recordio", f"data.path={rec}", "num_classes=9", f"output={out}") == 0
    assert load_trained(out).head.num_classes == 9
    capsys.readouterr()
    assert _train("mode=lora", "data.kind=recordio", f"data.path={rec}", "num_classes=3",
                  f"output={tmp_path / 'small'}") == 2
    err = capsys.readouterr().err
    assert "num_classes=3" in err and "5 classes" in err and "Traceback" not in err
    assert not (tmp_path / "small").exists()


def test_train_on_image_folder(tmp_path):
    root = tmp_path / "faces"
    for k, (img, label) in enumerate(_faces(4, 3)):
        folder = root / f"person_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{k}.png")
    out = tmp_path / "run"
    assert _train("mode=petalface", "data.kind=imagefolder", f"data.path={root}", "data.degrade=false",
                  f"output={out}") == 0
    assert load_trained(out).head.num_classes == 4


def test_bad_config_value_exits_with_message(tmp_path, capsys):
    for word, expect in [("lr=fast", "lr must be a number"), ("batch_size=0", "batch_size must be an integer >= 1"),
                         ("data.kind=zip", "data.kind must be one of"), ("dropout=1.5", "dropout must be")]:
        assert _train(word, f"output={tmp_path / 'x'}") == 2
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_malformed_pack_exits_with_message_naming_file(tmp_path, capsys):
    rec = _pack(tmp_path)
    data = bytearray(rec.read_bytes())
    data[100:104] = b"\xff\xff\xff\xff"  # inside record 1: its image no longer decodes (or its header breaks)
    (tmp_path / "train.idx").write_text("0\t0\n1\t999999\n")
    assert _train("mode=lora", "data.kind=recordio", f"data.path={rec}", f"output={tmp_path / 'r'}") == 2
    err = capsys.readouterr().err
    assert "train.idx" in err and "record 1" in err and "Traceback" not in err


def _run_words(out: Path, *extra: str) -> list[str]:
    return ["mode=lora", "data.num_identities=4", "data.images_per_identity=2", f"output={out}", *extra]


def test_rerun_with_another_config_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(*_run_words(out)) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _train(*_run_words(out, "loss=arcface", "lr=0.01")) == 2
    err = capsys.readouterr().err
    assert "loss" in err and "lr" in err and "resume=false" in err and "new output folder" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files  # nothing rewritten
    # keys that do not change the computation may differ
    assert _train(*_run_words(out, "log_every=5", "data.num_workers=0")) == 0
    assert (out / "model.pt").read_bytes() == files["model.pt"]  # complete run: 0 steps, model.pt kept
    # resume=false starts over in the same folder
    assert _train(*_run_words(out, "loss=arcface", "resume=false")) == 0
    assert load_trained(out).head is not None
    saved = training_state.load(out / training_state.LAST)
    assert saved["config"]["loss"] == "arcface" and saved["step"] == 2


def test_rerun_refused_when_only_model_pt_is_left(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(*_run_words(out)) == 0
    (out / training_state.LAST).unlink()
    before = (out / "model.pt").read_bytes()
    assert _train(*_run_words(out, "rank=4")) == 2
    assert "rank" in capsys.readouterr().err and (out / "model.pt").read_bytes() == before


def test_corrupt_checkpoint_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(*_run_words(out, "max_steps=1")) == 0
    last = out / training_state.LAST
    last.write_bytes(last.read_bytes()[:200])  # truncated
    capsys.readouterr()
    assert _train(*_run_words(out, "max_steps=1")) == 2
    err = capsys.readouterr().err
    assert str(last) in err and "truncated" in err
    last.write_bytes(b"")
    assert _train(*_run_words(out, "max_steps=1")) == 2
    assert "empty" in capsys.readouterr().err


def test_stale_temporary_files_are_cleaned_on_next_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = 2**22 + 12345  # above pid_max on default systems: no such process
    stale = [out / f".checkpoint_last.pt.tmp{dead}", out / f".model.pt.tmp{dead}"]
    for p in stale:
        p.write_bytes(b"\0" * 100)
    mine = out / f".checkpoint_last.pt.tmp{os.getppid()}"  # a live process's file stays
    mine.write_bytes(b"x")
    foreign = out / "notes.tmp"
    foreign.write_text("not ours")
    assert _train(*_run_words(out, "max_steps=1")) == 0
    assert not any(p.exists() for p in stale) and mine.exists() and foreign.exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name and p not in (mine, foreign)]


def test_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    """A readable checkpoint whose optimizer state does not fit: refused, model and optimizer untouched."""
    from petal_fast.config import load_config
    from petal_fast.models import trainable_state_dict
    from petal_fast.train import Trainer
    words = _run_words(tmp_path / "run", "max_steps=1", "progress=false")
    assert _train(*words) == 0
    last = tmp_path / "run" / training_state.LAST
    state = training_state.load(last)
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]  # one group too few
    atomic_save(state, last)
    trainer = Trainer(load_config(None, [*TINY, *words]))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(training_state.CheckpointFileError, match="does not fit this run"):
        trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and trainer.step == 0
    assert not trainer.optimizer.state and torch.equal(torch.get_rng_state(), rng)
    assert trainable_state_dict(trainer.model).keys()


def test_eval_with_bad_files_exits_with_message(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(*_run_words(out, "max_steps=1")) == 0
    capsys.readouterr()
    (tmp_path / "bad.bin").write_bytes(b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"N.")
    assert main(["eval", "--checkpoint", str(out), "--data", str(tmp_path / "bad.bin"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "bad.bin" in err and "Traceback" not in err
    (out / "model.pt").write_bytes(b"\0" * 64)
    assert main(["eval", "--checkpoint", str(out), "--data", str(tmp_path / "bad.bin")]) == 2
    assert "model.pt" in capsys.readouterr().err
