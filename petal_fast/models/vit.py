"""Face ViT in the layout of insightface arcface_torch's ``vit_t`` / ``vit_s`` / ``vit_b``.

112×112 input, patch 9 (conv; 12×12 = 144 tokens, the last 4 pixel rows/columns are dropped as in
arcface_torch), learned position embedding, pre-norm blocks (LayerNorm, attention with a
bias-free qkv, ReLU6 MLP), final LayerNorm, then the feature head ``flatten → Linear(D·144 → D, no
bias) → BatchNorm1d → Linear(D → embedding, no bias) → BatchNorm1d`` (BN eps 2e-5). State-dict
keys match arcface_torch, so its checkpoints load. In training, ``mask_ratio`` of the tokens are
dropped after the position embedding and replaced by ``mask_token`` before the head (as
arcface_torch; PETALface fine-tuning uses 0).
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import attention, check_attention_impl
from .layers import DropPath, init_vit_weights


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attention_impl: str = "sdpa") -> None:
        super().__init__()
        self.attention_impl = check_attention_impl(attention_impl)  # "sdpa" | "math" (models/attention.py)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x)  # explicit head size: a -1 is ambiguous for an empty batch
        head_dim = qkv.shape[-1] // (3 * self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.view(b, n, 3, self.num_heads, head_dim).unbind(2))
        out = attention(q, k, v, None, self.attn_drop if self.training else 0.0, self.attention_impl)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), nn.ReLU6()
        self.fc2, self.drop = nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FaceViT(nn.Module):
    """arcface_torch-layout ViT. ``forward(images) -> (B, embedding_size)``."""

    feature_linear = "feature.0"  # where PETALface puts its single-branch feature LoRA

    def __init__(self, img_size: int = 112, patch_size: int = 9, embed_dim: int = 512, depth: int = 12,
                 num_heads: int = 8, mlp_ratio: float = 4.0, embedding_size: int = 512, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, mask_ratio: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        self.img_size, self.embed_dim, self.embedding_size = img_size, embed_dim, embedding_size
        self.mask_ratio = mask_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, drop_rate, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False), nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False), nn.BatchNorm1d(embedding_size, eps=2e-5))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_vit_weights)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"images must be (B, 3, {self.img_size}, {self.img_size}), got {tuple(images.shape)}")
        x = self.pos_drop(self.patch_embed(images) + self.pos_embed)
        b, n, d = x.shape
        masking = self.training and self.mask_ratio > 0
        if masking:  # keep a random (1 − mask_ratio) of the tokens per image
            order = torch.rand(b, n, device=x.device).argsort(dim=1)
            restore = order.argsort(dim=1)
            x = x.gather(1, order[:, :int(n * (1 - self.mask_ratio)), None].expand(-1, -1, d))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if masking:
            x = torch.cat([x, self.mask_token.expand(b, n - x.shape[1], d)], dim=1)
            x = x.gather(1, restore[..., None].expand(-1, -1, d))
        return x.reshape(b, n * d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature(self.forward_features(images))
