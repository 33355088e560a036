"""LoRAs (``lora_dict``, ``use_lcm_lora``): diffusers' output at each weight, live weight
changes with no reload, one set per model, refusals naming the entry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from livediff.engine import Engine, ModelInUseError, Session
from livediff.frames import Frame
from livediff.testing.lora import write_lora
from livediff.testing.models import TINY_UNET, ModelFolders
from livediff.testing.reference import diffusers_img2img
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import Stream, camera_frames, tiny_settings

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A LoRA for the tiny UNet (a folder), the same as a file, and one of another family (its
    cross-attention takes 32 features, the tiny UNet's 16: an SDXL LoRA on SD 1.5 in small)."""
    root = tmp_path_factory.mktemp("loras")
    folder = write_lora(root / "style", TINY_UNET, seed=1)
    other = write_lora(root / "other", {**TINY_UNET, "cross_attention_dim": 32}, seed=2)
    return {
        "style": str(folder),
        "file": str(folder / "pytorch_lora_weights.safetensors"),
        "other": str(other),
    }


def wait_ready(transform: DiffusionTransform, *lora_ids: str) -> None:
    """Wait until the pool has read the LoRAs (they load in the background)."""
    pool = transform.lora_pool()
    deadline = time.monotonic() + 60
    while not all(pool.ready(lora_id) for lora_id in lora_ids):
        assert time.monotonic() < deadline, "the LoRAs never loaded"
        time.sleep(0.01)


def accept(stream: Stream, **patch: Any) -> None:
    """Update the stream's params as the engine does (validate, then wait for the loads)."""
    stream.update(**patch)
    stream.transform.validate_params(stream.params)
    wait_ready(stream.transform, *(lora_id for lora_id, _ in stream.params.loras()))


