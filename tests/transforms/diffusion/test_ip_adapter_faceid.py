"""IP-Adapter FaceID (``ip_adapter.type: "faceid"``): the face model's steps (detection,
alignment, embedding) on tiny random onnx models in buffalo_l's shapes; one step equal to
diffusers' FaceID path (``load_ip_adapter(..., image_encoder_folder=None)`` with the face
embedding as ``ip_adapter_image_embeds``); per session in one batch; 422s for a picture without
a face and for an adapter of the plain kind."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from pydantic import ValidationError

from livediff.testing.ip_adapter import write_ip_adapter
from livediff.testing.models import ModelFolders
from livediff.testing.reference import diffusers_img2img
from livediff.transforms.diffusion.ip_adapter_faceid import (
    ARCFACE_TEMPLATE,
    FaceModel,
    align,
    similarity,
)
from livediff.transforms.diffusion.ip_adapter_params import FACE_MODEL_REPO, FACEID_REPO
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import Stream, camera_frames

FIELD = "ip_adapter_style_image_url"
#: The tiny detector's fixed input side (buffalo_l's is dynamic, fed 640).
DET_SIDE = 160


# -- tiny random models in buffalo_l's and h94's shapes -------------------------------------------
class TinyDetector(torch.nn.Module):
    """SCRFD's interface: (1, 3, H, W) -> per stride 8, 16, 32: scores (N, 1), boxes (N, 4),
    landmarks (N, 10), N = cells x 2 anchors. A cell scores high where the picture is bright;
    the landmarks sit at fixed offsets (ArcFace's template, 4 strides wide)."""

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores, boxes, points = [], [], []
        offsets = torch.tensor((ARCFACE_TEMPLATE / 112 * 4).reshape(1, 10), dtype=torch.float32)
        for stride in (8, 16, 32):
            bright = torch.nn.functional.avg_pool2d(pixels, stride).mean(1, keepdim=True)
            logits = torch.cat([bright, bright * 0.9], 1) * 20 - 6
            score = torch.sigmoid(logits).permute(0, 2, 3, 1).reshape(-1, 1)
            scores.append(score)
            boxes.append(score * 0 + torch.ones(1, 4))
            points.append(score * 0 + offsets)
        return (*scores, *boxes, *points)


class TinyArcFace(torch.nn.Module):
    """ArcFace's interface: (1, 3, 112, 112) -> (1, 512)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.head = torch.nn.Linear(4 * 14 * 14, 512)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(face)).flatten(1))  # type: ignore[no-any-return]


def write_face_model(folder: Path) -> Path:
    """det_10g.onnx and w600k_r50.onnx: the tiny models, exported (legacy exporter)."""
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    detector = torch.zeros(1, 3, DET_SIDE, DET_SIDE)
    torch.onnx.export(TinyDetector(), (detector,), str(folder / "det_10g.onnx"), dynamo=False)
    face = torch.zeros(1, 3, 112, 112)
    torch.onnx.export(TinyArcFace(), (face,), str(folder / "w600k_r50.onnx"), dynamo=False)
    return folder


def write_faceid_adapter(folder: Path, unet: Any, *, seed: int) -> str:
    """A random FaceID adapter in h94's layout: ``ip-adapter-faceid_sd15.bin`` at the root,
    ``image_proj`` h94's MLPProjModel (512 -> 1024 -> 4 x width, LayerNorm)."""
    torch.manual_seed(seed)
    width = int(unet.config.cross_attention_dim)
    image_proj = {
        "proj.0.weight": torch.randn(1024, 512) * 0.1,
        "proj.0.bias": torch.randn(1024) * 0.1,
        "proj.2.weight": torch.randn(4 * width, 1024) * 0.1,
        "proj.2.bias": torch.randn(4 * width) * 0.1,
        "norm.weight": 1 + torch.randn(width) * 0.1,
        "norm.bias": torch.randn(width) * 0.1,
    }
    layers: dict[str, torch.Tensor] = {}
    names = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for index, name in enumerate(names):
        out = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
        for part in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * index + 1}.{part}.weight"] = torch.randn(out, width) * 0.5
    folder.mkdir(parents=True)
    torch.save(
        {"image_proj": image_proj, "ip_adapter": layers}, folder / "ip-adapter-faceid_sd15.bin"
    )
    return str(folder)


