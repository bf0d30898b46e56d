"""The modeling stage: U-Net and DiT in image and video form, conditioning, factory, costs."""

import pytest
import torch

from difflab.cli import main
from difflab.conditioning import NULL_CLASS, drop_condition, null_condition
from difflab.diffusion import Precond
from difflab.models import DiT, build_network, model_info, network_config
from difflab.sampling import sample

UNET = dict(arch="unet", resolution=8, channels=16, channel_mult=(1, 2), attention_resolutions=(4,), head_dim=8,
            norm_groups=8)
DIT = dict(arch="dit", resolution=8, in_channels=3, hidden=32, depth=2, heads=4)
COND = dict(num_classes=5, text_dim=6, concat_channels=2)


def randomize(network: torch.nn.Module, seed: int = 0, skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """Give every parameter (zero-initialised ones too) random values, so every path carries signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if not any(s in name for s in skip):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return network


def inputs(batch=2, channels=3, frames=None, size=8, cond=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial = (size, size) if frames is None else (frames, size, size)
    x = torch.randn(batch, channels, *spatial, generator=gen)
    kwargs = {}
    if cond:
        kwargs = dict(
            class_labels=torch.tensor([3, NULL_CLASS] * (batch // 2) + [1] * (batch % 2)),
            text=torch.randn(batch, 4, 6, generator=gen),
            text_mask=torch.tensor([[True, True, False, False]] * batch),
            concat=torch.randn(batch, 2, *spatial, generator=gen),
        )
    return x, torch.linspace(0.1, 0.9, batch), kwargs


CASES = {
    "unet": dict(UNET),
    "unet_temporal_attention": dict(UNET, temporal="attention"),
    "unet_temporal_conv": dict(UNET, temporal="conv"),
    "unet_temporal_conv3d": dict(UNET, temporal="conv3d"),
    "unet_temporal_spacetime": dict(UNET, temporal="spacetime"),
    "unet_temporal_and_spacetime_at_4": dict(UNET, temporal="attention", spacetime_resolutions=(4,)),
    "dit_sincos": dict(DIT),
    "dit_rope": dict(DIT, pos_embed="rope"),
    "dit_factorised": dict(DIT, video_attention="factorised", frame_patch=2),
    "dit_rope_factorised": dict(DIT, pos_embed="rope", video_attention="factorised"),
}
VIDEO = [name for name in CASES if name != "unet"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("size", [8, 16])
def test_image_shapes_and_zero_output_at_start(name, size):
    torch.manual_seed(0)
    network = build_network(dict(CASES[name], **COND))
    x, c_noise, cond = inputs(channels=3, size=size)
    out = network(x, c_noise, **cond)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0, "zero-initialised output layers make the network output 0 at start"
    denoiser = Precond(network, "edm")
    sigma = torch.tensor([0.5, 2.0])
    expected = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(denoiser(x, sigma, **cond), expected[:, None, None, None] * x)


@pytest.mark.parametrize("name", VIDEO)
@pytest.mark.parametrize("frames", [2, 4])
def test_video_shapes(name, frames):
    network = randomize(build_network(dict(CASES[name], **COND)))
    x, c_noise, cond = inputs(frames=frames)
    out = network(x, c_noise, **cond)
    assert out.shape == x.shape and out.isfinite().all()


def test_unet_video_form_is_the_image_model_per_frame_at_start():
    """Temporal layers start as the identity, so the video U-Net is the image U-Net on every frame."""
    network = randomize(build_network(dict(UNET, temporal="attention", num_classes=5)),
                        skip=("attn.out", "conv."))  # keep temporal outputs (and conv2) zero
    for layer in network.modules():
        if type(layer).__name__ == "TemporalLayer":
            assert all(torch.count_nonzero(p) == 0 for n, p in layer.named_parameters() if "out" in n)
    x, c_noise, _ = inputs(frames=3, cond=False)
    labels = torch.tensor([2, 4])
    video = network(x, c_noise, class_labels=labels)
    for t in range(3):
        torch.testing.assert_close(video[:, :, t], network(x[:, :, t], c_noise, class_labels=labels))


def test_temporal_layers_mix_frames():
    network = randomize(build_network(dict(UNET, temporal="conv")))
    x, c_noise, _ = inputs(frames=3, cond=False)
    changed = x.clone()
    changed[:, :, 0] += 1  # perturb frame 0 only
    delta = (network(changed, c_noise) - network(x, c_noise))[:, :, 1:]
    assert delta.abs().max() > 1e-4


@pytest.mark.parametrize("kind, reaches", [("attention", "same"), ("conv", "same"), ("conv3d", "neighbours"),
                                           ("spacetime", "all")])
def test_what_a_temporal_layer_carries_from_one_frame_to_another(kind, reaches):
    """Per-pixel layers carry a change of frame 0 to the same pixel of frame 1 (other pixels see it only through
    frame 0's normalisation statistics); the space-time convolution to that pixel's neighbours, space-time
    attention to every pixel of frame 1 alike, so what frames share can follow a moving object."""
    from difflab.models.unet import Context, TemporalLayer

    torch.manual_seed(0)
    layer = randomize(TemporalLayer(8, kind, head_dim=4, groups=4))
    frames, ctx = 3, Context(None, None, None, 3)
    x = torch.randn(2 * frames, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[0, :, 0, 0] += 1  # clip 0, frame 0, pixel (0, 0)
    delta = (layer(changed, ctx) - layer(x, ctx)).abs().amax(1)  # (B*T, H, W)
    # frame 1: the changed pixel, a neighbour, and the pixels far from it
    same, neighbour, far = delta[1, 0, 0], delta[1, 1, 1], delta[1, 4:, 4:].mean()
    assert same > 1e-4
    assert (neighbour > 0.3 * same) == (reaches != "same")
    assert (far > 0.3 * same) == (reaches == "all")
    assert delta[frames:].max() == 0  # never another clip


def test_spacetime_layers_only_at_the_sizes_asked():
    kinds = [m.kind for m in build_network(CASES["unet_temporal_and_spacetime_at_4"]).modules()
             if type(m).__name__ == "TemporalLayer"]
    blocks = sum(type(m).__name__ == "ResBlock" for m in build_network(UNET).modules())
    assert kinds.count("attention") == blocks  # per-pixel temporal attention after every block
    assert 0 < kinds.count("spacetime") < kinds.count("attention")  # the 4x4 level's blocks and the middle


@pytest.mark.parametrize("name", ["unet", "dit_sincos"])
def test_conditioning_changes_the_output_and_null_condition_is_model_independent(name):
    network = randomize(build_network(dict(CASES[name], **COND)))
    x, c_noise, cond = inputs()
    base = network(x, c_noise, **cond)
    for key, changed in [
        ("class_labels", torch.tensor([4, 0])),
        ("text", cond["text"] + 1),
        ("concat", cond["concat"] + 1),
    ]:
        assert (network(x, c_noise, **{**cond, key: changed}) - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4, key
    assert (network(x, c_noise + 0.3, **cond) - base).abs().max() > 1e-4

    null = null_condition(cond)
    assert (null["class_labels"] == NULL_CLASS).all() and not null["text_mask"].any()
    unconditional = network(x, c_noise, **null)
    # The null prompt ignores the prompt's tokens entirely, and the null class is one learned class.
    other_text = network(x, c_noise, **{**null, "text": torch.randn_like(cond["text"])})
    torch.testing.assert_close(unconditional, other_text)
    assert (unconditional - base).abs().max() > 1e-4


def test_drop_condition_replaces_labels_and_prompts_per_sample():
    cond = dict(class_labels=torch.arange(6) % 5, text=torch.randn(6, 3, 2), concat=torch.zeros(6, 1))
    drop = torch.tensor([True, False, True, False, False, True])
    dropped = drop_condition(cond, drop)
    assert torch.equal(dropped["class_labels"] == NULL_CLASS, drop)
    assert torch.equal(~dropped["text_mask"].any(dim=1), drop)
    assert dropped["concat"] is cond["concat"]
    assert drop_condition({"concat": cond["concat"]}, drop)["concat"] is cond["concat"]  # nothing to drop


def test_conditioning_errors_are_clear():
    plain = build_network(UNET)
    x, c_noise, cond = inputs(cond=True)
    with pytest.raises(TypeError, match="not class-conditional"):
        plain(x, c_noise, class_labels=cond["class_labels"])
    with pytest.raises(TypeError, match="not text-conditional"):
        plain(x, c_noise, text=cond["text"])
    with pytest.raises(ValueError, match="concat must have shape"):
        plain(x, c_noise, concat=cond["concat"])
    conditioned = build_network(dict(UNET, **COND))
    with pytest.raises(TypeError, match="text-conditional"):
        conditioned(x, c_noise, class_labels=cond["class_labels"], concat=cond["concat"])
    with pytest.raises(ValueError, match="text must have shape"):
        conditioned(x, c_noise, **{**cond, "text": torch.randn(2, 4, 5)})
    with pytest.raises(TypeError, match="concat="):
        conditioned(x, c_noise, class_labels=cond["class_labels"], text=cond["text"])
    with pytest.raises(ValueError, match="no temporal layers"):
        plain(torch.randn(2, 3, 2, 8, 8), c_noise)
    one_frame = torch.randn(2, 3, 1, 8, 8)  # a one-frame clip is an image
    torch.testing.assert_close(plain(one_frame, c_noise), plain(one_frame[:, :, 0], c_noise)[:, :, None])
    with pytest.raises(ValueError, match="patches"):
        build_network(DIT)(torch.randn(2, 3, 7, 8), c_noise)


@pytest.mark.parametrize("name", ["unet_temporal_attention", "dit_rope_factorised", "dit_factorised"])
def test_gradient_reaches_every_parameter(name):
    network = randomize(build_network(dict(CASES[name], **COND)))
    x, c_noise, cond = inputs(frames=4)
    cond["text_mask"][1] = False  # one null prompt, so its learned token and pooled vector are used
    network(x, c_noise, **cond).square().mean().backward()
    dead = [n for n, p in network.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("name", ["unet_temporal_conv", "dit_factorised"])
def test_activation_checkpointing_gives_the_same_output_and_gradients(name):
    outputs, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        network = randomize(build_network(dict(CASES[name], **COND, checkpointing=checkpointing)))
        x, c_noise, cond = inputs(frames=2)
        out = network(x, c_noise, **cond)
        out.square().mean().backward()
        outputs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in network.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_construction_is_deterministic_with_a_seed():
    nets = []
    for _ in range(2):
        torch.manual_seed(7)
        nets.append(build_network(dict(DIT, **COND)))
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_channels_last_gives_the_same_output():
    outputs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        network = randomize(build_network(dict(UNET, temporal="conv", channels_last=channels_last)))
        assert network.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        outputs.append([network(*inputs(cond=False)[:2]), network(*inputs(frames=2, cond=False)[:2])])
    for contiguous, nhwc in zip(*outputs, strict=True):
        torch.testing.assert_close(contiguous, nhwc)


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_dit_image_is_a_still_clip(pos_embed):
    """Images sit at frame 0 of the position grid, so image and video forms share weights exactly."""
    network = randomize(build_network(dict(DIT, frame_patch=2, pos_embed=pos_embed)))
    x, c_noise, _ = inputs(cond=False)
    still = network(x[:, :, None].expand(-1, -1, 2, -1, -1), c_noise)
    torch.testing.assert_close(network(x, c_noise), still.mean(dim=2))


def test_dit_flops_match_the_closed_form():
    """Forward FLOPs of a DiT: 2 * MACs of every linear layer, plus attention's two N x N products."""
    c = network_config(dict(DIT, resolution=16, patch_size=2))
    tokens, d = (16 // 2) ** 2, c.hidden
    per_token = 2 * (3 * d * d + d * d + 2 * 4 * d * d) * c.depth  # qkv, out, mlp
    attention = c.depth * 2 * 2 * tokens * tokens * d
    patches = 2 * tokens * 3 * 4 * d + 2 * tokens * d * 3 * 4  # patch embedding and output projection
    embedding = 2 * (256 * d + d * d) + 2 * (6 * d * d) * c.depth + 2 * 2 * d * d  # noise MLP, adaLN
    info = model_info(c)
    assert info["forward_flops"] == tokens * per_token + attention + patches + embedding
    # Backward costs twice the forward, plus the recomputed attention scores.
    assert 2.9 * info["forward_flops"] < info["train_flops"] < 3.2 * info["forward_flops"]
    assert info["parameters"] == sum(p.numel() for p in DiT(c).parameters())
    assert info["activation_bytes"] > 0


def test_presets_build_the_dit_family():
    # DiT-XL/2 has 675 M parameters with 1000 classes (Peebles & Xie 2023, Table 4).
    config = network_config({"preset": "dit_xl_2", "num_classes": 1000})
    params = 12 * config.depth * config.hidden**2  # qkv+out (4d^2) + mlp (8d^2) per block
    params += 6 * config.depth * config.hidden**2  # adaLN modulation
    assert abs(params - 675e6) / 675e6 < 0.02
    assert network_config("dit_s_4").patch_size == 4


def test_factory_rejects_bad_configs_with_one_line_errors():
    with pytest.raises(ValueError, match="unknown key 'unet.chanels'"):
        network_config(dict(UNET, chanels=8))
    with pytest.raises(ValueError, match="unet.channels must be int, got '8'"):
        network_config(dict(UNET, channels="8"))
    with pytest.raises(ValueError, match="unknown model preset"):
        network_config("dit_q_2")
    with pytest.raises(ValueError, match="needs arch"):
        network_config({"channels": 8})
    with pytest.raises(ValueError, match="temporal must be"):
        network_config(dict(UNET, temporal="lstm"))
    assert network_config(dict(UNET, channel_mult=[1, 2])).channel_mult == (1, 2)
    assert network_config(dict(DIT, mlp_ratio=2)).mlp_ratio == 2.0


def test_networks_sample_through_preconditioning():
    for name in ("unet", "dit_rope"):
        denoiser = Precond(randomize(build_network(CASES[name])), "edm")
        out = sample(denoiser, torch.randn(2, 3, 8, 8), solver="heun", steps=3)
        assert out.shape == (2, 3, 8, 8) and out.isfinite().all()


def test_model_info_cli(capsys, tmp_path):
    config = tmp_path / "model.yaml"
    config.write_text("model:\n  preset: dit_tiny\n  num_classes: 10\n")
    assert main(["model-info", str(config), "--set", "depth=1"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "training step FLOPs" in out and "activation memory" in out
    assert main(["model-info", "dit_tiny", "--set", "depht=1"]) == 2
    assert "unknown key 'dit.depht'" in capsys.readouterr().err
    config.write_text("model: [1, 2\n")
    assert main(["model-info", str(config)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_dit_compiles_without_graph_breaks():
    network = randomize(build_network(dict(DIT, num_classes=5, text_dim=6, pos_embed="rope")))
    x, c_noise, cond = inputs()
    cond.pop("concat")
    torch._dynamo.reset()
    compiled = torch.compile(network, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, c_noise, **cond), network(x, c_noise, **cond))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside inductor
@pytest.mark.parametrize("name", ["dit_sincos", "unet"])
def test_inductor_compile_matches_eager(name):
    network = randomize(build_network(CASES[name]))
    x, c_noise, _ = inputs(cond=False)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(network)
        out = compiled(x, c_noise)
    except Exception as exc:  # no C++ toolchain, unsupported platform
        pytest.skip(f"torch.compile does not work here: {type(exc).__name__}")
    torch.testing.assert_close(out, network(x, c_noise), rtol=1e-4, atol=1e-5)
