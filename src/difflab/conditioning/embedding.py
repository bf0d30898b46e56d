"""The conditioning vector and cross-attention context shared by every denoiser network.

A network is told the noise level, and optionally a class label and a text prompt:

- the noise level ``c_noise`` becomes sinusoidal features (DDPM/ADM's positional embedding, Ho et al.
  2020; or EDM's random Fourier features, Song et al. 2021) and then an MLP;
- a class label adds a learned embedding; the label ``-1`` is the learned **null class** that
  classifier-free guidance samples with (Ho & Salimans 2022) and training drops labels to;
- a text prompt arrives as token states ``text`` (B, T, D_text) from a frozen encoder with a boolean
  ``text_mask`` (B, T). The tokens, projected to the network's width, are the cross-attention context;
  their masked mean, through an MLP, adds to the conditioning vector (the pooled vector of SDXL/SD3).
  A sample whose mask is all False is the **null prompt**: it attends to a learned null token and adds a
  learned null pooled vector instead;
- a guidance scale ``guidance_scale`` (guidance-distilled students, Meng et al. 2023) adds sinusoidal features
  of ``w`` through an MLP whose last layer starts at zero, so a student starts as its teacher.

The null condition of any batch is therefore model-independent: :func:`null_condition`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NULL_CLASS = -1
GUIDANCE_INPUT_SCALE = 100.0  # w of 0..10 onto the timestep-like range (0..1000) the positional features suit


def null_condition(cond: dict) -> dict:
    """The unconditional counterpart of a conditioning dict (labels -> null class, prompts -> null prompt).

    Other entries (concatenated channels such as masks or control images) are kept: they describe the
    task, not the content that guidance amplifies.
    """
    null = dict(cond)
    if cond.get("class_labels") is not None:
        null["class_labels"] = torch.full_like(cond["class_labels"], NULL_CLASS)
    if cond.get("text") is not None:
        text = cond["text"]
        null["text_mask"] = torch.zeros(text.shape[:2], dtype=torch.bool, device=text.device)
    return null


def drop_condition(cond: dict, drop: torch.Tensor) -> dict:
    """Replace the labels and prompt of the samples where ``drop`` (B,) is True by the null condition.

    Training with a random ``drop`` mask teaches the unconditional model classifier-free guidance needs.
    """
    dropped = dict(cond)
    if cond.get("class_labels") is not None:
        dropped["class_labels"] = cond["class_labels"].masked_fill(drop, NULL_CLASS)
    if cond.get("text") is not None:
        mask = cond.get("text_mask")
        mask = torch.ones(cond["text"].shape[:2], dtype=torch.bool, device=drop.device) if mask is None else mask
        dropped["text_mask"] = mask & ~drop[:, None]
    return dropped


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of the noise input, then a 2-layer MLP (ADM / DiT ``TimestepEmbedder``).

    ``positional``: frequencies ``max_period^(-k/half)`` as in DDPM, for inputs on a timestep scale
    (0..1000); ``fourier``: fixed random frequencies (EDM's ``FourierEmbedding``, scale 16), for inputs
    on a log-sigma scale.
    """

    def __init__(self, dim: int, features: int = 256, kind: str = "positional", max_period: float = 10000.0):
        super().__init__()
        half = features // 2
        if kind == "positional":
            freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        elif kind == "fourier":
            freqs = 2 * math.pi * 16 * torch.randn(half, generator=torch.Generator().manual_seed(0))
        else:
            raise ValueError(f"unknown noise embedding {kind!r}; choose positional or fourier")
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        args = c_noise.float()[:, None] * self.freqs[None]  # (B, half)
        features = torch.cat([args.cos(), args.sin()], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ConditionEmbedding(nn.Module):
    """Noise level + class label + pooled prompt -> conditioning vector (B, dim); prompt tokens -> context.

    ``num_classes=0`` and ``text_dim=0`` switch the corresponding inputs off (passing them is then an
    error, so a typo cannot silently train an unconditional model).
    """

    def __init__(
        self,
        dim: int,
        *,
        noise_embedding: str = "positional",
        num_classes: int = 0,
        text_dim: int = 0,
        context_dim: int | None = None,
        guidance_embed: bool = False,
    ):
        super().__init__()
        self.noise = NoiseEmbedding(dim, kind=noise_embedding)
        self.num_classes = num_classes
        self.text_dim = text_dim
        self.guidance = None
        if guidance_embed:
            self.guidance = NoiseEmbedding(dim)
            for p in self.guidance.mlp[-1].parameters():  # zero: the student starts as its teacher
                nn.init.zeros_(p)
        if num_classes:
            # Row num_classes is the learned null class (label -1).
            self.classes = nn.Embedding(num_classes + 1, dim)
        if text_dim:
            context_dim = context_dim or dim
            self.context = nn.Linear(text_dim, context_dim)
            self.pooled = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.null_token = nn.Parameter(torch.zeros(1, 1, context_dim))
            self.null_pooled = nn.Parameter(torch.zeros(dim))

    def forward(
        self,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return (embedding (B, dim), context (B, T', context_dim) or None, context mask (B, T') or None)."""
        emb = self.noise(c_noise)
        if (guidance_scale is None) != (self.guidance is None):
            raise TypeError("this network takes guidance_scale= (a guidance-distilled student)" if self.guidance
                            else "this network has no guidance input (guidance_embed=false) but got guidance_scale")
        if self.guidance is not None:
            scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=emb.device).expand(emb.shape[0])
            emb = emb + self.guidance(GUIDANCE_INPUT_SCALE * scale).to(emb.dtype)
        if class_labels is not None:
            if not self.num_classes:
                raise TypeError("this network is not class-conditional (num_classes=0) but got class_labels")
            if class_labels.shape != (emb.shape[0],):
                raise ValueError(f"class_labels must have shape ({emb.shape[0]},), got {tuple(class_labels.shape)}")
            emb = emb + self.classes(torch.where(class_labels < 0, self.num_classes, class_labels))
        if text is None:
            if self.text_dim:
                raise TypeError("this network is text-conditional: pass text= (and text_mask=) or its null condition")
            return emb, None, None
        if not self.text_dim:
            raise TypeError("this network is not text-conditional (text_dim=0) but got text")
        if text.ndim != 3 or text.shape[0] != emb.shape[0] or text.shape[2] != self.text_dim:
            raise ValueError(f"text must have shape ({emb.shape[0]}, tokens, {self.text_dim}), got {tuple(text.shape)}")
        batch, tokens = text.shape[:2]
        if text_mask is None:
            text_mask = torch.ones(batch, tokens, dtype=torch.bool, device=text.device)
        text_mask = text_mask.bool()
        has_prompt = text_mask.any(dim=1)  # (B,)
        weights = text_mask.to(text.dtype)[..., None]
        pooled = (text * weights).sum(1) / weights.sum(1).clamp(min=1)
        pooled = torch.where(has_prompt[:, None], self.pooled(pooled).to(emb.dtype), self.null_pooled.to(emb.dtype))
        context = torch.cat([self.null_token.expand(batch, 1, -1).to(text.dtype), self.context(text)], dim=1)
        # The null token is visible only to null prompts, so every row attends to at least one key.
        context_mask = torch.cat([~has_prompt[:, None], text_mask & has_prompt[:, None]], dim=1)
        return emb + pooled, context, context_mask
