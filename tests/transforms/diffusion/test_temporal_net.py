"""TemporalNet's preprocessors: the previous output as the control image (``temporal_net``),
TemporalNet2's 6 channels with the optical flow's colours (``temporal_net_tensorrt``), and the
ControlNet channel check that refuses a preprocessor its model cannot take.

The flow is pure torch (pyramidal Lucas-Kanade): a shifted texture must give back its shift, and
the colours must follow the Middlebury wheel's definition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from livediff.testing.models import ModelFolders
from livediff.transforms.diffusion.temporal_net import (
    colour_wheel,
    dense_flow,
    flow_colours,
    temporal_net2,
)
from livediff.transforms.diffusion.transform import DiffusionTransform
from livediff.transforms.diffusion.unet_batch import control_key
from tests.transforms.diffusion.conftest import SIZE, Stream, camera_frames, ready, spec

TN = "temporal_net"
TN2 = "temporal_net_tensorrt"


@pytest.fixture(scope="module")
def controlnet6(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelFolders) -> str:
    """A random TemporalNet2-shaped ControlNet (conditioning_channels 6) for the tiny model."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model.model / "unet")
    torch.manual_seed(7)
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=6)
    for name, parameter in controlnet.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
            torch.nn.init.normal_(parameter, std=0.3)
    folder = tmp_path_factory.mktemp("temporalnet2") / "cn"
    controlnet.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def transform(make_transform: Callable[..., DiffusionTransform]) -> DiffusionTransform:
    return make_transform()


def latest(stream: Stream, entry: dict[str, Any]) -> torch.Tensor:
    """The control image of the stream's newest frame for ``entry``."""
    params = type(stream.params).model_validate({"controlnets": [entry]}).controlnets[0]
    return stream.state.controls[control_key(params)][0:1]


def as_control(previous: torch.Tensor | None) -> torch.Tensor:
    assert previous is not None
    return ((previous.float() + 1) / 2).clamp(0, 1)


def test_temporal_net_is_each_sessions_previous_output_in_one_batch(
    transform: DiffusionTransform, controlnets: list[str]
) -> None:
    entries = [spec(controlnets[0], preprocessor=TN), spec(controlnets[1])]  # + passthrough
    streams = [Stream(transform, controlnets=entries) for _ in range(2)]
    ready(transform, *controlnets)
    frames = camera_frames(12, seed=4)
    first = transform.process([stream.job(frames[i]) for i, stream in enumerate(streams)])
    assert first is not None
    for stream in streams:  # no previous output yet: the frame itself (as passthrough sees it)
        assert torch.equal(latest(stream, entries[0]), latest(stream, entries[1]))
    seen = 0
    for index in range(2, 12, 2):
        before = [stream.state.previous_image for stream in streams]
        transform.process([stream.job(frames[index + i]) for i, stream in enumerate(streams)])
        for stream, previous in zip(streams, before, strict=True):
            if previous is None:
                continue
            seen += 1
            assert torch.equal(latest(stream, entries[0]), as_control(previous))
    assert seen >= 4
    one, two = (stream.state.previous_image for stream in streams)
    assert one is not None and two is not None and not torch.equal(one, two)


def test_temporal_net2_is_the_previous_output_and_the_flow_colours() -> None:
    torch.manual_seed(0)
    frames = torch.rand(3, 3, SIZE, SIZE)
    previous = [torch.rand(1, 3, SIZE, SIZE), None, torch.rand(1, 3, SIZE, SIZE)]
    flow_from = [torch.rand(1, 3, SIZE, SIZE), None, torch.rand(1, 3, SIZE, SIZE)]
    images = temporal_net2(frames, previous, flow_from, 0.5)
    assert images.shape == (3, 6, SIZE, SIZE)
    for index in (0, 2):  # batched, each from its own previous input
        before, earlier = flow_from[index], previous[index]
        assert before is not None and earlier is not None
        flow = dense_flow(before, frames[index : index + 1]) * 0.5
        assert torch.allclose(images[index : index + 1, 3:], flow_colours(flow), atol=1.01 / 255)
        assert torch.equal(images[index : index + 1, :3], earlier)
    assert torch.equal(images[1:2, :3], frames[1:2])  # first frame: itself, and no flow
    assert torch.equal(images[1:2, 3:], torch.zeros(1, 3, SIZE, SIZE))


