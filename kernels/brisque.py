"""BRISQUE's fused stage in Triton (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

For a batch of luminance images Y (B, H, W), per pixel:

    μ = Σ_k w_k Y_k,   σ² = Σ_k w_k (Y_k − Y_c)² − (μ − Y_c)²   (= w∗Y² − μ², shifted by the centre
    value Y_c so flat regions keep their digits in float32),   m = (Y_c − μ) / (sqrt|σ²| + 1/255)

over the 7×7 Gaussian window w (zero padding). A program owns a BH×BW tile; it computes the MSCN
value at its pixels and at the three neighbours (right, below, below-right) that the products
need, forms the MSCN map and its horizontal, vertical, main- and secondary-diagonal products, and
reduces each to the five sums of the AGGD fit (Σ|x|, Σ_{x<0} x², n_{x<0}, Σ_{x≥0} x², n_{x≥0}),
written per tile and summed over tiles by the launcher. The MSCN map is never stored.
"""
from __future__ import annotations

import torch
import triton
from torch._guards import detect_fake_mode
import triton.language as tl

from ._host import direct

MAPS, SUMS = 5, 5
C_MSCN = 1.0 / 255.0


@triton.jit
def _mscn_at(img, w_ptr, H, W, ys, xs, C: tl.constexpr):
    inside = (ys < H) & (xs < W)
    centre = tl.load(img + ys * W + xs, mask=inside, other=0.0)
    mu = tl.zeros_like(centre)
    ss = tl.zeros_like(centre)
    # A run-time loop over the 49 taps, not two static_range loops: unrolled, the four MSCN
    # evaluations of the kernel took ~70 s to compile for sm_90 in float64 (longer than the GPU
    # suite's whole BRISQUE stage on an H200).
    for tap in range(49):
        wk = tl.load(w_ptr + tap)
        yy = ys + (tap // 7 - 3)
        xx = xs + (tap % 7 - 3)
        ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        v = tl.load(img + yy * W + xx, mask=ok, other=0.0)
        mu += wk * v
        d = v - centre
        ss += wk * d * d
    var = ss - (mu - centre) * (mu - centre)
    return (centre - mu) / (tl.sqrt(tl.abs(var)) + C)


@triton.jit
def _store_sums(out, x, valid):
    neg = valid & (x < 0)
    pos = valid & (x >= 0)
    sq = x * x
    zero = tl.zeros_like(x)
    tl.store(out + 0, tl.sum(tl.sum(tl.where(valid, tl.abs(x), zero), 1), 0))
    tl.store(out + 1, tl.sum(tl.sum(tl.where(neg, sq, zero), 1), 0))
    tl.store(out + 2, tl.sum(tl.sum(neg.to(x.dtype), 1), 0))
    tl.store(out + 3, tl.sum(tl.sum(tl.where(pos, sq, zero), 1), 0))
    tl.store(out + 4, tl.sum(tl.sum(pos.to(x.dtype), 1), 0))


@triton.jit
def _brisque_moments_kernel(gray, w_ptr, partial, H, W, n_tiles_x, n_tiles,
                            BH: tl.constexpr, BW: tl.constexpr, C: tl.constexpr):
    b = tl.program_id(0)
    ty = tl.program_id(1)
    tx = tl.program_id(2)
    img = gray + b.to(tl.int64) * H * W
    ys = ty * BH + tl.arange(0, BH)[:, None]
    xs = tx * BW + tl.arange(0, BW)[None, :]
    m00 = _mscn_at(img, w_ptr, H, W, ys, xs, C)
    m01 = _mscn_at(img, w_ptr, H, W, ys, xs + 1, C)
    m10 = _mscn_at(img, w_ptr, H, W, ys + 1, xs, C)
    m11 = _mscn_at(img, w_ptr, H, W, ys + 1, xs + 1, C)
    in_y, in_x = ys < H, xs < W
    right, below = (xs + 1) < W, (ys + 1) < H
    out = partial + (b.to(tl.int64) * n_tiles + ty * n_tiles_x + tx) * 25
    _store_sums(out + 0, m00, in_y & in_x)            # MSCN
    _store_sums(out + 5, m00 * m01, in_y & right)     # horizontal
    _store_sums(out + 10, m00 * m10, below & in_x)    # vertical
    _store_sums(out + 15, m00 * m11, below & right)   # main diagonal
    _store_sums(out + 20, m10 * m01, below & right)   # secondary diagonal


def gaussian_window(device, dtype, n: int = 7, sigma: float = 7.0 / 6.0) -> torch.Tensor:
    """The normalised n×n Gaussian on ``device``: made there once (built on the host per call it was a
    host→device copy per batch, a synchronisation); a trace on fake tensors gets a fresh constant."""
    if detect_fake_mode() is not None:
        return _gaussian(device, dtype, n, sigma)
    key = (torch.device(device), dtype, n, sigma)
    if key not in _WINDOWS:
        with torch.inference_mode(False):
            _WINDOWS[key] = _gaussian(device, dtype, n, sigma)
    return _WINDOWS[key]


_WINDOWS: dict = {}


def _gaussian(device, dtype, n: int, sigma: float) -> torch.Tensor:
    r = torch.arange(n, dtype=torch.float64, device=device) - n // 2
    k = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    return (k / k.sum()).to(dtype=dtype).contiguous()


def mscn_moments(gray: torch.Tensor, block_h: int = 16, block_w: int = 32, wrap=direct) -> torch.Tensor:
    """(B, H, W) float32/float64 luminance → (B, 5 maps, 5 sums) in gray's dtype; ``wrap`` is applied
    to the kernel before its launch (``wrap_triton`` in a triton_op)."""
    if gray.dim() != 3 or gray.shape[1] < 2 or gray.shape[2] < 2:
        raise ValueError(f"gray must be (B, H >= 2, W >= 2), got {tuple(gray.shape)}")
    if gray.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"gray must be float32 or float64, got {gray.dtype}")
    gray = gray.contiguous()
    B, H, W = gray.shape
    bh = min(block_h, triton.next_power_of_2(H))
    bw = min(block_w, triton.next_power_of_2(W))
    nty, ntx = triton.cdiv(H, bh), triton.cdiv(W, bw)
    partial = torch.full((B, nty * ntx, MAPS * SUMS), float("nan"), dtype=gray.dtype, device=gray.device)
    window = gaussian_window(gray.device, gray.dtype)
    wrap(_brisque_moments_kernel)[(B, nty, ntx)](gray, window, partial, H, W, ntx, nty * ntx, BH=bh, BW=bw, C=C_MSCN)
    return partial.sum(1).view(B, MAPS, SUMS)
