"""Distillation: few-step students of a trained teacher, as ordinary run directories (``difflab distill``)."""

from difflab.distillation.distill import consistency_sigmas, distill, student_mapping
from difflab.distillation.objectives import OBJECTIVES, ConsistencyObjective, GuidanceObjective, ProgressiveObjective

__all__ = ["OBJECTIVES", "ConsistencyObjective", "GuidanceObjective", "ProgressiveObjective", "consistency_sigmas",
           "distill", "student_mapping"]
