"""BRISQUE, literally, stage by stage in float64 — the test oracle of ``petal_fast.quality``.

Mirrors the ``brisque`` PyPI package (0.2.0, ``brisque/brisque.py``), which is the definition:

- luminance  ``Y = 0.2125 R + 0.7154 G + 0.0721 B`` in [0, 1] (skimage ``rgb2gray``; uint8 / 255);
- MSCN       ``m = (Y − μ) / (σ + C)``, ``μ = w ∗ Y``, ``σ = sqrt|μ² − w ∗ Y²|``, ``C = 1/255``,
             ``w`` the normalised 7×7 Gaussian (σ = 7/6), 'same' convolution with zero padding;
- products   horizontal ``m[:, :-1] m[:, 1:]``, vertical ``m[:-1] m[1:]``, main diagonal
             ``m[:-1, :-1] m[1:, 1:]``, secondary diagonal ``m[1:, :-1] m[:-1, 1:]``;
- AGGD fit   of each of the 5 maps from its moments: ``r̂ = (E|x|)² / E x²``,
             ``γ̂ = sqrt(E[x² | x<0]) / sqrt(E[x² | x≥0])``, ``R̂ = r̂ (γ̂³+1)(γ̂+1) / (γ̂²+1)²``,
             shape ``ν`` solving ``Γ(2/ν)² / (Γ(1/ν) Γ(3/ν)) = R̂``, ``σ_l, σ_r`` the left/right RMS,
             ``η = (σ_r − σ_l) sqrt(Γ(1/ν)/Γ(3/ν)) Γ(2/ν)/Γ(1/ν)``;
             features: MSCN ``[ν, (σ_l² + σ_r²)/2]``, each product ``[ν, η, σ_l², σ_r²]`` (18 per scale);
- scale 2    OpenCV ``resize(fx=fy=1/2, INTER_CUBIC)`` of Y (4-tap cubic, a = −0.75, replicated border);
- model      ``f' = −1 + 2 (f − min) / (max − min)``, RBF ε-SVR ``Σ_i c_i exp(−g ‖f' − s_i‖²) − ρ``.

Written for clarity, not speed; imports only torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA = (0.2125, 0.7154, 0.0721)
C_MSCN = 1.0 / 255.0
WINDOW, WINDOW_SIGMA = 7, 7.0 / 6.0
MAPS = ("mscn", "horizontal", "vertical", "main_diagonal", "secondary_diagonal")
# Per-map moment sums the fit needs, in this order (the fused kernels produce the same layout).
MOMENTS = ("sum_abs", "sumsq_neg", "count_neg", "sumsq_pos", "count_pos")
# Cubic weights of OpenCV's INTER_CUBIC (a = −0.75) at fractional offset 1/2, taps x−1 … x+2.
HALF_CUBIC = (-3.0 / 32.0, 19.0 / 32.0, 19.0 / 32.0, -3.0 / 32.0)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 or float in [0, 1], C ∈ {1, 3} → (B, H, W) float64 luminance in [0, 1]."""
    x = images.double() / 255.0 if images.dtype == torch.uint8 else images.double()
    if x.shape[1] == 1:
        return x[:, 0]
    w = torch.tensor(LUMA, dtype=torch.float64, device=x.device)
    return torch.einsum("bchw,c->bhw", x, w)


def gaussian_window(n: int = WINDOW, sigma: float = WINDOW_SIGMA, device=None) -> torch.Tensor:
    """The package's ``gaussian_kernel2d``: exp(−(x² + y²)/(2σ²)) on an n×n grid, normalised to sum 1."""
    r = torch.arange(n, dtype=torch.float64, device=device) - n // 2
    k = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
    return k / k.sum()


