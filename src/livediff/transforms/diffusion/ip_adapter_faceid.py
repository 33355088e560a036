"""IP-Adapter FaceID (``ip_adapter.type: "faceid"``): the face in the style image steers every
frame, as Livepeer's StreamDiffusion offers it (h94/IP-Adapter-FaceID with insightface's
buffalo_l).

The face embedding (once per style image, never per frame; cached by the picture's content):
- detection: buffalo_l's SCRFD (``det_10g.onnx``): the picture letterboxed into 640 x 640
  (top-left, black padding), ``(rgb - 127.5) / 128``; per stride 8, 16, 32 a score, a box and
  five landmarks (eyes, nose, mouth corners) per anchor (2 per cell), offsets in strides from
  the cell's corner; the face is the highest score at or above 0.5 (insightface's ``faces[0]``);
- alignment: the similarity transform (Umeyama, as scikit-image's ``SimilarityTransform``) of
  the five landmarks onto ArcFace's 112 x 112 template, bilinear (as ``face_align.norm_crop``);
- embedding: buffalo_l's ArcFace (``w600k_r50.onnx``) on ``(rgb - 127.5) / 127.5``, 512 wide,
  L2-normalised (insightface's ``normed_embedding``, what h94's FaceID was trained on).
No face at or above the threshold is a 422 on ``ip_adapter_style_image_url``.

Library: onnxruntime directly, not the ``insightface`` package. ``insightface`` installs here
(a wheel, no compiler), but it pulls opencv-python, scikit-image, scipy and onnx, and its
``FaceAnalysis`` loads every model of a pack from ``~/.insightface`` (downloading from GitHub);
livediff needs two of buffalo_l's five models and ~100 lines of numpy and PIL for the rest, and
finds them like its other models (``models.locate_face_model``: a folder, or the hub mirror
``public-data/insightface``'s ``models/buffalo_l/``, so ``HF_HUB_OFFLINE`` and ``model_dir`` hold).
onnxruntime runs the face model on CUDA when ``onnxruntime-gpu`` provides it (ai-runner's
image), else on the CPU (once per style image: a few tens of milliseconds).

The adapter (``ip-adapter-faceid_sd15.bin`` / ``ip-adapter-faceid_sdxl.bin``): ``image_proj`` is
h94's ``MLPProjModel`` (diffusers' ``IPAdapterFaceIDImageProjection``): ``proj.0`` Linear
512 -> 1024, GELU, ``proj.2`` Linear 1024 -> 4 x cross_attention_dim, reshape to 4 tokens,
``norm`` LayerNorm; the per-layer ``to_k_ip`` / ``to_v_ip`` and the attention path are the plain
adapter's (:mod:`.ip_adapter`: per-row scales, weight types, one UNet call). Guidance rows
attend to the projection of a zero embedding (diffusers' FaceID negative embeds). The FaceID
LoRA h94 recommends (``ip-adapter-faceid_sd15_lora.safetensors``) is not applied: a session that
wants it names it in ``lora_dict`` (one LoRA set serves every session).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livediff.transforms.diffusion.ip_adapter import (
    AdapterState,
    IPAdapterWeights,
    layers_misfit,
)

logger = logging.getLogger(__name__)

#: ArcFace's input side and its five-landmark template (insightface's ``arcface_dst``).
FACE_SIZE = 112
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
#: The detector's input side (insightface's default det_size) and score threshold.
DET_SIZE = 640
DET_THRESHOLD = 0.5
STRIDES = (8, 16, 32)
#: The face embedding's width (ArcFace r50).
FACE_EMBED = 512
#: Face embeddings kept (by picture content).
CACHE = 16
#: The face model's files in its folder.
DETECTOR, RECOGNIZER = "det_10g.onnx", "w600k_r50.onnx"


# -- the face model -------------------------------------------------------------------------------
class FaceModel:
    """buffalo_l's detector and ArcFace on onnxruntime: a picture -> its face's embedding."""

    def __init__(self, folder: Path, *, cuda: bool = False) -> None:
        ort = importlib.import_module("onnxruntime")
        providers = ["CPUExecutionProvider"]
        if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.detector = ort.InferenceSession(str(folder / DETECTOR), providers=providers)
        self.recognizer = ort.InferenceSession(str(folder / RECOGNIZER), providers=providers)
        self._cache: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, image: Any) -> np.ndarray | None:
        """The normed embedding (512,) of the picture's face (PIL), None when it has none."""
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        key = hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            found = self._embed(rgb)
            self._cache[key] = found
            if len(self._cache) > CACHE:
                self._cache.popitem(last=False)
            return found

    def _embed(self, rgb: np.ndarray) -> np.ndarray | None:
        landmarks = self.landmarks(rgb)
        if landmarks is None:
            return None
        return self.recognize(align(rgb, landmarks))

    def landmarks(self, rgb: np.ndarray) -> np.ndarray | None:
        """The five landmarks (5, 2) of the best face at or above the threshold, or None."""
        size = _input_size(self.detector)
        canvas, scale = letterbox(rgb, size)
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        name = self.detector.get_inputs()[0].name
        outputs = self.detector.run(None, {name: blob})
        return best_landmarks(outputs, size, DET_THRESHOLD, scale)

    def recognize(self, face: np.ndarray) -> np.ndarray:
        """ArcFace on an aligned 112 x 112 face: the L2-normalised embedding (512,)."""
        blob = ((face.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        name = self.recognizer.get_inputs()[0].name
        embedding = self.recognizer.run(None, {name: blob})[0].reshape(-1).astype(np.float32)
        return embedding / max(float(np.linalg.norm(embedding)), 1e-12)  # type: ignore[no-any-return]


def _input_size(session: Any) -> tuple[int, int]:
    """The detector's (height, width): its fixed input shape, else insightface's 640."""
    shape = session.get_inputs()[0].shape
    if all(isinstance(side, int) for side in shape[2:4]):
        return int(shape[2]), int(shape[3])
    return DET_SIZE, DET_SIZE


def letterbox(rgb: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The picture resized into ``size`` (height, width) keeping its aspect, top-left on black
    (insightface's SCRFD.detect), and its scale."""
    from PIL import Image

    height, width = rgb.shape[:2]
    if height / width > size[0] / size[1]:
        new_height, new_width = size[0], int(size[0] / (height / width))
    else:
        new_width, new_height = size[1], int(size[1] * (height / width))
    resized = Image.fromarray(rgb).resize((new_width, new_height), Image.Resampling.BILINEAR)
    canvas = np.zeros((*size, 3), dtype=np.uint8)
    canvas[:new_height, :new_width] = np.asarray(resized)
    return canvas, new_height / height


def best_landmarks(
    outputs: list[np.ndarray], size: tuple[int, int], threshold: float, scale: float
) -> np.ndarray | None:
    """SCRFD's outputs (scores, boxes, landmarks per stride) -> the best face's landmarks in
    the picture's pixels, or None when no score reaches ``threshold``."""
    levels = len(STRIDES)
    if len(outputs) != 3 * levels:
        raise ValueError(f"the face detector gives {len(outputs)} outputs, not {3 * levels}")
    best_score, best = threshold, None
    for index, stride in enumerate(STRIDES):
        scores = np.asarray(outputs[index]).reshape(-1)
        top = int(np.argmax(scores))
        if scores[top] < best_score:
            continue
        kps = np.asarray(outputs[index + 2 * levels]).reshape(-1, 10)[top] * stride
        best_score, best = float(scores[top]), _anchor(top, scores.size, size, stride) + kps
    return None if best is None else best.reshape(5, 2) / scale


def _anchor(index: int, count: int, size: tuple[int, int], stride: int) -> np.ndarray:
    """Anchor ``index``'s centre (x, y), tiled for the five landmarks (10,)."""
    columns = size[1] // stride
    cell = index // (count // ((size[0] // stride) * columns))
    centre = np.array([cell % columns, cell // columns], dtype=np.float64) * stride
    return np.tile(centre, 5)


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity transform taking ``source`` points nearest ``target`` (Umeyama)."""
    mean_s, mean_t = source.mean(axis=0), target.mean(axis=0)
    centred_s, centred_t = source - mean_s, target - mean_t
    covariance = centred_t.T @ centred_s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(covariance) < 0:
        signs[-1] = -1
    rotation = u @ np.diag(signs) @ vt
    scale = float((singular * signs).sum() / centred_s.var(axis=0).sum())
    shift = mean_t - scale * rotation @ mean_s
    return np.hstack([scale * rotation, shift[:, None]])


def align(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The face warped onto ArcFace's template (112, 112, 3), bilinear, black outside (as
    cv2.warpAffine in insightface's ``norm_crop``: pixel centres at integer coordinates)."""
    from PIL import Image

    forward = np.vstack([similarity(landmarks.astype(np.float64), ARCFACE_TEMPLATE), [0, 0, 1]])
    inverse = np.linalg.inv(forward)[:2]
    a, b, c = inverse[0]
    d, e, f = inverse[1]
    data = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    warped = Image.fromarray(rgb).transform(
        (FACE_SIZE, FACE_SIZE), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR
    )
    return np.asarray(warped)


# -- the adapter ----------------------------------------------------------------------------------
@dataclass
class FaceIDWeights(IPAdapterWeights):
    """A FaceID adapter on the device: its MLP projection, the per-layer weights and the face
    model that embeds style images."""

    face: FaceModel | None = None

    def embed(self, image: Any) -> torch.Tensor:
        """The style image's face embedding (1, 512); a picture without a face (refused before
        it gets here) gives the zero embedding, the guidance rows' one."""
        assert self.face is not None
        found = self.face.embed(image)
        weight = self.norm.weight
        if found is None:
            logger.warning("IP-Adapter FaceID: no face in the style image, none applied")
            return weight.new_zeros((1, self.embed_dim))
        return torch.from_numpy(found).to(weight.device, weight.dtype)[None]


def faceid_misfit(state: AdapterState, unet: Any) -> str | None:
    """Why ``state`` is not a FaceID adapter that serves ``unet``, or None (shapes only)."""
    image_proj = state.get("image_proj", {})
    if not all(f"{name}.weight" in image_proj for name in ("proj.0", "proj.2", "norm")):
        return (
            "this is not an IP-Adapter FaceID (no image_proj.proj.0 / proj.2 / norm, as h94's"
            " ip-adapter-faceid_sd15.bin has)"
        )
    if int(image_proj["proj.0.weight"].shape[1]) != FACE_EMBED:
        return f"this IP-Adapter FaceID does not take {FACE_EMBED}-wide ArcFace embeddings"
    width = int(unet.config.cross_attention_dim)
    tokens_width = int(image_proj["norm.weight"].shape[0])
    if tokens_width != width:
        return (
            f"this IP-Adapter FaceID makes image tokens {tokens_width} wide, the loaded"
            f" model's cross-attention is {width} wide: h94/IP-Adapter-FaceID serves the SD 1.5"
            " family (768) and SDXL (2048)"
        )
    return layers_misfit(state, unet, "h94/IP-Adapter-FaceID serves the SD 1.5 family and SDXL")


def build_faceid_weights(
    state: AdapterState, layers: int, device: torch.device, dtype: torch.dtype
) -> FaceIDWeights:
    """The MLP projection and per-layer weights of a checked FaceID ``state``, on ``device``."""
    image_proj = state["image_proj"]
    hidden, embed = image_proj["proj.0.weight"].shape
    out_features = int(image_proj["proj.2.weight"].shape[0])
    width = int(image_proj["norm.weight"].shape[0])
    proj = torch.nn.Sequential(
        torch.nn.Linear(embed, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, out_features)
    )
    proj.load_state_dict(
        {key.removeprefix("proj."): value for key, value in image_proj.items() if "proj." in key}
    )
    norm = torch.nn.LayerNorm(width)
    norm.load_state_dict({"weight": image_proj["norm.weight"], "bias": image_proj["norm.bias"]})
    adapter = state["ip_adapter"]

    def moved(name: str, index: int) -> torch.Tensor:
        return adapter[f"{2 * index + 1}.{name}.weight"].to(device, dtype).contiguous()

    return FaceIDWeights(
        proj=proj.to(device, dtype).eval().requires_grad_(False),
        norm=norm.to(device, dtype).eval().requires_grad_(False),
        tokens=out_features // width,
        embed_dim=int(embed),
        keys=[moved("to_k_ip", index) for index in range(layers)],
        values=[moved("to_v_ip", index) for index in range(layers)],
    )
