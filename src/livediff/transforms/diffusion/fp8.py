"""FP8 for the UNet (``unet_quantization: fp8``): its linear layers and 1x1 convolutions run as
FP8 matrix products on the GPU's FP8 tensor cores (Ada and Hopper, CUDA capability 8.9 and up).

The weights become torchao ``Float8Tensor``s at load: ``float8_e4m3fn`` values with one float32
scale per output channel (its absolute maximum over 448, e4m3's largest value), computed once
here. On every call torchao scales each row of the layer's input by its own absolute maximum the
same way and runs one rowwise-scaled product (``torch._scaled_mm``: CUTLASS on Hopper, a
reference kernel on the CPU) that writes bfloat16. A 1x1 convolution is a linear layer over the
channels: it becomes a :class:`PointwiseConv`, whose permutes are views under the UNet's
channels_last layout. The 3x3 convolutions stay in bfloat16: torchao's FP8 convolution needs
the mslk kernels and Blackwell (capability 10.0), neither of which the GPU machine has; so do
the norms, the attention products and every layer whose sides are not multiples of 16 (what the
FP8 kernels need).

The conversion runs before ``torch.compile``, so the compiled buckets are planned with the FP8
layers, and it refuses (:class:`Fp8UnavailableError`) a CUDA device below capability 8.9, a
device that is neither CUDA nor the CPU, or a missing torchao. LoRAs are refused on an FP8 UNet
(the transform's 422): their update cannot be fused into FP8 values.

Invariant: after :func:`convert_unet`, every layer it reports converted computes
``dequant(q(x)) @ dequant(q(W)).T + b`` with per-row scales, in bfloat16, and every other layer
of the UNet is as it was.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: The setting that asks for it (``LIVEDIFF_UNET_QUANTIZATION``).
SETTING = "unet_quantization"
#: The CUDA capability of the first FP8 tensor cores (Ada); Hopper is 9.0.
MIN_CAPABILITY = (8, 9)
#: Both sides of an FP8 product's weight must be multiples of this (the kernels' alignment).
ALIGNMENT = 16
#: The UNet dtype rowwise-scaled FP8 products write (and torchao's per-row weights need).
UNET_DTYPE = torch.bfloat16


class Fp8UnavailableError(LookupError):
    """FP8 was asked for on a device that has no FP8 products."""


def device_refusal(device: torch.device, capability: tuple[int, int] | None = None) -> str | None:
    """Why the UNet cannot run FP8 on ``device`` (None: it can). ``capability`` is the CUDA
    device's (read from the device when not given); the CPU runs torch's reference kernel."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"{SETTING} 'fp8' runs on CUDA or the CPU, not on {device.type!r}"
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        major, minor = capability
        return (
            f"{SETTING} 'fp8' needs FP8 tensor cores (CUDA capability 8.9 or more: Ada, Hopper);"
            f" {device} has {major}.{minor}: use {SETTING} 'none'"
        )
    return None


def check_available(device: torch.device) -> None:
    """Raise :class:`Fp8UnavailableError` (naming the setting) where FP8 cannot run: on such
    a device, or without torchao."""
    reason = device_refusal(device)
    if reason is None and importlib.util.find_spec("torchao") is None:
        reason = f"{SETTING} 'fp8' needs torchao: pip install 'livediff[fp8]'"
    if reason is not None:
        raise Fp8UnavailableError(reason)


@dataclass(frozen=True)
class Fp8Report:
    """What :func:`convert_unet` did: layers converted, layers left and why, weight bytes."""

    #: Linear layers now FP8, and 1x1 convolutions now FP8 :class:`PointwiseConv` layers.
    linears: int
    pointwise_convs: int
    #: Linear layers and 1x1 convolutions left in bfloat16: a side not a multiple of 16.
    misaligned: tuple[str, ...]
    #: Other convolutions (3x3, strided) left in bfloat16: no FP8 convolution on Hopper.
    convolutions_left: int
    #: The converted layers' weights before (bfloat16) and after (FP8 values and scales).
    bytes_before: int
    bytes_after: int

    def summary(self) -> str:
        return (
            f"FP8: {self.linears} linear layers and {self.pointwise_convs} 1x1 convolutions"
            f" converted ({self.bytes_before / 2**20:.1f} MiB of weights -> "
            f"{self.bytes_after / 2**20:.1f} MiB); left in bfloat16: {self.convolutions_left}"
            f" convolutions, {len(self.misaligned)} layers with a side not a multiple of"
            f" {ALIGNMENT}"
        )


