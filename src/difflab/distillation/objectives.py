"""What a student minimises, one trainer objective per method (``training/objectives.py`` has the interface).

Each student is an ordinary run: the trainer draws its data, noise and label dropout as for any generator, and the
objective turns them into the method's regression target through the teacher's denoiser and the sampling stage's
own step functions (:func:`~difflab.sampling.solvers.euler_update`, :func:`~difflab.sampling.solvers.heun_update`)
and guidance combinator (:func:`~difflab.guidance.guided`): no second copy of a sampler.

- progressive distillation (Salimans & Ho 2022, Alg. 2): one student step from sigma to sigma'' matches two teacher
  steps sigma -> sigma' -> sigma'' of the teacher's grid; target and truncated-SNR weight as the paper;
- consistency distillation (Song et al. 2023, Alg. 2): the student at sigma_{n+1} matches an EMA target network at
  the teacher's Heun step to sigma_n, through the boundary-condition parameterisation ``consistency``;
- multistep consistency distillation (Heek, Hoogeboom & Salimans 2024): the grid is cut into segments at the
  student's ``sample.sigmas``, and within each the student's DDIM jump to the segment's lower edge, not its x0
  estimate, must be consistent; one euler step per segment is then a deterministic sample;
- consistency training (Song et al. 2023, Alg. 3, with the improved techniques of Song & Dhariwal 2023): no teacher,
  both points share one noise; a doubling discretisation curriculum, log-normal choice of the noise level, the
  stop-gradient student as target, pseudo-Huber distance weighted by 1 / (sigma_{n+1} - sigma_n);
- guidance distillation (Meng et al. 2023, stage 1): a student with a guidance-scale input matches the
  classifier-free guided teacher, ``D_w = lerp(D(x | null), D(x | c), w)``, in one forward pass.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from difflab.config import ConfigError
from difflab.diffusion import loss_weight, weighted_mse
from difflab.sampling.schedules import karras
from difflab.sampling.solvers import euler_update, heun_update, rows
from difflab.training.objectives import DiffusionObjective, Share, start_from

CT_FIRST_INTERVALS = 10  # iCT's s0: the consistency-training curriculum starts at 10 noise levels and doubles
CT_P_MEAN, CT_P_STD = -1.1, 2.0  # iCT's log-normal choice of the noise level
MULTISTEP = "multistep_consistency"


class _Student(DiffusionObjective):
    """A denoising objective whose network starts from the teacher's weights; the teacher is frozen."""

    def __init__(self, config, network: nn.Module, generator: torch.Generator, num_classes: int, encoder=None):
        super().__init__(config, network, generator, num_classes, encoder)
        self.teacher = None
        if config.distill.teacher is not None:
            from difflab.training.run import load_run

            run = load_run(config.distill.teacher, ema=config.distill.teacher_ema,
                           device=next(network.parameters()).device)
            self.teacher = run.model.requires_grad_(False)
            # The teacher's weights; a student's own new inputs (a guidance embedding) keep their zero start.
            start_from(network, run.network.state_dict(),
                       f"the student's model differs from the teacher {config.distill.teacher}", ("embed.guidance.",))

    def teacher_step(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cond: dict):
        """The teacher's solver step from per-sample ``sigma`` to ``sigma_next``."""
        denoised = self.teacher(x, sigma, **cond)
        if self.config.distill.teacher_solver == "heun":
            return heun_update(self.teacher, x, denoised, sigma, sigma_next, cond)
        return euler_update(x, denoised, sigma, sigma_next)


