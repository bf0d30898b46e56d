"""The control stage: steer sampling with more than a label or prompt.

Training-free, on any run: :func:`inpainted` and :func:`repaint` (inpainting), :func:`strength_sigmas`
(image-to-image), :func:`invert` (ODE inversion), all reachable through ``sample(init=, mask=, strength=,
resample=)``. Trained through the one trainer by :func:`difflab.control.finetune.finetune` (``difflab finetune``):
ControlNets (:func:`attach_controlnets` combines them), LoRA adapters (:func:`merge_lora`) and mask-conditioned
inpainting models.
"""

from difflab.control.controlnet import attach_controlnets
from difflab.control.editing import INVERSION_SOLVERS, invert, strength_sigmas
from difflab.control.inpaint import check_mask, inpainted, repaint, repaint_segments
from difflab.control.lora import merge_lora
from difflab.control.pictures import CONTROL_PICTURES

__all__ = ["CONTROL_PICTURES", "INVERSION_SOLVERS", "attach_controlnets", "check_mask", "inpainted", "invert",
           "merge_lora", "repaint", "repaint_segments", "strength_sigmas"]