class PointwiseConv(torch.nn.Module):
    """A 1x1 convolution (stride 1, no padding, one group) as a linear layer over the channels:
    NCHW in and out. Under channels_last both permutes are views, so no copy is made."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        channels_last = sample.permute(0, 2, 3, 1)
        return F.linear(channels_last, self.weight, self.bias).permute(0, 3, 1, 2)


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out x in, bfloat16) as a torchao ``Float8Tensor``: e4m3 values, one scale per
    output channel, and its input quantized per row on each call (the settings of torchao's
    ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``, whose own hardware
    check would refuse the CPU)."""
    quantization = importlib.import_module("torchao.quantization")
    float8_tensor = importlib.import_module(
        "torchao.quantization.quantize_.workflows.float8.float8_tensor"
    )
    mm_config = quantization.Float8MMConfig(use_fast_accum=True)
    per_row = quantization.PerRow()
    activations = float8_tensor.QuantizeTensorToFloat8Kwargs(
        float8_dtype=torch.float8_e4m3fn, granularity=per_row, mm_config=mm_config
    )
    quantized: torch.Tensor = quantization.Float8Tensor.from_hp(
        weight.detach(),
        float8_dtype=torch.float8_e4m3fn,
        granularity=per_row,
        mm_config=mm_config,
        act_quant_kwargs=activations,
    )
    return quantized


def convert_unet(unet: torch.nn.Module) -> Fp8Report:
    """Make the UNet's eligible layers FP8 in place (bfloat16 weights on their device, before
    any ``torch.compile``); what was converted and left, counted."""
    _check_dtype(unet)
    counts = {"linears": 0, "pointwise_convs": 0, "convolutions_left": 0}
    misaligned: list[str] = []
    bytes_before = bytes_after = 0
    for name, parent, child_name, layer in _layers(unet):
        kind = _kind(layer)
        if kind == "convolutions_left":
            counts[kind] += 1
        elif layer.weight.shape[0] % ALIGNMENT or layer.weight.shape[1] % ALIGNMENT:
            misaligned.append(name)
        else:
            before, after = _convert_layer(parent, child_name, layer)
            counts[kind] += 1
            bytes_before, bytes_after = bytes_before + before, bytes_after + after
    report = Fp8Report(
        misaligned=tuple(misaligned), bytes_before=bytes_before, bytes_after=bytes_after, **counts
    )
    logger.info("%s", report.summary())
    return report


def _convert_layer(parent: torch.nn.Module, child_name: str, layer: Any) -> tuple[int, int]:
    """Replace ``layer`` (a Linear, or a 1x1 Conv2d) with its FP8 form; its weight's bytes
    before and after."""
    weight = layer.weight.detach().flatten(1)
    quantized = quantize_weight(weight)
    if isinstance(layer, torch.nn.Linear):
        layer.weight = torch.nn.Parameter(quantized, requires_grad=False)
    else:
        setattr(parent, child_name, PointwiseConv(quantized, layer.bias))
    return weight.numel() * weight.element_size(), _stored_bytes(quantized)


def _check_dtype(unet: torch.nn.Module) -> None:
    dtype = next(unet.parameters()).dtype
    if dtype != UNET_DTYPE:
        raise ValueError(
            f"{SETTING} 'fp8' needs the UNet in bfloat16 (dtype 'bfloat16': rowwise-scaled FP8"
            f" products write bfloat16); it is in {dtype}"
        )


def _layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, Any]]:
    """Every Linear and Conv2d of ``unet``: (full name, parent, name in the parent, layer)."""
    found = []
    for parent_name, parent in unet.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                found.append((name, parent, child_name, child))
    return found


def _kind(layer: torch.nn.Module) -> str:
    """Which count ``layer`` joins: linears, pointwise_convs or convolutions_left."""
    if isinstance(layer, torch.nn.Linear):
        return "linears"
    assert isinstance(layer, torch.nn.Conv2d)
    pointwise = (
        tuple(layer.kernel_size) == (1, 1)
        and tuple(layer.stride) == (1, 1)
        and tuple(layer.dilation) == (1, 1)
        and layer.groups == 1
        and layer.padding in ((0, 0), "valid")
    )
    return "pointwise_convs" if pointwise else "convolutions_left"


def _stored_bytes(quantized: Any) -> int:
    """The bytes of a ``Float8Tensor``'s values and scales."""
    return sum(
        int(part.numel() * part.element_size()) for part in (quantized.qdata, quantized.scale)
    )