class ProgressiveObjective(_Student):
    """Progressive distillation (Salimans & Ho 2022, Alg. 2): the student's grid is every other point of the
    teacher's, ``distill.teacher_sigmas``; a training sample sits at a random student step."""

    def __init__(self, config, network, generator, num_classes, encoder=None):
        super().__init__(config, network, generator, num_classes, encoder)
        self.grid = torch.tensor(config.distill.teacher_sigmas, dtype=torch.float64)
        self.student_steps = (len(self.grid) - 1) // 2

    def draw(self, batch: int, sample_shape, step: int) -> dict:
        return {**super().draw(batch, sample_shape, step),
                "steps": torch.randint(self.student_steps, (batch,), generator=self.generator)}

    def loss(self, model, batch, draws, share: Share, step: int):
        x0, noise, _, cond = self.prepare(batch, draws, share)
        k = 2 * draws["steps"][share.whole]
        sigma, middle, sigma_next = (self.grid[k + j].to(x0.device, torch.float32) for j in range(3))
        x = x0 + rows(sigma, x0) * noise
        with torch.no_grad():
            x_next = self.teacher_step(self.teacher_step(x, sigma, middle, cond), middle, sigma_next, cond)
            # The x0 estimate whose single DDIM step from x lands on the teacher's x_next (Alg. 2's x~).
            ratio = rows(sigma_next / sigma, x0)
            target = (x_next - ratio * x) / (1 - ratio)
        weight = loss_weight("truncated_snr", sigma)
        return weighted_mse(model(x, sigma, **cond), target, weight).mean(), {}


