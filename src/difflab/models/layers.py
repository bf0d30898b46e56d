"""Layers shared by the U-Net and the DiT: attention through SDPA, RoPE, sin-cos positions, checkpointing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias, so a residual branch starts as the identity (ADM, DiT's adaLN-Zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def maybe_checkpoint(enabled: bool, function, *args):
    """Run ``function(*args)``, recomputing its activations in the backward pass when ``enabled``."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention`` (Vaswani et al. 2017).

    Self-attention uses one fused QKV projection; cross-attention (``context_dim`` set) projects queries
    from ``x`` and keys/values from the context. ``rope`` is a (cos, sin) pair from :func:`rope_table`.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, zero_out: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.out = zero_init(nn.Linear(dim, dim)) if zero_out else nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, tokens, dim = x.shape  # (B, N, D)
        if self.cross:
            q = self.q(x).view(batch, tokens, self.heads, -1).transpose(1, 2)  # (B, H, N, Dh)
            k, v = self.kv(context).view(batch, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, Dh)
        return self.out(out.transpose(1, 2).reshape(batch, tokens, dim))


def rope_table(grid: tuple[int, ...], head_dim: int, theta: float = 10000.0, device=None):
    """Axial rotary position tables (Su et al. 2021) for tokens on a grid ordered row-major.

    The head's frequency pairs are split evenly between the grid's axes (time, height, width); pairs
    left over rotate by zero. Returns (cos, sin), each (N, head_dim // 2).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head width, got {head_dim}")
    pairs = head_dim // 2
    per_axis = pairs // len(grid)
    positions = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float32, device=device) for n in grid], indexing="ij"), -1
    ).reshape(-1, len(grid))  # (N, axes)
    freqs = theta ** (-torch.arange(per_axis, dtype=torch.float32, device=device) / max(per_axis, 1))
    angles = (positions[:, :, None] * freqs).reshape(positions.shape[0], -1)  # (N, axes * per_axis)
    angles = F.pad(angles, (0, pairs - angles.shape[1]))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` (..., N, Dh) by the angles of a :func:`rope_table`."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


def sincos_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D sin-cos embedding (Vaswani et al. 2017) of positions (N,) -> (N, dim), as DiT's ``get_1d_sincos``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.double()[:, None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_grid(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """2-D sin-cos embedding of a height x width grid, row-major (N, dim): half for rows, half for columns."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.cat([sincos_embedding(rows, dim // 2), sincos_embedding(cols, dim // 2)], dim=1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    groups = math.gcd(channels, groups)
    return nn.GroupNorm(groups, channels, eps=1e-6)
