"""Torch composition of the fused margin-softmax core (same memory behaviour as the C++/Triton paths).

The core reduces, per row i, over the classes j ≠ y_i (the target column is handled by the caller):

    z_ij = s·⟨e_i/‖e_i‖, w_j/‖w_j‖⟩,   lse_i = log Σ_{j≠y_i} exp z_ij,   zsum_i = Σ_{j≠y_i} z_ij

Forward: class chunks of ``chunk_classes(B)`` rows of W, online log-sum-exp (running max and sum).
Backward recomputes each chunk's tile: G_ij = s·(g_lse_i·exp(z_ij − lse_i) + g_zsum_i) (0 at the
target), dÊ += (G ⊙ r_w)·W_c, dŴ_c = Gᵀ·Ê, then the ε-safe normalisation chain for both.
Extra memory: O(B·D + C) plus one B × chunk tile; everything in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

TILE_ELEMS = 1 << 21  # fp32 tile ≈ 8 MiB: few enough chunks that per-op overhead stays small


def chunk_classes(batch: int, num_classes: int) -> int:
    n = max(64, min(16384, TILE_ELEMS // max(batch, 1)))
    return max(1, min(num_classes, n))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def inv_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1/max(‖x_i‖, ε) per row (F.normalize's divisor)."""
    return x.norm(dim=1).clamp_min(eps).reciprocal()


def normalise_grad(dxn: torch.Tensor, x: torch.Tensor, r: torch.Tensor, eps: float) -> torch.Tensor:
    """Backward of x̂ = x·r, r = 1/max(‖x‖, ε): r·(dx̂ − x̂⟨x̂, dx̂⟩), no projection where ‖x‖ < ε."""
    xn = x * r.unsqueeze(1)
    proj = (xn * dxn).sum(1) * (r < 1.0 / eps)
    return (dxn - xn * proj.unsqueeze(1)) * r.unsqueeze(1)


def chunk_dw(dw_rows: torch.Tensor, g: torch.Tensor, en: torch.Tensor, wc: torch.Tensor, rw: torch.Tensor,
             eps: float) -> None:
    """dW_c = r·dŴ − r³⟨w, dŴ⟩·w with dŴ = Gᵀ·Ê, computed in place in dW's rows (no n×D temporaries)."""
    direct = dw_rows.dtype == en.dtype
    dwn = torch.mm(g.t(), en, out=dw_rows) if direct else g.t() @ en
    dot = torch.bmm(wc.unsqueeze(1), dwn.unsqueeze(2)).view(-1)  # row dots without an n×D product
    coef = -(rw * rw * rw) * dot * (rw < 1.0 / eps)
    dwn.mul_(rw.unsqueeze(1)).addcmul_(wc, coef.unsqueeze(1))
    if not direct:
        dw_rows.copy_(dwn)


def _target_cols(labels: torch.Tensor, c0: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    local = labels - c0
    rows = ((local >= 0) & (local < n)).nonzero().squeeze(1)
    return rows, local[rows]


def _tile(en: torch.Tensor, w: torch.Tensor, c0: int, n: int, scale: float, eps: float):
    wc = w[c0:c0 + n].to(en.dtype)
    rw = inv_norm(wc, eps)
    z = (en @ wc.t()).mul_(rw * scale)
    return z, wc, rw


def forward(e: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, scale: float, eps: float):
    acc = acc_dtype(e.dtype)
    en = e.to(acc)
    en = en * inv_norm(en, eps).unsqueeze(1)
    B, C = e.shape[0], w.shape[0]
    m = torch.full((B,), float("-inf"), dtype=acc, device=e.device)
    l = torch.zeros(B, dtype=acc, device=e.device)
    zsum = torch.zeros(B, dtype=acc, device=e.device)
    step = chunk_classes(B, C)
    for c0 in range(0, C, step):
        n = min(step, C - c0)
        z, _, _ = _tile(en, w, c0, n, scale, eps)
        rows, cols = _target_cols(labels, c0, n)
        zsum += z.sum(1)
        zsum.index_add_(0, rows, -z[rows, cols])
        z[rows, cols] = float("-inf")
        m_new = torch.maximum(m, z.amax(1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        l = l * torch.exp(m - m_safe) + z.sub_(m_safe.unsqueeze(1)).exp_().sum(1)
        m = m_new
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return m_safe + torch.log(l), zsum


def backward(e: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g_lse: torch.Tensor,
             g_zsum: torch.Tensor, scale: float, eps: float, need_e: bool, need_w: bool):
    acc = acc_dtype(e.dtype)
    e_acc = e.to(acc)
    re = inv_norm(e_acc, eps)
    en = e_acc * re.unsqueeze(1)
    B, C = e.shape[0], w.shape[0]
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(1)
    a, b = (g_lse.to(acc) * scale).unsqueeze(1), (g_zsum.to(acc) * scale).unsqueeze(1)
    den = torch.zeros_like(en) if need_e else None
    dw = torch.empty_like(w) if need_w else None
    step = chunk_classes(B, C)
    for c0 in range(0, C, step):
        n = min(step, C - c0)
        z, wc, rw = _tile(en, w, c0, n, scale, eps)
        rows, cols = _target_cols(labels, c0, n)
        z[rows, cols] = float("-inf")
        g = z.sub_(lse_safe).exp_().mul_(a).add_(b)
        g[rows, cols] = 0.0
        if need_w:
            chunk_dw(dw[c0:c0 + n], g, en, wc, rw, eps)
        if need_e:
            den.addmm_(g.mul_(rw), wc)
    de = normalise_grad(den, e_acc, re, eps).to(e.dtype) if need_e else None
    return de, dw
