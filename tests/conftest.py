"""Shared pytest setup: keep CPU tests small and predictable, and every cache out of the user's home."""

import atexit
import os
import shutil
import tempfile

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning slows every test many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting, which is read when torch loads)

torch.set_num_threads(2)
# Tests that look at a cache point DIFFLAB_CACHE at their own folder; the rest share this one for the session.
os.environ["DIFFLAB_CACHE"] = tempfile.mkdtemp(prefix="difflab-test-cache-")
atexit.register(shutil.rmtree, os.environ["DIFFLAB_CACHE"], ignore_errors=True)
