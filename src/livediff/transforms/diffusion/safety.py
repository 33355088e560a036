"""The safety filter: an NSFW image classifier on the decoded outputs, Livepeer's shape.

Params ``use_safety_checker`` and ``safety_checker_threshold`` (Livepeer's StreamDiffusion
names; the default of the first is the server's, ``LIVEDIFF_SAFETY_CHECKER``). The classifier is
Livepeer's, ``Freepik/nsfw_image_detector`` (``LIVEDIFF_SAFETY_MODEL``; any transformers
``AutoModelForImageClassification`` with a neutral/normal/safe class serves), loaded on first
use like the depth model. Livepeer's NSFW score is the probability of every level above
neutral (low + medium + high), i.e. ``1 - P(neutral)``; a frame whose score is at or above the
session's threshold is flagged.

Per UNet-batch group, on the device: the outputs of the sessions that filter go through one
classifier call (resized bicubic with antialiasing to the classifier's size, normalised with
its mean and std: device constants, no host copy), and ``torch.where`` picks each flagged
frame's replacement, the session's last safe output of the same size, else a black frame. A
flagged frame never leaves the transform. The flags then come back to the host in one read
per group (the one device sync this adds, only when a session of the group filters), so that
the engine counts them (``livediff_frames_filtered_total``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from livediff.config import DEFAULT_SAFETY_MODEL
from livediff.pixels.device import constant
from livediff.transforms.diffusion.models import ModelUnavailableError, locate_safety_model
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.state import SessionCache

#: Labels that name the safe class (Freepik's "neutral", others' "normal", "safe", "sfw").
SAFE_LABELS = ("neutral", "normal", "safe", "sfw")
#: The classifier's input when its config does not say: Freepik's EVA-02 at 448 px with
#: OpenAI CLIP's mean and std (timm's, which Livepeer's engine uses rounded).
DEFAULT_SIZE = 448
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: A black frame in the decoded range [-1, 1].
BLACK = -1.0


class Screened(Protocol):
    """What the filter reads and writes of a finished frame's entry in the UNet batch."""

    params: DiffusionParams
    state: SessionCache
    #: Set here: whether this frame was replaced.
    filtered: bool


@dataclass(frozen=True)
class ClassifierInput:
    """How the classifier takes its pixels and which of its classes is safe."""

    #: (height, width) the frames are resized to.
    size: tuple[int, int]
    #: Per-channel mean and std of RGB on 0..1.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: The index of the safe class in the logits.
    safe_index: int


def classifier_input(config: Any, folder: Path | None = None) -> ClassifierInput:
    """The input a classifier wants, from its config: a timm model's ``pretrained_cfg``
    (``input_size``, ``mean``, ``std``), else ``image_size`` and the folder's
    ``preprocessor_config.json`` (``image_mean``, ``image_std``), else Freepik's."""
    timm = getattr(config, "pretrained_cfg", None) or {}
    processor = _read_json(folder / "preprocessor_config.json") if folder is not None else {}
    side = getattr(config, "image_size", DEFAULT_SIZE)
    size = timm.get("input_size", (3, side, side))[-2:]
    mean = timm.get("mean") or processor.get("image_mean") or CLIP_MEAN
    std = timm.get("std") or processor.get("image_std") or CLIP_STD
    return ClassifierInput(
        size=(int(size[0]), int(size[1])),
        mean=_triple(mean),
        std=_triple(std),
        safe_index=safe_index(getattr(config, "id2label", None) or {}),
    )


def safe_index(id2label: Mapping[Any, str]) -> int:
    """The class whose label names the safe one (see SAFE_LABELS); 0 when none does."""
    for index, label in id2label.items():
        if str(label).strip().lower() in SAFE_LABELS:
            return int(index)
    return 0


def pixel_values(images: torch.Tensor, spec: ClassifierInput, dtype: torch.dtype) -> torch.Tensor:
    """Decoded frames (B, 3, H, W) in [-1, 1] -> the classifier's input: RGB on 0..1, resized
    bicubic with antialiasing (Livepeer's transforms), clamped, normalised."""
    rgb = ((images.to(torch.float32) + 1) / 2).clamp(0, 1)
    sized = F.interpolate(rgb, size=spec.size, mode="bicubic", antialias=True).clamp(0, 1)
    mean = constant(spec.mean, images.device, torch.float32).view(1, 3, 1, 1)
    std = constant(spec.std, images.device, torch.float32).view(1, 3, 1, 1)
    return ((sized - mean) / std).to(dtype)


