"""Asymmetric generalised Gaussian (AGGD) fits from moment sums, vectorised over images and maps.

From the five sums of a map x with N values — S|x|, S_neg = Σ_{x<0} x², n_neg, S_pos = Σ_{x≥0} x², n_pos:

    r̂ = (S|x|/N)² / ((S_neg + S_pos)/N),   σ_l² = S_neg/n_neg,   σ_r² = S_pos/n_pos,   γ̂ = σ_l/σ_r
    R̂ = r̂ (γ̂³ + 1)(γ̂ + 1) / (γ̂² + 1)²,    shape ν:  φ(ν) = Γ(2/ν)² / (Γ(1/ν) Γ(3/ν)) = R̂
    η = (σ_r − σ_l) · sqrt(Γ(1/ν)/Γ(3/ν)) · Γ(2/ν)/Γ(1/ν)

φ is increasing from 0 to 3/4, so ν is found for every (image, map) at once: a table lookup in
log ν, then Newton steps on log φ (derivative through the digamma function). R̂ outside φ's
range (degenerate maps) gives the end of the bracket [1e-3, 1e3], as the reference does.
"""
from __future__ import annotations

import functools
import math

import torch

from .._graph import graph_constant, real_tensors

NU_LO, NU_HI = 1e-3, 1e3
_TABLE = 4096
_NEWTON = 2


def log_phi(nu: torch.Tensor) -> torch.Tensor:
    return 2 * torch.lgamma(2 / nu) - torch.lgamma(1 / nu) - torch.lgamma(3 / nu)


def _dlog_phi_dlog_nu(nu: torch.Tensor) -> torch.Tensor:
    # d/dν lgamma(k/ν) = −(k/ν²) ψ(k/ν);  times ν for the derivative in log ν
    return (torch.digamma(1 / nu) + 3 * torch.digamma(3 / nu) - 4 * torch.digamma(2 / nu)) / nu


@functools.lru_cache(maxsize=8)
@real_tensors
def _table(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.linspace(math.log(NU_LO), math.log(NU_HI), _TABLE, dtype=torch.float64)
    return t.to(device), log_phi(torch.exp(t)).to(device)


def solve_shape(r_hat: torch.Tensor) -> torch.Tensor:
    """ν with φ(ν) = R̂, elementwise (float64)."""
    t_grid, lp_grid = map(graph_constant, _table(str(r_hat.device)))
    target = torch.log(r_hat).clamp(lp_grid[0], lp_grid[-1])
    i = torch.searchsorted(lp_grid, target.contiguous()).clamp(1, _TABLE - 1)
    lp0, lp1 = lp_grid[i - 1], lp_grid[i]
    t = t_grid[i - 1] + (t_grid[i] - t_grid[i - 1]) * (target - lp0) / (lp1 - lp0)
    lo, hi = math.log(NU_LO), math.log(NU_HI)
    for _ in range(_NEWTON):
        nu = torch.exp(t)
        t = (t - (log_phi(nu) - target) / _dlog_phi_dlog_nu(nu)).clamp(lo, hi)
    return torch.exp(t)


def aggd_fit(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(…, 5 sums) → shape ν, mean η, σ_l², σ_r²."""
    sum_abs, sq_neg, n_neg, sq_pos, n_pos = m.unbind(-1)
    n = n_neg + n_pos
    r_hat = (sum_abs / n) ** 2 / ((sq_neg + sq_pos) / n)
    var_l, var_r = sq_neg / n_neg, sq_pos / n_pos
    sd_l, sd_r = var_l.sqrt(), var_r.sqrt()
    gamma = sd_l / sd_r
    nu = solve_shape(r_hat * (gamma ** 3 + 1) * (gamma + 1) / (gamma ** 2 + 1) ** 2)
    lg1, lg2, lg3 = torch.lgamma(1 / nu), torch.lgamma(2 / nu), torch.lgamma(3 / nu)
    mean = (sd_r - sd_l) * torch.exp(0.5 * (lg1 - lg3) + lg2 - lg1)
    return nu, mean, var_l, var_r


def scale_features(m: torch.Tensor) -> torch.Tensor:
    """(B, 5 maps, 5 sums) → (B, 18): MSCN [ν, (σ_l² + σ_r²)/2], each product [ν, η, σ_l², σ_r²]."""
    nu, mean, var_l, var_r = aggd_fit(m)
    first = torch.stack([nu[:, 0], (var_l[:, 0] + var_r[:, 0]) / 2], dim=1)
    rest = torch.stack([nu[:, 1:], mean[:, 1:], var_l[:, 1:], var_r[:, 1:]], dim=2).flatten(1)
    return torch.cat([first, rest], dim=1)
