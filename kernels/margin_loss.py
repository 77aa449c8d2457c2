"""Triton kernels of the fused margin-softmax core (docs/design.md §1.3): per row i over classes j ≠ y_i,

    z_ij = s·⟨ê_i, w_j⟩·r_j  (r_j = 1/max(‖w_j‖, ε)),   lse_i = log Σ exp z_ij,   zsum_i = Σ z_ij

- ``_fwd_kernel``: one program per (block of rows, class split), looping over the split's class
  tiles with an online log-sum-exp (running max and sum) — the B×C logits never exist; the
  splits' (max, sum, logit sum) partials (splits × B) are merged on the host side in torch.
- ``_bwd_de_kernel``: per (block of rows, class split), recomputes each tile,
  G = s·(g_lse·exp(z − lse) + g_zsum) (0 at the target and outside C), dÊ += (G ⊙ r)·W_tile,
  added into dÊ with fp32 atomics.
- ``_bwd_dw_kernel``: per block of classes, loops over row blocks, dŴ += Gᵀ·Ê, then applies the
  ε-safe normalisation chain dW = r·(dŴ − ŵ⟨ŵ, dŴ⟩) before the store.
Every dot accumulates in fp32; fp32 operands use IEEE precision (no TF32) so fp32 matches the
float64 reference to 1e-5; fp16/bf16 class weights feed the tensor cores with fp32 accumulation.
The whole embedding dimension is one block (BLOCK_D = next power of two ≥ D).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, direct

BLOCK_B = 16
BLOCK_C = 32


@triton.jit
def _load_classes(w_ptr, r_ptr, offs_c, offs_d, C, D):
    c_ok = offs_c < C
    w = tl.load(w_ptr + offs_c[:, None] * D + offs_d[None, :], mask=c_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    r = tl.load(r_ptr + offs_c, mask=c_ok, other=0.0)
    return w, r


@triton.jit
def _logits(en, w, r, lab, offs_c, C, scale, LOW_P: tl.constexpr):
    """z = s·(Ê·Wᵀ)·r for one tile, and which entries count (inside C, not the target)."""
    c_ok = offs_c < C
    if LOW_P:
        s = tl.dot(en.to(w.dtype), tl.trans(w))
    else:
        s = tl.dot(en, tl.trans(w.to(tl.float32)), input_precision="ieee")
    z = s * (r * scale)[None, :]
    keep = c_ok[None, :] & (offs_c[None, :] != lab[:, None])
    return z, keep


@triton.jit
def _fwd_kernel(en_ptr, w_ptr, r_ptr, lab_ptr, m_ptr, l_ptr, zsum_ptr, B, C, D, scale, SPLITS,
                BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, LOW_P: tl.constexpr):
    split = tl.program_id(1)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    b_ok = offs_b < B
    en = tl.load(en_ptr + offs_b[:, None] * D + offs_d[None, :], mask=b_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    lab = tl.load(lab_ptr + offs_b, mask=b_ok, other=-1)
    m = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_B,), tl.float32)
    zs = tl.zeros((BLOCK_B,), tl.float32)
    for c0 in range(split * BLOCK_C, C, SPLITS * BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        w, r = _load_classes(w_ptr, r_ptr, offs_c, offs_d, C, D)
        z, keep = _logits(en, w, r, lab, offs_c, C, scale, LOW_P)
        zs += tl.sum(tl.where(keep, z, 0.0), axis=1)
        z = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + split * B + offs_b, m, mask=b_ok)
    tl.store(l_ptr + split * B + offs_b, l, mask=b_ok)
    tl.store(zsum_ptr + split * B + offs_b, zs, mask=b_ok)


@triton.jit
def _grad_tile(z, keep, lse, a, b):
    """G = a·exp(z − lse) + b on kept entries, 0 elsewhere (lse of an empty row is −inf → 0)."""
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    return tl.where(keep, a[:, None] * tl.exp(z - lse_safe[:, None]) + b[:, None], 0.0)


@triton.jit
def _bwd_de_kernel(en_ptr, w_ptr, r_ptr, lab_ptr, lse_ptr, a_ptr, b_ptr, den_ptr, B, C, D, scale, SPLITS,
                   BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, LOW_P: tl.constexpr):
    split = tl.program_id(1)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    b_ok = offs_b < B
    mask_bd = b_ok[:, None] & (offs_d[None, :] < D)
    en = tl.load(en_ptr + offs_b[:, None] * D + offs_d[None, :], mask=mask_bd, other=0.0)
    lab = tl.load(lab_ptr + offs_b, mask=b_ok, other=-1)
    lse = tl.load(lse_ptr + offs_b, mask=b_ok, other=0.0)
    a = tl.load(a_ptr + offs_b, mask=b_ok, other=0.0)
    b = tl.load(b_ptr + offs_b, mask=b_ok, other=0.0)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for c0 in range(split * BLOCK_C, C, SPLITS * BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        w, r = _load_classes(w_ptr, r_ptr, offs_c, offs_d, C, D)
        z, keep = _logits(en, w, r, lab, offs_c, C, scale, LOW_P)
        g = _grad_tile(z, keep, lse, a, b) * r[None, :]
        if LOW_P:
            acc += tl.dot(g.to(w.dtype), w)
        else:
            acc += tl.dot(g, w.to(tl.float32), input_precision="ieee")
    tl.atomic_add(den_ptr + offs_b[:, None] * D + offs_d[None, :], acc, mask=mask_bd)


@triton.jit
def _bwd_dw_kernel(en_ptr, w_ptr, r_ptr, lab_ptr, lse_ptr, a_ptr, b_ptr, dw_ptr, B, C, D, scale, eps,
                   BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, LOW_P: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    w, r = _load_classes(w_ptr, r_ptr, offs_c, offs_d, C, D)
    acc = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        en = tl.load(en_ptr + offs_b[:, None] * D + offs_d[None, :], mask=b_ok[:, None] & (offs_d[None, :] < D),
                     other=0.0)
        lab = tl.load(lab_ptr + offs_b, mask=b_ok, other=-1)
        lse = tl.load(lse_ptr + offs_b, mask=b_ok, other=0.0)
        a = tl.load(a_ptr + offs_b, mask=b_ok, other=0.0)
        b = tl.load(b_ptr + offs_b, mask=b_ok, other=0.0)
        z, keep = _logits(en, w, r, lab, offs_c, C, scale, LOW_P)
        g = _grad_tile(z, keep & b_ok[:, None], lse, a, b)
        if LOW_P:
            acc += tl.dot(tl.trans(g.to(w.dtype)), en.to(w.dtype))
        else:
            acc += tl.dot(tl.trans(g), en, input_precision="ieee")
    wn = w.to(tl.float32) * r[:, None]
    proj = tl.sum(wn * acc, axis=1) * (r < 1.0 / eps)
    dw = (acc - wn * proj[:, None]) * r[:, None]
    c_ok = offs_c < C
    tl.store(dw_ptr + offs_c[:, None] * D + offs_d[None, :], dw.to(dw_ptr.dtype.element_ty),
             mask=c_ok[:, None] & (offs_d[None, :] < D))


def _inv_norms(x: torch.Tensor, eps: float, rows: int = 1 << 16) -> torch.Tensor:
    """1/max(‖x_i‖, ε) in fp32, a block of rows at a time (no fp32 copy of a bf16 C×D weight).
    A batch of embeddings (symbolic size in a traced graph) is one block."""
    if not isinstance(x.shape[0], int) or x.shape[0] <= rows:
        return x.float().norm(dim=1).clamp_min_(eps).reciprocal_()
    return torch.cat([x[i:i + rows].float().norm(dim=1) for i in range(0, x.shape[0], rows)]).clamp_min_(eps).reciprocal_()


def _splits(B, C: int, device: torch.device):
    """Class splits so that row blocks × splits fill the GPU (≈ 4 programs per SM); 2 in the
    interpreter so the merge of partials is exercised. SymInt arithmetic when B is symbolic."""
    tiles = cdiv(C, BLOCK_C)
    if device.type != "cuda":
        return min(2, tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return torch.sym_max(1, torch.sym_min(tiles, cdiv(4 * sms, cdiv(B, BLOCK_B))))


def _prep(e: torch.Tensor, w: torch.Tensor, eps: float):
    if e.dtype == torch.float64 or w.dtype == torch.float64:
        raise TypeError("margin_loss: the triton backend supports float32/float16/bfloat16, not float64")
    e32 = e.float()
    re = _inv_norms(e32, eps)
    en = (e32 * re.unsqueeze(1)).contiguous()
    r = _inv_norms(w, eps).contiguous()
    meta = dict(BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_D=max(16, triton.next_power_of_2(e.shape[1])),
                LOW_P=w.dtype in (torch.float16, torch.bfloat16))
    return e32, re, en, r, meta


def forward(e: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, scale: float, eps: float, wrap=direct):
    """(lse, zsum) per row; ``wrap`` is applied to each kernel before its launch (``wrap_triton`` in a triton_op)."""
    B, D = e.shape
    C = w.shape[0]
    _, _, en, r, meta = _prep(e, w, eps)
    splits = _splits(B, C, e.device)
    m, l, zs = (torch.empty(splits, B, dtype=torch.float32, device=e.device) for _ in range(3))
    wrap(_fwd_kernel)[(cdiv(B, BLOCK_B), splits)](en, w, r, labels, m, l, zs, B, C, D, scale, splits, **meta)
    m_max = m.amax(0)
    m_safe = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    lse = m_safe + (l * torch.exp(m - m_safe)).sum(0).log()
    return lse, zs.sum(0)


def backward(e: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g_lse: torch.Tensor,
             g_zsum: torch.Tensor, scale: float, eps: float, need_e: bool, need_w: bool, wrap=direct):
    """(dE or None, dW or None) of the non-target statistics (``wrap`` as in ``forward``)."""
    B, D = e.shape
    C = w.shape[0]
    e32, re, en, r, meta = _prep(e, w, eps)
    a = (g_lse.float() * scale).contiguous()
    b = (g_zsum.float() * scale).contiguous()
    lse = lse.float().contiguous()
    de = dw = None
    if need_e:
        splits = _splits(B, C, e.device)
        den = torch.zeros(B, D, dtype=torch.float32, device=e.device)
        wrap(_bwd_de_kernel)[(cdiv(B, BLOCK_B), splits)](en, w, r, labels, lse, a, b, den, B, C, D, scale,
                                                         splits, **meta)
        proj = (en * den).sum(1) * (re < 1.0 / eps)
        de = ((den - en * proj.unsqueeze(1)) * re.unsqueeze(1)).to(e.dtype)
    if need_w:
        dw = torch.empty_like(w)
        wrap(_bwd_dw_kernel)[(cdiv(C, BLOCK_C),)](en, w, r, labels, lse, a, b, dw, B, C, D, scale, eps, **meta)
    return de, dw
