"""ControlNets for the UNet batch: loaded while it keeps serving, residuals for every row.

Sessions name ControlNets in their params (``controlnets``: Livepeer's shape). The pool loads
each model id once, in a background thread (from disk to the device, then a sync on that
thread), while the worker keeps serving: a new ControlNet joins the frames once it is ready, and
one no session names any more is freed. A ControlNet that does not fit the base model (another
family or cross-attention size) or that is not downloaded while ``HF_HUB_OFFLINE`` is set is
refused when the params arrive, with a 422 on ``controlnets.N.model_id`` that says why; one
whose control images have another number of channels than its preprocessor makes (config
``conditioning_channels``: 6 for TemporalNet2's ``temporal_net_tensorrt``, 3 for every other)
with a 422 on ``controlnets.N.preprocessor``.

Residuals: for each ControlNet in use, the UNet rows of the sessions whose entry acts at that
row's step (``ControlNetSpec.active``) go through it in one call, each with its own frame's
control image (a frame's rows, its guidance rows too, share one), are scaled by the entry's
``conditioning_scale`` and added into the batch's residuals; several ControlNets add up (what
diffusers' multi-ControlNet does). The rows' indices and scales are device constants made once
per value (:func:`livediff.pixels.device.constant`), so a batch never waits for the host.

Under ``--compile`` the pool *plans* its ControlNets (a planner the UNet batch hands it at load,
:meth:`ControlNetPool.plan_with`): each is compiled and run at every shape bucket, twice (the
compile, the autotuning and the CUDA graph recording happen then), and served as that padded
call. Planning runs on the worker thread between batches, never inside a served batch: when a
session's params name a ControlNet (:meth:`ControlNetPool.check`, which then waits for its
weights and plans it; the session's params apply once it is planned) and when one is added
(:meth:`ControlNetPool.add`). CUDA graph trees are per thread, so the worker, which replays the
graphs, records them too. The invariant: a ControlNet served in a batch is either planned, or
runs eager on its real rows (one that loaded while serving, e.g. again after an idle release,
until a session's params name it again); a batch never compiles or records.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic_core import ValidationError

from livediff.pixels.device import constant
from livediff.transforms.diffusion.control_params import ControlNetSpec
from livediff.transforms.diffusion.models import ModelUnavailableError, hub_offline

logger = logging.getLogger(__name__)

Locate = Callable[[str, bool], Path]
#: A loaded ControlNet: (x_t, timesteps, embeddings, control images) -> (down blocks..., mid).
ControlNetForward = Callable[..., tuple[torch.Tensor, ...]]
#: Compiles and plans a ControlNetModel (on the device) taking control images of the given
#: channels, in the shape buckets; returns its padded call (worker thread).
Planner = Callable[[Any, int], ControlNetForward]
#: Channels of the control images each preprocessor makes (diffusers' default is 3).
PREPROCESSOR_CHANNELS = {"temporal_net_tensorrt": 6}
DEFAULT_CHANNELS = 3


def preprocessor_channels(preprocessor: str) -> int:
    """How many channels ``preprocessor``'s control images have."""
    return PREPROCESSOR_CHANNELS.get(preprocessor, DEFAULT_CHANNELS)


