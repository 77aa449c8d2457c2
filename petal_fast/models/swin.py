"""The face Swin Transformer of PETALface, in the released checkpoint's layout.

Input (B, 3, H, W) → patch embedding (conv, patch p) + LayerNorm → absolute position embedding →
stages of Swin blocks (window attention with relative position bias; every second block shifts the
windows by ⌊window/2⌋) with patch merging between stages → final LayerNorm → feature head
``flatten → BatchNorm1d → Dropout(0.25) → Linear → BatchNorm1d`` → the face embedding.

The paper's size (preset ``"petalface"``): 120×120 input, patch 6, embed 384, depths [2, 18, 2],
heads [8, 16, 16], window 5; the last stage is 5×5 (one window, so no shift there); the feature
head maps 25·1536 = 38400 → 512. 213,666,768 parameters.

Shifted windows: the released code builds the SW-MSA mask (``attn_mask`` buffer, saved in its
checkpoints) but never passes it to the attention, so tokens of different shifted regions that share
a window attend to each other. ``paper_compat=True`` reproduces that exactly (needed to match the
released checkpoints' embeddings); the default ``paper_compat=False`` applies the mask as Swin
intends.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .attention import attention, check_attention_impl
from .layers import DropPath, init_vit_weights


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, window², C), windows image-major (so PetalLinear's rows_per_image holds)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B·nW, window², C) → (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) index into the (2·window − 1)² bias table, as Swin."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """(nW, window², window²) additive mask: −100 between tokens of different shifted regions."""
    img = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    region = 0
    for hs in cuts:
        for ws in cuts:
            img[:, hs, ws, :] = region
            region += 1
    ids = window_partition(img, window).squeeze(-1)
    mask = ids[:, None, :] - ids[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attention_impl: str = "sdpa") -> None:
        super().__init__()
        self.attention_impl = check_attention_impl(attention_impl)  # "sdpa" | "math" (models/attention.py)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.window, self.num_heads, self.attn_drop = dim, window, num_heads, attn_drop
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> torch.Tensor:
        n = self.window * self.window
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(n, n, -1).permute(2, 0, 1)  # heads, N, N

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B·nW, N, C); mask: (nW, N, N) or None."""
        bw, n, c = x.shape
        # unbind on the qkv axis: its backward stacks the three gradients straight into qkv's layout
        qkv = self.qkv(x)  # explicit head size: a -1 is ambiguous for an empty batch
        head_dim = qkv.shape[-1] // (3 * self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.view(bw, n, 3, self.num_heads, head_dim).unbind(2))
        bias = self.position_bias().unsqueeze(0)  # 1, heads, N, N
        if mask is not None:
            bias = bias + mask.unsqueeze(1)  # nW, heads, N, N
        # One contiguous (B·nW, heads, N, N) bias: SDPA's fused CPU kernel takes it (~8× faster than a
        # broadcast mask, which falls back to the math path); windows are image-major, so nW repeats.
        bias = bias.unsqueeze(0).expand(bw // bias.shape[0], *bias.shape).reshape(bw, self.num_heads, n, n)
        out = attention(q, k, v, bias, self.attn_drop if self.training else 0.0, self.attention_impl)
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), act()
        self.fc2, self.drop = nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, shift: int,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, paper_compat: bool = False) -> None:
        super().__init__()
        if min(resolution) <= window:  # one window covers the map: nothing to shift
            window, shift = min(resolution), 0
        if resolution[0] % window or resolution[1] % window:
            raise ValueError(f"feature map {resolution} is not divisible by window {window}")
        self.resolution, self.window, self.shift, self.paper_compat = resolution, window, shift, paper_compat
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Persistent, as in the released checkpoints (which store it even though it is never applied).
        self.register_buffer("attn_mask", shifted_window_mask(*resolution, window, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, l, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(y, self.window)
        mask = None if self.paper_compat else self.attn_mask
        y = window_reverse(self.attn(windows, mask), self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, l, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbouring tokens → concat (4C) → LayerNorm → Linear(4C → 2C, no bias)."""

    def __init__(self, resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, _, c = x.shape
        # Swin's order [x(0,0), x(1,0), x(0,1), x(1,1)] (row, column offsets) as one permuted copy
        # instead of four strided slices and a cat (and four zero-filled slice gradients backward).
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 mlp_ratio: float, drop_path: Sequence[float], downsample: bool, paper_compat: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio,
                      drop_path[i], paper_compat) for i in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class FaceSwin(nn.Module):
    """Face Swin Transformer (see the module docstring). ``forward(images) -> (B, embedding_size)``."""

    feature_linear = "feature_layer.2"  # where PETALface puts its single-branch feature LoRA

    def __init__(self, img_size: int = 120, patch_size: int = 6, embed_dim: int = 384,
                 depths: Sequence[int] = (2, 18, 2), num_heads: Sequence[int] = (8, 16, 16), window_size: int = 5,
                 mlp_ratio: float = 4.0, embedding_size: int = 512, drop_path_rate: float = 0.1,
                 feature_dropout: float = 0.25, bn_eps: float = 1e-5, paper_compat: bool = False) -> None:
        super().__init__()
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} must be non-empty and of "
                             "equal length")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.paper_compat, self.embedding_size = img_size, paper_compat, embedding_size
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        grid = self.patch_embed.grid
        if grid % (2 ** (len(depths) - 1)):
            raise ValueError(f"patch grid {grid} cannot be halved {len(depths) - 1} times by patch merging")
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear stochastic-depth schedule
        stages, dim, res = [], embed_dim, grid
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            last = i == len(depths) - 1
            stages.append(SwinStage(dim, (res, res), depth, heads, window_size, mlp_ratio,
                                    rates[sum(depths[:i]):sum(depths[:i + 1])], not last, paper_compat))
            if not last:
                dim, res = dim * 2, res // 2
        self.layers = nn.ModuleList(stages)
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        flat = dim * res * res
        self.feature_layer = nn.Sequential(
            nn.BatchNorm1d(flat, eps=bn_eps), nn.Dropout(feature_dropout),
            nn.Linear(flat, embedding_size), nn.BatchNorm1d(embedding_size, eps=bn_eps))
        nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.apply(init_vit_weights)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"images must be (B, 3, {self.img_size}, {self.img_size}), got {tuple(images.shape)}")
        x = self.pos_drop(self.patch_embed(images) + self.absolute_pos_embed)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_layer(self.forward_features(images))
