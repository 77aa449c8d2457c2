"""Batched BRISQUE: each stage against the ``brisque`` package (0.2.0) and the float64 reference,
the fused stage on every backend, the input contract, and score agreement on real photographs.

The package is the oracle. Its ``BRISQUE.score`` fails with NumPy >= 2.4: ``scale_features`` calls
``float()`` on the one-element arrays its AGGD fit returns for σ_l, σ_r and the mean. ``Oracle``
below overrides only that method (taking element 0 of each feature), so every other step —
rgb2gray, MSCN, the fits with ``scipy.optimize.root``, ``cv2.resize``, libsvm's prediction — is the
package's own code.
"""
from __future__ import annotations

import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import petal_fast
from petal_fast import _ext
from petal_fast.quality import brisque, brisque_features, ggd, resize, svr
from petal_fast.reference import brisque as ref

from conftest import HAS_CUDA, rel_err, triton_interpreter_ok

pkg = pytest.importorskip("brisque.brisque", reason="the brisque package (with OpenCV) is the test oracle")
cv2 = pytest.importorskip("cv2")
skimage_color = pytest.importorskip("skimage.color")


class Oracle(pkg.BRISQUE):
    """The package with its NumPy-2.4-incompatible ``float()`` conversion replaced (see module doc)."""

    def scale_features(self, features):
        f = np.array([np.asarray(v, dtype=np.float64).reshape(-1)[0] for v in features])
        lo = np.asarray(self.scale_params["min_"], dtype=np.float64)
        hi = np.asarray(self.scale_params["max_"], dtype=np.float64)
        return -1 + 2.0 / (hi - lo) * (f - lo)

    def features(self, gray: np.ndarray) -> np.ndarray:
        half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        f = np.concatenate([self.calculate_brisque_features(gray, 7, 7 / 6),
                            self.calculate_brisque_features(half, 7, 7 / 6)])
        return np.array([np.asarray(v, dtype=np.float64).reshape(-1)[0] for v in f])


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle()


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 (or HW) numpy → (1, C, H, W) tensor."""
    img = np.array(img)  # writable copy
    return torch.from_numpy(img[..., None] if img.ndim == 2 else img).permute(2, 0, 1)[None]


def textured(b: int, c: int, h: int, w: int, dtype=torch.float64) -> torch.Tensor:
    """Random images with structure (smooth gradient + noise + edges), values inside [0, 1]."""
    yy = torch.linspace(0, 1, h)[:, None]
    xx = torch.linspace(0, 1, w)[None, :]
    base = 0.35 + 0.3 * torch.sin(6 * xx + 4 * yy * torch.rand(b, c, 1, 1))
    edge = 0.15 * (xx > torch.rand(b, c, 1, 1)).double()
    return (base + edge + 0.05 * torch.randn(b, c, h, w)).clamp(0, 1).to(dtype)


# ---------------------------------------------------------------------------------------------
# each stage: float64 reference vs the package
# ---------------------------------------------------------------------------------------------

def test_luminance_matches_rgb2gray():
    img = (torch.rand(23, 19, 3) * 255).to(torch.uint8).numpy()
    want = skimage_color.rgb2gray(img)
    assert np.abs(ref.luminance(to_tensor(img))[0].numpy() - want).max() < 1e-14


def test_mscn_and_products_match_package(oracle):
    gray = textured(1, 1, 21, 26)[0, 0].numpy()
    m = oracle.calculate_mscn_coefficients(gray, 7, 7 / 6)
    got = ref.mscn(torch.from_numpy(gray)[None])
    assert rel_err(got[0], torch.from_numpy(m)) < 1e-12
    want = oracle.calculate_pair_product_coefficients(m)
    for name, prod in ref.pair_products(got).items():
        assert rel_err(prod[0], torch.from_numpy(want[name])) < 1e-12, name


def test_aggd_fit_matches_package(oracle):
    # heavy-tailed, skewed samples: shapes away from 2 and unequal left/right spreads
    for _ in range(4):
        x = torch.randn(3000, dtype=torch.float64) ** 3 * torch.where(torch.rand(3000) < 0.5, 0.7, 1.3)
        want = oracle.asymmetric_generalized_gaussian_fit(x.numpy())
        got = ref.aggd_fit(ref.moments(x[None]))
        fast = ggd.aggd_fit(ref.moments(x[None]))
        for g, f, w in zip(got, fast, (want[0], want[1], want[2] ** 2, want[3] ** 2)):
            w = float(np.asarray(w).reshape(-1)[0])
            assert abs(g.item() - w) <= 1e-6 * max(1.0, abs(w))
            assert abs(f.item() - g.item()) <= 1e-12 * max(1.0, abs(g.item()))


def test_solve_shape_inverts_phi():
    nu = torch.exp(torch.empty(200, dtype=torch.float64).uniform_(-2.5, 2.5))
    r = torch.exp(ggd.log_phi(nu))
    assert rel_err(ggd.solve_shape(r), nu) < 1e-11
    assert rel_err(ref.solve_shape(r), nu) < 1e-11


@pytest.mark.parametrize("h,w", [(16, 16), (17, 23), (21, 30), (33, 18)])
def test_resize_half_matches_opencv(h, w):
    gray = torch.rand(2, h, w, dtype=torch.float64)
    want = np.stack([cv2.resize(g.numpy(), None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC) for g in gray])
    got = resize.resize_half(gray)
    assert got.shape == want.shape
    assert np.abs(got.numpy() - want).max() < 1e-14
    assert np.abs(ref.resize_half(gray).numpy() - want).max() < 1e-14


def test_features_match_package(oracle):
    img = (textured(1, 3, 40, 37) * 255).round().to(torch.uint8)
    gray = skimage_color.rgb2gray(img[0].permute(1, 2, 0).numpy())
    want = torch.from_numpy(oracle.features(gray))
    assert rel_err(ref.brisque_features(img)[0], want) < 1e-8
    assert rel_err(brisque_features(img)[0], want) < 1e-8


def test_svr_matches_libsvm(oracle):
    from libsvm import svmutil
    model = svr.load_model("cpu")
    x = torch.empty(5, 36, dtype=torch.float64).uniform_(-1, 1)
    want = []
    for row in x.tolist():
        nodes, _ = svmutil.gen_svm_nodearray(row, isKernel=False)
        want.append(svmutil.libsvm.svm_predict_values(oracle.model, nodes, (svmutil.c_double * 1)()))
    feats = (x + 1) / 2 * (model.f_max - model.f_min) + model.f_min  # undo the scaling
    assert rel_err(svr.predict(feats, model), torch.tensor(want, dtype=torch.float64)) < 1e-10
    assert rel_err(ref.svr(x, model.support, model.coef, model.rho, model.gamma), torch.tensor(want, dtype=torch.float64)) < 1e-10


# ---------------------------------------------------------------------------------------------
# model files: read as data, without importing the package, with a restricted unpickler
# ---------------------------------------------------------------------------------------------

def test_model_loads_without_importing_brisque():
    code = ("import sys, torch\nimport petal_fast.quality as q\n"
            "s = q.brisque(torch.rand(2, 3, 16, 20))\n"
            "assert s.shape == (2,) and torch.isfinite(s).all()\n"
            "assert 'brisque' not in sys.modules and 'cv2' not in sys.modules, sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_scaling_pickle_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "normalize.pickle"
    path.write_bytes(pickle.dumps({"min_": Evil(), "max_": [1.0]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        svr.load_scaling(path)
    path.write_bytes(pickle.dumps({"min_": np.zeros(3), "max_": np.ones(3)}))
    lo, hi = svr.load_scaling(path)
    assert lo.tolist() == [0.0] * 3 and hi.tolist() == [1.0] * 3


def test_model_shapes():
    m = svr.load_model("cpu")
    assert m.f_min.shape == m.f_max.shape == (36,) and m.support.shape == (m.coef.numel(), 36)
    with pytest.raises(ValueError, match="epsilon_svr"):
        svr.parse_libsvm("svm_type c_svc\nkernel_type rbf\nSV\n")


# ---------------------------------------------------------------------------------------------
# the fused stage on every backend against the float64 reference
# ---------------------------------------------------------------------------------------------

def _ref_moments(images: torch.Tensor) -> torch.Tensor:
    gray = ref.luminance(images)
    return torch.stack([ref.mscn_moments(gray), ref.mscn_moments(ref.resize_half(gray))], dim=1)


@pytest.mark.skipif(not _ext.has_op("brisque_moments"), reason="C++ extension not built")
@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (3, 3, 17, 29), (2, 3, 40, 33), (4, 1, 23, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_cpp_moments(shape, dtype):
    x = textured(*shape)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    got = _ext.op("brisque_moments")(x, 2)
    assert rel_err(got, _ref_moments(x)) < 1e-12
    assert torch.equal(got[..., 2] + got[..., 4], _ref_moments(x)[..., 2] + _ref_moments(x)[..., 4])


@pytest.mark.skipif(not _ext.has_op("brisque_moments"), reason="C++ extension not built")
def test_cpp_non_contiguous_and_errors():
    x = textured(2, 3, 24, 20).permute(0, 1, 3, 2)  # not contiguous
    assert rel_err(_ext.op("brisque_moments")(x, 2), _ref_moments(x)) < 1e-12
    with pytest.raises(RuntimeError, match="scales"):
        _ext.op("brisque_moments")(x, 3)
    with pytest.raises(RuntimeError, match="uint8, float32 or float64"):
        _ext.op("brisque_moments")(x.half(), 1)


@pytest.mark.skipif(not _ext.has_op("brisque_moments"), reason="C++ extension not built")
@pytest.mark.parametrize("h,w", [(4, 4), (5, 7), (6, 9), (9, 5), (8, 13), (11, 12)])
def test_cpp_moments_every_resize_edge_and_lane_tail(h, w):
    """Widths 4…13: the half-size resize's clamped edge columns and its interior loop, and rows that
    are not a multiple of the 8 summation lanes; flat patches take the direct-sum fix-up."""
    x = textured(3, 3, h, w)
    x[1, :, : h // 2] = 0.25  # constant rows: (numerically) flat windows
    got = _ext.op("brisque_moments")(x, 2)
    assert rel_err(got, _ref_moments(x)) < 1e-12
    assert torch.equal(got[..., 2] + got[..., 4], _ref_moments(x)[..., 2] + _ref_moments(x)[..., 4])


@pytest.mark.skipif(not _ext.has_op("brisque_score"), reason="C++ extension not built")
def test_cpp_score_is_the_same_on_any_thread_count_and_ranges_are_exact():
    """Images are handed to threads dynamically; each is computed whole by one thread, so the bits do
    not depend on how many threads there are. The per-image [min, max] is exact in every input type."""
    m = svr.load_model("cpu")
    x = textured(7, 3, 23, 31)
    x[2, 1, 4, 5], x[5, 0, 0, 0] = 1.0, 0.0
    outs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_ext.op("brisque_score")(x, m.f_min, m.f_max, m.support, m.coef, m.rho, m.gamma))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
    for t in (x, x.float(), (x * 255).round().to(torch.uint8)):
        ranges = _ext.op("brisque_score")(t, m.f_min, m.f_max, m.support, m.coef, m.rho, m.gamma)[2]
        flat = t.flatten(1).double()
        assert torch.equal(ranges, torch.stack([flat.amin(1), flat.amax(1)], 1))
    y = x.clone()
    y[3, 2, 7, 8], y[4, 0, 1, 1] = float("nan"), float("inf")
    ranges = _ext.op("brisque_score")(y, m.f_min, m.f_max, m.support, m.coef, m.rho, m.gamma)[2]
    assert ranges[3].isnan().all() and ranges[4, 1] == float("inf") and not ranges[[0, 1, 2, 5, 6]].isnan().any()


@pytest.mark.skipif(not triton_interpreter_ok() and not HAS_CUDA, reason="needs Triton (interpreter or CUDA)")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_triton_moments(dtype, tol):
    from petal_fast.kernels import brisque as kb
    device = "cuda" if HAS_CUDA else "cpu"
    gray = ref.luminance(textured(2, 1, 17, 19)).to(device)
    got = kb.mscn_moments(gray.to(dtype), block_h=16, block_w=16)  # two tiles across, two down
    want = ref.mscn_moments(gray)
    assert not torch.isnan(got).any()
    assert rel_err(got.cpu(), want.cpu()) < tol


@pytest.mark.skipif(not triton_interpreter_ok() and not HAS_CUDA, reason="needs Triton (interpreter or CUDA)")
def test_triton_backend_scores():
    x = textured(1, 3, 16, 18)
    with petal_fast.use_backend("torch"):
        want = brisque(x)
    with petal_fast.use_backend("triton"):
        got = brisque(x.cuda() if HAS_CUDA else x).cpu()
    assert torch.allclose(got, want, rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_backends_agree(backend):
    if backend == "cpp" and not _ext.has_op("brisque_moments"):
        pytest.skip("C++ extension not built")
    x = textured(3, 3, 31, 26)
    with petal_fast.use_backend("reference"):
        want = brisque(x)
    with petal_fast.use_backend(backend):
        got = brisque(x)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert torch.allclose(got, want, rtol=0, atol=1e-8)
    with petal_fast.use_backend("reference"):
        want_f = brisque_features(x)
    with petal_fast.use_backend(backend):
        got_f = brisque_features(x)
    assert got_f.shape == (3, 36) and rel_err(got_f, want_f) < 1e-10


def test_batch_equals_per_image_and_dtypes():
    x = textured(4, 3, 20, 24)
    batch = brisque(x)
    single = torch.cat([brisque(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(batch, single, rtol=0, atol=1e-9)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(brisque(u8), brisque(u8.double() / 255), rtol=0, atol=1e-8)
    assert torch.allclose(brisque(x.float()), brisque(x.float().double()), rtol=0, atol=1e-8)
    gray = x[:, :1]
    assert torch.allclose(brisque(gray), brisque(gray.expand(-1, 3, -1, -1)), rtol=0, atol=1e-8)
    assert brisque(x[:0]).shape == (0,)


# ---------------------------------------------------------------------------------------------
# input contract
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_input_contract_errors(backend):
    if backend == "cpp" and not _ext.has_op("brisque_score"):
        pytest.skip("C++ extension not built")
    with petal_fast.use_backend(backend):
        _check_contract()


def _check_contract():
    good = torch.rand(2, 3, 16, 16)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        brisque(good.numpy())
    with pytest.raises(TypeError, match="uint8"):
        brisque((good * 100).int())
    with pytest.raises(ValueError, match=r"add the batch dimension"):
        brisque(good[0])
    with pytest.raises(ValueError, match="C = 1 .* or 3"):
        brisque(torch.rand(2, 2, 16, 16))
    with pytest.raises(ValueError, match="permute"):
        brisque(torch.rand(2, 16, 16, 3))
    with pytest.raises(ValueError, match="at least 16"):
        brisque(torch.rand(2, 3, 15, 40))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        brisque(good * 2 - 1)  # the released code's [-1, 1] images
    with pytest.raises(ValueError, match="x / 255"):
        brisque(good * 255)
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brisque(bad)


# ---------------------------------------------------------------------------------------------
# agreement with the package on real photographs (scikit-image sample images, face crops)
# ---------------------------------------------------------------------------------------------

def _photos() -> dict[str, np.ndarray]:
    data = pytest.importorskip("skimage.data")
    out = {}
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket"):
        img = getattr(data, name)()
        out[name] = np.stack([img] * 3, -1) if img.ndim == 2 else img
    astro, cat = data.astronaut(), data.chelsea()
    out["face_astronaut"] = astro[30:230, 150:330]
    out["face_chelsea"] = cat[20:220, 120:320]
    return out


def _degrade(img: np.ndarray, kind: str) -> np.ndarray:
    from PIL import Image, ImageFilter
    p = Image.fromarray(img)
    w, h = p.size
    if kind == "blur":
        p = p.filter(ImageFilter.GaussianBlur(2.5))
    elif kind == "noise":
        rng = np.random.default_rng(0)
        return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    elif kind == "jpeg":
        buf = io.BytesIO()
        p.save(buf, format="JPEG", quality=10)
        p = Image.open(buf).convert("RGB")
    elif kind.startswith("updown"):  # down to s px, back up to 112 px wide (a low-resolution face)
        s = int(kind[6:])
        p = p.resize((s, max(16, s * h // w)), Image.BICUBIC).resize((112, 112 * h // w), Image.BICUBIC)
    elif kind.startswith("small"):  # scored at 16–32 px as they are
        s = int(kind[5:])
        p = p.resize((s, s), Image.BICUBIC)
    return np.asarray(p)


KINDS = ("none", "blur", "noise", "jpeg", "updown16", "updown24", "updown32", "small16", "small24", "small32")


def test_agreement_with_package_on_photographs(oracle):
    failures = []
    n = 0
    for name, img in _photos().items():
        for kind in KINDS:
            x = img if kind == "none" else _degrade(img, kind)
            want = oracle.score(x)
            got = brisque(to_tensor(x)).item()
            n += 1
            if abs(got - want) > max(1.0, 0.02 * abs(want)):
                failures.append(f"{name}/{kind}: package {want:.3f}, petal_fast {got:.3f}")
    assert n == len(KINDS) * 7
    assert not failures, failures


def test_agreement_batched_float_faces(oracle):
    """A batch of same-size float face crops (the training-time input) scores like the package one by one."""
    faces = [_degrade(img, "updown24")[:72, :100] for img in _photos().values()]
    batch = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).double() / 255
    got = brisque(batch)
    want = [oracle.score(f.astype(np.float64) / 255) for f in faces]
    for g, w in zip(got.tolist(), want):
        assert abs(g - w) <= max(1.0, 0.02 * abs(w))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    x = textured(8, 3, 112, 112)
    assert torch.allclose(brisque(x.cuda()).cpu(), brisque(x), rtol=0, atol=1e-6)