class ControlNetPool:
    """The ControlNets that sessions name, by model id, on the worker's device."""

    def __init__(
        self,
        unet_config: Any,
        device: torch.device,
        dtype: torch.dtype,
        locate: Locate,
    ) -> None:
        self._unet_config = unet_config
        self._device = device
        self._dtype = dtype
        self._locate = locate
        self._ready: dict[str, ControlNetForward] = {}
        #: The ready ControlNets' models (what a planner compiles).
        self._models: dict[str, Any] = {}
        #: The ready ControlNets served as their planned (compiled, padded) call.
        self._planned: set[str] = set()
        self._planner: Planner | None = None
        #: ``conditioning_channels`` of the ready ControlNets.
        self._channels: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._loading: dict[str, concurrent.futures.Future[Any]] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._loader = concurrent.futures.ThreadPoolExecutor(1, "livediff-controlnet")

    # -- params (worker thread) ---------------------------------------------------------------
    def check(self, specs: Sequence[ControlNetSpec]) -> None:
        """Refuse (422 on the entry's model_id) a ControlNet that cannot serve this model, and
        (422 on its preprocessor) one its preprocessor cannot feed. A planning pool then loads
        (waiting for the weights) and plans each accepted one not planned yet: a load that
        fails is a 422 on its model_id."""
        for index, spec in enumerate(specs):
            reason = self._refusal(spec.model_id)
            if reason is not None:
                raise _model_id_error(index, spec.model_id, reason)
            reason = self._channel_misfit(spec)
            if reason is not None:
                raise _field_error(index, "preprocessor", spec.preprocessor, reason)
        if self._planner is not None:
            for index, spec in enumerate(specs):
                self._prepare(index, spec.model_id)

    def channels(self, model_id: str) -> int | None:
        """``conditioning_channels`` of the ControlNet, if it is loaded or on disk."""
        if model_id in self._channels:
            return self._channels[model_id]
        try:
            folder = self._locate(model_id, False)
        except ModelUnavailableError:
            return None  # not downloaded yet: checked when it loads
        config = json.loads((folder / "config.json").read_text())
        return int(config.get("conditioning_channels") or DEFAULT_CHANNELS)

    def _channel_misfit(self, spec: ControlNetSpec) -> str | None:
        """Why ``spec``'s preprocessor cannot feed its ControlNet, or None."""
        found = self.channels(spec.model_id)
        made = preprocessor_channels(spec.preprocessor)
        if found is None or found == made:
            return None
        return (
            f"this ControlNet takes {found}-channel control images (conditioning_channels"
            f" {found}), the {spec.preprocessor} preprocessor makes {made}: {_fitting(found)}"
        )

    def _refusal(self, model_id: str) -> str | None:
        if model_id in self._ready:
            return None
        if model_id in self._failed:
            return self._failed[model_id]
        try:
            folder = self._locate(model_id, False)
        except ModelUnavailableError as exc:
            if hub_offline() or _names_a_folder(model_id):
                return str(exc)
            return None  # fetched by the background load
        return self._misfit(folder)

    def _misfit(self, folder: Path) -> str | None:
        """Why the ControlNet in ``folder`` does not fit the base UNet, or None."""
        return self._misfit_config(json.loads((folder / "config.json").read_text()))

    def _misfit_config(self, config: Any) -> str | None:
        unet = self._unet_config
        wanted = {
            "cross_attention_dim": unet.cross_attention_dim,
            "block_out_channels": list(unet.block_out_channels),
            "in_channels": unet.in_channels,
            # SDXL's ControlNets read the pooled text and time ids as the UNet does
            "addition_embed_type": unet.get("addition_embed_type"),
        }
        for key, value in wanted.items():
            found = config.get(key)
            found = list(found) if isinstance(found, list | tuple) else found
            if found != value:
                return (
                    f"this ControlNet is for another model family: its {key} is {found}, the"
                    f" loaded model's is {value} (use a ControlNet trained for this base model)"
                )
        return None

    # -- frames (worker thread) ---------------------------------------------------------------
    def get(self, model_id: str) -> ControlNetForward | None:
        """The ControlNet's call when it is loaded; else its load starts (None meanwhile)."""
        self._last_used[model_id] = time.monotonic()
        found = self._ready.get(model_id)
        if found is not None:
            return found
        with self._lock:
            future = self._loading.get(model_id)
            if future is None and model_id not in self._failed:
                self._loading[model_id] = self._loader.submit(self._load, model_id)
                return None
        if future is None or not future.done():
            return None
        return self._settle(model_id, future)

    def _settle(
        self, model_id: str, future: concurrent.futures.Future[Any]
    ) -> ControlNetForward | None:
        with self._lock:
            self._loading.pop(model_id, None)
        try:
            model = future.result()
        except Exception as exc:
            self._failed[model_id] = f"could not load it: {exc}"
            logger.error("ControlNet %s could not be loaded: %s", model_id, exc)
            return None
        self._keep(model_id, model)  # inside a served batch: eager, planned when named again
        if self._planner is None:
            logger.info("ControlNet %s joined", model_id)
        else:
            logger.warning(
                "ControlNet %s joined eager: planned when params name it again", model_id
            )
        return self._ready[model_id]

    def add(self, model_id: str, model: Any) -> None:
        """Serve ``model`` (a ControlNetModel already on the device) as ``model_id`` (worker
        thread, between batches): a ControlNet built or loaded elsewhere, as the benchmarks do;
        a planning pool plans it now."""
        if misfit := self._misfit_config(model.config):
            raise ValueError(misfit)
        self._keep(model_id, model)
        if self._planner is not None:
            self._plan(model_id)

    def plan_with(self, planner: Planner) -> None:
        """Plan every ControlNet from now on with ``planner`` (worker thread, at load), and
        the ready ones now."""
        self._planner = planner
        for model_id in list(self._ready):
            self._plan(model_id)

    def _keep(self, model_id: str, model: Any) -> None:
        """Serve ``model`` eager, on the real rows, until it is planned."""
        self._models[model_id] = model
        self._ready[model_id] = controlnet_forward(model)
        self._planned.discard(model_id)
        channels = getattr(model.config, "conditioning_channels", None)
        self._channels[model_id] = int(channels or DEFAULT_CHANNELS)
        self._last_used[model_id] = time.monotonic()

    def _plan(self, model_id: str) -> None:
        """Serve the ready ControlNet as its planned call (compiled, padded to the buckets)."""
        assert self._planner is not None
        planned = self._planner(self._models[model_id], self._channels[model_id])
        self._ready[model_id] = planned
        self._planned.add(model_id)
        self._last_used[model_id] = time.monotonic()
        logger.info("ControlNet %s planned in the shape buckets", model_id)

    def _prepare(self, index: int, model_id: str) -> None:
        """Load (waiting for the loader thread) and plan ``model_id`` unless it is planned."""
        if model_id in self._planned:
            self._last_used[model_id] = time.monotonic()
            return
        if model_id not in self._models:
            self._keep(model_id, self._load_now(index, model_id))
        self._plan(model_id)

    def _load_now(self, index: int, model_id: str) -> Any:
        """The ControlNet's model, loaded on the loader thread (this thread waits); a failed
        load is a 422 on entry ``index``'s model_id (and remembered, as in :meth:`get`)."""
        with self._lock:
            future = self._loading.pop(model_id, None)
            if future is None:
                future = self._loader.submit(self._load, model_id)
        try:
            return future.result()
        except Exception as exc:
            reason = self._failed[model_id] = f"could not load it: {exc}"
            raise _model_id_error(index, model_id, reason) from exc

    def _load(self, model_id: str) -> Any:
        """Loader thread: read, check, move to the device, and wait for the copies there."""
        diffusers = __import__("diffusers")
        folder = self._locate(model_id, True)
        misfit = self._misfit(folder)
        if misfit is not None:
            raise ValueError(misfit)
        model = diffusers.ControlNetModel.from_pretrained(folder, torch_dtype=self._dtype)
        model.to(self._device).eval().requires_grad_(False)
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()  # the loader thread's CUDA stream
        return model

    def release_idle(self, idle_s: float) -> None:
        """Free the ControlNets no frame used for ``idle_s`` (worker thread, at the start of a
        batch: the previous batch's wait has passed, so no kernel still reads their weights)."""
        cutoff = time.monotonic() - idle_s
        for model_id in [known for known in self._ready if self._last_used[known] < cutoff]:
            del self._ready[model_id]
            del self._models[model_id]
            self._planned.discard(model_id)
            self._channels.pop(model_id, None)
            self._failed.pop(model_id, None)
            logger.info("ControlNet %s freed (unused for %g s)", model_id, idle_s)

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._ready.clear()
        self._models.clear()
        self._planned.clear()


