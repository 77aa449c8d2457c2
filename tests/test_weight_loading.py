"""Loading weights never falls back to random weights in silence (issue 27, item 5): ``pretrained=``,
``eval`` and ``export`` refuse a checkpoint that does not fit the model, listing the missing,
unexpected or mismatched tensors; ``pretrained_partial=true`` / ``--partial-load`` load what fits."""
from __future__ import annotations

import pytest
import torch

from petal_fast.config import ConfigError
from petal_fast.models import CheckpointError, build_backbone, build_model, full_state_dict, save_checkpoint
from petal_fast.train import Trainer, load_trained
from petal_fast.training.model import build_training_model

from test_train import tiny_cfg


def _backbone_file(tmp_path, name: str, **overrides) -> str:
    path = tmp_path / f"{name}.pt"
    torch.save({f"backbone.{k}": v for k, v in build_backbone(name, **overrides).state_dict().items()}, path)
    return str(path)


@pytest.mark.parametrize("source", ["vit", "wider", "unrelated"])
def test_pretrained_that_does_not_fit_is_refused(tmp_path, source):
    """A ViT for a Swin, another size, an unrelated dict: before, a warning "loaded 0 tensors" and
    training from random weights, exit 0."""
    path = {"vit": lambda: _backbone_file(tmp_path, "vit_tiny"),
            "wider": lambda: _backbone_file(tmp_path, "tiny", embed_dim=48, num_heads=(3, 6)),
            "unrelated": lambda: torch.save({"weights": torch.zeros(3), "bias": torch.ones(2)},
                                            tmp_path / "u.pt") or str(tmp_path / "u.pt")}[source]()
    cfg = tiny_cfg(tmp_path, mode="lora", pretrained=path)
    with pytest.raises(ConfigError, match=r"pretrained=.* does not fit this model .*(missing|unexpected|mismatched)"):
        build_training_model(cfg, 6, torch.device("cpu"))
    if source != "wider":  # nothing fits: an error even when partial loads are allowed
        with pytest.raises(ConfigError, match="only [0-9]+ of the [0-9]+ tensors of this model.s backbone"):
            build_training_model(tiny_cfg(tmp_path, mode="lora", pretrained=path, pretrained_partial=True), 6,
                                 torch.device("cpu"))


def test_partial_pretrained_loads_what_fits_and_warns(tmp_path):
    path = _backbone_file(tmp_path, "tiny", embedding_size=64)  # only the feature head differs
    cfg = tiny_cfg(tmp_path, mode="lora", pretrained=path, pretrained_partial=True)
    with pytest.warns(RuntimeWarning, match="mismatched"):
        model = build_training_model(cfg, 6, torch.device("cpu"))
    saved = torch.load(path, weights_only=True)
    own = model.state_dict()
    assert torch.equal(own["backbone.patch_embed.proj.weight"], saved["backbone.patch_embed.proj.weight"])


def test_pretrained_backbone_and_pretrain_run_files_load(tmp_path):
    """What the README describes still works strictly: a backbone file, or a pretrain run's model.pt
    whose head (the pretraining task's classes) is another size and is left out."""
    pre = build_model("pretrain", "tiny", num_classes=11)
    save_checkpoint(pre, tmp_path / "pre.pt", trainable_only=False)
    for path in (_backbone_file(tmp_path, "tiny"), str(tmp_path / "pre.pt")):
        model = build_training_model(tiny_cfg(tmp_path, mode="petalface", pretrained=path), 6, torch.device("cpu"))
        assert model.head.num_classes == 6
    ref = full_state_dict(pre)
    assert torch.equal(model.state_dict()["backbone.patch_embed.proj.weight"], ref["backbone.patch_embed.proj.weight"])


def test_cli_train_with_a_foreign_pretrained_exits_2(tmp_path, capsys):
    from petal_fast.cli import main
    path = _backbone_file(tmp_path, "vit_tiny")
    code = main(["train", "mode=lora", "backbone=tiny", "batch_size=8", "data.num_identities=4",
                 "data.images_per_identity=4", f"output={tmp_path / 'run'}", "progress=false", f"pretrained={path}"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit this model" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    Trainer(tiny_cfg(tmp, mode="lora", max_steps=1, epochs=1)).fit()
    return tmp / "run"


def _rewrite(run, tmp_path, change) -> str:
    raw = torch.load(run / "model.pt", weights_only=True)
    change(raw)
    out = tmp_path / "broken"
    out.mkdir(parents=True)
    torch.save(raw, out / "model.pt")
    return str(out)


def test_load_trained_refuses_what_does_not_fit(trained_run, tmp_path, capsys):
    def drop_adapter(raw):
        key = next(k for k in raw["state_dict"] if k.endswith("lora_B"))
        del raw["state_dict"][key]

    def other_head(raw):
        raw["state_dict"]["head.weight"] = torch.randn(6, 99)

    def extra(raw):
        raw["state_dict"]["backbone.nonsense"] = torch.zeros(2)

    for change, expect in ((drop_adapter, "missing 1: backbone."), (other_head, "mismatched 1: head.weight"),
                           (extra, "unexpected 1: backbone.nonsense")):
        run = _rewrite(trained_run, tmp_path / change.__name__, change)
        with pytest.raises(CheckpointError, match=expect):
            load_trained(run)
        with pytest.warns(RuntimeWarning, match=expect):
            model = load_trained(run, partial=True)
        assert model.head.weight.shape == (6, model.embedding_size)
        from petal_fast.cli import main
        assert main(["export", "--checkpoint", run, "--format", "pt2", "--alpha", "0.5",
                     "--output", str(tmp_path / change.__name__ / "x.pt2")]) == 2
        assert expect in capsys.readouterr().err
    model = load_trained(trained_run)  # an intact run loads as trained
    saved = torch.load(trained_run / "model.pt", weights_only=True)["state_dict"]
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v), k
