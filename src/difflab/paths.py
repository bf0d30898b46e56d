"""Where difflab keeps what it computes once and reuses, and how every file is written: whole or not at all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """``$DIFFLAB_CACHE``, else ``$XDG_CACHE_HOME/difflab`` or ``~/.cache/difflab``."""
    root = os.environ.get("DIFFLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difflab"
    return Path(root)


@contextlib.contextmanager
def replacing(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to, renamed over ``path`` when the block succeeds.

    Readers see the old file or the new one, never half of one; a failed block leaves the old file and no
    temporary. The temporary keeps ``path``'s suffix, so writers that infer the format from it (Pillow,
    numpy) work unchanged. ``durable`` syncs the file and its folder to disk (checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
        if durable:
            fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes, durable: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`replacing`."""
    with replacing(path, durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