def controlnet_forward(model: Any) -> ControlNetForward:
    """``model``'s call on a batch's rows: (x_t, timesteps, embeddings, control images, SDXL's
    pooled text embeddings and time ids if any) -> (down blocks..., mid)."""

    def forward(
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        cond: torch.Tensor,
        *added: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        extra: dict[str, Any] = {}
        if added:  # SDXL's pooled text embeddings and time ids
            extra["added_cond_kwargs"] = {"text_embeds": added[0], "time_ids": added[1]}
        down, mid = model(
            x_t,
            timesteps,
            encoder_hidden_states=embeddings,
            controlnet_cond=cond,
            return_dict=False,
            **extra,
        )
        return (*down, mid)

    return forward


@dataclass
class RowControl:
    """What one UNet row needs from one ControlNet entry."""

    row: int
    scale: float
    image: torch.Tensor  # (1, C, H, W) in [0, 1]: the row's frame's control image


def residuals(
    uses: dict[str, list[RowControl]],
    pool: ControlNetPool,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    embeddings: torch.Tensor,
    *,
    added: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """The summed, scaled residuals (down blocks..., mid) for every row, in ``x_t``'s dtype (the
    model's); None if no loaded ControlNet acts on any row. ``added``: SDXL's pooled text
    embeddings and time ids of every row (an SDXL ControlNet reads them too)."""
    total: list[torch.Tensor] | None = None
    for model_id, rows in uses.items():
        call = pool.get(model_id)
        if call is None or not rows or not _feeds(pool, model_id, rows[0].image):
            continue
        index = constant(tuple(use.row for use in rows), x_t.device, torch.long)
        scale = constant(tuple(use.scale for use in rows), x_t.device, x_t.dtype)
        cond = torch.cat([use.image for use in rows]).to(x_t.dtype)
        rows_added = () if added is None else tuple(part[index] for part in added)
        outputs = call(x_t[index], timesteps[index], embeddings[index], cond, *rows_added)
        if total is None:
            total = [x_t.new_zeros((x_t.shape[0], *out.shape[1:])) for out in outputs]
        for summed, out in zip(total, outputs, strict=True):
            summed.index_add_(0, index, out * scale.view(-1, 1, 1, 1))
    return None if total is None else tuple(total)


def _fitting(channels: int) -> str:
    """Which preprocessors fit a ControlNet that takes ``channels`` channels."""
    if channels == DEFAULT_CHANNELS:
        return "use a 3-channel one (canny, depth, passthrough, or temporal_net for TemporalNet)"
    fits = [name for name, made in PREPROCESSOR_CHANNELS.items() if made == channels]
    if fits:
        return f"use {' or '.join(fits)} (TemporalNet2)"
    return f"no preprocessor makes {channels}-channel control images"


def _feeds(pool: ControlNetPool, model_id: str, image: torch.Tensor) -> bool:
    """Whether ``image``'s channels are what the ControlNet takes (one that was downloaded
    after its params were accepted is checked here: a misfit is left out, not run)."""
    wanted = pool.channels(model_id)
    if wanted is None or wanted == image.shape[1]:
        return True
    logger.error(
        "ControlNet %s takes %d-channel control images, its preprocessor makes %d: left out",
        model_id,
        wanted,
        image.shape[1],
    )
    return False


def _names_a_folder(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~"))


def _model_id_error(index: int, model_id: str, reason: str) -> ValidationError:
    return _field_error(index, "model_id", model_id, reason)


def _field_error(index: int, field: str, value: str, reason: str) -> ValidationError:
    """A 422 on ``controlnets.INDEX.FIELD``."""
    return ValidationError.from_exception_data(
        "DiffusionParams",
        [
            {
                "type": "value_error",
                "loc": ("controlnets", index, field),
                "input": value,
                "ctx": {"error": reason},
            }
        ],
    )
