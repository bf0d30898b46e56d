"""Shared pytest setup: keep CPU tests small and predictable."""

import torch

torch.set_num_threads(2)