def _filter_same(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # scipy.signal.convolve2d(..., 'same') with zero fill; w is symmetric, so correlation = convolution.
    return F.conv2d(x[:, None], w[None, None], padding=w.shape[-1] // 2)[:, 0]


def mscn(gray: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float64 → MSCN coefficients (B, H, W)."""
    w = gaussian_window(device=gray.device)
    mu = _filter_same(gray, w)
    sigma = torch.sqrt(torch.abs(mu ** 2 - _filter_same(gray ** 2, w)))
    return (gray - mu) / (sigma + C_MSCN)


def pair_products(m: torch.Tensor) -> dict[str, torch.Tensor]:
    """The MSCN map and its four neighbour products, keyed as in ``MAPS``."""
    return {
        "mscn": m,
        "horizontal": m[:, :, :-1] * m[:, :, 1:],
        "vertical": m[:, :-1, :] * m[:, 1:, :],
        "main_diagonal": m[:, :-1, :-1] * m[:, 1:, 1:],
        "secondary_diagonal": m[:, 1:, :-1] * m[:, :-1, 1:],
    }


def moments(x: torch.Tensor) -> torch.Tensor:
    """Per image (first dim) of ``x``: the ``MOMENTS`` sums → (B, 5)."""
    x = x.reshape(x.shape[0], -1)
    neg = x < 0
    sq = x * x
    return torch.stack([x.abs().sum(1), (sq * neg).sum(1), neg.sum(1).double(),
                        (sq * ~neg).sum(1), (~neg).sum(1).double()], dim=1)


def mscn_moments(gray: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float64 → (B, 5 maps, 5 moments): the stage the fused kernels implement."""
    maps = pair_products(mscn(gray))
    return torch.stack([moments(maps[k]) for k in MAPS], dim=1)


def _log_phi(nu: torch.Tensor) -> torch.Tensor:
    return 2 * torch.lgamma(2 / nu) - torch.lgamma(1 / nu) - torch.lgamma(3 / nu)


def solve_shape(r_hat: torch.Tensor, lo: float = 1e-3, hi: float = 1e3, steps: int = 120) -> torch.Tensor:
    """ν with Γ(2/ν)²/(Γ(1/ν)Γ(3/ν)) = R̂, by bisection in log ν (φ is increasing, φ → 0 and 3/4).

    R̂ outside φ's range (degenerate maps) gives the bracket's end instead of a non-converged root.
    """
    target = torch.log(r_hat)
    a = torch.full_like(r_hat, math.log(lo))
    b = torch.full_like(r_hat, math.log(hi))
    for _ in range(steps):
        mid = (a + b) / 2
        below = _log_phi(torch.exp(mid)) < target
        a = torch.where(below, mid, a)
        b = torch.where(below, b, mid)
    return torch.exp((a + b) / 2)


def aggd_fit(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(…, 5 moments) → shape ν, mean η, σ_l², σ_r² of the asymmetric generalised Gaussian."""
    sum_abs, sq_neg, n_neg, sq_pos, n_pos = m.unbind(-1)
    n = n_neg + n_pos
    r_hat = (sum_abs / n) ** 2 / ((sq_neg + sq_pos) / n)
    var_l, var_r = sq_neg / n_neg, sq_pos / n_pos
    gamma = torch.sqrt(var_l) / torch.sqrt(var_r)
    big_r = r_hat * (gamma ** 3 + 1) * (gamma + 1) / (gamma ** 2 + 1) ** 2
    nu = solve_shape(big_r)
    ratio = torch.exp(torch.lgamma(2 / nu) - torch.lgamma(1 / nu))
    const = torch.exp(0.5 * (torch.lgamma(1 / nu) - torch.lgamma(3 / nu)))
    mean = (torch.sqrt(var_r) - torch.sqrt(var_l)) * const * ratio
    return nu, mean, var_l, var_r


def features_from_moments(m: torch.Tensor) -> torch.Tensor:
    """(B, 5 maps, 5 moments) → (B, 18) features of one scale, in the package's order."""
    nu, mean, var_l, var_r = aggd_fit(m)
    first = torch.stack([nu[:, 0], (var_l[:, 0] + var_r[:, 0]) / 2], dim=1)
    rest = torch.stack([nu[:, 1:], mean[:, 1:], var_l[:, 1:], var_r[:, 1:]], dim=2).reshape(m.shape[0], 16)
    return torch.cat([first, rest], dim=1)


def half_size(n: int) -> int:
    """OpenCV's output size for fx = 1/2: saturate_cast<int>(n · 0.5), i.e. round half to even."""
    return round(n / 2)


def _resize_half_last(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    out = half_size(n)
    # output j samples input 2j + 1/2: taps 2j−1 … 2j+2, indices clamped (OpenCV's replicated border)
    idx = (2 * torch.arange(out, device=x.device)[:, None] + torch.arange(-1, 3, device=x.device)).clamp(0, n - 1)
    w = torch.tensor(HALF_CUBIC, dtype=x.dtype, device=x.device)
    return (x[..., idx] * w).sum(-1)


def resize_half(gray: torch.Tensor) -> torch.Tensor:
    """(B, H, W) → (B, round(H/2), round(W/2)), OpenCV ``resize(fx=0.5, fy=0.5, INTER_CUBIC)``."""
    return _resize_half_last(_resize_half_last(gray).transpose(1, 2)).transpose(1, 2)


def brisque_features(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images → (B, 36) BRISQUE features (18 at full size, 18 at half size)."""
    gray = luminance(images)
    return torch.cat([features_from_moments(mscn_moments(gray)),
                      features_from_moments(mscn_moments(resize_half(gray)))], dim=1)


def scale_features(f: torch.Tensor, f_min: torch.Tensor, f_max: torch.Tensor) -> torch.Tensor:
    """libsvm-style scaling to [−1, 1] with the model's per-feature min/max."""
    return -1 + 2.0 / (f_max - f_min) * (f - f_min)


def svr(x: torch.Tensor, support: torch.Tensor, coef: torch.Tensor, rho: float, gamma: float) -> torch.Tensor:
    """RBF ε-SVR decision value, one support vector at a time: Σ_i c_i exp(−g‖x − s_i‖²) − ρ."""
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for s, c in zip(support, coef):
        out = out + c * torch.exp(-gamma * ((x - s) ** 2).sum(1))
    return out - rho


def brisque(images: torch.Tensor, model) -> torch.Tensor:
    """(B, C, H, W) → (B,) scores; ``model`` has ``f_min, f_max, support, coef, rho, gamma``."""
    f = scale_features(brisque_features(images), model.f_min, model.f_max)
    return svr(f, model.support, model.coef, model.rho, model.gamma)
