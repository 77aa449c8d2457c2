"""Every user-facing bound is checked up front with an error naming the argument (issue 27, item 4):
evaluation options, configuration sizes (positive where zero is meaningless, memory estimates where a
value would exhaust RAM), non-finite module parameters, α per image. Property-based: any value either
passes the check and then works, or is refused with a ValueError naming what was wrong."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from petal_fast import PetalLinear
from petal_fast.config import ConfigError, load_config
from petal_fast.data import Degrade
from petal_fast.eval import add_eval_arguments
from petal_fast.eval.cli import check_eval_arguments
from petal_fast.memory import check_fits
from petal_fast.models import build_backbone, build_model
from petal_fast.nn.margin_loss import MarginSoftmaxLoss
from petal_fast.quality import QualityToAlpha, alpha_from_quality, calibrate
from petal_fast.training.resources import check_model_fits

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([math.nan, math.inf, -math.inf, 0.0])


# --- non-finite module parameters ------------------------------------------------------------------
@PROPS
@given(scale=ANY_FLOAT)
def test_petal_linear_scale(scale):
    if not math.isfinite(scale):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            PetalLinear(8, 6, rank=2, scale=scale)
        return
    assume(abs(scale) < 1e30)
    layer = PetalLinear(8, 6, rank=2, scale=scale)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert torch.isfinite(layer(torch.randn(3, 8), alpha=torch.rand(3))).all()


@PROPS
@given(tau=ANY_FLOAT, slope=ANY_FLOAT, mode=st.sampled_from(["oriented", "paper"]))
def test_quality_to_alpha_parameters(tau, slope, mode):
    bad = [name for name, ok in (("slope", math.isfinite(slope) and slope > 0), ("tau", math.isfinite(tau))) if not ok]
    if bad:
        with pytest.raises(ValueError, match=f"({'|'.join(bad)}) must be a finite number"):
            QualityToAlpha("resolution", tau=tau, slope=slope, mode=mode)
        used = [b for b in bad if mode == "oriented" or b == "tau"]  # the paper's mapping has no slope
        if used:
            with pytest.raises(ValueError, match=f"({'|'.join(used)}) must be a finite number"):
                alpha_from_quality(torch.tensor([3.0, 5.0], dtype=torch.float64), tau, slope, mode)
        return
    q2a = QualityToAlpha("resolution", tau=tau, slope=slope, mode=mode)
    alpha = q2a(torch.rand(3, 3, 16, 16), original_size=torch.tensor([8, 16, 32]))
    assert torch.isfinite(alpha).all() and (mode == "paper" or ((alpha >= 0) & (alpha <= 1)).all())


@PROPS
@given(slope=ANY_FLOAT)
def test_calibrate_slope(slope):
    data = torch.rand(4, 3, 16, 16)
    fn = lambda images: images.mean(dim=(1, 2, 3))  # noqa: E731
    if math.isfinite(slope) and slope > 0:
        assert calibrate(fn, data, slope=slope, progress=False).slope.item() == slope
    else:
        with pytest.raises(ValueError, match="slope must be a finite number > 0"):
            calibrate(fn, data, slope=slope, progress=False)


@PROPS
@given(h=ANY_FLOAT, momentum=ANY_FLOAT, scale=ANY_FLOAT)
def test_margin_head_parameters(h, momentum, scale):
    problems = {"scale": not (math.isfinite(scale) and scale > 0), "h": not math.isfinite(h),
                "momentum": not 0 <= momentum <= 1}
    if any(problems.values()):
        with pytest.raises(ValueError) as err:
            MarginSoftmaxLoss(8, 5, loss="adaface", h=h, momentum=momentum, scale=scale)
        assert str(err.value).split(" must ")[0] in [k for k, v in problems.items() if v]
        return
    assume(scale < 1e6)
    head = MarginSoftmaxLoss(8, 5, loss="adaface", h=h, momentum=momentum, scale=scale)
    assert torch.isfinite(head(torch.randn(4, 8), torch.tensor([0, 1, 2, 4])))


@PROPS
@given(low=ANY_FLOAT, high=ANY_FLOAT)
def test_petalface_input_range(low, high):
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        with pytest.raises(ValueError, match="input_range must be"):
            build_model("petalface", "tiny", quality=0.5, input_range=(low, high))
    else:
        build_model("petalface", "tiny", quality=0.5, input_range=(low, high))


@PROPS
@given(noise=ANY_FLOAT, blur=ANY_FLOAT)
def test_degrade_ranges(noise, blur):
    if math.isfinite(noise) and noise >= 0 and math.isfinite(blur) and blur >= 0:
        assume(blur < 50)
        Degrade.fixed(8, noise_std=noise, blur_sigma=blur)(torch.zeros(16, 16, 3, dtype=torch.uint8).numpy())
    else:
        with pytest.raises(ValueError, match="noise_std|blur_sigma"):
            Degrade.fixed(8, noise_std=noise, blur_sigma=blur)


# --- α per image -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def petalface():
    return build_model("petalface", "tiny", num_classes=5, quality=None).eval()


@settings(max_examples=20, deadline=None)
@given(images=st.integers(1, 4), values=st.integers(0, 6), two_d=st.booleans())
def test_one_alpha_per_image(petalface, images, values, two_d):
    x = torch.rand(images, 3, 40, 40) * 2 - 1
    alpha = torch.rand(values, 1) if two_d else torch.rand(values)
    with torch.no_grad():
        if values == images and not two_d:
            assert petalface.embedding(x, alpha).shape == (images, petalface.embedding_size)
        else:
            with pytest.raises(ValueError, match=rf"alpha must hold one value per image, shape \({images},\)"):
                petalface.embedding(x, alpha)


# --- evaluation options ----------------------------------------------------------------------------
def _eval_args(**options) -> argparse.Namespace:
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(["--data", "synthetic"])
    for k, v in options.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("option, value, expect", [
    ("lowres", 0, "--lowres must be a resolution in [1, --image-size = 112]"),
    ("lowres", 100_000, "--lowres must be a resolution in [1, --image-size = 112]"),
    ("gallery_per_identity", -1, "--gallery-per-identity must be an integer >= 1"),
    ("gallery_per_identity", 0, "--gallery-per-identity must be an integer >= 1"),
    ("batch_size", 0, "--batch-size must be an integer >= 1"),
    ("num_pairs", 0, "--num-pairs must be an integer >= 1"),
    ("open_set_fraction", 1.0, "--open-set-fraction must be a fraction in [0, 1)"),
    ("max_images", 0, "--max-images must be an integer >= 1"),
    ("image_size", 8, "--image-size must be an integer >= 16"),
    ("image_size", 10**6, "this evaluation needs at least"),
    ("num_pairs", 10**12, "this evaluation needs at least"),
])
def test_eval_option_out_of_range(option, value, expect):
    with pytest.raises(ValueError) as err:
        check_eval_arguments(_eval_args(**{option: value}))
    assert expect in str(err.value)


def test_cli_eval_lowres_is_refused_before_anything_runs(tmp_path, capsys):
    """``--lowres 100000`` was killed by the OOM killer at 22.8 GB; now exit 2 and one line."""
    from petal_fast.cli import main
    from petal_fast.models import save_checkpoint
    model = build_model("lora", "tiny", num_classes=4)
    cfg = load_config(None, ["mode=lora", "backbone=tiny", "num_classes=4"]).to_dict()
    save_checkpoint(model, tmp_path / "model.pt", metadata={"config": cfg})
    for lowres in ("100000", "0"):
        assert main(["eval", "--checkpoint", str(tmp_path), "--data", "synthetic:ids=3,per_id=2,size=40",
                     "--lowres", lowres, "--out", str(tmp_path / "eval")]) == 2
        assert "--lowres must be a resolution in [1, --image-size = 40]" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_bin_decoded_at_a_size_that_cannot_fit_is_refused(tmp_path):
    from petal_fast.eval import load_bin, save_bin
    import numpy as np
    save_bin(str(tmp_path / "p.bin"), np.zeros((4, 8, 8, 3), np.uint8), [True, False])
    with pytest.raises(ValueError, match=r"decoding .*p.bin needs at least .*lower --image-size"):
        load_bin(str(tmp_path / "p.bin"), 10**6)
    assert load_bin(str(tmp_path / "p.bin"), 16)[0].shape == (4, 16, 16, 3)


INTS = st.integers(-3, 70) | st.integers(10**6, 10**13)


@PROPS
@given(image_size=INTS, lowres=st.none() | INTS, batch=INTS, pairs=INTS, gallery=INTS,
       fraction=ANY_FLOAT, max_images=st.none() | INTS)
def test_eval_options_property(image_size, lowres, batch, pairs, gallery, fraction, max_images):
    """Either every option is in its documented range and the estimate fits, or a ValueError names one."""
    args = _eval_args(image_size=image_size, lowres=lowres, batch_size=batch, num_pairs=pairs,
                      gallery_per_identity=gallery, open_set_fraction=fraction, max_images=max_images)
    in_range = (image_size >= 16 and (lowres is None or 1 <= lowres <= image_size) and batch >= 1 and pairs >= 1
                and gallery >= 1 and math.isfinite(fraction) and 0 <= fraction < 1
                and (max_images is None or max_images >= 1))
    try:
        check_eval_arguments(args)
    except ValueError as err:
        assert str(err).startswith("--") or "this evaluation needs at least" in str(err)
        assert not in_range or "needs at least" in str(err)
        return
    assert in_range and 2 * batch * 3 * image_size ** 2 * 4 < 10**12


# --- configuration sizes ---------------------------------------------------------------------------
@pytest.mark.parametrize("override, expect", [
    ("backbone_overrides={'embed_dim': 0}", "backbone_overrides.embed_dim must be an integer >= 1"),
    ("backbone_overrides={'window_size': 0}", "backbone_overrides.window_size must be an integer >= 1"),
    ("backbone_overrides={'patch_size': 0}", "backbone_overrides.patch_size must be an integer >= 1"),
    ("backbone_overrides={'depths': []}", "backbone_overrides.depths must be a list of integers >= 1"),
    ("backbone_overrides={'drop_path_rate': 1.5}", "backbone_overrides.drop_path_rate must be a number in [0, 1)"),
])
def test_zero_sizes_are_config_errors(override, expect):
    with pytest.raises(ConfigError, match=expect.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["backbone=tiny", override])


@pytest.mark.parametrize("override, expect", [
    ("num_classes=10000000000", "margin head (10,000,000,000 classes)"),
    ("backbone_overrides={'embed_dim': 100000}", "transformer blocks' weights"),
    ("batch_size=10000000", "activations (batch_size=10000000)"),
    ("rank=1000000", "gradients and AdamW state"),
    ("backbone_overrides={'depths': [10000000, 2]}", "transformer blocks' weights"),
    ("backbone_overrides={'window_size': 7}", "feature map (10, 10) is not divisible by window 7"),
])
def test_sizes_that_cannot_build_or_fit_are_config_errors(override, expect):
    cfg = load_config(None, ["backbone=tiny", "mode=petalface", override])
    with pytest.raises(ConfigError, match="needs at least|does not build") as err:
        check_model_fits(cfg, cfg.num_classes or 10, 40, torch.device("cpu"))
    assert expect in str(err.value)


def test_check_fits_lists_the_parts():
    check_fits({"a": 10, "b": 20}, "x", "fix it", available=30)
    with pytest.raises(ValueError, match=r"x needs at least 40.0 MiB of RAM \(b 30.0 MiB, a 10.0 MiB\), but 1.0 MiB "
                                         r"is available: fix it"):
        check_fits({"a": 10 << 20, "b": 30 << 20}, "x", "fix it", available=1 << 20)


SWIN_FIELDS = {"img_size": INTS, "patch_size": INTS, "embed_dim": INTS, "window_size": INTS, "embedding_size": INTS,
               "depths": st.lists(INTS, min_size=0, max_size=3), "num_heads": st.lists(INTS, min_size=0, max_size=3)}


@settings(max_examples=40, deadline=None)
@given(overrides=st.fixed_dictionaries({}, optional=SWIN_FIELDS))
def test_backbone_overrides_property(overrides):
    """Any overrides of the tiny Swin: refused with a ConfigError, or the model builds and embeds."""
    words = ["backbone=tiny", "mode=lora", f"backbone_overrides={overrides!r}"]
    try:
        cfg = load_config(None, words)
        size = cfg.backbone_overrides.get("img_size", 40)
        check_model_fits(cfg, 10, size, torch.device("cpu"))
    except ConfigError as err:
        assert str(err)
        return
    backbone = build_backbone("tiny", **cfg.backbone_overrides).eval()
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, size, size))
    assert out.shape == (2, backbone.embedding_size)
