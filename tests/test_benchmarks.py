"""The benchmark scripts run end to end at a tiny size and write their JSON and figures."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _benchmark(monkeypatch, name: str):
    """Import benchmarks/<name>.py for one test, and forget it afterwards."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module(name)
    sys.modules.pop(name, None)


@pytest.fixture
def output_module(monkeypatch):
    yield from _benchmark(monkeypatch, "output")


def test_write_json_records_the_command_and_replaces_whole_files(output_module, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--json", "out.json"])
    path = tmp_path / "new" / "figures.json"
    output_module.write_json(path, {"rmse": 0.5, "run": tmp_path})
    assert json.loads(path.read_text()) == {"command": "benchmarks/x.py --json out.json", "rmse": 0.5,
                                            "run": str(tmp_path)}
    assert capsys.readouterr().out == f"wrote {path}\n"

    def full_disk(self, data):  # writes a little, then fails
        with open(self, "wb") as f:
            f.write(data[:5])
        raise OSError("No space left on device")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space"):
        patch.setattr(Path, "write_bytes", full_disk)
        output_module.write_json(path, {"rmse": 0.25}, quiet=True)
    assert json.loads(path.read_text())["rmse"] == 0.5  # the last complete file stays
    output_module.write_json(None, {"rmse": 1.0})  # no --json: nothing written
    assert capsys.readouterr().out == "" and sorted(p.name for p in path.parent.iterdir()) == ["figures.json"]


@pytest.fixture
def samplers_module(monkeypatch):
    yield from _benchmark(monkeypatch, "samplers")


def test_samplers_benchmark_smoke(samplers_module, tmp_path, capsys):
    out = tmp_path / "samplers.json"
    samplers_module.main([
        "--cases", "ring", "--nfe", "5", "--solvers", "^(euler|euler_ancestral|dpmpp_2m)$", "--deterministic",
        "--peers", "DPMSolverMultistep",
        "--samples", "200", "--search-samples", "64", "--bespoke-samples", "64", "--bespoke-held-out", "256",
        "--bespoke-pool", "512", "--bespoke-steps", "2", "--reference-steps", "200", "--focus-search", "4",
        "--json", str(out), "--plots", str(tmp_path), "--cache", str(tmp_path / "cache.json"),
        "--markdown", str(tmp_path / "table.md"),
    ])
    printed = capsys.readouterr().out
    assert "best endpoint RMSE per NFE budget" in printed
    result = json.loads(out.read_text())["cases"]["ring"]
    configs = {row["config"] for row in result["rows"]}
    assert {"euler+karras", "dpmpp_2m+optimized", "bespoke"} <= configs
    assert any(c.startswith("diffusers/DPMSolverMultistep") for c in configs)
    assert all(isinstance(row["switchers"], int) and 0 <= row["switchers"] <= 200 for row in result["rows"])
    assert not any(row["stochastic"] for row in result["rows"])  # --deterministic: no euler_ancestral, no (sde) peer
    assert all(row["nfe"] <= 5 for row in result["rows"])
    (summary,) = result["summary"]
    assert summary["difflab"]["rmse"] <= summary["difflab_closed_form"]["rmse"]
    assert (tmp_path / "samplers_ring.png").exists()
    assert "| 5 | " in (tmp_path / "table.md").read_text()
    (fit,) = [entry for key, entry in json.loads((tmp_path / "cache.json").read_text()).items() if "bespoke" in key]
    assert fit["info"]["steps_run"] <= 2  # --bespoke-steps
    (row,) = [row for row in result["rows"] if row["config"] == "bespoke"]
    assert row["fit"]["start"] == fit["info"]["start"] and row["fit"]["restarts"] == fit["info"]["restarts"]
    key = next(key for key in json.loads((tmp_path / "cache.json").read_text()) if "bespoke" in key)
    assert "|search4|" in key and key.endswith("|held256|pool512")


def test_samplers_benchmark_keeps_its_references(samplers_module, tmp_path, capsys):
    def run(steps: str) -> tuple[dict, str]:
        out = tmp_path / "samplers.json"
        samplers_module.main(["--cases", "ring", "--nfe", "3", "--solvers", "^euler$", "--peers", "none",
                              "--no-optimized", "--no-bespoke", "--samples", "50", "--mmd-samples", "20",
                              "--reference-steps", steps, "--references", str(tmp_path / "refs"),
                              "--json", str(out), "--plots", str(tmp_path)])
        result = json.loads(out.read_text())["cases"]["ring"]
        for row in result["rows"]:
            row.pop("seconds")
        return result, capsys.readouterr().out

    first, printed = run("40")
    assert "read from" not in printed and len(list((tmp_path / "refs").iterdir())) == 1
    again, printed = run("40")
    assert "read from" in printed and again["rows"] == first["rows"]
    assert again["reference_half_steps_rmse"] == first["reference_half_steps_rmse"]
    finer, printed = run("80")  # other steps: another reference
    assert "read from" not in printed and len(list((tmp_path / "refs").iterdir())) == 2
    assert finer["reference_half_steps_rmse"] < first["reference_half_steps_rmse"]
    for stored in (tmp_path / "refs").iterdir():
        stored.write_bytes(b"not safetensors")
    with pytest.raises(SystemExit, match="unreadable reference file .*reference-.*delete it to recompute"):
        run("40")


@pytest.mark.parametrize("args, message", [(["--cases", "nope"], "unknown case(s) nope"),
                                           (["--nfe", "3,x"], "expected comma-separated positive integers"),
                                           (["--restarts", "0"], "expected an integer >= 1, got '0'"),
                                           (["--bespoke-held-out", "0"], "expected an integer >= 1, got '0'"),
                                           (["--bespoke-steps", "-1"], "expected an integer >= 0, got '-1'"),
                                           (["--focus-search", "-2"], "expected an integer >= 0, got '-2'"),
                                           (["--bespoke-pool", "100"], "--bespoke-pool 100 is smaller than "
                                                                       "--bespoke-samples 4096"),
                                           (["--mmd-samples", "1"], "expected an integer >= 2, got '1'"),
                                           (["--samples", "many"], "expected an integer >= 2, got 'many'")])
def test_samplers_benchmark_rejects_bad_arguments(samplers_module, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        samplers_module.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag, path, folder", [("--references", "file", "file"), ("--json", "file/out.json", "file"),
                                                ("--plots", "file/figures", "file/figures"),
                                                ("--markdown", "file/table.md", "file")])
