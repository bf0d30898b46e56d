"""Where every benchmark's figures go: a JSON file that also records the command that measured them."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_json(path: Path | None, figures: dict, *, quiet: bool = False) -> None:
    """Write ``figures`` to ``path`` (nothing when it is None) after a ``command`` entry holding this run's command.

    The file is written beside its place and then moved there, so an interrupted run leaves the last complete
    version rather than a truncated one (the distillation and control benchmarks rewrite theirs after every row).
    """
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"command": " ".join(sys.argv), **figures}, indent=1, default=str))
    partial.replace(path)
    if not quiet:
        print(f"wrote {path}")