def reference(transform: DiffusionTransform, image: np.ndarray, lora: str, weight: float) -> Any:
    """diffusers' img2img with the LoRA as a peft adapter at ``weight``, one step at t=499."""
    pipe = diffusers_img2img(transform._unet_batch().bundle)
    if "style" not in pipe.get_list_adapters().get("unet", []):
        pipe.load_lora_weights(lora, adapter_name="style")
    pipe.set_adapters(["style"], [weight])
    return pipe(
        prompt=PROMPT,
        image=torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
        num_inference_steps=2,
        strength=0.5,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images.permute(0, 2, 3, 1)


def test_a_lora_at_two_weights_equals_diffusers_adapters(
    make_transform: Callable[..., DiffusionTransform], loras: dict[str, str]
) -> None:
    ours, theirs = make_transform(), make_transform()  # the same tiny components, twice
    image = camera_frames(1)[0]
    stream = Stream(ours, prompt=PROMPT, seed=7, strength=0.5, cfg_type="none")
    plain = stream.feed(image)
    for weight in (0.6, 1.7):
        accept(stream, lora_dict={loras["style"]: weight})
        fused = stream.feed(image)
        expected = reference(theirs, image, loras["style"], weight)
        assert not torch.allclose(fused, plain, atol=1e-3)  # the LoRA does change the picture
        torch.testing.assert_close(fused, expected, atol=5e-5, rtol=0)


def test_null_or_empty_lora_dict_gives_todays_output_exactly(
    make_transform: Callable[..., DiffusionTransform], loras: dict[str, str]
) -> None:
    transform = make_transform()
    image = camera_frames(1, seed=3)[0]
    stream = Stream(transform, prompt=PROMPT, seed=3)
    today = stream.feed(image)
    accept(stream, lora_dict={loras["file"]: 1.0})  # a file path works as well as a folder
    assert not torch.allclose(stream.feed(image), today, atol=1e-3)
    for off in (None, {}, {loras["file"]: 0.0}):
        accept(stream, lora_dict=off)
        assert torch.equal(stream.feed(image), today), off
    assert transform.lora_pool().applied == ((loras["file"], 0.0),)


def test_use_lcm_lora_adds_lcm_lora_id_at_weight_one() -> None:
    params = DiffusionParams(use_lcm_lora=True, lcm_lora_id="./lcm", lora_dict={"./a": 0.5})
    assert params.loras() == (("./a", 0.5), ("./lcm", 1.0))
    assert DiffusionParams().loras() == ()
    assert DiffusionTransform.model_ids(params)[("lora_dict", "./a")] == "./a"
    asking = DiffusionParams(use_lcm_lora=True)
    assert DiffusionTransform.model_ids(asking)[("lcm_lora_id",)] == (
        "latent-consistency/lcm-lora-sdv1-5"
    )
    assert ("lcm_lora_id",) not in DiffusionTransform.model_ids(DiffusionParams())  # unused


@pytest.mark.parametrize(
    ("lora_dict", "loc"),
    [
        ({"./a": 5.5}, ("lora_dict", "./a")),
        ({f"./l{index}": 1.0 for index in range(9)}, ("lora_dict",)),
    ],
    ids=["weight-out-of-range", "too-many"],
)
def test_lora_dict_is_bounded(lora_dict: dict[str, float], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as refused:
        DiffusionParams(lora_dict=lora_dict)
    assert refused.value.errors()[0]["loc"] == loc


# -- served by the engine ------------------------------------------------------------------------
@asynccontextmanager
async def lora_engine(tiny_model: ModelFolders, *allowed: str) -> AsyncIterator[Engine]:
    settings = tiny_settings(tiny_model, warmup_frames=2, allow_models=list(allowed))
    engine = Engine(settings, DiffusionTransform(settings))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def roundtrip(session: Session, image: np.ndarray, pts: int) -> torch.Tensor:
    slot = session.subscribe(asyncio.get_running_loop())
    try:
        session.submit(Frame(image, pts=pts))
        frame = await asyncio.wait_for(slot.get(), 60)
    finally:
        session.unsubscribe(slot)
    assert isinstance(frame.image, torch.Tensor)
    return frame.image


def loads(engine: Engine) -> float:
    return float(engine.metrics.registry.get_sample_value("livediff_model_loads_total") or 0)


async def open_with_lora(engine: Engine, lora: str, weight: float) -> Session:
    session = await engine.open_session(engine.validate({"lora_dict": {lora: weight}}))
    transform = engine.transform
    assert isinstance(transform, DiffusionTransform)
    await asyncio.to_thread(wait_ready, transform, lora)
    return session


async def test_a_weight_change_applies_live_with_no_reload_and_one_set_per_model(
    tiny_model: ModelFolders, loras: dict[str, str]
) -> None:
    style = loras["style"]
    async with lora_engine(tiny_model, style) as engine:
        transform = engine.transform
        assert isinstance(transform, DiffusionTransform)
        unet_batch, image = transform.unet_batch, camera_frames(1, seed=5)[0]
        first = await open_with_lora(engine, style, 0.5)
        half = await roundtrip(first, image, 0)
        await engine.update_params(first.id, {"lora_dict": {style: 1.5}})
        stronger = await roundtrip(first, image, 1)
        assert not torch.allclose(stronger, half, atol=1e-3)  # applied on the next frame
        await engine.update_params(first.id, {"lora_dict": {style: 0.5}})
        assert torch.equal(await roundtrip(first, image, 2), half)  # back exactly

        with pytest.raises(ModelInUseError, match="LoRAs"):  # another set while others run
            await engine.open_session(engine.validate({}))
        second = await engine.open_session(engine.validate({"lora_dict": {style: 0.5}}))
        with pytest.raises(ModelInUseError, match="1 other session"):
            await engine.update_params(first.id, {"lora_dict": {style: 1.0}})
        assert torch.equal(await roundtrip(second, image, 0), half)
        await engine.close_session(second.id, "done")
        await engine.update_params(first.id, {"lora_dict": None})  # alone again: allowed
        assert not torch.equal(await roundtrip(first, image, 3), half)

        assert loads(engine) == 1 and transform.unet_batch is unet_batch  # never reloaded
        refused = engine.metrics.registry.get_sample_value("livediff_reloads_refused_total")
        assert refused == 2


async def test_a_lora_of_another_family_or_missing_is_a_422_on_its_entry_and_frames_go_on(
    tiny_model: ModelFolders,
    loras: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    style, other, missing = loras["style"], loras["other"], str(tmp_path / "no-such-lora")
    offline = "someone/not-downloaded-lora"
    async with lora_engine(tiny_model, style, other, missing, offline) as engine:
        session = await open_with_lora(engine, style, 1.0)
        image = camera_frames(1, seed=6)[0]
        before = await roundtrip(session, image, 0)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        cases = [
            (other, "another model family: it changes down_blocks.0.attentions.0"),
            (missing, "neither a file, a folder nor a hub id"),
            (offline, "fetch it first with: livediff prepare-models --lora " + offline),
            ("not/allowed-lora", "not an allowed model"),
        ]
        for lora, reason in cases:
            with pytest.raises(ValidationError) as refused:
                await engine.update_params(session.id, {"lora_dict": {style: 1.0, lora: 0.5}})
            error = refused.value.errors()[0]
            assert error["loc"] == ("lora_dict", lora), error
            assert reason in error["msg"], error["msg"]
        assert session.params.lora_dict == {style: 1.0}  # the session keeps its LoRAs
        assert torch.equal(await roundtrip(session, image, 1), before)  # and frames flow
