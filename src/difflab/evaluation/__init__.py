"""Evaluation: distances between sample sets, and the plots that show them."""

from difflab.evaluation.distances import mmd, rmse

__all__ = ["mmd", "rmse"]
