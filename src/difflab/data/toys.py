"""2-D toy distributions for quick experiments with solvers, guidance and small networks: (N, 2) points."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def ring(n: int, seed: int = 0, modes: int = 8, radius: float = 1.0, std: float = 0.05) -> torch.Tensor:
    """``modes`` Gaussian blobs evenly spaced on a circle."""
    g = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi * torch.randint(0, modes, (n,), generator=g) / modes
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + std * torch.randn(n, 2, generator=g)


def swiss_roll(n: int, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """The 2-D swiss roll: a spiral r = t for t in [1.5 pi, 4.5 pi], scaled into about [-1, 1]^2."""
    g = torch.Generator().manual_seed(seed)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    points = torch.stack([t * t.cos(), t * t.sin()], dim=1) / (4.5 * math.pi)
    return points + noise * torch.randn(n, 2, generator=g)


def checkerboard(n: int, seed: int = 0, squares: int = 4) -> torch.Tensor:
    """Uniform on the dark squares of a ``squares`` x ``squares`` board covering [-1, 1]^2."""
    g = torch.Generator().manual_seed(seed)
    cells = [(i, j) for i in range(squares) for j in range(squares) if (i + j) % 2 == 0]
    index = torch.tensor(cells)[torch.randint(0, len(cells), (n,), generator=g)]
    return (index + torch.rand(n, 2, generator=g)) * (2 / squares) - 1


TOYS: dict[str, Callable[..., torch.Tensor]] = {"ring": ring, "swiss_roll": swiss_roll, "checkerboard": checkerboard}
