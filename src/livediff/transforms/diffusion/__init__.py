"""The diffusion transform: StreamDiffusion-class img2img on diffusers, one frame per step.

Torch-free on purpose: importing this package (and its ``params`` module) must not import
torch, because the ai-runner loader imports the params class under a time limit. The transform
itself lives in :mod:`livediff.transforms.diffusion.transform` and is imported when selected.
"""

from livediff.config import MAX_STEPS
from livediff.transforms.diffusion.params import (
    FULL_VAE,
    TIMESTEP_GRID,
    DiffusionParams,
)

__all__ = [
    "FULL_VAE",
    "MAX_STEPS",
    "TIMESTEP_GRID",
    "DiffusionParams",
]