def face_png(seed: int, *, face: bool = True) -> bytes:
    """A dark picture (64 x 80) with, when ``face``, a bright textured square (the tiny
    detector's face) whose texture the seed picks."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 40, (64, 80, 3), dtype=np.uint8)
    if face:
        pixels[12:52, 20:60] = rng.integers(170, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def face_url(seed: int, *, face: bool = True) -> str:
    return "data:image/png;base64," + base64.b64encode(face_png(seed, face=face)).decode()


def picture(seed: int, *, face: bool = True) -> PILImage.Image:
    return PILImage.open(io.BytesIO(face_png(seed, face=face))).convert("RGB")


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def face_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_face_model(tmp_path_factory.mktemp("face") / "buffalo_l")


@pytest.fixture(scope="module")
def faceid(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelFolders) -> dict[str, str]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model.model / "unet")
    root = tmp_path_factory.mktemp("faceid")
    plain = Path(write_ip_adapter(root / "plain", unet, seed=12))
    disguised = root / "disguised"  # a plain adapter under FaceID's name
    disguised.mkdir()
    (disguised / "ip-adapter-faceid_sd15.bin").write_bytes(
        (plain / "models" / "ip-adapter_sd15.bin").read_bytes()
    )
    return {
        "faceid": write_faceid_adapter(root / "faceid", unet, seed=11),
        "plain": str(plain),
        "disguised": str(disguised),
    }


@pytest.fixture
def transform(
    make_transform: Callable[..., DiffusionTransform],
    face_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> DiffusionTransform:
    monkeypatch.setattr(DiffusionTransform, "_locate_face_model", lambda _self: face_dir)
    return make_transform()


def faceid_params(
    adapter: str, seed: int = 3, *, face: bool = True, **block: Any
) -> dict[str, Any]:
    return {
        "ip_adapter": {"type": "faceid", "ipadapter_model_path": adapter, **block},
        FIELD: face_url(seed, face=face),
    }


def faceid_stream(transform: DiffusionTransform, **params: Any) -> Stream:
    """A session as the engine opens one: style image fetched, params validated (the face
    model loads, the face is found), then the adapter's background load awaited."""
    stream = Stream(transform, **params)
    asyncio.run(transform.resolve_params(stream.params))
    transform.validate_params(stream.params)
    pool = transform._unet_batch().ip_adapters
    assert pool is not None
    deadline = time.monotonic() + 60
    while pool.get(stream.params.ip_adapter.ipadapter_model_path) is None:
        assert time.monotonic() < deadline, "the FaceID adapter never loaded"
        time.sleep(0.02)
    return stream


# -- the face model -------------------------------------------------------------------------------
def test_the_face_model_finds_aligns_and_embeds_a_face_once(face_dir: Path) -> None:
    model = FaceModel(face_dir)
    first, again = model.embed(picture(1)), model.embed(picture(1))
    other = model.embed(picture(2))
    assert first is not None and other is not None and first.shape == (512,)
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-5)
    assert again is first  # cached by the picture's content: embedded once
    assert not np.allclose(first, other, atol=1e-3)  # another face, another embedding
    assert model.embed(picture(1, face=False)) is None
    landmarks = model.landmarks(np.asarray(picture(1)))
    assert landmarks is not None
    x, y = landmarks.mean(axis=0)
    assert 20 <= x <= 60 and 12 <= y <= 52  # on the bright square, in the picture's pixels


def test_alignment_is_the_similarity_onto_arcfaces_template() -> None:
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = ARCFACE_TEMPLATE @ (scale * rotation).T + shift
    matrix = similarity(moved, ARCFACE_TEMPLATE)
    back = moved @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(back, ARCFACE_TEMPLATE, atol=1e-9)
    # the template's own landmarks on a picture: the crop is that picture's 112 x 112 corner
    rgb = np.random.default_rng(0).integers(0, 256, (150, 130, 3), dtype=np.uint8)
    crop = align(rgb, ARCFACE_TEMPLATE.copy())
    np.testing.assert_allclose(crop[1:-1, 1:-1], rgb[1:111, 1:111], atol=1)


