"""Text conditioning end to end: the frozen MiniLM encoder, the caption bank, text dropout, prompts through
sample() and the CLI, negative prompts in guidance, and the serving backend on a trained text run."""

import base64
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.conditioning import text as text_module
from difflab.conditioning.text import (
    TEMPLATES,
    caption_bank,
    caption_variants,
    encoder_dim,
    load_text_encoder,
)
from difflab.config import ConfigError
from difflab.data import Batch
from difflab.guidance import guided
from difflab.training import resolve
from difflab.training.objectives import DiffusionObjective, Share
from difflab.training.run import draw, load_run


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


# ------------------------------------------------------------------------------------------------- the encoder
def test_minilm_token_states_are_the_sentence_transformer_and_ignore_padding(minilm):
    from sentence_transformers import SentenceTransformer

    from difflab.conditioning.text import encoder_folder

    prompts = ["a panda face", "flag: Japan", "grinning face with big eyes, flat icon"]
    states, mask = minilm(prompts)
    assert states.shape[::2] == (3, 384) and mask.dtype == torch.bool and encoder_dim("minilm") == 384
    assert mask.sum(1).tolist()[2] == states.shape[1] and mask.sum(1)[0] < states.shape[1]  # padded to the longest
    # Our masked mean of the token states is the sentence embedding sentence-transformers computes (which it
    # then normalises).
    pooled = torch.nn.functional.normalize((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=1)
    reference = SentenceTransformer(str(encoder_folder("minilm")), device="cpu").encode(
        prompts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=1e-4)
    alone, alone_mask = minilm(prompts[:1])  # padding changes nothing under the mask
    torch.testing.assert_close(alone[0][alone_mask[0]], states[0][mask[0]], atol=1e-5, rtol=1e-5)


def test_an_unknown_text_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither minilm nor a folder"):
        encoder_dim(str(tmp_path / "clip"))
    with pytest.raises(ValueError, match="non-empty list"):
        load_text_encoder("minilm")([])


# --------------------------------------------------------------------------------------------- the caption bank
def test_caption_variants_use_every_template_and_only_new_aliases():
    variants = caption_variants(["panda", "P button"], [["panda face", "Panda"], ["p button", "parking"]])
    assert variants[0] == [t.format("panda") for t in TEMPLATES] + ["panda face"]
    assert variants[1] == [t.format("P button") for t in TEMPLATES] + ["parking"]  # same words, other case: dropped


def test_the_caption_bank_hands_out_the_encoders_states_and_is_encoded_once(minilm, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    variants = caption_variants(["red fox", "blue whale"], [["fox"], []])
    bank = caption_bank(variants, "minilm")
    assert len(bank) == 2 and bank.tokens.dtype == torch.float16
    text, mask = bank.lookup(torch.tensor([0, 1, 0]), torch.tensor([0.0, 0.99, 0.99]))
    expected = [variants[0][0], variants[1][-1], variants[0][-1]]  # first variant, last variant, the alias
    states, want_mask = minilm(expected)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(text, states * want_mask[..., None], atol=2e-3, rtol=2e-3)  # fp16 storage
    monkeypatch.setattr(text_module, "load_text_encoder", lambda *a: pytest.fail("encoded again"))
    again = caption_bank(variants, "minilm")
    assert torch.equal(again.tokens, bank.tokens)
    (cached,) = (tmp_path / "text").glob("captions-*.safetensors")
    cached.write_bytes(b"truncated")
    monkeypatch.setattr(text_module, "load_text_encoder", load_text_encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(caption_bank(variants, "minilm").tokens, bank.tokens)  # a broken cache is rebuilt
    with pytest.raises(ValueError, match="at least one caption"):
        caption_bank([[]], "minilm")


# ------------------------------------------------------------------------------------------------------ training
def test_text_config_errors_are_clear(text_run):
    config = load_run(text_run).config
    data = str(config.data.dataset)
    with pytest.raises(ConfigError, match="data.text_encoder is not"):
        resolve({"model": {"arch": "unet", "channels": 16, "text_dim": 384}, "data": {"dataset": data}})
    with pytest.raises(ConfigError, match="has no captions"):
        resolve({"model": {"arch": "unet", "channels": 16}, "data": {"dataset": "digits", "text_encoder": "minilm"}})
    with pytest.raises(ConfigError, match="gives 384-d"):
        resolve({"model": {"arch": "unet", "channels": 16, "text_dim": 8},
                 "data": {"dataset": data, "text_encoder": "minilm"}})
    with pytest.raises(ValueError, match="text_dropout must be in"):
        resolve({"model": {"arch": "unet", "channels": 16}, "data": {"dataset": data, "text_encoder": "minilm"},
                 "diffusion": {"text_dropout": 1.0}})


def test_training_sees_caption_variants_and_drops_prompts_at_the_text_rate(text_run):
    config = load_run(text_run).config
    run = load_run(text_run, ema="none")
    objective = DiffusionObjective(config, run.network, torch.Generator().manual_seed(0), 0)
    draws = objective.draw(2000, (3, 8, 8), 0)
    assert abs(draws["text_drops"].float().mean().item() - config.diffusion.text_dropout) < 0.02
    batch = Batch(torch.zeros(6, 3, 8, 8), None, torch.tensor([0, 1, 2, 3, 4, 5]))
    draws = {**objective.draw(6, (3, 8, 8), 0), "text_drops": torch.tensor([True, False] * 3)}
    _, _, _, cond = objective.prepare(batch, draws, Share(0, 6, 0, 1))
    assert cond["text"].shape[::2] == (6, 384)
    assert not cond["text_mask"][0].any() and cond["text_mask"][1].any()  # dropped -> the null prompt
    (grid,) = (text_run / "samples").glob("*.png")  # the training grid: a row per training caption
    width, height = Image.open(grid).size
    assert height > 3 * width


# ------------------------------------------------------------------------------------------------------ sampling
def test_prompts_steer_samples_and_a_negative_prompt_replaces_the_null_one(text_run):
    run = load_run(text_run)
    red, _ = draw(run, 2, prompts="a red square", seed=0)
    blue, _ = draw(run, 2, prompts="a blue ring", seed=0)
    null, _ = draw(run, 2, seed=0)
    assert red.shape == (2, 3, 8, 8) and not torch.allclose(red, blue) and not torch.allclose(red, null)
    per_sample, _ = draw(run, 2, prompts=["a red square", "a blue ring"], seed=0)
    torch.testing.assert_close(per_sample, torch.stack([red[0], blue[1]]), atol=1e-5, rtol=1e-5)
    guided_images, _ = draw(run, 2, prompts="a red square", seed=0, guidance=3.0)
    negative, _ = draw(run, 2, prompts="a red square", seed=0, guidance=3.0, negative_prompt="a green ring")
    assert not torch.allclose(guided_images, negative)
    # A negative prompt equal to the prompt leaves nothing to guide away from: the conditional model alone.
    same, _ = draw(run, 2, prompts="a red square", seed=0, guidance=3.0, negative_prompt="a red square")
    torch.testing.assert_close(same, red, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="must not be empty"):
        draw(run, 2, prompts=" ")
    with pytest.raises(ValueError, match="3 prompts for 2 samples"):
        draw(run, 2, prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match="need a guidance scale"):
        draw(run, 2, prompts="a red square", negative_prompt="blue")


def test_guidance_acts_on_the_prompt_branch_in_one_batched_pass(text_run):
    run = load_run(text_run)
    condition, negative = run.prompt_condition(["a red ring"], "a blue square")
    calls = []

    def denoiser(x, sigma, **cond):
        calls.append(cond["text"].shape[0])
        return run.model(x, sigma, **cond)

    x, sigma = torch.randn(1, 3, 8, 8), torch.full((1,), 2.0)
    out = guided(denoiser, 2.5, negative=negative)(x, sigma, **condition)
    with torch.no_grad():
        positive, away = run.model(x, sigma, **condition), run.model(x, sigma, **negative)
    torch.testing.assert_close(out, away + 2.5 * (positive - away), atol=1e-5, rtol=1e-5)
    assert calls == [2]


def test_sample_cli_takes_a_prompt_a_prompt_file_and_a_negative_prompt(text_run, tmp_path, capsys):
    out = tmp_path / "fox.npz"
    assert main(["sample", str(text_run), "--prompt", "a red ring", "--n", "3", "--guidance", "2",
                 "--negative-prompt", "blue", "--out", str(out), "--no-progress"]) == 0
    with np.load(out) as archive:
        assert archive["images"].shape == (3, 8, 8, 3) and archive["prompts"].tolist() == ["a red ring"] * 3
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red ring\n\na blue square\n")
    grid = tmp_path / "grid.png"
    assert main(["sample", str(text_run), "--prompts", str(prompts), "--n", "2", "--out", str(grid),
                 "--no-progress"]) == 0
    assert Image.open(grid).size[0] < Image.open(grid).size[1] * 2  # 2 rows of 2, not one row of 4
    npz = tmp_path / "many.npz"
    assert main(["sample", str(text_run), "--prompts", str(prompts), "--n", "2", "--out", str(npz),
                 "--no-progress"]) == 0
    with np.load(npz) as archive:
        assert archive["prompts"].tolist() == ["a red ring"] * 2 + ["a blue square"] * 2
    capsys.readouterr()
    assert main(["sample", str(text_run), "--prompt", "a red ring", "--negative-prompt", "blue", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "give --guidance W too" in capsys.readouterr().err
    prompts.write_text("\n# nothing\n")
    for args, message in (([], "holds no prompt"), (["--prompt", ""], None)):
        argv = ["sample", str(text_run), "--out", str(tmp_path / "x.png"), "--no-progress"]
        argv += args or ["--prompts", str(prompts)]
        if message is None:
            assert main(argv) == 2 and "must not be empty" in capsys.readouterr().err
        else:
            assert main(argv) == 2 and message in capsys.readouterr().err


def test_a_run_without_text_refuses_prompts(tmp_path, capsys):
    from difflab.training import Trainer

    config = {"model": {"arch": "unet", "channels": 16, "channel_mult": [1], "blocks_per_level": 1,
                        "attention_resolutions": []},
              "data": {"dataset": "digits"}, "train": {"steps": 1, "batch": 8, "threads": 1, "ema_decays": [0.9]}}
    Trainer(resolve(config), tmp_path / "run", progress=False).fit()
    assert main(["sample", str(tmp_path / "run"), "--prompt", "a seven", "--out", str(tmp_path / "x.png")]) == 2
    assert "not text-conditional" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "run")]) == 2
    assert "not a text-to-image run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- serving
def test_the_server_makes_what_sample_makes(text_run):
    from fastapi.testclient import TestClient

    from difflab.serve import create_app
    from difflab.serve.backend import RunBackend

    backend = RunBackend.load(text_run)
    assert backend.info["resolution"] == 8 and backend.info["text"]
    client = TestClient(create_app(backend))
    body = client.post("/v1/generate", json={"prompt": "a green ring", "seed": 5, "n": 2, "guidance": 2.0,
                                             "steps": 4, "solver": "euler", "size": 8}).json()
    served = [np.asarray(Image.open(io.BytesIO(base64.b64decode(image["png"])))) for image in body["images"]]
    images, _ = draw(load_run(text_run), 2, prompts="a green ring", seed=5, guidance=2.0, steps=4, solver="euler")
    expected = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.stack(served), expected)
    alone = client.post("/v1/generate", json={"prompt": "a green ring", "seed": 6, "n": 1, "guidance": 2.0,
                                              "steps": 4, "solver": "euler", "size": 8}).json()
    assert alone["images"][0]["png"] == body["images"][1]["png"]  # image i is reproducible alone from seed + i


def test_the_shipped_emoji_model_draws_what_it_is_told():
    """pretrained/emoji-t2i (difflab's own recipe, exported in fp16): a red heart comes out red, a blue circle
    mostly blue (median over six seeds of the red-minus-blue mean colour)."""
    from pathlib import Path

    run = load_run(Path(__file__).parents[1] / "pretrained" / "emoji-t2i")
    redness = {}
    for prompt in ("red heart", "blue circle"):
        images, _ = draw(run, 6, prompts=prompt, guidance=4.0, steps=20, solver="dpmpp_2m")
        colour = images.mean((2, 3))
        redness[prompt] = (colour[:, 0] - colour[:, 2]).median().item()
    assert redness["red heart"] > 0.5 and redness["blue circle"] < 0.0
