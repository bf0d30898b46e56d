"""The distillation stage: targets against the sampler's own steps on an analytic teacher, each method's loss on a
tiny teacher, guidance distillation reproducing the guided teacher, and students through the normal CLI."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from difflab.cli import main
from difflab.config import load_yaml
from difflab.data import Batch, load_dataset
from difflab.diffusion import GaussianMixture, Precond
from difflab.distillation import ConsistencyObjective, consistency_sigmas, distill
from difflab.distillation.distill import student_mapping
from difflab.guidance import guided
from difflab.sampling import SOLVERS, sample
from difflab.sampling.solvers import heun_update
from difflab.training import Trainer, resolve
from difflab.training.objectives import Share
from difflab.training.run import draw, load_run

TINY = {
    "model": {"arch": "unet", "channels": 16, "channel_mult": [1, 2], "blocks_per_level": 1,
              "attention_resolutions": [], "head_dim": 16},
    "data": {"dataset": "digits"},
    "optim": {"lr": 0.002, "warmup_steps": 2},
    "train": {"steps": 30, "batch": 32, "log_every": 1, "checkpoint_every": 100, "threads": 1,
              "ema_decays": [0.9]},
    "sample": {"steps": 4, "n": 10},
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny class-conditional digits model: a teacher whose classes and null class already differ."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    Trainer(resolve(TINY), run, progress=False).fit()
    return run


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def mixture(seed: int = 0) -> GaussianMixture:
    return GaussianMixture.random(dim=64, components=10, std=0.3, seed=seed, sample_shape=(1, 8, 8))  # labels 0..9


def objective(teacher: Path, method: str, *overrides: str, **kwargs):
    """A student objective of ``teacher`` as the trainer would build it, with the network it trains."""
    from difflab.distillation import OBJECTIVES
    from difflab.models import build_network

    config = resolve(student_mapping(teacher, method, train_steps=10, **kwargs), list(overrides))
    network = build_network(config.model)
    return OBJECTIVES[method](config, network, torch.Generator().manual_seed(0), 10), config


def batch(n: int = 12, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1), torch.randint(10, (n,), generator=g),
                 torch.arange(n))


# --------------------------------------------------------------------------------------------- math core pieces
def test_consistency_parameterisation_is_the_identity_at_sigma_min_and_edm_far_above():
    network = lambda x, c_noise, **cond: torch.randn_like(x)  # noqa: E731 (any network)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(Precond(network, "consistency")(x, torch.full((3,), 0.002)), x)
    edm, consistency = (Precond(lambda x, c, **k: torch.ones_like(x), p) for p in ("edm", "consistency"))
    torch.testing.assert_close(consistency(x, torch.full((3,), 80.0)), edm(x, torch.full((3,), 80.0)), atol=1e-3,
                               rtol=1e-3)


def test_per_sample_heun_update_is_the_heun_solvers_step():
    """The teacher step of distillation, at one noise level per sample, equals the solver's step for each sample."""
    gmm = mixture()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([5.0, 1.0, 0.3, 0.05], dtype=torch.float64)
    sigma_next = torch.tensor([2.0, 0.5, 0.0, 0.01], dtype=torch.float64)
    labels = torch.tensor([1, 2, 3, 4])
    stepped = heun_update(gmm, x, gmm(x, sigma, class_labels=labels), sigma, sigma_next, {"class_labels": labels})
    for i in range(4):
        one = SOLVERS["heun"](gmm, x[i : i + 1], torch.stack([sigma[i], sigma_next[i]]),
                              class_labels=labels[i : i + 1])
        torch.testing.assert_close(stepped[i : i + 1], one, rtol=1e-10, atol=1e-10)


def test_consistency_solver_jumps_then_renoises():
    gmm = mixture(1)
    noise = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    one = sample(gmm, noise, solver="consistency", sigmas=[80.0, 0.0])
    torch.testing.assert_close(one, gmm(noise * 80, torch.full((5,), 80.0, dtype=torch.float64)))
    calls = []
    counting = lambda x, s, **c: calls.append(s[0].item()) or gmm(x, s, **c)  # noqa: E731
    sample(counting, noise, solver="consistency", sigmas=consistency_sigmas(3, 0.002, 80.0),
           generator=torch.Generator().manual_seed(0))
    assert len(calls) == SOLVERS["consistency"].nfe(3) == 3 and calls[0] == 80.0 and min(calls) > 0.002


