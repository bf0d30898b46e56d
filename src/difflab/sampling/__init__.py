"""The sampling stage: sigma schedules, solvers and the ``sample()`` front door (DESIGN.md contracts)."""

from difflab.sampling.optimize import optimized, reference_solution
from difflab.sampling.sample import SCHEDULES, sample
from difflab.sampling.solvers import SOLVERS, STOCHASTIC, noise_like, steps_for_nfe

__all__ = ["SCHEDULES", "SOLVERS", "STOCHASTIC", "noise_like", "optimized", "reference_solution", "sample",
           "steps_for_nfe"]
