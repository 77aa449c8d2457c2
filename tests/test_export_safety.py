"""Loading ``.pt2`` exports safely (issue 27, item 8): ``torch.export.load`` unpickles parts of the
archive, so a tampered file runs code; ``petal_fast.export.load_pt2`` loads petal-fast's exports with
the weights-only unpickler and refuses a tampered one without running anything."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from petal_fast.export import load_pt2


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling it creates the marker file: proof that code ran
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A .pt2 as `petal-fast export` writes it (tiny model merged at a fixed α)."""
    from petal_fast.export import export
    from petal_fast.models import build_model
    out = tmp_path_factory.mktemp("pt2") / "model.pt2"
    export(build_model("petalface", "tiny", num_classes=4), 40, "pt2", 0.5, out)
    return out


def _tamper(src, dst, marker: str, member: str) -> None:
    """Replace the example inputs, or a weight (marked ``use_pickle`` in the weights config), by a pickle
    that runs code."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        config_name = next(n for n in names if n.endswith("model_weights_config.json"))
        config = json.loads(zin.read(config_name))
        first = next(iter(config["config"].values()))
        for info in zin.infolist():
            data = zin.read(info.filename)
            if member == "weight" and info.filename == config_name:
                first["use_pickle"] = True
                data = json.dumps(config).encode()
            hit = info.filename.endswith("data/sample_inputs/model.pt") if member == "inputs" else \
                info.filename.endswith("data/weights/" + first["path_name"])
            if hit:
                data = pickle.dumps(_Evil(marker))
            zout.writestr(info, data)


def test_exports_load_weights_only(exported):
    program = load_pt2(exported)
    images = torch.rand(3, 3, 40, 40) * 2 - 1
    assert program.module()(images).shape == (3, 128)


@pytest.mark.parametrize("member", ["inputs", "weight"])
def test_tampered_pt2_is_refused_without_running_code(exported, tmp_path, member):
    evil, marker = tmp_path / "evil.pt2", tmp_path / "code-ran"
    _tamper(exported, evil, str(marker), member)
    with pytest.raises(ValueError, match="refusing to load"):
        load_pt2(evil)
    assert not marker.exists()
    # what the README warns about: torch.export.load itself runs it (in a child, to keep this process clean)
    subprocess.run([sys.executable, "-c", f"import torch\ntry: torch.export.load({str(evil)!r})\nexcept Exception: pass"],
                   capture_output=True, timeout=300, cwd=tmp_path)
    assert marker.exists()


def test_pt2_with_pickled_objects_is_refused(exported, tmp_path):
    bad = tmp_path / "objects.pt2"
    with zipfile.ZipFile(exported) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        root = zin.namelist()[0].split("/", 1)[0]
        zout.writestr(f"{root}/data/constants/opaque_obj_0", pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        load_pt2(bad)
    with pytest.raises(ValueError, match="not a .pt2 archive"):
        (tmp_path / "junk.pt2").write_bytes(b"junk")
        load_pt2(tmp_path / "junk.pt2")