def test_samplers_benchmark_refuses_unwritable_outputs_before_measuring(samplers_module, tmp_path, capsys, flag,
                                                                        path, folder):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        samplers_module.main(["--cases", "ring", flag, str(tmp_path / path)])
    printed = capsys.readouterr()
    assert exit_info.value.code == 2 and f"{flag}: cannot make the folder {tmp_path / folder}: " in printed.err
    assert "== ring" not in printed.out  # refused before any measuring


@pytest.fixture
def models_module(monkeypatch):
    pytest.importorskip("diffusers")
    yield from _benchmark(monkeypatch, "models")


def test_models_benchmark_smoke(models_module, tmp_path, capsys):
    out = tmp_path / "models.json"
    models_module.main(["--quick", "--json", str(out)])
    assert "difflab / diffusers images/s" in capsys.readouterr().out
    report = json.loads(out.read_text())
    for case in ("unet", "dit"):
        result = report["cases"][case]
        assert result["speed_ratio"] > 0 and result["matmul_peak_gflops"]["best"] > 0
        for system in ("difflab", "diffusers"):
            figures = result["systems"][system]
            assert figures["parameters"] > 0 and figures["train_flops_per_image"] > 0
            assert figures["images_per_second"] > 0 and 0 < figures["peak_fraction"]
            # At least the weights, their gradients and AdamW's two moments are live at the peak.
            assert figures["memory_bytes"] >= 4 * 4 * figures["parameters"]


