"""KL-regularised convolutional autoencoder for latent diffusion, for images (B, C, H, W) and video (B, C, T, H, W).

The image network is LDM's (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
the Stable Diffusion VAE): GroupNorm-SiLU-conv residual blocks, learnt stride-2 downsampling between levels, a mid
block with optional self-attention, and a diagonal Gaussian posterior (mean, log-variance) that training pulls
towards N(0, I) with a small KL term. The spatial factor is f = 2 ** (len(channel_mult) - 1). Layers run in the
order of diffusers' ``AutoencoderKL`` (without its 1x1 ``quant_conv``s), and a test checks parity on its weights.

Video comes in two forms (``video``). "frames" codes every frame with the image network. "causal" swaps every
convolution for a :class:`CausalConv3d` and compresses time by ``time_factor``: the first frame is coded alone and
each later group of ``time_factor`` frames becomes one latent frame, so 1 + k * time_factor frames give 1 + k latent
frames and an image is a one-frame clip. It follows the causal video VAEs of HunyuanVideo (Kong et al. 2024) and
Cosmos (Agarwal et al. 2025): first-frame replication as causal padding, stride-2 causal convolutions in time, and
Cosmos's temporal upsampling (repeat every frame, drop the copy before the first; HunyuanVideo's "first frame in
space only" is the same map). Unlike HunyuanVideo, whose GroupNorm and attention span the whole clip, norms and
attention here act on each frame, so no latent or reconstructed frame depends on a later input frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.models.layers import Attention, group_norm, maybe_checkpoint

VIDEO_FORMS = ("none", "frames", "causal")
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp: keeps exp(logvar) finite in float32


@dataclass(frozen=True)
class AutoencoderConfig:
    """Hyper-parameters of :class:`Autoencoder` (field names are the config-file keys)."""

    in_channels: int = 3
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one level per entry; factor 2 ** (len - 1): (1, 2, 2) is f=4
    blocks_per_level: int = 1
    latent_channels: int = 4
    attention: bool = False  # one self-attention block in the encoder's and the decoder's mid block
    groups: int = 32  # GroupNorm groups, lowered to a divisor of each width
    video: str = "none"  # "frames": per-frame 2-D coding; "causal": 3-D causal convolutions that compress time
    time_factor: int = 1  # temporal compression of the causal form: 1, 2 or 4
    checkpointing: bool = False

    def __post_init__(self):
        for key in ("in_channels", "channels", "blocks_per_level", "latent_channels", "groups"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive integers, got {self.channel_mult}")
        if self.video not in VIDEO_FORMS:
            raise ValueError(f"video must be none, frames or causal, got {self.video!r}")
        if self.time_factor not in (1, 2, 4):
            raise ValueError(f"time_factor must be 1, 2 or 4, got {self.time_factor}")
        if self.time_factor > 1 and self.video != "causal":
            raise ValueError(f"time_factor {self.time_factor} needs video: causal, got video: {self.video}")
        if self.time_levels > len(self.channel_mult) - 1:
            raise ValueError(
                f"time_factor {self.time_factor} needs {self.time_levels} downsampling levels, "
                f"channel_mult {self.channel_mult} has {len(self.channel_mult) - 1}"
            )

    @property
    def factor(self) -> int:
        """Spatial downsampling factor: latent height and width are the sample's divided by it."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def time_levels(self) -> int:
        """How many of the first downsampling levels also halve time."""
        return int(math.log2(self.time_factor))

    def latent_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The latent's (C, [T,] H, W) for a sample of shape (C, [T,] H, W); a ValueError if it cannot be coded."""
        ranks = {"none": (3,), "frames": (3, 4), "causal": (4,)}[self.video]
        if len(sample_shape) not in ranks:
            expected = " or ".join({3: "(C, H, W)", 4: "(C, T, H, W)"}[r] for r in ranks)
            raise ValueError(f"video: {self.video} codes samples {expected}, got shape {tuple(sample_shape)}")
        channels, *frames, height, width = sample_shape
        if channels != self.in_channels:
            raise ValueError(f"in_channels is {self.in_channels}, got a sample with {channels} channels")
        if height % self.factor or width % self.factor:
            raise ValueError(f"height and width must be divisible by the factor {self.factor}, got {height}x{width}")
        if self.video == "causal":  # the first frame is coded alone, each later group of time_factor frames together
            steps, rest = divmod(frames[0] - 1, self.time_factor)
            if steps < 0 or rest:
                tf = self.time_factor
                raise ValueError(f"time_factor {tf} codes 1 + k * {tf} frames (k >= 0), got T={frames[0]}")
            frames = [1 + steps]
        return (self.latent_channels, *frames, height // self.factor, width // self.factor)


def per_frame(function, x: torch.Tensor) -> torch.Tensor:
    """``function`` of image batches (B, C, H, W), applied to ``x`` or to every frame of a clip (B, C, T, H, W)."""
    if x.ndim == 4:
        return function(x)
    out = function(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, H, W)
    return out.unflatten(0, (x.shape[0], -1)).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """Convolution over (B, C, T, H, W) whose output frame t sees input frames <= t only.

    Time is padded on the past side with kernel_size - 1 copies of the first frame (HunyuanVideo, CogVideoX), not
    zeros: frame 0 then sees the past of a still shot, so an image is coded as a still clip rather than as a frame
    after black ones. With stride 2 in time, output frame 0 sees frame 0 alone and output j frames 2j - 2 ... 2j.
    Space is padded symmetrically (``spatial_padding``, default kernel_size // 2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: tuple[int, int, int] = (1, 1, 1),
        spatial_padding: int | None = None,
    ):
        pad = kernel_size // 2 if spatial_padding is None else spatial_padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad, pad))
        self.past = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, :, :1].expand(-1, -1, self.past, -1, -1), x], dim=2)  # (B, C, past + T, H, W)
        return super().forward(x)


def conv(in_channels: int, out_channels: int, kernel_size: int, causal: bool) -> nn.Module:
    """A size-preserving convolution: 2-D, or causal 3-D for the causal video form."""
    if causal:
        return CausalConv3d(in_channels, out_channels, kernel_size)
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a 1x1 skip where the width changes (LDM's ``ResnetBlock`` without a time input).

    :class:`difflab.models.unet.ResBlock` modulates its second norm by a noise embedding and zero-inits its last
    conv; an autoencoder has no embedding, and LDM initialises every conv by default.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, causal: bool):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = conv(in_channels, out_channels, 3, causal)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = conv(out_channels, out_channels, 3, causal)
        self.skip = conv(in_channels, out_channels, 1, causal) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Norms act per frame so that a causal clip's statistics never mix in later frames. In-place SiLU: the
        # GroupNorm backward does not need the tensor it overwrites.
        h = self.conv1(F.silu(per_frame(self.norm1, x), inplace=True))
        h = self.conv2(F.silu(per_frame(self.norm2, h), inplace=True))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, added to its input (LDM's mid-block ``AttnBlock``)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.attn = Attention(channels, heads=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(self._image, x)

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.attn(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    """Halve H and W (and T, causally, when ``time``) with a stride-2 3x3 conv after a right/bottom pad of one.

    A learnt strided conv rather than average pooling, as LDM: the network chooses what survives the halving
    instead of a fixed box filter. LDM's asymmetric pad gives the same H / 2 as a symmetric one; it is kept so the
    layer computes exactly what LDM and diffusers' ``AutoencoderKL`` compute (the parity test relies on it).
    """

    def __init__(self, channels: int, causal: bool, time: bool = False):
        super().__init__()
        if causal:
            self.conv = CausalConv3d(channels, channels, stride=(2 if time else 1, 2, 2), spatial_padding=0)
        else:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pads W then H, for images and clips alike


class Upsample(nn.Module):
    """Nearest-neighbour x2 in H and W, and in T when ``time``, then a 3x3 conv (LDM).

    In time every frame is repeated and the copy before the first frame dropped (Cosmos): 1 + k frames become
    1 + 2k, the first still alone, and output frame s comes from latent frame ceil(s / 2), so causality holds.
    """

    def __init__(self, channels: int, causal: bool, time: bool = False):
        super().__init__()
        self.time = time
        self.conv = conv(channels, channels, 3, causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = F.interpolate(x, scale_factor=(2.0 if self.time else 1.0, 2.0, 2.0), mode="nearest")
        return self.conv(x[:, :, 1:] if self.time else x)


def mid_block(channels: int, config: AutoencoderConfig) -> list[nn.Module]:
    """Residual block, optional self-attention, residual block at the lowest resolution."""
    causal = config.video == "causal"
    attention = [AttentionBlock(channels, config.groups)] if config.attention else []
    return [
        ResBlock(channels, channels, config.groups, causal),
        *attention,
        ResBlock(channels, channels, config.groups, causal),
    ]


class ConvEncoder(nn.Module):
    """Sample (B, C, [T,] H, W) -> posterior moments (B, 2 * latent_channels, [T',] H / f, W / f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        causal = c.video == "causal"
        widths = [c.channels * m for m in c.channel_mult]
        self.conv_in = conv(c.in_channels, widths[0], 3, causal)
        blocks, ch = [], widths[0]
        for level, width in enumerate(widths):
            for _ in range(c.blocks_per_level):
                blocks.append(ResBlock(ch, width, c.groups, causal))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Downsample(ch, causal, time=level < c.time_levels))
        self.blocks = nn.ModuleList(blocks + mid_block(ch, c))
        self.norm_out = group_norm(ch, c.groups)
        self.conv_out = conv(ch, 2 * c.latent_channels, 3, causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = maybe_checkpoint(self.config.checkpointing, block, h)
        return self.conv_out(F.silu(per_frame(self.norm_out, h), inplace=True))


class ConvDecoder(nn.Module):
    """Latent (B, latent_channels, [T',] h, w) -> sample (B, C, [T,] f h, f w); mirrors :class:`ConvEncoder`.

    Each level has blocks_per_level + 1 residual blocks, as LDM's decoder.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        causal = c.video == "causal"
        widths = [c.channels * m for m in c.channel_mult]
        ch = widths[-1]
        self.conv_in = conv(c.latent_channels, ch, 3, causal)
        blocks = mid_block(ch, c)
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(c.blocks_per_level + 1):
                blocks.append(ResBlock(ch, width, c.groups, causal))
                ch = width
            if level > 0:  # undoes the encoder's downsampling after level - 1
                blocks.append(Upsample(ch, causal, time=level - 1 < c.time_levels))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(ch, c.groups)
        self.conv_out = conv(ch, c.in_channels, 3, causal)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.blocks:
            h = maybe_checkpoint(self.config.checkpointing, block, h)
        return self.conv_out(F.silu(per_frame(self.norm_out, h), inplace=True))


class Autoencoder(nn.Module):
    """``encode(x) -> (mean, logvar)``, ``decode(z) -> x``; ``forward`` reconstructs through a posterior sample.

    The "frames" form folds a clip's frames into the batch, so it is the image network applied frame by frame.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = ConvEncoder(config)
        self.decoder = ConvDecoder(config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the diagonal Gaussian posterior q(z | x), each of the latent's shape."""
        c = self.config
        if x.ndim not in (4, 5):
            raise ValueError(f"expected (B, C, H, W) or (B, C, T, H, W) input, got shape {tuple(x.shape)}")
        c.latent_shape(tuple(x.shape[1:]))
        moments = self.encoder(x) if c.video == "causal" else per_frame(self.encoder, x)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The sample a latent (B, latent_channels, [T,] h, w) codes; T latent frames give 1 + (T - 1) * time_factor."""
        c = self.config
        ranks = {"none": (4,), "frames": (4, 5), "causal": (5,)}[c.video]
        if z.ndim not in ranks or z.shape[1] != c.latent_channels:
            expected = " or ".join({4: "(B, C, h, w)", 5: "(B, C, T, h, w)"}[r] for r in ranks)
            raise ValueError(f"video: {c.video} decodes latents {expected} with C = {c.latent_channels}, "
                             f"got shape {tuple(z.shape)}")
        return self.decoder(z) if c.video == "causal" else per_frame(self.decoder, z)

    def forward(
        self,
        x: torch.Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mean, logvar): decodes z = mean + exp(logvar / 2) * noise (Kingma & Welling 2014), or
        the mean when ``sample`` is false. ``noise`` (the latent's shape) replaces the draw from ``generator``, so
        a trainer can draw it per sample, independently of how the batch is split."""
        mean, logvar = self.encode(x)
        z = mean
        if sample:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            elif noise.shape != mean.shape:
                raise ValueError(f"noise must have the latent's shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
            z = mean + (0.5 * logvar).exp() * noise
        return self.decode(z), mean, logvar
