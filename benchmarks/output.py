"""Where every benchmark's figures go: a JSON file that also records the command that measured them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from difflab.paths import write_atomic


def write_json(path: Path | None, figures: dict, *, quiet: bool = False) -> None:
    """Write ``figures`` to ``path`` (nothing when it is None) after a ``command`` entry holding this run's command.

    Written whole or not at all (:func:`difflab.paths.write_atomic`), so an interrupted run leaves the last
    complete version (the distillation and control benchmarks rewrite theirs after every row).
    """
    if path is None:
        return
    write_atomic(path, json.dumps({"command": " ".join(sys.argv), **figures}, indent=1, default=str))
    if not quiet:
        print(f"wrote {path}")
