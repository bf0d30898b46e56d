"""The control stage: steer sampling with more than a label or prompt (see each module)."""

from difflab.control.editing import INVERSION_SOLVERS, invert, strength_sigmas
from difflab.control.inpaint import check_mask, inpainted, repaint, repaint_segments

__all__ = ["INVERSION_SOLVERS", "check_mask", "inpainted", "invert", "repaint", "repaint_segments",
           "strength_sigmas"]
