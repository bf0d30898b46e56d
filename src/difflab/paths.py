"""Where difflab keeps what it computes once and reuses: fitted schedules, feature networks, built data sets."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DIFFLAB_CACHE``, else ``$XDG_CACHE_HOME/difflab`` or ``~/.cache/difflab``."""
    root = os.environ.get("DIFFLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difflab"
    return Path(root)