def shifted_pair(dx: int, dy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random texture and the same texture moved by (dx, dy) pixels."""
    torch.manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 3, SIZE + 16, SIZE + 16), 5, 1, 2)
    before = base[..., 8 : 8 + SIZE, 8 : 8 + SIZE]
    after = base[..., 8 - dy : 8 - dy + SIZE, 8 - dx : 8 - dx + SIZE]
    return before, after


@pytest.mark.parametrize("shift", [(3, -2), (-1, 4), (0, 0)])
def test_the_flow_recovers_a_known_shift(shift: tuple[int, int]) -> None:
    before, after = shifted_pair(*shift)
    flow = dense_flow(before, after)[..., 16:48, 16:48]  # away from the borders
    assert flow.shape[1] == 2
    assert abs(flow[:, 0].median().item() - shift[0]) < 0.3
    assert abs(flow[:, 1].median().item() - shift[1]) < 0.3


def test_the_colours_follow_the_middlebury_wheel() -> None:
    wheel = colour_wheel()
    assert len(wheel) == 55
    assert wheel[0] == (255.0, 0.0, 0.0)  # red
    assert wheel[15] == (255.0, 255.0, 0.0)  # yellow
    assert wheel[21] == (0.0, 255.0, 0.0)  # green
    assert wheel[16] == (255.0 - 42.0, 255.0, 0.0)  # 255 - floor(255 / 6)
    # a unit vector along +x is the wheel's start (red), along -x half way round: wheel[27]
    flow = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.5, 0.0]]).view(3, 2, 1, 1)
    colours = torch.cat([flow_colours(vector[None]) for vector in flow]) * 255
    assert colours[0].flatten().tolist() == [255.0, 0.0, 0.0]
    assert colours[1].flatten().tolist() == [0.0, 255.0 - 46.0, 255.0]  # 255 - floor(510 / 11)
    assert wheel[27] == (0.0, 209.0, 255.0)
    assert torch.equal(colours[2], colours[0])  # alone, a shorter vector is scaled to full
    white = flow_colours(torch.zeros(1, 2, 4, 4))
    assert torch.equal(white, torch.ones(1, 3, 4, 4))  # no motion: white


def test_flow_colours_are_each_frames_own_scale() -> None:
    flow = torch.randn(2, 2, 16, 16)
    both = flow_colours(flow * torch.tensor([1.0, 40.0]).view(2, 1, 1, 1))
    assert torch.allclose(both, torch.cat([flow_colours(f[None]) for f in flow]), atol=1 / 255)
    still = flow_colours(torch.zeros(1, 2, 8, 8))
    assert torch.equal(still, torch.ones(1, 3, 8, 8))  # no motion: white, as torchvision's


def test_a_stream_runs_both_temporal_nets(
    transform: DiffusionTransform, controlnets: list[str], controlnet6: str
) -> None:
    entries = [
        spec(controlnets[0], preprocessor=TN),
        spec(controlnet6, preprocessor=TN2, preprocessor_params={"flow_strength": 0.5}),
    ]
    stream = Stream(transform, controlnets=entries)
    ready(transform, controlnets[0], controlnet6)
    frames = camera_frames(6, seed=5)
    outputs = [stream.feed(frame) for frame in frames[:-1]]
    before = stream.state.previous_image
    outputs.append(stream.feed(frames[-1]))
    assert sum(output is not None for output in outputs) >= 3
    steps = stream.state.table.steps if stream.state.table is not None else 1
    assert latest(stream, entries[0]).shape == (1, 3, SIZE, SIZE)
    six = stream.state.controls[control_key(stream.params.controlnets[1])]
    assert six.shape == (steps, 6, SIZE, SIZE)
    assert stream.state.flow_input is not None  # the newest frame, where the next flow starts
    assert six[0:1, 3:].ne(0).any()  # a flow from the frame before
    assert torch.equal(six[0:1, :3], as_control(before))


@pytest.mark.parametrize(
    "case",
    [(True, "canny", "temporal_net_tensorrt"), (False, TN2, "3-channel")],
    ids=["six-channels-with-canny", "three-channels-with-temporalnet2"],
)
def test_a_controlnet_its_preprocessor_cannot_feed_is_refused(
    transform: DiffusionTransform,
    controlnets: list[str],
    controlnet6: str,
    case: tuple[bool, str, str],
) -> None:
    six, preprocessor, expected = case
    stream = Stream(transform)
    model_id = controlnet6 if six else controlnets[0]
    fitting = TN2 if six else TN
    good = stream.params.model_validate(
        {**stream.params.model_dump(), "controlnets": [spec(model_id, preprocessor=fitting)]}
    )
    if not six:
        transform.validate_params(good)
    bad = stream.params.model_validate(
        {
            **stream.params.model_dump(),
            "controlnets": [spec(controlnets[1]), spec(model_id, preprocessor=preprocessor)],
        }
    )
    with pytest.raises(ValidationError) as refused:
        transform.validate_params(bad)
    error = refused.value.errors()[0]
    assert error["loc"] == ("controlnets", 1, "preprocessor")
    assert expected in error["msg"]
    assert f"{6 if six else 3}-channel" in error["msg"]
