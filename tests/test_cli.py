"""The difflab command and the demo."""

import pytest
import torch

from difflab.cli import main
from difflab.demo import run_demo


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "solvers" in out and "model-info" in out


def test_solvers_lists_every_registry_entry(capsys):
    from difflab.sampling import SCHEDULES, SOLVERS

    assert main(["solvers"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in [*SOLVERS, *SCHEDULES])


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_cli_values_get_a_one_line_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--samples", value])
    assert exit_info.value.code == 2
    assert f"expected a positive integer, got '{value}'" in capsys.readouterr().err


def test_unusable_output_folders_get_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--out", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("difflab demo: error: argument --out: cannot create output folder")
    assert blocker.read_text() == "keep me"


def test_demo_writes_pictures_and_the_optimized_schedule_wins(tmp_path):
    errors = run_demo(tmp_path, samples=300, nfe_grid=(5,), panel_nfe=5, progress=False)
    assert (tmp_path / "solvers.png").stat().st_size > 10_000
    assert (tmp_path / "error_vs_nfe.png").stat().st_size > 10_000
    best_closed_form = min(e for label, points in errors.items() if "karras" in label for n, e in points if n == 5)
    assert dict(errors["dpmpp_2m + optimized"])[5] < best_closed_form


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's ten-line example is code that works, not prose."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    example, networks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(example.strip().splitlines()) <= 12
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["x0_fast"].shape == (1000, 2)
    assert (tmp_path / "optimized_schedules.json").exists()
    exec(compile(networks, "README.md", "exec"), namespace)
    assert namespace["video"](torch.zeros(1, 3, 2, 16, 16), torch.ones(1)).shape == (1, 3, 2, 16, 16)


def test_digits_demo_trains_samples_and_scores(tmp_path, monkeypatch):
    import pathlib

    from difflab.demo import run_digits_demo

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    config = pathlib.Path(__file__).parents[1] / "configs" / "digits.yaml"
    metrics = run_digits_demo(tmp_path, config, steps=2, eval_samples=40, progress=False)
    assert (tmp_path / "digits.png").exists() and (tmp_path / "digits-run" / "config.yaml").exists()
    assert {"frechet_distance", "class_accuracy", "noise_floor_frechet_distance"} <= set(metrics)
    run_digits_demo(tmp_path, config, steps=1, eval_samples=10, progress=False)  # reruns start afresh
