"""FP8 for the UNet (``unet_quantization: fp8``, fp8.py): which layers convert, the product they
compute, how far the UNet's output moves, the refusals, and the setting through the transform.

torch's ``_scaled_mm`` has a CPU kernel, so the converted layers here run the same torchao path
as on Hopper; what only a GPU can show (the CUTLASS product, CUDA graphs) is marked ``gpu``.

The bounds come from e4m3's 3 mantissa bits: rounding to it moves a value by at most half a
step, 2**-4 of its size, and by 2**-4 / sqrt(3) (the deviation of a uniform error) on average.
A product of two rounded operands therefore moves by about sqrt(2) * 2**-4 / sqrt(3) = 0.051
in relative RMS, and at most by 2 * 2**-4 = 0.125 element by element.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from livediff.config import Settings
from livediff.testing.models import build_components
from livediff.transforms.diffusion import fp8
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import Stream, camera_frames, params_for, tiny_settings

#: A product of two e4m3-rounded operands, relative RMS error (see the module docstring).
PRODUCT_RMS = math.sqrt(2) * 2**-4 / math.sqrt(3)
#: The largest relative move of one such product, element by element.
PRODUCT_MAX = 2 * 2**-4
#: bfloat16's own rounding (8 bits of mantissa): what the reference product may differ by.
BF16_STEP = 2**-8


def tiny_unet() -> Any:
    """The tiny random UNet as the transform prepares it: bfloat16, channels_last, eval."""
    unet = build_components("tiny", seed=0)["unet"].to(torch.bfloat16)
    return unet.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def unet_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, 8, 8, generator=generator).to(torch.bfloat16)
    text = torch.randn(batch, 77, 16, generator=generator).to(torch.bfloat16)
    return latents, torch.tensor([999, 500][:batch]), text


def run(unet: Any) -> torch.Tensor:
    latents, timesteps, text = unet_inputs()
    with torch.no_grad():
        return unet(latents, timesteps, encoder_hidden_states=text).sample.float()  # type: ignore[no-any-return]


def relative_rms(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().float(), reference.detach().float()
    return float((value - reference).norm() / reference.norm())


def layers_of(unet: Any) -> dict[str, int]:
    """Linear layers, 1x1 and other convolutions, counted from the module tree itself."""
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    pointwise = [m for m in convs if m.kernel_size == (1, 1)]
    return {"linears": len(linears), "pointwise": len(pointwise), "convs": len(convs)}


def per_row_fp8(values: torch.Tensor) -> torch.Tensor:
    """``values`` (bfloat16) rounded to e4m3 with one scale per row, scaled back: the
    dequantized FP8 values, in float32. The scale is the row's absolute maximum over 448 (e4m3's
    largest value), computed in the values' own dtype as torchao does."""
    largest = torch.finfo(torch.float8_e4m3fn).max
    scale = (values.abs().amax(dim=-1, keepdim=True) / largest).float()
    return (values.float() / scale).to(torch.float8_e4m3fn).float() * scale


