"""Shared pytest setup: keep CPU tests small and predictable, and every cache out of the user's home."""

import atexit
import os
import shutil
import tempfile

import torch

torch.set_num_threads(2)
# Tests that look at a cache point DIFFLAB_CACHE at their own folder; the rest share this one for the session.
os.environ["DIFFLAB_CACHE"] = tempfile.mkdtemp(prefix="difflab-test-cache-")
atexit.register(shutil.rmtree, os.environ["DIFFLAB_CACHE"], ignore_errors=True)
