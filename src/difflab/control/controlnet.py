"""Sampling with ControlNets: attach the ControlNets of fine-tuned runs to a base run (several combine with weights).

The network (:class:`~difflab.models.unet.ControlNet`) lives with the U-Net; training is
:class:`~difflab.control.objectives.ControlNetObjective` through ``difflab finetune``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

_OWN_KEYS = ("controls", "control_downsample")


def attach_controlnets(run, control_runs: list[str | Path]):
    """``run`` (a :class:`~difflab.training.run.Run`) with the ControlNets of ``control_runs`` appended after its
    own, in order. Each must have been trained for the same architecture (its base may be another checkpoint of
    it, as with ControlNets shared between fine-tuned models)."""
    from difflab.training.run import load_run
    from difflab.training.trainer import make_model

    model = dict(run.config.model)
    base = {k: v for k, v in model.items() if k not in _OWN_KEYS}
    device = next(run.network.parameters()).device
    state = dict(run.network.state_dict())
    controls = list(model.get("controls", ()))
    for path in control_runs:
        other = load_run(path, device=device)
        if other.config.control.method != "controlnet":
            raise ValueError(f"{path} is not a ControlNet run (control.method: {other.config.control.method})")
        theirs = {k: v for k, v in other.config.model.items() if k not in _OWN_KEYS}
        if theirs != base:
            differ = sorted(k for k in base.keys() | theirs.keys() if base.get(k) != theirs.get(k))
            raise ValueError(f"the ControlNet of {path} was trained for another model (differs in {', '.join(differ)})")
        if controls and other.config.model["control_downsample"] != model.get("control_downsample", 1):
            raise ValueError(f"the ControlNet of {path} takes control pictures of another size")
        for k, value in other.network.state_dict().items():
            if k.startswith("controlnets."):
                index, rest = k.removeprefix("controlnets.").split(".", 1)
                state[f"controlnets.{len(controls) + int(index)}.{rest}"] = value
        controls += other.config.model["controls"]
        model["control_downsample"] = other.config.model["control_downsample"]
    model["controls"] = controls
    config = replace(run.config, model=model)
    return replace(run, config=config, model=make_model(config, state, device))
