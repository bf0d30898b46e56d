"""Atomic, self-describing checkpoints: ``checkpoints/step-NNNNNNN/`` folders and a ``latest`` pointer.

A checkpoint is written into a hidden ``.tmp-*`` folder, every file fsync'd, then renamed into place,
and only then does ``latest`` (itself replaced atomically) point at it. A process killed at any moment
therefore leaves either the previous complete checkpoint or the new one, never a half-written folder
under a ``step-*`` name; leftovers of an interrupted write are removed on the next start. Tensors go to
safetensors files, everything else to JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difflab.paths import fsync, write_atomic

STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file (contiguous CPU copies), fsync'd."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    fsync(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def begin(checkpoints: Path, step: int) -> Path:
    """Create the temporary folder a checkpoint is written into."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints / f".tmp-{step_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(checkpoints: Path, tmp: Path, step: int, keep: int) -> Path:
    """Move a fully written temporary folder into place, point ``latest`` at it, drop old checkpoints."""
    fsync(tmp)
    final = checkpoints / step_name(step)
    if final.exists():  # the same step written again after a resume: the new copy replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(checkpoints)
    write_atomic(checkpoints / "latest", final.name + "\n", durable=True)
    for old in complete_checkpoints(checkpoints)[:-keep]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """The complete checkpoint folders, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The folder ``latest`` names, or the newest complete one if the pointer is missing or stale."""
    pointer = checkpoints / "latest"
    if pointer.is_file():
        named = checkpoints / pointer.read_text().strip()
        if STEP_DIR.match(named.name) and named.is_dir():
            return named
    found = complete_checkpoints(checkpoints)
    return found[-1] if found else None


def remove_partial(checkpoints: Path) -> None:
    """Delete what an interrupted write left behind (``.tmp-*`` folders and files)."""
    if checkpoints.is_dir():
        for leftover in checkpoints.glob(".*tmp*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def optimizer_to_tensors(state: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into safetensors-ready tensors and JSON-ready settings."""
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: Mapping[str, torch.Tensor], settings: Mapping) -> dict:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *settings["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in settings["param_groups"]]
    return {"state": state, "param_groups": groups}


def write_json(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2))
    fsync(path)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