# ------------------------------------------------------------------------------------------------- objectives
def test_progressive_target_is_where_one_student_step_meets_two_teacher_steps(teacher):
    """On an analytic teacher, the student that outputs the target x~ makes one DDIM step land exactly on the
    teacher's two solver steps (Salimans & Ho 2022, Alg. 2), so its loss is zero and any other output's is not."""
    grid = [80.0, 10.0, 2.0, 0.5, 0.0]
    for solver in ("euler", "heun"):
        student, _ = objective(teacher, "progressive", teacher_sigmas=grid, teacher_solver=solver)
        gmm = mixture()
        student.teacher = lambda x, s, **c: gmm(x.double(), s.double(), **c).float()  # noqa: E731
        data = batch()
        draws = student.draw(12, (1, 8, 8), 0)
        draws["drops"][:] = False

        def exact(x, sigma, **cond):  # x~ such that euler(x~) from x to sigma'' = the teacher's solver, 2 steps
            out = []
            for i in range(x.shape[0]):
                k = grid.index(round(sigma[i].item(), 4))
                two = SOLVERS[solver](student.teacher, x[i : i + 1], torch.tensor(grid[k : k + 3]),
                                      class_labels=cond["class_labels"][i : i + 1])
                r = grid[k + 2] / grid[k]
                out.append((two - r * x[i : i + 1]) / (1 - r))
            return torch.cat(out)

        loss, _ = student.loss(exact, data, draws, Share(0, 12, 0, 1), 0)
        assert loss.item() < 1e-8
        plain, _ = student.loss(lambda x, s, **c: student.teacher(x, s, **c), data, draws,
                                Share(0, 12, 0, 1), 0)
        assert plain.item() > 1e-4  # the teacher's own one-step estimate is not the target


def test_consistency_distillation_target_network_is_an_ema_and_checkpointed(teacher):
    student, config = objective(teacher, "consistency", steps=2)
    assert isinstance(student, ConsistencyObjective) and student.target is not None
    before = [p.clone() for p in student.target.parameters()]
    with torch.no_grad():
        for p in student.module.parameters():
            p.add_(1.0)
    student.after_step(0)
    for old, new, current in zip(before, student.target.parameters(), student.module.parameters()):
        torch.testing.assert_close(new, 0.95 * old + 0.05 * current)
    tensors, settings = student.state_tensors()
    fresh, _ = objective(teacher, "consistency", steps=2)
    fresh.load_state_tensors(tensors, settings)
    for a, b in zip(fresh.target.parameters(), student.target.parameters()):
        torch.testing.assert_close(a, b)
    # The grid: karras noise levels from sigma_max to sigma_min; pairs are adjacent levels.
    grid = student.grid(0)
    assert len(grid) == config.distill.intervals and grid[0] == 80.0 and abs(grid[-1].item() - 0.002) < 1e-12
    pairs = student.draw(64, (1, 8, 8), 0)["pairs"]
    assert all(grid.tolist().index(a) + 1 == grid.tolist().index(b) for a, b in pairs.tolist())


def test_consistency_distillation_without_target_decay_uses_the_stop_gradient_student(teacher):
    student, _ = objective(teacher, "consistency", "distill.target_decay=0", steps=2)
    assert student.target is None
    data = batch()
    calls = []

    def model(x, sigma, **cond):
        calls.append(torch.is_grad_enabled())
        return x * 0.5

    loss, _ = student.loss(model, data, student.draw(12, (1, 8, 8), 0), Share(0, 12, 0, 1), 0)
    assert torch.isfinite(loss) and calls == [False, True]  # the target without gradient, then the prediction