def nsfw_scores(logits: torch.Tensor, safe: int) -> torch.Tensor:
    """(B, classes) logits -> (B,) NSFW scores: 1 - P(safe class)."""
    return 1 - torch.softmax(logits.to(torch.float32), dim=-1)[:, safe]


class SafetyFilter:
    """The NSFW filter of one UNet batch (worker thread): its classifier, loaded on first use."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        model: str = DEFAULT_SAFETY_MODEL,
        model_dir: str | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.model = model
        self.model_dir = model_dir
        self._classifier: Any = None
        self._input: ClassifierInput | None = None

    def apply(self, entries: Sequence[Screened], images: torch.Tensor) -> torch.Tensor:
        """``images`` (one decoded row per entry, [-1, 1]) with every flagged row of a session
        that filters replaced; ``images`` itself when no session filters."""
        screening = [index for index, entry in enumerate(entries) if _screens(entry)]
        if not screening:
            return images
        rows = list(images.tensor_split(len(entries)))
        screened = torch.cat([rows[index] for index in screening])
        flags = self._flags(screened, [entries[index] for index in screening])
        fallback = torch.cat([_fallback(entries[index].state, rows[index]) for index in screening])
        kept = torch.where(flags.view(-1, 1, 1, 1), fallback, screened)
        for index, row in zip(screening, kept.tensor_split(len(screening)), strict=True):
            rows[index] = entries[index].state.safe_output = row
            entries[index].state.previous_image = row  # feedback blends what was sent
        for index, flagged in zip(screening, flags.tolist(), strict=True):  # the one sync
            entries[index].filtered = bool(flagged)
        return torch.cat(rows)

    def _flags(self, screened: torch.Tensor, entries: Sequence[Screened]) -> torch.Tensor:
        """(B,) bool on the device: each frame's score against its session's threshold (a
        kernel scalar each, no host copy)."""
        classifier, spec = self.classifier()
        logits = classifier(pixel_values=pixel_values(screened, spec, self.dtype)).logits
        scores = nsfw_scores(logits, spec.safe_index)
        return torch.stack(
            [
                scores[row] >= entry.params.safety_checker_threshold
                for row, entry in enumerate(entries)
            ]
        )

    def classifier(self) -> tuple[Any, ClassifierInput]:
        """The classifier on the device and its input spec (loaded on first call)."""
        if self._classifier is None or self._input is None:
            folder = locate_safety_model(self.model, self.model_dir, download=True)
            model = _load_classifier(folder, self.model)
            self._classifier = model.to(self.device, self.dtype).eval().requires_grad_(False)
            self._input = classifier_input(model.config, folder)
        return self._classifier, self._input

    def close(self) -> None:
        self._classifier = self._input = None


def _screens(entry: Screened) -> bool:
    """Whether the entry's session filters; a session that does not forgets its safe output."""
    if not entry.params.use_safety_checker:
        entry.state.safe_output = None
        return False
    return True


def _fallback(state: SessionCache, row: torch.Tensor) -> torch.Tensor:
    """What replaces a flagged ``row``: the session's last safe output of the same shape and
    dtype, else a black frame."""
    last = state.safe_output
    if last is not None and last.shape == row.shape and last.dtype == row.dtype:
        return last
    return torch.full_like(row, BLACK)


def _load_classifier(folder: Path, name: str) -> Any:
    """transformers' AutoModelForImageClassification from ``folder`` (on the CPU)."""
    transformers = __import__("transformers")
    try:
        return transformers.AutoModelForImageClassification.from_pretrained(folder)
    except ImportError as exc:  # e.g. a timm model (Freepik's) without timm installed
        raise ModelUnavailableError(
            f"the safety model {name!r} cannot be loaded: {exc} (Freepik/nsfw_image_detector"
            " needs timm: pip install timm)",
            "use_safety_checker",
        ) from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    loaded = json.loads(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    first, second, third = (float(value) for value in values)
    return first, second, third
