"""Training settings the demo's comparison needs: ``fixed_alpha`` (PETALface with a constant α, the
ablation of the quality weighting) and ``feature_rank`` (LoRA at PETALface's total rank)."""
from __future__ import annotations

import re

import pytest
import torch

from petal_fast.cli import main as cli_main
from petal_fast.config import ConfigError, DataConfig, TrainConfig, load_config
from petal_fast.train import Trainer, load_trained


def _cfg(tmp_path, **kw) -> TrainConfig:
    data = DataConfig(num_identities=4, images_per_identity=4, degrade=True, resolution=(8, 16))
    base = dict(mode="petalface", backbone="tiny", batch_size=8, epochs=1, progress=False, calibrate_batches=1,
                output=str(tmp_path / "run"), data=data)
    return TrainConfig(**{**base, **kw}).validate()


@pytest.mark.parametrize("words, expect", [
    (["fixed_alpha=1.5"], "fixed_alpha must be a number in [0, 1]"),
    (["fixed_alpha=-0.1"], "fixed_alpha must be a number in [0, 1]"),
    (["fixed_alpha=1e999"], "fixed_alpha must be a number in [0, 1]"),
    (["fixed_alpha=0.5", "mode=lora"], "fixed_alpha weights PETALface's two branches: it needs mode=petalface"),
    (["feature_rank=0"], "feature_rank must be an integer >= 1"),
])
def test_bad_values_name_the_key(words, expect):
    with pytest.raises(ConfigError, match=re.escape(expect)):
        load_config(None, words)


def _backbone_file(tmp_path) -> str:
    """A (random) pretrained backbone: a reloaded adapter run rebuilds its frozen part from it."""
    from petal_fast.models import build_model, full_state_dict
    torch.manual_seed(0)
    path = tmp_path / "backbone.pt"
    state = full_state_dict(build_model("pretrain", backbone="tiny", num_classes=4))
    torch.save({k: v for k, v in state.items() if k.startswith("backbone.")}, path)
    return str(path)


def test_fixed_alpha_trains_without_quality_and_reloads(tmp_path):
    trainer = Trainer(_cfg(tmp_path, fixed_alpha=0.25, pretrained=_backbone_file(tmp_path)))
    trainer.fit()
    model = trainer.model
    assert not hasattr(model.quality_to_alpha, "tau")  # no quality measure, nothing calibrated
    images = torch.rand(3, 3, 40, 40) * 2 - 1
    assert torch.equal(model.alpha(images), torch.full((3,), 0.25))
    again = load_trained(tmp_path / "run")
    with torch.no_grad():
        assert torch.allclose(again.embed(images), model.eval().embed(images), atol=1e-6)
    assert torch.equal(again.alpha(images), torch.full((3,), 0.25))


def test_fixed_alpha_is_the_weight_the_layers_see(tmp_path):
    """The model's α is the constant: its embedding is the one with that α passed explicitly, not another's."""
    model = Trainer(_cfg(tmp_path, fixed_alpha=0.25)).model.eval()
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.requires_grad:  # the adapters start at B = 0 (no effect): make both branches matter
                p.normal_(std=0.5)
        images = torch.rand(2, 3, 40, 40) * 2 - 1
        own = model.embedding(images)
        assert torch.equal(own, model.embedding(images, torch.full((2,), 0.25)))
        assert not torch.allclose(own, model.embedding(images, torch.full((2,), 0.75)))


def test_feature_rank_gives_lora_petalface_parameter_count(tmp_path):
    petal = Trainer(_cfg(tmp_path, rank=4)).model
    lora = Trainer(_cfg(tmp_path, mode="lora", rank=8, feature_rank=4, output=str(tmp_path / "l"))).model
    count = lambda m: sum(p.numel() for p in m.backbone.parameters() if p.requires_grad)  # noqa: E731
    assert count(petal) == count(lora) == petal.parameter_report().trainable


def test_cli_fixed_alpha(tmp_path):
    out = tmp_path / "cli"
    assert cli_main(["train", "mode=petalface", "fixed_alpha=0.5", "backbone=tiny", "batch_size=8", "epochs=1",
                     "data.num_identities=4", "data.images_per_identity=4", f"output={out}",
                     "progress=false"]) == 0
    assert torch.equal(load_trained(out).alpha(torch.zeros(2, 3, 40, 40)), torch.full((2,), 0.5))