def test_multistep_consistency_is_consistent_within_segments_cut_at_its_sampling_levels(teacher):
    student, config = objective(teacher, "multistep_consistency", "distill.target_decay=0",
                                "sample.sigmas=[80, 0.8, 0]", steps=2)
    assert config.sample.solver == "euler" and config.diffusion.parameterization == "consistency"
    grid = student.grid(0)
    edge = grid[(grid - 0.8).abs().argmin()].item()
    assert edge == pytest.approx(0.8) and len(grid) == config.distill.intervals + 1  # the edge is a level
    pairs = student.draw(4000, (1, 8, 8), 0)["pairs"]
    assert not ((pairs[:, 0] > edge + 1e-6) & (pairs[:, 1] < edge - 1e-6)).any()  # no pair spans two segments
    above = grid[grid.tolist().index(edge) - 1].item()

    def model(offset):  # the target network (called without gradient) is off by ``offset``
        return lambda x, sigma, **cond: x * 0.5 + (0.0 if torch.is_grad_enabled() else offset)

    data, share = batch(), Share(0, 12, 0, 1)
    for pair, target_matters in (((above, edge), False), ((2.0 * above, above), True)):
        draws = student.draw(12, (1, 8, 8), 0)
        draws["pairs"] = torch.tensor([pair] * 12)
        losses_ = [student.loss(model(offset), data, draws, share, 0)[0] for offset in (0.0, 3.0)]
        # Onto a segment's edge the target is the teacher's point itself: its jump to the edge is no jump.
        assert bool(torch.isclose(*losses_, rtol=1e-5)) != target_matters, (pair, losses_)


def test_consistency_training_curriculum_doubles_the_discretisation(teacher):
    student, _ = objective(teacher, "consistency_training", "distill.intervals=40", "train.steps=30", steps=1)
    assert student.target is None  # iCT: the stop-gradient student is the target
    assert [len(student.grid(step)) for step in (0, 9, 10, 20, 29)] == [10, 10, 20, 40, 40]
    pairs = student.draw(4000, (1, 8, 8), 0)["pairs"]
    assert (pairs[:, 0] > pairs[:, 1]).all() and pairs[:, 0].median() < 5  # log-normal: mostly low noise


@pytest.mark.parametrize("method", ["progressive", "consistency", "multistep_consistency", "consistency_training",
                                    "guidance"])
def test_each_method_trains_from_the_teacher_and_its_loss_falls(teacher, tmp_path, method):
    """Loss at initialisation (the student is the teacher) is finite; after a few steps it has fallen."""
    students = distill(teacher, method, tmp_path / "student", steps=2, from_steps=4, train_steps=24,
                       overrides=["train.log_every=1", "optim.warmup_steps=0", "optim.lr=0.002"], progress=False)
    for run in students:
        values = losses(run)
        assert len(values) == 24 and all(np.isfinite(values))
        assert np.mean(values[-6:]) < np.mean(values[:6]), (run, values)
    assert load_run(students[0]).config.distill.teacher == str(teacher.resolve())


def test_student_starts_as_its_teacher(teacher):
    """Before any step a progressive or guidance student computes the teacher's denoiser (guidance scale 1)."""
    images, labels, _ = batch()
    x, sigma = images * 0 + torch.randn(images.shape), torch.full((12,), 2.0)
    reference = load_run(teacher).model
    for method in ("progressive", "guidance"):
        kwargs = {"teacher_sigmas": [80.0, 1.0, 0.0]} if method == "progressive" else {}
        student, _ = objective(teacher, method, **kwargs)
        cond = {"class_labels": labels, **({"guidance_scale": 1.0} if method == "guidance" else {})}
        with torch.no_grad():
            torch.testing.assert_close(student.module(x, sigma, **cond), reference(x, sigma, class_labels=labels))


def test_guidance_student_reproduces_the_guided_teacher(teacher, tmp_path):
    """After training on the toy digits, one forward pass of the student at w = 3 is close to the teacher's
    classifier-free guided output (two branches) on a fixed input: 3x closer than at initialisation (this tiny
    student plateaus near 0.3 of the initial error)."""
    student = distill(teacher, "guidance", tmp_path / "gd", train_steps=300,
                      overrides=["distill.guidance_range=[3.0, 3.0]", "train.ema_decays=[]", "optim.lr=0.003",
                                 "optim.decay=cosine"],
                      progress=False)[0]
    teacher_model = load_run(teacher).model
    g = torch.Generator().manual_seed(5)
    digits = load_dataset("digits")
    x0, labels = digits.images[:16], digits.labels[:16]
    sigma = torch.full((16,), 1.0)
    x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        target = guided(teacher_model, 3.0)(x, sigma, class_labels=labels)
        conditional = teacher_model(x, sigma, class_labels=labels)
        trained = load_run(student, ema="none").model(x, sigma, class_labels=labels, guidance_scale=3.0)
    start = (conditional - target).norm()  # the untrained student is the conditional teacher
    assert (trained - target).norm() < 0.4 * start


