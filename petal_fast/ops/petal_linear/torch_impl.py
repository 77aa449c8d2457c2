"""PetalLinear as a torch composition with the fused paths' memory behaviour.

Used on CPU when the C++ extension is not built and on CUDA when Triton is missing. Same
interface as the C++ ops and the Triton launchers:

    forward(x, W, b, A_cat, B_cat, coef, p, seed)           -> (y, U)
    backward(dy, x, W, A_cat, B_cat, coef, U, p, seed, need_x) -> (dx | None, dA_cat, dB_cat)

``x``: (M, K) contiguous; ``A_cat``: (R, K) = both branches' A stacked (R = branches·r);
``B_cat``: (N, R); ``coef``: (images, branches) per-image branch weights s·(1−α), s·α (or s);
``U = x A_catᵀ`` (M, R), unscaled — the only activation saved besides x.
"""
from __future__ import annotations

import torch

from petal_fast.definitions.dropout import dropout_mask


def branch_coefficients(alpha: torch.Tensor | None, branches: int, scale: float,
                        dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(images, branches) per-image weights: [s(1−α), sα] for two branches, [[s]] for one."""
    if branches == 1:
        return torch.full((1, 1), float(scale), dtype=dtype, device=device)
    a = alpha.to(dtype)
    return torch.stack((scale * (1.0 - a), scale * a), dim=1)


def row_scale(t: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """t (M, R) times the per-row, per-branch weight, without an M-long copy of α."""
    images, branches = coef.shape
    m, r_total = t.shape
    v = t.view(images, m // images, branches, r_total // branches)
    return (v * coef.to(t.dtype)[:, None, :, None]).view(m, r_total)


def forward(x, weight, bias, a_cat, b_cat, coef, p, seed):
    u = x @ a_cat.T
    v = row_scale(u, coef)
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    branches = coef.shape[1]
    if p == 0.0:
        y.addmm_(v, b_cat.T)  # LoRA expand accumulated into the base output (beta = 1)
    else:
        r = a_cat.shape[0] // branches
        for k in range(branches):
            part = v[:, k * r:(k + 1) * r] @ b_cat[:, k * r:(k + 1) * r].T
            y.add_(part.mul_(dropout_mask(seed, k, y.shape[0], y.shape[1], p, dtype=y.dtype, device=y.device)))
    return y, u


def backward(dy, x, weight, a_cat, b_cat, coef, u, p, seed, need_x):
    branches = coef.shape[1]
    v = row_scale(u, coef)
    if p == 0.0:
        du = dy @ b_cat                      # (M, R): dY·B for both branches in one pass
        db = dy.T @ v                        # (N, R)
    else:
        r = a_cat.shape[0] // branches
        du, db = torch.empty_like(u), torch.empty_like(b_cat)
        for k in range(branches):
            sl = slice(k * r, (k + 1) * r)
            dyk = dy * dropout_mask(seed, k, dy.shape[0], dy.shape[1], p, dtype=dy.dtype, device=dy.device)
            du[:, sl] = dyk @ b_cat[:, sl]
            db[:, sl] = dyk.T @ v[:, sl]
    dt = row_scale(du, coef)
    da = dt.T @ x
    dx = None
    if need_x:
        dx = dy @ weight
        dx.addmm_(dt, a_cat)                 # LoRA term accumulated into dY·W
    return dx, da, db