# -- conversion -----------------------------------------------------------------------------------
def test_the_tiny_unets_linear_layers_and_1x1_convolutions_become_fp8() -> None:
    unet = tiny_unet()
    before = layers_of(unet)
    linears = [(n, m) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    shapes = {name: tuple(layer.weight.shape) for name, layer in linears}

    report = fp8.convert_unet(unet)

    assert (report.linears, report.pointwise_convs) == (before["linears"], before["pointwise"])
    assert report.linears > 0 and report.pointwise_convs > 0 and report.misaligned == ()
    assert report.convolutions_left == before["convs"] - before["pointwise"]
    assert report.bytes_after < 0.6 * report.bytes_before  # 1 byte a value, not 2, plus scales
    for name, shape in shapes.items():
        weight: Any = unet.get_submodule(name).weight
        assert weight.qdata.dtype == torch.float8_e4m3fn and tuple(weight.qdata.shape) == shape
        assert tuple(weight.scale.shape) == (shape[0], 1)  # one scale per output channel
    shortcut = unet.up_blocks[0].resnets[0].conv_shortcut
    assert isinstance(shortcut, fp8.PointwiseConv)
    shortcut_weight: Any = shortcut.weight
    assert shortcut_weight.qdata.dim() == 2
    assert all(
        c.weight.dtype == torch.bfloat16 for c in unet.modules() if isinstance(c, torch.nn.Conv2d)
    )
    assert run(unet).shape == (2, 4, 8, 8)


def test_a_layer_with_a_side_not_a_multiple_of_16_is_left_and_named() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Linear(24, 32))
    model.to(torch.bfloat16)
    report = fp8.convert_unet(model)
    assert report.misaligned == ("0", "1") and report.linears == 0
    assert model[0].weight.dtype == torch.bfloat16


def test_a_converted_layer_computes_the_product_of_per_row_fp8_values() -> None:
    generator = torch.Generator().manual_seed(1)
    linear, pointwise = torch.nn.Linear(64, 48), torch.nn.Conv2d(64, 48, 1)
    model = torch.nn.ModuleList([linear, pointwise]).to(torch.bfloat16)
    weights = [linear.weight.detach().clone(), pointwise.weight.detach().flatten(1).clone()]
    biases = [linear.bias.detach().float(), pointwise.bias.detach().float()]  # type: ignore[union-attr]
    tokens = torch.randn(3, 10, 64, generator=generator).to(torch.bfloat16)
    image = torch.randn(2, 64, 5, 6, generator=generator).to(torch.bfloat16)
    image = image.to(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = [model[0](tokens).float(), model[1](image).float().permute(0, 2, 3, 1)]
        fp8.convert_unet(model)
        outputs = [model[0](tokens).float(), model[1](image).float().permute(0, 2, 3, 1)]
    rows = [tokens, image.permute(0, 2, 3, 1)]  # a 1x1 convolution's rows: its pixels
    for row, weight, bias, output, unconverted in zip(
        rows, weights, biases, outputs, exact, strict=True
    ):
        reference = per_row_fp8(row) @ per_row_fp8(weight).T + bias
        assert relative_rms(output, reference) < BF16_STEP
        assert 2**-7 < relative_rms(output, unconverted) < PRODUCT_RMS


def test_the_fp8_unets_output_stays_within_the_rounding_of_one_product() -> None:
    unet = tiny_unet()
    reference = run(copy.deepcopy(unet))
    fp8.convert_unet(unet)
    error = relative_rms(run(unet), reference)
    # above bfloat16's rounding (it is FP8), below the largest move of a single product
    assert 2**-6 < error < PRODUCT_MAX


# -- refusals --------------------------------------------------------------------------------------
def test_devices_without_fp8_products_are_refused_naming_the_setting() -> None:
    cuda = torch.device("cuda", 0)
    for capability in ((8, 0), (8, 6), (7, 5)):
        reason = fp8.device_refusal(cuda, capability)
        assert reason is not None and "unet_quantization" in reason and "8.9" in reason
    assert fp8.device_refusal(cuda, (8, 9)) is None  # Ada
    assert fp8.device_refusal(cuda, (9, 0)) is None  # Hopper
    assert fp8.device_refusal(torch.device("cpu")) is None  # torch's reference kernel
    with pytest.raises(fp8.Fp8UnavailableError, match="unet_quantization 'fp8' runs on CUDA"):
        fp8.check_available(torch.device("meta"))


def test_the_transform_refuses_fp8_at_start_on_a_device_without_it(tiny_model: Any) -> None:
    settings = tiny_settings(tiny_model, device="meta", dtype="bfloat16", unet_quantization="fp8")
    with pytest.raises(LookupError, match="unet_quantization"):
        DiffusionTransform(settings)


def test_fp8_needs_bfloat16_a_validation_error_on_the_setting() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(dtype="float16", unet_quantization="fp8")
    assert caught.value.errors()[0]["loc"] == ("unet_quantization",)
    assert Settings(dtype="bfloat16", unet_quantization="fp8").unet_quantization == "fp8"
    with pytest.raises(ValueError, match="needs the UNet in bfloat16"):
        fp8.convert_unet(torch.nn.Linear(16, 16))


# -- the setting, through the transform -----------------------------------------------------------
def outputs_of(transform: DiffusionTransform, frames: list[np.ndarray]) -> np.ndarray:
    stream = Stream(transform, seed=3)
    return np.stack([np.asarray(stream.feed(frame)) for frame in frames]).astype(np.float64)


def psnr(value: np.ndarray, reference: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((value - reference) ** 2)))


