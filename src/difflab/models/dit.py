"""Diffusion Transformer (Peebles & Xie 2023, "DiT") for images (B, C, H, W) and video (B, C, T, H, W).

Patches become tokens, every block is modulated by the conditioning vector through adaLN-Zero
(shift/scale/gate regressed from it, zero-initialised so each block starts as the identity, Sec. 3.2),
and a final adaptive layer maps tokens back to patches. Positions are fixed 2-D sin-cos embeddings
(plus a 1-D one over frames for video) or axial RoPE inside attention. Video uses space-time patches
(``frame_patch`` frames by ``patch_size``^2 pixels) and either full attention over all tokens or
factorised attention that alternates spatial and temporal blocks (Ma et al. 2024, "Latte", variant 1).
A prompt adds cross-attention after self-attention in each block (Chen et al. 2023, "PixArt-alpha").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.conditioning import ConditionEmbedding
from difflab.models.layers import Attention, maybe_checkpoint, rope_table, sincos_embedding, sincos_grid, zero_init
from difflab.models.unet import _network_input


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of :class:`DiT` (field names are the config-file keys)."""

    in_channels: int = 4
    out_channels: int | None = None  # defaults to in_channels
    concat_channels: int = 0
    resolution: int = 32  # input height/width for model-info; any multiple of patch_size runs
    patch_size: int = 2
    frame_patch: int = 1  # frames per space-time patch (video)
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"  # or "rope"
    video_attention: str = "full"  # or "factorised"
    noise_embedding: str = "positional"
    num_classes: int = 0
    text_dim: int = 0
    guidance_embed: bool = False  # a guidance scale input: guidance-distilled students (Meng et al. 2023)
    frames: int | None = None  # clip length for model-info; any multiple of frame_patch runs
    checkpointing: bool = False

    def __post_init__(self):
        if self.pos_embed not in ("sincos", "rope"):
            raise ValueError(f"pos_embed must be sincos or rope, got {self.pos_embed!r}")
        if self.video_attention not in ("full", "factorised"):
            raise ValueError(f"video_attention must be full or factorised, got {self.video_attention!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")


# The DiT family (Peebles & Xie 2023, Table 1); append the patch size: dit_xl_2 is DiT-XL/2.
DIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x += gate * attn(modulate(norm(x))); x += gate * mlp(modulate(norm(x)))."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        if cross:
            self.cross_norm = nn.LayerNorm(hidden, eps=1e-6)
            self.cross = Attention(hidden, heads, context_dim=hidden, zero_out=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))
        self.modulation = zero_init(nn.Linear(hidden, 6 * hidden))

    def forward(self, x, cond, context, context_mask, rope, groups: tuple[int, int, bool]) -> torch.Tensor:
        # x (B, N, D); cond = SiLU(c) (B, D); groups = (frames, temporal): frames > 1 factorises attention.
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = torch.addcmul(x, gate1, self._self_attention(h, rope, groups))
        if context is not None:
            x = x + self.cross(self.cross_norm(x), context, context_mask)
        return torch.addcmul(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))

    def _self_attention(self, h, rope, groups):
        frames, temporal = groups
        if frames == 1:  # full attention over all tokens
            return self.attn(h, rope=rope)
        batch, tokens, dim = h.shape
        pixels = tokens // frames
        if not temporal:  # within each frame: (B*T, HW, D)
            return self.attn(h.reshape(batch * frames, pixels, dim), rope=rope).reshape(batch, tokens, dim)
        h = h.view(batch, frames, pixels, dim).transpose(1, 2).reshape(batch * pixels, frames, dim)  # (B*HW, T, D)
        out = self.attn(h, rope=rope).view(batch, pixels, frames, dim)
        return out.transpose(1, 2).reshape(batch, tokens, dim)