@pytest.mark.parametrize("args, message", [(["--cases", "vit"], "unknown case(s) vit"),
                                           (["--batch", "0"], "--batch must be a positive integer")])
def test_models_benchmark_rejects_bad_arguments(models_module, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        models_module.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def digits_module(monkeypatch):
    pytest.importorskip("diffusers")
    yield from _benchmark(monkeypatch, "digits_quality")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside diffusers' DPM-Solver
def test_digits_quality_benchmark_smoke(digits_module, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "digits.json"
    digits_module.main(["--quick", "--json", str(out), "--plots", str(tmp_path), "--run-dir", str(tmp_path / "run"),
                        "--threads", "1"])
    assert "peer / difflab" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["parameters"]["diffusers"] > 6e6  # the peer's 6.5 M-parameter U-Net
    for name in ("difflab", "diffusers"):
        assert [row["minutes"] for row in report["curves"][name]] == [0.02, 0.04]
        assert all(row["images_seen"] > 0 and row["frechet_distance"] > 0 for row in report["curves"][name])
    assert (tmp_path / "digits_quality.png").exists() and (tmp_path / "digits_samples_difflab.png").exists()


def test_digits_quality_benchmark_rejects_bad_minutes(digits_module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        digits_module.main(["--minutes", "5,1"])
    assert exit_info.value.code == 2 and "increasing" in capsys.readouterr().err


@pytest.fixture
def data_loader_module(monkeypatch):
    yield from _benchmark(monkeypatch, "data_loader")


def test_data_loader_benchmark_smoke(data_loader_module, tmp_path, capsys):
    out = tmp_path / "data_loader.json"
    assert data_loader_module.main(["--quick", "--json", str(out)]) == 0
    assert "loader throughput" in capsys.readouterr().out
    result = json.loads(out.read_text())
    sources = {(row["data"], row["source"], row["workers"]) for row in result["loaders"]}
    assert {("emoji", "jpeg folder", 1), ("emoji", "shards", 0), ("digits", "memory", 0)} <= sources
    assert all(row["samples_per_s"] > 0 for row in result["loaders"] + result["training"])
    assert {row["source"] for row in result["training"]} == {"memory", "shards, 0 workers", "shards, 1 workers"}


@pytest.fixture
def autoencoder_module(monkeypatch):
    yield from _benchmark(monkeypatch, "autoencoder")


def test_autoencoder_benchmark_smoke(autoencoder_module, tmp_path, capsys):
    out = tmp_path / "autoencoder.json"
    assert autoencoder_module.main(["--quick", "--work", str(tmp_path / "work"), "--json", str(out),
                                    "--figure", str(tmp_path / "ae.png")]) == 0
    assert (tmp_path / "ae.png").exists()
    assert "latent training is" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["stage1"]["factor"] == 4 and result["stage1"]["latent_channels"] == 4
    assert 0 < result["stage1"]["autoencoder"]["psnr"] < 60 and -1 <= result["stage1"]["bicubic"]["ssim"] <= 1
    assert set(result["generators"]) == {"pixel", "latent"} and result["latent_over_pixel_images_per_second"] > 0
    with pytest.raises(SystemExit):  # a used work folder is never overwritten
        autoencoder_module.main(["--quick", "--work", str(tmp_path / "work")])


@pytest.fixture
def guidance_module(monkeypatch):
    yield from _benchmark(monkeypatch, "guidance")


def test_guidance_benchmark_smoke(guidance_module, tmp_path, capsys):
    out = tmp_path / "guidance.json"
    assert guidance_module.main(["--quick", "--work", str(tmp_path / "runs"), "--plot", str(tmp_path / "g.png"),
                                 "--json", str(out)]) == 0
    assert "ordering by best FD" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert {(row["method"], row["guidance"]) for row in result["rows"]} == {
        (m, w) for m in ("cfg", "cfg+interval", "autoguidance") for w in (0.0, 2.0)}
    assert set(result["best"]) == {"cfg", "cfg+interval", "autoguidance"} and (tmp_path / "g.png").exists()


@pytest.fixture
def distillation_module(monkeypatch):
    yield from _benchmark(monkeypatch, "distillation")


def test_distillation_benchmark_smoke(distillation_module, tmp_path, capsys):
    out = tmp_path / "distillation.json"
    assert distillation_module.main(["--quick", "--work", str(tmp_path / "runs"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target: 4-step progressive" not in printed and "target: 2-step consistency" in printed  # quick: 2, 1
    result = json.loads(out.read_text())
    models = {row["model"] for row in result["rows"]}
    assert {"teacher", "teacher (best solver)", "progressive/steps-2", "progressive/steps-1", "consistency",
            "multistep consistency", "guidance student", "teacher/guided"} <= models
    assert "target: 2-step multistep consistency" in printed
    student = next(row for row in result["rows"] if row["model"] == "guidance student")
    assert student["rmse_to_guided_teacher"] >= 0 and student["distill_minutes"] > 0


@pytest.fixture
def control_module(monkeypatch):
    yield from _benchmark(monkeypatch, "control")


def test_control_benchmark_smoke(control_module, tmp_path, capsys):
    out, figures = tmp_path / "control.json", tmp_path / "figures"
    assert control_module.main(["--quick", "--work", str(tmp_path / "runs"), "--figures", str(figures),
                                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    methods = [row for row in result["inpainting"] if "reference" not in row["method"]]
    assert all(row["kept_max_error"] < 1e-6 for row in methods)  # kept pixels come back exactly
    assert {row["method"] for row in result["inpainting"]} >= {"replacement", "RePaint", "reconstruction",
                                                               "reconstruction + RePaint", "mask-conditioned"}
    assert [row["strength"] for row in result["img2img"]] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert {(row["solver"], row["refine"]) for row in result["inversion"]} == {
        ("heun", 0), ("heun", 2), ("euler", 0), ("euler", 2)}
    assert len(result["controlnet"]) == 2 and result["controlnet_fd_ratio"] > 0
    assert [row["strength"] for row in result["lora"]] == [0.0, 0.5, 1.0] and result["lora_file_bytes"] > 0
    assert sorted(p.name for p in figures.iterdir()) == [
        "control_controlnet.png", "control_img2img.png", "control_inpainting.png", "control_inversion.png",
        "control_lora.png"]


@pytest.fixture
def text_to_image_module(monkeypatch):
    yield from _benchmark(monkeypatch, "text_to_image")


def test_text_to_image_benchmark_smoke(text_to_image_module, text_run, tmp_path, capsys):
    out, figure = tmp_path / "t2i.json", tmp_path / "grid.png"
    assert text_to_image_module.main([str(text_run), "--guidance", "0,2", "--prompts", "12", "--fd-samples", "12",
                                      "--batch", "8", "--clusters", "4", "--feature-epochs", "1", "--json", str(out),
                                      "--figure", str(figure)]) == 0
    result = json.loads(out.read_text())
    assert [row["guidance"] for row in result["rows"]] == [0.0, 2.0]
    assert all(0 <= row["top1"] <= row["top5"] <= 1 and row["fd"] >= 0 for row in result["rows"])
    assert result["random_top5"] == 5 / 12 and result["images_per_second"]["guided"] > 0
    width, height = Image.open(figure).size
    assert height > width  # 16 prompts (rows) at 2 scales (columns)
    assert "top-5" in capsys.readouterr().out


@pytest.fixture
def video_module(monkeypatch):
    yield from _benchmark(monkeypatch, "video")


def test_video_benchmark_smoke(video_module, tmp_path, capsys):
    out, figure = tmp_path / "video.json", tmp_path / "video.png"
    assert video_module.main(["--quick", "--work", str(tmp_path / "runs"), "--json", str(out),
                              "--figure", str(figure), "--from-image"]) == 0
    result = json.loads(out.read_text())
    assert result["real"]["identity_kept"] > 0.9  # the measure reads real clips right
    video_config = yaml.safe_load((tmp_path / "runs" / "video" / "config.yaml").read_text())
    assert result["video_from_image"] and video_config["train"]["init"] == str(tmp_path / "runs" / "frame-independent")
    assert set(result["models"]) == {"video", "frame-independent"}
    assert all(0 <= row["identity_kept"] <= 1 and row["clips_per_second"] > 0 for row in result["models"].values())
    errors = result["denoising_error"]
    assert set(errors) == {"video", "frame-independent", "frame-independent at sigma/sqrt(T)"}
    assert errors["frame-independent at sigma/sqrt(T)"]["1"] < errors["frame-independent"]["1"]  # less noise
    assert figure.is_file() and figure.with_suffix(".gif").is_file()
    assert "identity kept" in capsys.readouterr().out


def test_video_benchmark_trains_for_minutes_and_in_parallel(video_module, tmp_path, monkeypatch):
    monkeypatch.setattr(video_module, "PROBE_MINUTES", 0.01)
    out = tmp_path / "video.json"
    assert video_module.main(["--quick", "--minutes", "0.02", "--work", str(tmp_path / "timed"),
                              "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["models"]
    for name, row in rows.items():  # the steps a probe chose, as trained, and the probe is gone
        assert row["steps"] == video_module.trained_steps(tmp_path / "timed" / name) > 0
        assert not (tmp_path / "timed" / f"{name}-probe").exists()
    assert video_module.main(["--quick", "--parallel", "--joint", "0.5", "--work", str(tmp_path / "parallel"),
                              "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["models"]
    assert [row["steps"] for row in rows.values()] == [3, 3]  # both trained, in two processes
    video_config = yaml.safe_load((tmp_path / "parallel" / "video" / "config.yaml").read_text())
    assert video_config["data"]["images"] == video_module.FRAME_DATA and video_config["data"]["image_share"] == 0.5


@pytest.mark.parametrize("flags", [["--minutes", "0"], ["--samples", "-1"], ["--parallel", "--from-image"],
                                   ["--joint", "1"]])
def test_video_benchmark_refuses_bad_flags(video_module, flags, capsys):
    with pytest.raises(SystemExit):
        video_module.main(flags)
    assert "error:" in capsys.readouterr().err


@pytest.fixture
def scaling_module(monkeypatch):
    yield from _benchmark(monkeypatch, "scaling")


@pytest.mark.slow  # about 2.5 minutes: 16 torchrun launches
def test_scaling_benchmark_smoke(scaling_module, tmp_path, capsys):
    out = tmp_path / "scaling.json"
    scaling_module.main(["--quick", "--json", str(out)])
    report = json.loads(out.read_text())
    runs = report["throughput"]
    assert all(row["max_relative_loss_difference"] < 1e-4 for name, row in runs.items() if "half" not in name)
    assert runs["2 processes, DDP"]["allreduce_seconds"] > 0
    assert all(0.5 < row["ratio"] < 2 for row in report["memory"]["rows"])
    assert report["sampling"]["max_abs_difference"] < 1e-4
    assert "planned vs measured peak memory" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["--sections", "mfu"], "unknown section(s) mfu"),
                                           (["--sections", "sampling"], "add throughput to --sections"),
                                           (["--steps", "3", "--warmup", "3"], "--warmup must be below --steps")])
def test_scaling_benchmark_rejects_bad_arguments(scaling_module, capsys, args, message):
    with pytest.raises(SystemExit):
        scaling_module.main(args)
    assert message in capsys.readouterr().err