def test_the_setting_converts_the_loaded_unet_and_it_serves_frames(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    frames = camera_frames(3)
    plain = make_transform(dtype="bfloat16")
    quantized = make_transform(dtype="bfloat16", unet_quantization="fp8")
    assert plain.unet_batch is not None and quantized.unet_batch is not None
    assert plain.unet_batch.bundle.fp8 is None
    report = quantized.unet_batch.bundle.fp8
    assert report is not None and report.linears > 0 and report.pointwise_convs > 0

    unet = quantized.unet_batch.bundle.uncompiled_unet
    assert unet.time_embedding.linear_1.weight.qdata.dtype == torch.float8_e4m3fn

    reference, outputs = outputs_of(plain, frames), outputs_of(quantized, frames)
    assert outputs.shape == reference.shape
    # measured 102 dB: the tiny random UNet's move (4.7 %) barely reaches the 8-bit pixels
    assert psnr(outputs, reference) > 40


def test_the_fp8_unet_compiles_into_the_buckets(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    frames = camera_frames(2)
    eager = make_transform(dtype="bfloat16", unet_quantization="fp8")
    compiled = make_transform(
        dtype="bfloat16",
        unet_quantization="fp8",
        compile=True,
        compile_backend="eager",
        batch_buckets=[1],
    )
    assert compiled.unet_batch is not None and compiled.unet_batch.bundle.eager_unet is not None
    np.testing.assert_allclose(outputs_of(compiled, frames), outputs_of(eager, frames), atol=2)


def test_a_lora_is_refused_on_an_fp8_unet(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform(dtype="bfloat16", unet_quantization="fp8")
    params = params_for(transform, lora_dict={"some/lora": 1.0})
    with pytest.raises(ValidationError) as caught:
        transform.validate_params(params)
    assert caught.value.errors()[0]["loc"] == ("lora_dict", "some/lora")
    assert "FP8" in str(caught.value)


# -- on the GPU ------------------------------------------------------------------------------------
def _hopper() -> torch.device:
    device = torch.device("cuda")
    if fp8.device_refusal(device) is not None:
        pytest.skip(f"needs FP8 tensor cores: {fp8.device_refusal(device)}")
    return device


@pytest.mark.gpu
def test_on_the_gpu_the_fp8_unet_stays_close_and_replays_as_a_cuda_graph() -> None:
    device = _hopper()
    unet = tiny_unet().to(device)
    latents, timesteps, text = (part.to(device) for part in unet_inputs())
    with torch.no_grad():
        reference = unet(latents, timesteps, encoder_hidden_states=text).sample
        fp8.convert_unet(unet)
        eager = unet(latents, timesteps, encoder_hidden_states=text).sample
        compiled: Any = torch.compile(unet, mode="reduce-overhead", dynamic=False)
        for _ in range(3):  # warm-up, record, replay
            replayed = compiled(latents, timesteps, encoder_hidden_states=text).sample.clone()
    assert 2**-6 < relative_rms(eager, reference) < PRODUCT_MAX
    assert relative_rms(replayed, eager) < 2**-6