class DiT(nn.Module):
    """``network(x, c_noise, class_labels=, text=, text_mask=, concat=, guidance_scale=)``: output of x's shape."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        patch_dim = (c.in_channels + c.concat_channels) * c.frame_patch * c.patch_size**2
        self.out_channels = c.out_channels or c.in_channels
        self.patch_embed = nn.Linear(patch_dim, c.hidden)
        self.embed = ConditionEmbedding(
            c.hidden, noise_embedding=c.noise_embedding, num_classes=c.num_classes, text_dim=c.text_dim,
            guidance_embed=c.guidance_embed,
        )
        self.blocks = nn.ModuleList(DiTBlock(c.hidden, c.heads, c.mlp_ratio, bool(c.text_dim)) for _ in range(c.depth))
        self.norm_out = nn.LayerNorm(c.hidden, elementwise_affine=False, eps=1e-6)
        self.modulation_out = zero_init(nn.Linear(c.hidden, 2 * c.hidden))
        self.proj_out = zero_init(nn.Linear(c.hidden, self.out_channels * c.frame_patch * c.patch_size**2))
        # DiT's initialisation: Xavier-uniform for every linear layer but the zero-initialised ones.
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.any():
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        c = self.config
        x = _network_input(x, concat, c.concat_channels)
        video = x.ndim == 5
        # An image is a still clip one space-time patch long, so image and video batches share the weights.
        clip = x if video else x[:, :, None].expand(-1, -1, c.frame_patch, -1, -1)  # (B, C, T, H, W)
        length, height, width = clip.shape[2:]
        pt, p = c.frame_patch, c.patch_size
        if height % p or width % p or length % pt:
            raise ValueError(f"input {tuple(x.shape)} is not divisible into {pt}x{p}x{p} patches")
        grid = (length // pt, height // p, width // p)
        tokens = self.patch_embed(_patchify(clip, pt, p).to(self.patch_embed.weight.dtype))  # (B, N, D)

        emb, context, context_mask = self.embed(c_noise, class_labels, text, text_mask, guidance_scale)
        head_dim = c.hidden // c.heads
        factorised = video and c.video_attention == "factorised" and grid[0] > 1
        pixels = grid[1] * grid[2]
        # Positions always span (frame, row, column) with images at frame 0, so an image is a still clip.
        if c.pos_embed == "sincos":
            frame_pos = sincos_embedding(torch.arange(grid[0], device=x.device), c.hidden)
            pos = sincos_grid(grid[1], grid[2], c.hidden, device=x.device).repeat(grid[0], 1)  # (N, D)
            tokens = tokens + (pos + frame_pos.repeat_interleave(pixels, 0)).to(tokens.dtype)
            ropes = (None, None)
        else:
            cos, sin = rope_table(grid, head_dim, device=x.device)  # (N, Dh / 2)
            # Factorised blocks see one frame's pixels (frame 0's rows) or one pixel's frames (every pixels-th row).
            ropes = ((cos[:pixels], sin[:pixels]), (cos[::pixels], sin[::pixels])) if factorised else ((cos, sin),) * 2

        cond = F.silu(emb).to(tokens.dtype)
        for i, block in enumerate(self.blocks):
            temporal = factorised and i % 2 == 1
            groups = (grid[0] if factorised else 1, temporal)
            tokens = maybe_checkpoint(c.checkpointing, block, tokens, cond, context, context_mask,
                                      ropes[temporal], groups)
        shift, scale = self.modulation_out(cond)[:, None].chunk(2, dim=-1)
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))  # (B, N, C * pt * p * p)
        out = _unpatchify(out, grid, pt, p, self.out_channels)
        return out if video else out.mean(dim=2)


def _patchify(x: torch.Tensor, pt: int, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, C*pt*p*p), tokens ordered (t, h, w) and each patch (c, t, h, w) like Conv3d."""
    b, ch, t, h, w = x.shape
    x = x.reshape(b, ch, t // pt, pt, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (t // pt) * (h // p) * (w // p), ch * pt * p * p)


def _unpatchify(x: torch.Tensor, grid: tuple[int, int, int], pt: int, p: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`_patchify`: (B, N, C*pt*p*p) -> (B, C, T, H, W)."""
    b, (gt, gh, gw) = x.shape[0], grid
    x = x.reshape(b, gt, gh, gw, channels, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, channels, gt * pt, gh * p, gw * p)
