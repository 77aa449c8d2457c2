"""PetalLinear as a torch composition with the fused paths' memory behaviour.

Used on CPU when the C++ extension is not built and on CUDA when Triton is missing. Same
interface as the C++ ops:

    forward(x, W, b, A, B, α, s, p, seed)              -> (y, U)
    backward(dy, x, W, A, B, α, s, U, p, seed, need_x) -> (dx | None, dA, dB)

``x``: (M, K) contiguous; ``A``: (branches, r, K); ``B``: (branches, N, r); ``α``: (images,) or None
(one branch); per-image branch weights c = [s(1−α), sα] (or [s]); ``U = x A_catᵀ`` (M, R), unscaled
(A_cat = both branches' A stacked, R = branches·r) — the only activation saved besides x.
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


def concat(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A_cat (R × in) and B_cat (out × R), R = branches·r: both branches side by side."""
    branches, r, k = lora_A.shape
    if branches == 1:
        return lora_A[0], lora_B[0]
    return lora_A.reshape(branches * r, k), lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], branches * r)


def split_b(db_cat: torch.Tensor, branches: int) -> torch.Tensor:
    """dB_cat (out × R) → (branches, out, r) with lora_B's canonical strides (DDP compares them literally)."""
    if branches == 1:  # (a permuted size-1 dimension would keep odd strides through .contiguous())
        return db_cat.unsqueeze(0)
    return db_cat.reshape(db_cat.shape[0], branches, -1).permute(1, 0, 2).contiguous()


def row_scale(t: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """t (M, R) times the per-row, per-branch weight, without an M-long copy of α."""
    images, branches = coef.shape
    m, r_total = t.shape
    v = t.view(images, m // images, branches, r_total // branches)
    return (v * coef.to(t.dtype)[:, None, :, None]).view(m, r_total)


def _coef(lora_A, alpha, scale, x):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return branch_coefficients(alpha, lora_A.shape[0], scale, dtype, x.device)


def forward(x, weight, bias, lora_A, lora_B, alpha, scale, p, seed):
    a_cat, b_cat = concat(lora_A, lora_B)
    coef = _coef(lora_A, alpha, scale, x)
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


def backward(dy, x, weight, lora_A, lora_B, alpha, scale, u, p, seed, need_x):
    a_cat, b_cat = concat(lora_A, lora_B)
    coef = _coef(lora_A, alpha, scale, x)
    branches = coef.shape[1]
    v = row_scale(u, coef)
    if p == 0.0:
        du = dy @ b_cat                      # (M, R): dY·B for both branches in one pass
        db = dy.T @ v                        # (N, R)
    else:
        r = a_cat.shape[0] // branches
        du, db = torch.empty_like(u), torch.empty(b_cat.shape, dtype=b_cat.dtype, device=b_cat.device)
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
    return dx, da.reshape(lora_A.shape), split_b(db, branches)
