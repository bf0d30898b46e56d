"""Bring your own diffusers model: a local diffusers UNet or DiT folder becomes a difflab denoiser.

:func:`from_diffusers` loads the network named by the folder's ``config.json`` and reads the noise
process from its ``scheduler_config.json``: the scheduler's ``alphas_cumprod`` table becomes a
:class:`~difflab.diffusion.noise.VPSchedule` (the network's timestep is ``sigma_to_t(sigma)``) and its
``prediction_type`` picks the ``eps``/``v``/``x0`` preconditioning; a ``FlowMatch*`` scheduler means a
``flow`` network told ``1000 t`` (SD3's convention, Esser et al. 2024). The result is an ordinary
:class:`~difflab.diffusion.precond.Precond`, so every difflab solver, schedule and guidance works on it.

Sources: k-diffusion's ``external.py`` (discrete-timestep VP models as sigma-convention denoisers);
diffusers' ``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel`` (Peebles & Xie 2023) and
``PixArtTransformer2DModel`` (Chen et al. 2023), whose DiT/PixArt pipelines drop the learned-variance
channels and pass PixArt's resolution micro-conditions the way the adapter below does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from difflab.diffusion.noise import VPSchedule, flow_time_from_sigma
from difflab.diffusion.precond import Precond

MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel")
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Older diffusers saved DiT and PixArt as "Transformer2DModel"; diffusers remaps them by norm_type too.
_LEGACY_TRANSFORMERS = {
    "ada_norm_zero": "DiTTransformer2DModel",
    "ada_norm_single": "PixArtTransformer2DModel",
}
_TEXT_MODELS = ("UNet2DConditionModel", "PixArtTransformer2DModel")
_VAE_SCALE = 8  # PixArt-alpha's resolution micro-condition is in pixels; its VAE downsamples 8x


class DiffusersNetwork(nn.Module):
    """A diffusers model as a difflab network ``F(x_in, c_noise, **cond)`` returning its raw prediction.

    Conditioning keywords: ``class_labels`` (LongTensor (B,), -1 = the null class of classifier-free
    guidance), ``text`` (B, T, D) -> ``encoder_hidden_states``, ``text_mask`` (B, T) bool ->
    ``encoder_attention_mask``. Only those the model uses are accepted.
    """

    def __init__(self, model: nn.Module, class_name: str):
        super().__init__()
        config = model.config
        self.model = model
        self.class_name = class_name
        self.in_channels: int = config.in_channels
        self.out_channels: int = config.get("out_channels") or config.in_channels
        self.sample_size = config.sample_size
        self.null_class: int | None = None
        accepts = set()
        if class_name == "DiTTransformer2DModel":
            accepts.add("class_labels")
            self.null_class = config.num_embeds_ada_norm  # LabelEmbedding's extra row for dropped labels
        elif class_name.startswith("UNet2D"):
            if config.get("num_class_embeds") or config.get("class_embed_type"):
                accepts.add("class_labels")
        if class_name in _TEXT_MODELS:
            accepts.update(("text", "text_mask"))
        if config.get("addition_embed_type"):
            extra = config.addition_embed_type
            raise ValueError(f"{class_name} with addition_embed_type={extra!r} (SDXL-style) is unsupported")
        self.accepts = frozenset(accepts)
        self.requires = self.accepts - {"text_mask"}

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.model.device)
        if labels.is_floating_point() or not (labels == -1).any():
            return labels
        if self.null_class is None:
            raise ValueError(f"{self.class_name} has no null class, so class_labels may not contain -1")
        return labels.where(labels != -1, torch.full_like(labels, self.null_class))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, **cond) -> torch.Tensor:
        for name in cond:
            if name not in self.accepts:
                accepted = ", ".join(sorted(self.accepts)) or "none"
                raise TypeError(
                    f"{self.class_name} got unknown conditioning keyword {name!r} (accepts: {accepted})"
                )
        missing = sorted(self.requires - cond.keys())
        if missing:
            raise TypeError(f"{self.class_name} needs the conditioning keyword {missing[0]!r}")
        dtype = self.model.dtype
        x = x.to(dtype)
        timestep = c_noise.reshape(-1).expand(x.shape[0])  # (B,), fractional timesteps are fine
        labels = self._labels(cond["class_labels"]) if "class_labels" in cond else None
        text = cond["text"].to(dtype) if "text" in cond else None
        mask = cond.get("text_mask")
        if self.class_name == "UNet2DModel":
            out = self.model(x, timestep, class_labels=labels).sample
        elif self.class_name == "UNet2DConditionModel":
            out = self.model(x, timestep, encoder_hidden_states=text, class_labels=labels,
                             encoder_attention_mask=mask).sample
        elif self.class_name == "DiTTransformer2DModel":
            out = self.model(x, timestep=timestep, class_labels=labels).sample
        else:  # PixArtTransformer2DModel
            micro = {"resolution": None, "aspect_ratio": None}
            if self.model.use_additional_conditions:
                height, width = x.shape[-2] * _VAE_SCALE, x.shape[-1] * _VAE_SCALE
                micro = {"resolution": x.new_tensor([[height, width]]).expand(x.shape[0], 2),
                         "aspect_ratio": x.new_tensor([[height / width]]).expand(x.shape[0], 1)}
            out = self.model(x, encoder_hidden_states=text, timestep=timestep, added_cond_kwargs=micro,
                             encoder_attention_mask=mask).sample
        if self.out_channels == 2 * self.in_channels:  # learned variance (Nichol & Dhariwal 2021): keep eps
            out = out[:, : self.in_channels]
        return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _model_dir(folder: Path, subfolder: str | None) -> Path:
    candidates = [folder / subfolder] if subfolder else [folder, folder / "unet", folder / "transformer"]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise ValueError(f"no config.json in {' or '.join(str(c) for c in candidates)}")


def _scheduler_config(folder: Path, model_dir: Path) -> dict:
    names = [model_dir, folder, folder / "scheduler", model_dir.parent / "scheduler"]
    candidates = list(dict.fromkeys(name / "scheduler_config.json" for name in names))
    for candidate in candidates:
        if candidate.is_file():
            return _read_json(candidate)
    raise ValueError(f"no scheduler_config.json found in {', '.join(str(c.parent) for c in candidates)}")


def _noise_process(config: dict) -> tuple[str, Callable | None, VPSchedule | None]:
    """(parameterization, noise_input, vp_schedule) of a diffusers scheduler config."""
    import diffusers

    name = config.get("_class_name", "")
    num_timesteps = config.get("num_train_timesteps", 1000)
    if name.startswith("FlowMatch"):
        return "flow", lambda sigma: flow_time_from_sigma(sigma) * num_timesteps, None
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        choices = ", ".join(PREDICTION_TYPES)
        raise ValueError(f"unsupported prediction_type {prediction!r}; choose one of {choices}")
    # The scheduler builds the table exactly as the model was trained on it (float32 betas, trained_betas,
    # zero-terminal-SNR rescaling): recomputing it in float64 moves integer timesteps by up to 1e-3.
    scheduler_class = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    scheduler = scheduler_class.from_config(config) if scheduler_class else None
    alphabar = getattr(scheduler, "alphas_cumprod", None)
    if alphabar is None:
        raise ValueError(f"unsupported scheduler {name!r}; need a beta schedule (DDPM family) or FlowMatch")
    # Zero terminal SNR has alphabar = 0 at t = T - 1; cap it as diffusers' Euler scheduler does.
    alphabar = torch.as_tensor(alphabar, dtype=torch.float64).clamp(min=2.0**-24)
    return PREDICTION_TYPES[prediction], None, VPSchedule(alphabar)


def from_diffusers(
    folder: str | Path,
    *,
    subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Precond:
    """Load a local diffusers model folder (or pipeline folder) as a difflab denoiser ``D(x, sigma, **cond)``.

    ``folder`` holds ``config.json`` and the weights, or is a pipeline with ``unet/`` or ``transformer/``
    (``subfolder`` picks another) and ``scheduler/``. Nothing is downloaded. The adapter is
    ``result.network``; its ``in_channels`` and ``sample_size`` give the noise shape to sample.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"diffusers folder {folder} does not exist")
    model_dir = _model_dir(folder, subfolder)
    config = _read_json(model_dir / "config.json")
    class_name = config.get("_class_name", "")
    if class_name == "Transformer2DModel":
        class_name = _LEGACY_TRANSFORMERS.get(config.get("norm_type"), class_name)
    if class_name not in MODEL_CLASSES:
        supported = ", ".join(MODEL_CLASSES)
        raise ValueError(f"unsupported diffusers model class {class_name!r}; supported: {supported}")
    parameterization, noise_input, vp_schedule = _noise_process(_scheduler_config(folder, model_dir))

    import diffusers

    model_class = getattr(diffusers, class_name)
    model = model_class.from_pretrained(model_dir, torch_dtype=torch_dtype, local_files_only=True)
    model = model.to(device) if device is not None else model
    network = DiffusersNetwork(model.eval(), class_name)
    return Precond(network, parameterization, noise_input=noise_input, vp_schedule=vp_schedule)
