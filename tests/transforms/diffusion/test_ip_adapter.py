"""IP-Adapter (``ip_adapter`` + ``ip_adapter_style_image_url``): equal to diffusers'
``load_ip_adapter`` path on the same tiny components; per session in one UNet batch (different
images and scales, or none, which stays bit for bit today's); live changes with no recompile;
style image URLs fetched on the event loop within bounds, with 422s that say why."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from livediff.engine import Engine
from livediff.frames import Frame
from livediff.testing.ip_adapter import style_data_url as data_url
from livediff.testing.ip_adapter import style_png, write_ip_adapter
from livediff.testing.models import ModelFolders
from livediff.testing.reference import diffusers_img2img
from livediff.testing.servers import free_port, serve_app
from livediff.transforms.diffusion.ip_adapter import layer_weights
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import Stream, camera_frames, tiny_settings
from tests.transforms.diffusion.test_shapes import COMPILED, compiled_graphs

FIELD = "ip_adapter_style_image_url"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelFolders) -> dict[str, str]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model.model / "unet")
    root = tmp_path_factory.mktemp("ip-adapters")
    return {
        "fits": write_ip_adapter(root / "fits", unet, seed=1),
        "other": write_ip_adapter(root / "other", unet, seed=2, width=8),
    }


def ip_params(adapter: str, seed: int = 3, **block: Any) -> dict[str, Any]:
    return {
        "ip_adapter": {"ipadapter_model_path": adapter, **block},
        FIELD: data_url(seed),
    }


def ready(transform: DiffusionTransform, adapter: str) -> None:
    """Resolve nothing, just wait until the pool has loaded ``adapter`` (background)."""
    pool = transform._unet_batch().ip_adapters
    assert pool is not None and pool.refusal(adapter) is None
    deadline = time.monotonic() + 60
    while pool.get(adapter) is None:
        assert time.monotonic() < deadline, "the IP-Adapter never loaded"
        time.sleep(0.02)


def stream_with(transform: DiffusionTransform, **params: Any) -> Stream:
    """A session whose style image is fetched (the engine's resolve step) before its frames."""
    stream = Stream(transform, **params)
    asyncio.run(transform.resolve_params(stream.params))
    if stream.params.ip_adapter.enabled:
        ready(transform, stream.params.ip_adapter.ipadapter_model_path)
    return stream


@pytest.fixture
def transform(make_transform: Callable[..., DiffusionTransform]) -> DiffusionTransform:
    return make_transform()


# -- equivalence ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("cfg_type", "guidance"), [("none", 1.0), ("full", 3.0)])
def test_one_step_equals_diffusers_load_ip_adapter(
    transform: DiffusionTransform,
    adapters: dict[str, str],
    tiny_model: ModelFolders,
    cfg_type: str,
    guidance: float,
) -> None:
    from diffusers import UNet2DConditionModel

    image = camera_frames(1)[0]
    common = {"prompt": "a fox", "negative_prompt": "blurry", "seed": 7, "strength": 0.5}
    stream = stream_with(
        transform,
        **common,
        cfg_type=cfg_type,
        guidance_scale=guidance,
        **ip_params(adapters["fits"], scale=0.7),
    )
    ours = stream.feed(image)

    bundle = transform._unet_batch().bundle
    fresh = UNet2DConditionModel.from_pretrained(tiny_model.model / "unet")  # not converted
    pipe = diffusers_img2img(dataclasses.replace(bundle, unet=fresh, eager_unet=None))
    pipe.load_ip_adapter(adapters["fits"], subfolder="models", weight_name="ip-adapter_sd15.bin")
    pipe.set_ip_adapter_scale(0.7)
    reference = pipe(
        prompt="a fox",
        negative_prompt="blurry",
        image=torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
        ip_adapter_image=PILImage.open(io.BytesIO(style_png(3))),
        num_inference_steps=2,
        strength=0.5,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images.permute(0, 2, 3, 1)
    plain = Stream(transform, **common, cfg_type=cfg_type, guidance_scale=guidance).feed(image)

    assert not torch.allclose(ours, plain, atol=1e-3)  # the style image does act
    torch.testing.assert_close(ours, reference, atol=5e-5, rtol=0)


def test_one_step_on_sdxl_equals_diffusers_load_ip_adapter(
    tiny_sdxl: ModelFolders, tmp_path: Path
) -> None:
    from diffusers import UNet2DConditionModel

    from livediff.testing.reference import diffusers_sdxl_img2img

    transform = DiffusionTransform(tiny_settings(tiny_sdxl))
    transform.load()
    try:
        fresh = UNet2DConditionModel.from_pretrained(tiny_sdxl.model / "unet")  # not converted
        adapter = write_ip_adapter(tmp_path / "sdxl-adapter", fresh, seed=4)
        image = camera_frames(1)[0]
        common = {"prompt": "a fox", "negative_prompt": "blurry", "seed": 7, "strength": 0.5}
        stream = stream_with(
            transform,
            **common,
            cfg_type="full",
            guidance_scale=3.0,
            **ip_params(adapter, scale=0.6),
        )
        ours = stream.feed(image)
        bundle = transform._unet_batch().bundle
        pipe = diffusers_sdxl_img2img(dataclasses.replace(bundle, unet=fresh, eager_unet=None))
        pipe.load_ip_adapter(adapter, subfolder="sdxl_models", weight_name="ip-adapter_sdxl.bin")
        pipe.set_ip_adapter_scale(0.6)
        reference = pipe(
            prompt="a fox",
            negative_prompt="blurry",
            image=torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
            ip_adapter_image=PILImage.open(io.BytesIO(style_png(3))),
            num_inference_steps=2,
            strength=0.5,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(7),
            output_type="pt",
        ).images.permute(0, 2, 3, 1)
    finally:
        transform.close()
    torch.testing.assert_close(ours, reference, atol=5e-5, rtol=0)


# -- per session in one batch --------------------------------------------------------------------
def together(transform: DiffusionTransform, streams: list[Stream], image: Any) -> list[Any]:
    return transform.process([stream.job(image) for stream in streams])


def test_two_sessions_with_different_images_and_scales_equal_each_alone(
    transform: DiffusionTransform, adapters: dict[str, str]
) -> None:
    image = camera_frames(1, seed=2)[0]
    first = {"seed": 1, **ip_params(adapters["fits"], seed=3, scale=0.8)}
    second = {"seed": 2, **ip_params(adapters["fits"], seed=4, scale=1.6, weight_type="weak input")}
    batched = together(
        transform, [stream_with(transform, **first), stream_with(transform, **second)], image
    )
    alone = [stream_with(transform, **values).feed(image) for values in (first, second)]
    for got, wanted in zip(batched, alone, strict=True):
        torch.testing.assert_close(got, wanted, atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_a_session_without_it_in_the_same_batch_is_todays_output_bit_for_bit(
    transform: DiffusionTransform, adapters: dict[str, str]
) -> None:
    image = camera_frames(1, seed=3)[0]
    plain = {"seed": 5, "prompt": "a harbour"}
    with_ip = together(
        transform,
        [
            stream_with(transform, seed=1, **ip_params(adapters["fits"])),
            stream_with(transform, **plain),
        ],
        image,
    )
    today = together(
        transform, [stream_with(transform, seed=1), stream_with(transform, **plain)], image
    )
    assert torch.equal(with_ip[1], today[1])
    assert not torch.allclose(with_ip[0], today[0], atol=1e-3)


# -- live changes --------------------------------------------------------------------------------
def test_scale_weight_type_and_image_change_live_encoding_once_and_never_compiling(
    make_transform: Callable[..., DiffusionTransform],
    adapters: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from livediff.transforms.diffusion import ip_adapter

    transform = make_transform(**COMPILED)
    graphs = compiled_graphs()
    encodes: list[int] = []
    encode = ip_adapter.IPAdapterWeights.encode
    monkeypatch.setattr(
        ip_adapter.IPAdapterWeights,
        "encode",
        lambda self, image: encodes.append(1) or encode(self, image),
    )
    image = camera_frames(1, seed=4)[0]
    stream = stream_with(transform, seed=3, **ip_params(adapters["fits"]))
    outputs = [stream.feed(image) for _ in range(2)]
    assert torch.equal(outputs[0], outputs[1]) and len(encodes) == 1  # once per image
    for change in ({"scale": 0.3}, {"scale": 0.3, "weight_type": "weak input"}, {"enabled": False}):
        stream.update(ip_adapter={"ipadapter_model_path": adapters["fits"], **change})
        outputs.append(stream.feed(image))
        assert not torch.allclose(outputs[-1], outputs[-2], atol=1e-4), change
    stream.update(**ip_params(adapters["fits"], seed=9))
    asyncio.run(transform.resolve_params(stream.params))
    outputs.append(stream.feed(image))
    assert len(encodes) == 2 and not torch.allclose(outputs[-1], outputs[0], atol=1e-4)
    assert compiled_graphs() == graphs, "an IP-Adapter change compiled"


def test_weight_types_map_to_comfyui_blocks(transform: DiffusionTransform) -> None:
    switch = transform._unet_batch().ip_switch
    # tiny: down_blocks.0 (1 transformer), mid (1), up_blocks.1 (2): input 0, middle 1, output 2-3
    assert layer_weights("linear", switch, sdxl=False) == (1.0,) * switch.layers
    weak_input = layer_weights("weak input", switch, sdxl=False)
    assert [w for w, kind in zip(weak_input, switch.kinds, strict=True) if kind == "input"] == [0.2]
    assert layer_weights("composition", switch, sdxl=False) == (0.0,) * switch.layers
    ease = layer_weights("ease in", switch, sdxl=False)
    assert ease[0] == 1.0 and min(ease) == pytest.approx(0.05 + 0.95 * 0.25)


# -- refusals ------------------------------------------------------------------------------------
def only_loc(refused: pytest.ExceptionInfo[ValidationError]) -> tuple[str | int, ...]:
    errors = refused.value.errors()
    assert len(errors) == 1
    return tuple(errors[0]["loc"])


def test_an_unknown_type_and_another_family_are_422s(
    transform: DiffusionTransform, adapters: dict[str, str]
) -> None:
    with pytest.raises(ValidationError) as refused:
        DiffusionParams(ip_adapter={"type": "plus"})
    assert only_loc(refused) == ("ip_adapter", "type")
    other = DiffusionParams.model_validate(ip_params(adapters["other"]))
    with pytest.raises(ValidationError, match=r"SD 1\.5 family") as refused:
        transform.validate_params(other)
    assert only_loc(refused) == ("ip_adapter",)
    assert DiffusionParams().ip_adapter.enabled is False  # absent block: off, as Livepeer
    assert DiffusionParams(ip_adapter=None).ip_adapter.enabled is False


def image_server() -> Starlette:
    async def ok(_: Request) -> Response:
        return Response(style_png(6), media_type="image/png")

    async def big(_: Request) -> Response:
        return Response(b"\x89PNG" + bytes(5000), media_type="image/png")

    async def text(_: Request) -> Response:
        return Response(b"hello, not an image", media_type="image/png")

    async def moved(_: Request) -> Response:
        return RedirectResponse("/ok.png")

    routes = [("/ok.png", ok), ("/big.png", big), ("/text.png", text), ("/moved.png", moved)]
    return Starlette(routes=[Route(path, handler) for path, handler in routes])


@pytest.fixture(scope="module")
def images_url() -> Iterator[str]:
    server = serve_app(image_server(), name="style-images", lifespan="off")
    yield server.url
    server.stop()


@pytest.mark.parametrize(
    ("path", "private", "reason"),
    [
        ("/big.png", True, "too big"),
        ("/text.png", True, "not an image"),
        ("/moved.png", True, "unreachable"),
        ("/ok.png", False, "private address"),
        ("unreachable", True, "unreachable"),
    ],
)
async def test_a_bad_style_image_url_is_a_422_on_the_field(
    tiny_model: ModelFolders, images_url: str, path: str, private: bool, reason: str
) -> None:
    settings = tiny_settings(
        tiny_model, style_image_max_bytes=2000, style_image_allow_private=private
    )
    transform = DiffusionTransform(settings)  # not loaded: resolving needs no model
    url = f"http://127.0.0.1:{free_port()}/x.png" if path == "unreachable" else images_url + path
    params = DiffusionParams.model_validate({"ip_adapter": {}, FIELD: url})
    with pytest.raises(ValidationError, match=reason) as refused:
        await transform.resolve_params(params)
    assert only_loc(refused) == (FIELD,)
    assert transform.style_images.get(url) is None


async def test_a_style_image_is_fetched_once_and_decoded(
    tiny_model: ModelFolders, images_url: str
) -> None:
    transform = DiffusionTransform(tiny_settings(tiny_model, style_image_allow_private=True))
    params = DiffusionParams.model_validate({"ip_adapter": {}, FIELD: images_url + "/ok.png"})
    await transform.resolve_params(params)
    image = transform.style_images.get(images_url + "/ok.png")
    assert image is not None and image.size == (48, 40) and image.mode == "RGB"
    bad = DiffusionParams.model_validate({"ip_adapter": {}, FIELD: "data:text/plain;base64,aGk="})
    with pytest.raises(ValidationError, match="not an image"):
        await transform.resolve_params(bad)


# -- served by the engine: a refusal leaves the session and its frames as they were --------------
@asynccontextmanager
async def ip_engine(tiny_model: ModelFolders, adapter: str) -> AsyncIterator[Engine]:
    settings = tiny_settings(
        tiny_model, warmup_frames=2, ip_adapter_model=adapter, style_image_allow_private=True
    )
    engine = Engine(settings, DiffusionTransform(settings))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def roundtrip(engine: Engine, session_id: str, image: np.ndarray, pts: int) -> torch.Tensor:
    session = engine.get(session_id)
    slot = session.subscribe(asyncio.get_running_loop())
    try:
        session.submit(Frame(image, pts=pts))
        frame = await asyncio.wait_for(slot.get(), 60)
    finally:
        session.unsubscribe(slot)
    assert isinstance(frame.image, torch.Tensor)
    return frame.image


async def test_through_the_engine_a_refused_url_keeps_the_session_and_a_new_image_applies(
    tiny_model: ModelFolders, adapters: dict[str, str], images_url: str
) -> None:
    async with ip_engine(tiny_model, adapters["fits"]) as engine:
        transform = engine.transform
        assert isinstance(transform, DiffusionTransform)
        image = camera_frames(1, seed=6)[0]
        block = {"ipadapter_model_path": adapters["fits"]}
        session = await engine.open_session(
            engine.validate({"ip_adapter": block, FIELD: data_url(3)})
        )
        await asyncio.to_thread(ready, transform, adapters["fits"])
        first = await roundtrip(engine, session.id, image, 0)
        before = session.params
        with pytest.raises(ValidationError, match="not an image") as refused:
            await engine.update_params(session.id, {FIELD: images_url + "/text.png"})
        assert only_loc(refused) == (FIELD,)
        assert session.params == before and engine.health() == "OK"
        assert torch.equal(await roundtrip(engine, session.id, image, 1), first)
        await engine.update_params(session.id, {FIELD: images_url + "/ok.png"})
        assert not torch.allclose(await roundtrip(engine, session.id, image, 2), first, atol=1e-4)