# ------------------------------------------------------------------------------------------------------- CLI
def test_students_sample_and_resume_through_the_cli(teacher, tmp_path, capsys):
    out = tmp_path / "progressive"
    common = ["--train-steps", "2", "--no-progress", "--set", "train.log_every=1"]
    assert main(["distill", str(teacher), "--method", "progressive", "--out", str(out), "--from-steps", "8",
                 "--steps", "2", *common]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["steps-2", "steps-4"]
    stage = yaml.safe_load((out / "steps-2" / "config.yaml").read_text())
    assert stage["sample"]["solver"] == "euler" and len(stage["sample"]["sigmas"]) == 3
    assert stage["optim"]["lr"] == 0.25 * TINY["optim"]["lr"]  # every stage: a quarter of the first teacher's
    assert stage["distill"]["teacher"] == str((out / "steps-4").resolve())
    assert load_yaml(out / "steps-4" / "config.yaml")["distill"]["teacher_sigmas"][::2] == \
        load_yaml(out / "steps-4" / "config.yaml")["sample"]["sigmas"]
    # Resume keeps finished stages untouched.
    before = (out / "steps-4" / "metrics.csv").read_text()
    assert main(["distill", str(teacher), "--method", "progressive", "--out", str(out), "--from-steps", "8",
                 "--steps", "2", "--resume", *common]) == 0
    assert (out / "steps-4" / "metrics.csv").read_text() == before
    # Without --resume an existing student is not overwritten.
    assert main(["distill", str(teacher), "--method", "progressive", "--out", str(out), "--from-steps", "8",
                 "--steps", "2", *common]) == 2
    assert "already holds a run" in capsys.readouterr().err

    run = load_run(out / "steps-2")
    calls = []
    forward = run.network.forward
    run.network.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    draw(run, 3)
    assert len(calls) == 2  # the student's own 2-step grid
    calls.clear()
    draw(run, 3, steps=5)  # an explicit --steps replaces it
    assert len(calls) == 5

    archive = tmp_path / "s.npz"
    assert main(["sample", str(out / "steps-2"), "--n", "6", "--out", str(archive), "--no-progress"]) == 0
    assert np.load(archive)["images"].shape == (6, 8, 8, 1)

    guidance = tmp_path / "gd"
    assert main(["distill", str(teacher), "--method", "guidance", "--out", str(guidance), *common]) == 0
    assert main(["sample", str(guidance), "--n", "4", "--guidance", "2.5", "--out", str(archive),
                 "--no-progress"]) == 0
    assert main(["sample", str(guidance), "--n", "4", "--guidance", "2", "--guidance-interval", "0.1,5", "--out",
                 str(archive), "--no-progress"]) == 2
    assert "takes only a guidance scale" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "progressive", "--from-steps", "12", "--steps", "5"], "must be 5 times a power of two"),
    (["--method", "consistency", "--set", "distill.metric=lpips"], "distill.metric must be one of"),
    (["--method", "guidance", "--set", "distill.guidance_range=[3, 1]"], "guidance_range"),
    (["--method", "guidance", "--set", "model.guidance_embed=false"], "needs model.guidance_embed=true"),
    (["--method", "consistency", "--set", "model.channels=8"], "the student's model differs from the teacher"),
])
def test_distill_errors_are_one_line(teacher, tmp_path, capsys, args, message):
    assert main(["distill", str(teacher), "--out", str(tmp_path / "s"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "s" / "config.yaml").exists()  # a run that never started leaves no run behind
    with pytest.raises(SystemExit):
        main(["distill", str(teacher), "--out", str(tmp_path / "s"), "--method", "reflow"])


def test_distilling_a_non_run_or_guidance_of_an_unconditional_teacher_fails(tmp_path, capsys):
    assert main(["distill", str(tmp_path), "--method", "consistency", "--out", str(tmp_path / "s")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    unconditional = tmp_path / "unconditional"
    Trainer(resolve(TINY, ["model.num_classes=0", "train.steps=1"]), unconditional, progress=False).fit()
    assert main(["distill", str(unconditional), "--method", "guidance", "--out", str(tmp_path / "g")]) == 2
    assert "needs a conditional teacher" in capsys.readouterr().err