class ConsistencyObjective(_Student):
    """Consistency distillation (``teacher`` steps with Heun between adjacent noise levels), also multistep, and,
    without a teacher step, consistency training. The target network is an EMA of the student
    (``distill.target_decay``)."""

    columns = ("intervals",)

    def __init__(self, config, network, generator, num_classes, encoder=None):
        super().__init__(config, network, generator, num_classes, encoder)
        if config.diffusion.parameterization != "consistency":
            raise ConfigError("consistency distillation needs diffusion.parameterization=consistency")
        self.training = config.distill.method == "consistency_training"
        self.decay = 0.0 if self.training else config.distill.target_decay
        self.target = copy.deepcopy(self.module).requires_grad_(False) if self.decay else None
        self.intervals = config.distill.intervals
        # Multistep: the segments' lower edges, decreasing: the sampling grid's inner levels, then 0 (the last
        # segment jumps to the x0 estimate, as single-step consistency does).
        multistep = config.distill.method == MULTISTEP
        self.edges = torch.tensor([*config.sample.sigmas[1:-1], 0.0], dtype=torch.float64) if multistep else None

    def grid(self, step: int) -> torch.Tensor:
        """Noise levels, decreasing (karras, rho 7, sample.sigma_min..max); consistency training's N doubles from 10
        up to at most ``intervals`` in equal parts of the run (iCT, Eq. 12)."""
        n = self.intervals
        if self.training:
            doublings = max(0, math.floor(math.log2(self.intervals / CT_FIRST_INTERVALS)))
            stage_steps = max(1, self.config.train.steps // (doublings + 1))
            n = min(CT_FIRST_INTERVALS * 2 ** (step // stage_steps), self.intervals)
        s = self.config.sample
        grid = karras(n, sigma_min=s.sigma_min, sigma_max=s.sigma_max)[:-1]  # no 0: the boundary is sigma_min
        if self.edges is not None:  # every edge a level, so that no pair of adjacent levels spans two segments
            grid = torch.cat([grid, self.edges[:-1].to(grid)]).unique().flip(0)
        return grid

    def draw(self, batch: int, sample_shape, step: int) -> dict:
        grid = self.grid(step)
        if self.training:  # iCT: the pair (sigma_{n+1}, sigma_n) with log-normal probability mass
            cdf = torch.erf((grid.log() - CT_P_MEAN) / (math.sqrt(2) * CT_P_STD))
            index = torch.multinomial((cdf[:-1] - cdf[1:]).float(), batch, replacement=True, generator=self.generator)
        else:
            index = torch.randint(len(grid) - 1, (batch,), generator=self.generator)
        return {**super().draw(batch, sample_shape, step), "pairs": torch.stack([grid[index], grid[index + 1]], 1)}

    def loss(self, model, batch, draws, share: Share, step: int):
        x0, noise, _, cond = self.prepare(batch, draws, share)
        sigma, sigma_next = draws["pairs"][share.whole].to(x0.device, torch.float32).unbind(1)
        x = x0 + rows(sigma, x0) * noise
        with torch.no_grad():
            if self.training:
                x_next = x0 + rows(sigma_next, x0) * noise
            else:
                x_next = self.teacher_step(x, sigma, sigma_next, cond)
            # The EMA target network, or with no decay (iCT, and always for consistency training) the student
            # itself without its gradient.
            target = (model if self.target is None else self.target)(x_next, sigma_next, **cond)
        prediction = model(x, sigma, **cond)
        if self.edges is not None:  # multistep: both points' DDIM jumps to their segment's lower edge
            edges = self.edges.to(sigma)
            edge = edges[(edges[None, :] <= sigma_next[:, None]).float().argmax(1)]  # the first edge below
            target = euler_update(x_next, target, sigma_next, edge)
            prediction = euler_update(x, prediction, sigma, edge)
        distance = self.distance(prediction, target)
        weight = 1 / (sigma - sigma_next) if self.training else torch.ones_like(sigma)
        return (weight * distance).mean(), {"intervals": float(len(self.grid(step)))}

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per sample: pseudo-Huber ``sqrt(|d|^2 + c^2) - c``, c = 0.00054 sqrt(dim) (iCT, Sec. 3.3), or mean L2."""
        difference = (prediction.float() - target.float()).flatten(1)
        if self.config.distill.metric == "l2":
            return difference.square().mean(1)
        c = 0.00054 * math.sqrt(difference.shape[1])
        return (difference.square().sum(1) + c**2).sqrt() - c

    def after_step(self, step: int) -> dict:
        if self.target is not None:
            with torch.no_grad():
                for target, student in zip(self.target.parameters(), self.module.parameters(), strict=True):
                    target.lerp_(student.detach(), 1 - self.decay)
        return {}

    def state_tensors(self) -> tuple[dict, dict]:
        if self.target is None:
            return {}, {}
        return {f"target.{k}": v for k, v in self.target.network.state_dict().items()}, {}

    def load_state_tensors(self, tensors: dict, settings: dict) -> None:
        if self.target is not None:
            self.target.network.load_state_dict({k.removeprefix("target."): v for k, v in tensors.items()})


class GuidanceObjective(_Student):
    """Guidance distillation (Meng et al. 2023, stage 1): at a scale ``w ~ U(distill.guidance_range)`` the student
    ``D(x | c, w)`` matches the teacher's classifier-free guided ``D_w(x | c)``, with the run's loss weight."""

    def __init__(self, config, network, generator, num_classes, encoder=None):
        super().__init__(config, network, generator, num_classes, encoder)
        if not config.model.get("guidance_embed"):
            raise ConfigError("guidance distillation needs model.guidance_embed=true (the student's scale input)")
        if not config.model.get("num_classes") and not config.model.get("text_dim"):
            raise ConfigError("guidance distillation needs a conditional teacher (class labels or text)")

    def draw(self, batch: int, sample_shape, step: int) -> dict:
        lo, hi = self.config.distill.guidance_range
        scales = lo + (hi - lo) * torch.rand(batch, generator=self.generator)
        return {**super().draw(batch, sample_shape, step), "scales": scales}

    def loss(self, model, batch, draws, share: Share, step: int):
        from difflab.guidance import guided

        d = self.config.diffusion
        x0, noise, sigma, cond = self.prepare(batch, draws, share)
        scales = draws["scales"][share.whole].to(x0.device)
        x = x0 + rows(sigma, x0) * noise
        with torch.no_grad():
            target = guided(self.teacher, scales)(x, sigma, **cond)
        weight = loss_weight(d.loss_weight, sigma, d.sigma_data, d.min_snr_gamma)
        return weighted_mse(model(x, sigma, guidance_scale=scales, **cond), target, weight).mean(), {}


OBJECTIVES = {
    "progressive": ProgressiveObjective,
    "consistency": ConsistencyObjective,
    "consistency_training": ConsistencyObjective,
    "multistep_consistency": ConsistencyObjective,
    "guidance": GuidanceObjective,
}