# -- equivalence ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("cfg_type", "guidance"), [("none", 1.0), ("full", 3.0)])
def test_one_step_equals_diffusers_faceid(
    transform: DiffusionTransform,
    faceid: dict[str, str],
    tiny_model: ModelFolders,
    cfg_type: str,
    guidance: float,
) -> None:
    from diffusers import UNet2DConditionModel

    image = camera_frames(1)[0]
    common = {"prompt": "a fox", "negative_prompt": "blurry", "seed": 7, "strength": 0.5}
    settings = {"cfg_type": cfg_type, "guidance_scale": guidance}
    stream = faceid_stream(
        transform, **common, **settings, **faceid_params(faceid["faceid"], scale=0.7)
    )
    ours = stream.feed(image)

    pool = transform._unet_batch().ip_adapters
    assert pool is not None
    embedding = pool.face_model().embed(picture(3))
    assert embedding is not None
    embeds = torch.from_numpy(embedding).view(1, 1, 1, 512)
    if guidance > 1:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
    bundle = transform._unet_batch().bundle
    fresh = UNet2DConditionModel.from_pretrained(tiny_model.model / "unet")  # not converted
    pipe = diffusers_img2img(dataclasses.replace(bundle, unet=fresh, eager_unet=None))
    pipe.load_ip_adapter(
        faceid["faceid"],
        subfolder="",
        weight_name="ip-adapter-faceid_sd15.bin",
        image_encoder_folder=None,
    )
    pipe.set_ip_adapter_scale(0.7)
    reference = pipe(
        prompt="a fox",
        negative_prompt="blurry",
        image=torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
        ip_adapter_image_embeds=[embeds],
        num_inference_steps=2,
        strength=0.5,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images.permute(0, 2, 3, 1)
    plain = Stream(transform, **common, **settings).feed(image)

    assert not torch.allclose(ours, plain, atol=1e-3)  # the face does act
    torch.testing.assert_close(ours, reference, atol=5e-5, rtol=0)


# -- per session in one batch ---------------------------------------------------------------------
def test_two_sessions_with_different_faces_in_one_batch_equal_each_alone(
    transform: DiffusionTransform, faceid: dict[str, str]
) -> None:
    image = camera_frames(1, seed=2)[0]
    first = {"seed": 1, **faceid_params(faceid["faceid"], seed=3, scale=0.8)}
    second = {"seed": 1, **faceid_params(faceid["faceid"], seed=4, scale=0.8)}
    streams = [faceid_stream(transform, **values) for values in (first, second)]
    batched = transform.process([stream.job(image) for stream in streams])
    alone = [faceid_stream(transform, **values).feed(image) for values in (first, second)]
    for got, wanted in zip(batched, alone, strict=True):
        torch.testing.assert_close(got, wanted, atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # same seed, other face


# -- refusals -------------------------------------------------------------------------------------
def only_loc(refused: pytest.ExceptionInfo[ValidationError]) -> tuple[str | int, ...]:
    errors = refused.value.errors()
    assert len(errors) == 1
    return tuple(errors[0]["loc"])


def test_a_picture_without_a_face_is_a_422_on_the_style_image(
    transform: DiffusionTransform, faceid: dict[str, str]
) -> None:
    params = DiffusionParams.model_validate(faceid_params(faceid["faceid"], face=False))
    asyncio.run(transform.resolve_params(params))
    with pytest.raises(ValidationError, match="no face in the style image") as refused:
        transform.validate_params(params)
    assert only_loc(refused) == (FIELD,)
    fine = DiffusionParams.model_validate(faceid_params(faceid["faceid"]))
    asyncio.run(transform.resolve_params(fine))
    transform.validate_params(fine)  # a face: accepted


def test_a_plain_adapter_as_faceid_is_a_422_and_the_default_repo_is_h94s_faceid(
    transform: DiffusionTransform, faceid: dict[str, str]
) -> None:
    for name, reason in (
        ("plain", "has no ip-adapter-faceid_sd15.bin"),
        ("disguised", "not an IP-Adapter FaceID"),
    ):
        params = DiffusionParams.model_validate(faceid_params(faceid[name]))
        with pytest.raises(ValidationError, match=reason) as refused:
            transform.validate_params(params)
        assert only_loc(refused) == ("ip_adapter",)
    default = DiffusionParams.model_validate({"ip_adapter": {"type": "faceid"}})
    assert default.ip_adapter.ipadapter_model_path == FACEID_REPO
    ids = DiffusionTransform.model_ids(default)
    assert ids[("ip_adapter", "ipadapter_model_path")] == FACEID_REPO
    assert ids[("ip_adapter", "type")] == FACE_MODEL_REPO  # on the allow-list
    regular = DiffusionParams.model_validate({"ip_adapter": {"type": "regular"}})
    assert ("ip_adapter", "type") not in DiffusionTransform.model_ids(regular)
