"""``GET /hardware/info``: the GPUs of this machine, in ai-runner's ``GPUComputeInfo`` fields.

ai-runner asks NVML; livediff asks torch's CUDA runtime, which the diffusion transform loads
anyway (without torch or CUDA the answer is empty). Blocking: call it from a thread.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from livediff.livepeer.native.schemas import GpuComputeInfo

logger = logging.getLogger(__name__)


def gpu_info() -> dict[int, GpuComputeInfo]:
    """Each CUDA device by index: uuid, name, total and free memory (bytes), compute capability."""
    if importlib.util.find_spec("torch") is None:
        return {}
    import torch

    if not torch.cuda.is_available():
        return {}
    found: dict[int, GpuComputeInfo] = {}
    for index in range(torch.cuda.device_count()):
        try:
            found[index] = describe(torch, index)
        except RuntimeError as exc:  # a device that fails to answer is left out, not fatal
            logger.warning("GPU %d did not answer: %s", index, exc)
    return found


def describe(torch: Any, index: int) -> GpuComputeInfo:
    properties = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    uuid = getattr(properties, "uuid", None)
    return GpuComputeInfo(
        id=f"GPU-{uuid}" if uuid is not None else str(index),
        name=str(properties.name),
        memory_total=int(total),
        memory_free=int(free),
        major=int(properties.major),
        minor=int(properties.minor),
    )
