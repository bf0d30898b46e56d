"""EMA: classic EMA against a brute-force loop, power-function EMA against its closed-form weights, post-hoc EMA
reconstruction against a directly tracked average (EDM2, Karras et al. 2024, App. C), and checkpoint round trips."""

import math

import pytest
import torch
from torch import nn

from difflab.training.ema import (
    EMA,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    posthoc_ema,
    sigma_rel_to_gamma,
    unwrapped_state_dict,
)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


class Vector(nn.Module):
    """One parameter vector, set directly to a simulated trajectory."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))


class Wrapper(nn.Module):
    """Stands in for DDP (attribute "module") or torch.compile's OptimizedModule (attribute "_orig_mod")."""

    def __init__(self, attr: str, inner: nn.Module) -> None:
        super().__init__()
        self.add_module(attr, inner)


def perturb(model: nn.Module, generator: torch.Generator) -> None:
    """A fake optimizer step: random parameter changes and a BatchNorm forward (running stats, int counter)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    model.train()(torch.randn(8, 3, generator=generator, dtype=next(model.parameters()).dtype))


def test_classic_ema_matches_brute_force_loop_with_warmup():
    gen = torch.Generator().manual_seed(0)
    model = tiny_model().double()  # float64 model: averages are float32 copies regardless
    ema = EMA(model, decays=(0.999, 0.9))
    assert ema.names == ["ema-0.999", "ema-0.9"]
    reference = {d: {k: v.clone() for k, v in model.state_dict().items()} for d in (0.999, 0.9)}
    for step in range(1, 51):
        perturb(model, gen)
        ema.update(model, step)
        for decay, avg in reference.items():
            beta = min(decay, (1 + step) / (10 + step))  # TensorFlow's num_updates warm-up
            for k, v in model.state_dict().items():
                avg[k] = beta * avg[k] + (1 - beta) * v if v.is_floating_point() else v.clone()
    for decay, avg in reference.items():
        got = ema.average(f"ema-{decay!r}")
        for k, v in avg.items():
            if v.is_floating_point():
                assert got[k].dtype == torch.float32
                torch.testing.assert_close(got[k].double(), v, rtol=0, atol=1e-6)
            else:
                assert torch.equal(got[k], v)  # num_batches_tracked copied as-is
    assert ema.average("ema-0.999")["1.num_batches_tracked"].item() == 50
    model.load_state_dict(ema.average("ema-0.9"))  # loadable into the model


def test_sigma_rel_gamma_conversion():
    # EDM2 Sec. 3 / Eq. 123: sigma_rel = ((gamma+1) / ((gamma+2)^2 (gamma+3)))^0.5; 0.05 -> 16.97, 0.10 -> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97220, abs=1e-5)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.93720, abs=1e-5)
    for sigma_rel in (0.01, 0.05, 0.07, 0.10, 0.2, 0.29):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
        s = sigma_rel**-2  # EDM2 Eq. 126: the larger real root of this cubic
        residual = gamma**3 + 7 * gamma**2 + (16 - s) * gamma + (12 - s)
        assert residual == pytest.approx(0, abs=1e-9 * s * (abs(gamma) + 1))
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.31)  # sigma_rel peaks at ~0.3003 (gamma = (sqrt(5) - 3) / 2)
    ema = EMA(Vector(1), sigma_rels=(0.05, 0.1))
    assert ema.names == ["phema-0.050", "phema-0.100"]
    betas = ema.betas(100)
    assert betas["phema-0.050"] == pytest.approx((1 - 1 / 100) ** (sigma_rel_to_gamma(0.05) + 1))
    assert ema.betas(1) == {"phema-0.050": 0.0, "phema-0.100": 0.0}


def test_power_ema_is_closed_form_weighted_average():
    steps, sigma_rel = 2000, 0.05
    gamma = sigma_rel_to_gamma(sigma_rel)
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    theta = torch.sin(t / 300) + 1e-3 * t  # scalar trajectory theta_t = f(t)
    model = Vector(1)
    ema = EMA(model, sigma_rels=(sigma_rel,))
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.w.fill_(theta[step - 1].item())
        ema.update(model, step)
        if step == 1:  # beta_1 = 0: the initialisation is forgotten at once
            assert ema.average("phema-0.050")["w"].item() == model.w.item()
    got = ema.average("phema-0.050")["w"].double().item()
    # Exact discrete weights: prod_{s>tau} (1 - 1/s)^(gamma+1) * (1 - beta_tau) = (tau^(g+1) - (tau-1)^(g+1)) / T^(g+1).
    exact = (t / steps) ** (gamma + 1) - ((t - 1) / steps) ** (gamma + 1)
    assert exact.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert got == pytest.approx((exact * theta).sum().item(), abs=1e-6)
    # For large t, w_t ∝ t^gamma (the continuous power-function profile).
    power = t**gamma / (t**gamma).sum()
    assert got == pytest.approx((power * theta).sum().item(), abs=1e-3)


def test_posthoc_reconstruction_matches_direct_power_ema():
    gen = torch.Generator().manual_seed(0)
    steps, dim, every = 4000, 256, 100
    model = Vector(dim)
    ema = EMA(model, sigma_rels=(0.05, 0.10, 0.07))
    walk, drift = torch.zeros(dim), torch.randn(dim, generator=gen)
    snapshots = []
    for step in range(1, steps + 1):
        walk += 0.01 * torch.randn(dim, generator=gen)  # noisy trajectory: random walk + slow drift + SGD-like noise
        with torch.no_grad():
            model.w.copy_(walk + math.sin(step / 700) * drift + 0.5 * torch.randn(dim, generator=gen))
        ema.update(model, step)
        if step % every == 0:
            for name in ("phema-0.050", "phema-0.100"):
                snapshots.append((step, ema.gammas[name], {k: v.clone() for k, v in ema.average(name).items()}))
        if step == 2000:
            mid = [ema.average(n)["w"].clone() for n in ("phema-0.070", "phema-0.050", "phema-0.100")]
    direct, a, b = (ema.average(n)["w"] for n in ("phema-0.070", "phema-0.050", "phema-0.100"))
    scale = (a - b).norm()  # how far apart the averages themselves are
    # Measured: ~1.5e-4 of that scale (5 seeds); with snapshots every 500 steps it rises to ~7.5e-3.
    assert (posthoc_ema(snapshots, 0.07)["w"] - direct).norm() / scale < 1e-3
    # Reconstructing at an earlier step (40 usable snapshots) measured ~6e-4 of that step's scale.
    direct_mid, a_mid, b_mid = mid
    assert (posthoc_ema(snapshots, 0.07, step=2000)["w"] - direct_mid).norm() / (a_mid - b_mid).norm() < 2e-3
    torch.testing.assert_close(posthoc_ema(snapshots, 0.05)["w"], a, rtol=0, atol=1e-6)  # a stored profile
    coefficients = posthoc_coefficients([(t, g) for t, g, _ in snapshots], 0.07)
    assert sum(coefficients) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        posthoc_coefficients([(t, g) for t, g, _ in snapshots], 0.07, step=steps + 1)


def test_state_dict_round_trip_and_safetensors():
    gen = torch.Generator().manual_seed(1)
    model = tiny_model()
    ema = EMA(model, decays=(0.999,), sigma_rels=(0.05,))
    for step in range(1, 11):
        perturb(model, gen)
        ema.update(model, step)
    flat = ema.state_dict()
    assert "ema-0.999/0.weight" in flat and "phema-0.050/1.num_batches_tracked" in flat
    safetensors = pytest.importorskip("safetensors.torch")
    flat = safetensors.load(safetensors.save(flat))
    restored = EMA(tiny_model(), decays=(0.999,), sigma_rels=(0.05,))
    restored.load_state_dict(flat)
    for key, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    with pytest.raises(KeyError):
        EMA(tiny_model(), decays=(0.99,)).load_state_dict(flat)
    bad = dict(flat, **{"ema-0.999/0.bias": torch.zeros(1)})
    with pytest.raises(ValueError):
        restored.load_state_dict(bad)


@pytest.mark.parametrize("attrs", [["module"], ["_orig_mod"], ["_orig_mod", "module"], ["module", "_orig_mod"]])
def test_wrapped_models_use_bare_keys(attrs):
    gen = torch.Generator().manual_seed(2)
    bare = tiny_model()
    wrapped = bare
    for attr in attrs:  # DDP -> "module.", torch.compile -> "_orig_mod.", in either nesting order
        wrapped = Wrapper(attr, wrapped)
    assert unwrapped_state_dict(wrapped).keys() == bare.state_dict().keys()
    ema_wrapped, ema_bare = EMA(wrapped, decays=(0.99,)), EMA(bare, decays=(0.99,))
    for step in range(1, 6):
        perturb(bare, gen)
        ema_wrapped.update(wrapped, step)
        ema_bare.update(bare, step)
    for key, value in ema_bare.state_dict().items():
        assert torch.equal(ema_wrapped.state_dict()[key], value)
    tiny_model().load_state_dict(ema_wrapped.average("ema-0.99"))  # strict load into the bare model
