"""``DiffusionTransform``: the "diffusion" pipeline (``livediff serve --pipeline diffusion``).

The worker thread loads the model and runs :class:`UNetBatch` on each batch (the engine warms
it up). The model is one per worker: a session that asks for another ``model``/``vae`` reloads
it for every session, so the engine allows that only to a session that is alone (409 otherwise,
see :class:`livediff.engine.Engine`). A model that cannot be loaded is refused with a 422 on the
``model``/``vae`` field, and the running model stays. LoRAs (``lora_dict``) are fused into the
loaded UNet between batches, with no reload, under the same rule (see :mod:`.lora`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic_core import ValidationError

from livediff.config import Settings
from livediff.frames import Image
from livediff.pixels.device import StagedUpload
from livediff.transforms.base import Transform
from livediff.transforms.diffusion import fp8
from livediff.transforms.diffusion.bundle import (
    CompileOptions,
    ModelBundle,
    load_bundle,
    prepare,
    uses_cuda_graphs,
)
from livediff.transforms.diffusion.control import ControlNetPool
from livediff.transforms.diffusion.ip_adapter import IPAdapterPool
from livediff.transforms.diffusion.ip_adapter_params import FACE_MODEL_REPO, IPAdapterConfig
from livediff.transforms.diffusion.lora import LoraPool
from livediff.transforms.diffusion.models import (
    ModelChoice,
    ModelUnavailableError,
    hub_offline,
    locate,
    locate_controlnet,
    locate_face_model,
    locate_faceid_adapter,
    locate_ip_adapter,
    locate_lora,
)
from livediff.transforms.diffusion.params import FULL_VAE, DiffusionParams
from livediff.transforms.diffusion.preprocess import Preprocessors
from livediff.transforms.diffusion.safety import SafetyFilter
from livediff.transforms.diffusion.state import SessionCache
from livediff.transforms.diffusion.style_image import StyleImages
from livediff.transforms.diffusion.unet_batch import DiffusionJob, UNetBatch

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class DeviceUnavailableError(LookupError):
    """The configured device does not exist on this machine."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; a named CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {name!r} was asked for but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> float16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def compile_options(settings: Settings) -> CompileOptions:
    """torch.compile as configured; its caches under the model dir unless one is named."""
    cache_dir = settings.compile_cache_dir
    if cache_dir is None and settings.model_dir is not None:
        cache_dir = str(Path(settings.model_dir) / "livediff-compile-cache")
    return CompileOptions(
        mode=settings.compile_mode,
        backend=settings.compile_backend,
        cache_size=settings.compile_cache_size,
        cache_dir=Path(cache_dir) if cache_dir else None,
    )


class DiffusionTransform(Transform[DiffusionParams, SessionCache, StagedUpload]):
    """Realtime img2img with a diffusion model, several sessions batched on one device.

    Its sessions' state is a :class:`SessionCache`, and :meth:`stage` leaves a
    :class:`StagedUpload` on each job (see :mod:`livediff.transforms.base`)."""

    name = "diffusion"
    params_model = DiffusionParams

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._device = resolve_device(settings.device)
        self._dtype = resolve_dtype(settings.dtype, self._device)
        self._compile = compile_options(settings) if settings.compile else None
        self._vae_dtype = None if settings.vae_dtype == "auto" else DTYPES[settings.vae_dtype]
        self.choice = ModelChoice(settings.model, settings.vae, settings.model_dir)
        self.unet_batch: UNetBatch | None = None
        #: The LoRAs fused into the loaded UNet (made for it on first use; see lora.py).
        self._loras: LoraPool | None = None
        #: The IP-Adapter's style images by URL: fetched on the event loop
        #: (:meth:`resolve_params`), read by the worker.
        self.style_images = StyleImages(
            max_bytes=settings.style_image_max_bytes,
            timeout_s=settings.style_image_timeout_s,
            allow_private=settings.style_image_allow_private,
        )
        self.check_available(settings)

    @classmethod
    def check_available(cls, settings: Settings) -> None:
        """Fail now (at start, with the fetch command) when the model cannot be had later, or
        FP8 (``unet_quantization``) cannot run on the device."""
        if settings.unet_quantization == "fp8":
            fp8.check_available(resolve_device(settings.device))
        choice = ModelChoice(settings.model, settings.vae, settings.model_dir)
        try:
            locate(choice)
        except ModelUnavailableError:
            if hub_offline() or _names_a_folder(choice):
                raise
            logger.info("%s is not downloaded yet: it is fetched while loading", choice.model)

    @property
    def device(self) -> str:
        return str(self._device)

    @classmethod
    def default_params(cls, settings: Settings) -> dict[str, Any]:
        return {
            **super().default_params(settings),
            "model": settings.model,
            "vae": settings.vae,
            "use_safety_checker": settings.safety_checker,
            "ip_adapter": {"enabled": False, "ipadapter_model_path": settings.ip_adapter_model},
        }

    @classmethod
    def model_ids(cls, params: DiffusionParams) -> dict[tuple[str | int, ...], str]:
        """``model``, ``vae`` unless it is 'full' (the model's own VAE, no other files), and
        the ``model_id`` of each entry of a ``controlnets`` list, each LoRA id
        (``lora_dict`` keys, and ``lcm_lora_id`` when ``use_lcm_lora`` is on), and, when the
        IP-Adapter is on, its ``ipadapter_model_path`` (and FaceID's face model)."""
        ids: dict[tuple[str | int, ...], str] = {("model",): params.model}
        if params.vae != FULL_VAE:
            ids[("vae",)] = params.vae
        for index, entry in enumerate(params.controlnets):
            ids[("controlnets", index, "model_id")] = entry.model_id
        for lora_id in params.lora_dict or {}:
            ids[("lora_dict", lora_id)] = lora_id
        if params.use_lcm_lora:
            ids[("lcm_lora_id",)] = params.lcm_lora_id
        block = params.ip_adapter
        if isinstance(block, dict):  # defaults made with model_construct (not validated)
            block = IPAdapterConfig.model_validate(block)
        if block.enabled:
            ids[("ip_adapter", "ipadapter_model_path")] = block.ipadapter_model_path
            if block.type == "faceid":  # the face model's hub mirror
                ids[("ip_adapter", "type")] = FACE_MODEL_REPO
        return ids

    @classmethod
    def configured_model_ids(cls, settings: Settings) -> set[str]:
        """The defaults' ids and the server's IP-Adapter (``LIVEDIFF_IP_ADAPTER_MODEL``)."""
        return {*super().configured_model_ids(settings), settings.ip_adapter_model}

    @classmethod
    def describe_session(cls, params: DiffusionParams) -> dict[str, Any]:
        """What a session's info adds for this pipeline (pure, so any thread may ask): the
        temporal tools acting on its frames, e.g. ``{"temporal": ["motion_noise"]}``."""
        return {"temporal": params.temporal_tools()}

    def loaded_params(self) -> dict[str, Any]:
        return {"model": self.choice.model, "vae": self.choice.vae}

    # -- loading ----------------------------------------------------------------------------------
    def load(self) -> None:
        self.unet_batch = self._load_unet_batch(self.choice, generation=0)

    def _load_unet_batch(self, choice: ModelChoice, generation: int) -> UNetBatch:
        bundle = self.load_bundle(choice)
        if self.unet_batch is not None:  # free the old model before the new one moves in
            self._drop_unet_batch()
        prepare(
            bundle,
            self._device,
            self._dtype,
            compile_options=self._compile,
            vae_dtype=self._vae_dtype,
            unet_quantization=self.settings.unet_quantization,
        )
        compile_mode = (
            self._compile.mode if self._compile and self._compile.backend == "inductor" else None
        )
        cuda_graphs = uses_cuda_graphs(self._device, compile_mode)
        assert bundle.ip_switch is not None  # prepare() installed it
        buckets = self.settings.batch_buckets if self._compile is not None else None
        unet_batch = UNetBatch(
            bundle,
            self._device,
            self._dtype,
            prompt_cache_size=self.settings.prompt_cache_size,
            max_skip=self.settings.similarity_max_skip,
            cuda_graphs=cuda_graphs,
            buckets=buckets,
            compile_options=self._compile,
            frame_graph=self.settings.frame_graph,
            frame_graph_steps=self.settings.frame_graph_steps,
            frame_graph_guidance=self.settings.frame_graph_guidance,
            controlnets=ControlNetPool(
                bundle.unet.config, self._device, self._dtype, self._locate_controlnet
            ),
            preprocess=Preprocessors(self._device, self._dtype, self.settings),
            safety=SafetyFilter(
                self._device, self._dtype, self.settings.safety_model, self.settings.model_dir
            ),
            ip_adapters=IPAdapterPool(
                bundle.uncompiled_unet,
                bundle.ip_switch,
                self._device,
                self._dtype,
                self._locate_ip_adapter,
                sdxl=bundle.sdxl,
                style_image=self.style_images.get,
                locate_faceid=self._locate_faceid_adapter,
                locate_face=self._locate_face_model,
            ),
        )
        unet_batch.generation = generation
        if self._compile is not None:  # every bucket compiles now, never while serving
            unet_batch.precompile(self.settings.width, self.settings.height)
        logger.info(
            "diffusion model %s (vae %s) loaded on %s", choice.model, choice.vae, self._device
        )
        return unet_batch

    def load_bundle(self, choice: ModelChoice) -> ModelBundle:
        """The model's components on the CPU, from its folders (downloaded if need be); a
        benchmark builds random-weight ones from published configs instead."""
        return load_bundle(locate(choice, download=True), choice, self._dtype)

    def _locate_controlnet(self, model_id: str, download: bool) -> Path:
        return locate_controlnet(model_id, self.settings.model_dir, download=download)

    def _locate_ip_adapter(self, repo: str, sdxl: bool, download: bool) -> Path:
        return locate_ip_adapter(repo, self.settings.model_dir, sdxl, download=download)

    def _locate_faceid_adapter(self, repo: str, sdxl: bool, download: bool) -> Path:
        return locate_faceid_adapter(repo, self.settings.model_dir, sdxl, download=download)

    def _locate_face_model(self) -> Path:
        return locate_face_model(FACE_MODEL_REPO, self.settings.model_dir, download=True)

    def _locate_lora(self, lora_id: str, download: bool) -> Path:
        return locate_lora(lora_id, self.settings.model_dir, download=download)

    def lora_pool(self) -> LoraPool:
        """The LoRAs of the loaded UNet (a new pool after a reload)."""
        unet = self._unet_batch().bundle.uncompiled_unet
        if self._loras is None or self._loras.unet is not unet:
            self._close_loras()
            self._loras = LoraPool(unet, self._device, self._dtype, self._locate_lora)
        return self._loras

    def _close_loras(self) -> None:
        if self._loras is not None:
            self._loras.close()
            self._loras = None

    def validate_params(self, params: DiffusionParams) -> None:
        """Refuse ControlNets and LoRAs that cannot serve the loaded model (422 on their
        model_id, on ``lora_dict.<id>``); accepted LoRAs start loading."""
        if params.controlnets:
            pool = self._unet_batch().controlnets
            if pool is not None:
                pool.check(params.controlnets)
        if self.settings.unet_quantization == "fp8" and params.loras():
            raise _fp8_lora_error(params)
        self.lora_pool().check(params)
        if params.use_safety_checker:
            self._check_safety_model()
        if params.ip_adapter.enabled:
            self._check_ip_adapter(params)

    def _check_ip_adapter(self, params: DiffusionParams) -> None:
        """Refuse an adapter that cannot serve the loaded model (422 on ``ip_adapter``); an
        accepted one starts loading. FaceID also needs its face model (loaded now, once) and
        a face in the style image (422 on ``ip_adapter_style_image_url``)."""
        settings = params.ip_adapter
        faceid = settings.type == "faceid"
        pool = self._unet_batch().ip_adapters
        if pool is None:
            return
        reason = pool.refusal(settings.ipadapter_model_path, faceid=faceid)
        if reason is not None:
            raise _field_error(("ip_adapter",), settings.model_dump(), reason)
        if faceid:
            self._check_face(pool, params.ip_adapter_style_image_url)

    def _check_face(self, pool: IPAdapterPool, url: str) -> None:
        """The face model loads (once); the style image (fetched already) must show a face."""
        try:
            face = pool.face_model()
        except ModelUnavailableError as exc:
            raise _field_error(("ip_adapter", "type"), "faceid", str(exc)) from exc
        image = self.style_images.get(url) if url else None
        if image is not None and face.embed(image) is None:
            raise _field_error("ip_adapter_style_image_url", url, NO_FACE)

    async def resolve_params(self, params: DiffusionParams) -> None:
        """Event loop: fetch the IP-Adapter's style image (when it acts) into the cache the
        worker reads; a refusal is a 422 on ``ip_adapter_style_image_url``."""
        if params.ip_adapter.enabled and params.ip_adapter_style_image_url:
            await self.style_images.resolve(params.ip_adapter_style_image_url)

    def _check_safety_model(self) -> None:
        """The safety classifier, loaded now (once): one that cannot be found, fetched or
        loaded is a 422 on ``use_safety_checker``, not a failure of every frame later."""
        try:
            self._unet_batch().safety.classifier()
        except ModelUnavailableError as exc:
            raise _field_error("use_safety_checker", True, str(exc)) from exc

    def affects_others(self, params: DiffusionParams) -> bool:
        """Another LoRA set than the one sessions run with: one set serves every session."""
        return params.loras() != self.lora_pool().wanted

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()

    def _drop_unet_batch(self) -> None:
        self._close_loras()
        if self.unet_batch is not None:
            if self.unet_batch.controlnets is not None:
                self.unet_batch.controlnets.close()
            if isinstance(self.unet_batch.preprocess, Preprocessors):
                self.unet_batch.preprocess.close()
            self.unet_batch.safety.close()
            if self.unet_batch.ip_adapters is not None:
                self.unet_batch.ip_adapters.close()
        self.unet_batch = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # -- params -----------------------------------------------------------------------------------
    def requires_reload(self, old: DiffusionParams, new: DiffusionParams) -> bool:
        wanted = _wanted(new)
        return wanted != _wanted(old) and wanted != (self.choice.model, self.choice.vae)

    def reload(self, params: DiffusionParams) -> None:
        choice = ModelChoice(*_wanted(params), self.settings.model_dir)
        generation = self._unet_batch().generation + 1
        try:
            unet_batch = self._load_unet_batch(choice, generation)
        except ModelUnavailableError as exc:
            raise _field_error(exc.role, getattr(params, exc.role), str(exc)) from exc
        self.unet_batch, self.choice = unet_batch, choice

    # -- sessions and frames ----------------------------------------------------------------------
    def open_session(self, params: DiffusionParams) -> SessionCache:
        if _wanted(params) != (self.choice.model, self.choice.vae):
            raise RuntimeError("open_session with another model than the loaded one (reload first)")
        return self._unet_batch().open_session()

    def close_session(self, state: SessionCache) -> None:
        state.release()

    def stage(self, jobs: Sequence[DiffusionJob]) -> None:
        self._unet_batch().stage(jobs)

    def process(self, jobs: Sequence[DiffusionJob]) -> list[Image | None]:
        if jobs:  # one LoRA set per model (the policy keeps the batch's sessions on one)
            self.lora_pool().follow(jobs[0].params.loras())
        return self._unet_batch().process(jobs)

    def close(self) -> None:
        self._drop_unet_batch()

    def _unet_batch(self) -> UNetBatch:
        if self.unet_batch is None:
            raise RuntimeError("the diffusion model is not loaded")
        return self.unet_batch


def _wanted(params: DiffusionParams) -> tuple[str, str]:
    """The (model, vae) ``params`` ask for."""
    return params.model, params.vae


def _fp8_lora_error(params: DiffusionParams) -> ValidationError:
    """The 422 for a LoRA asked of an FP8 UNet (its weights are FP8 values: nothing fuses)."""
    lora_id = params.loras()[0][0]
    named = lora_id in (params.lora_dict or {})
    loc = ("lora_dict", lora_id) if named else ("use_lcm_lora",)
    message = (
        "LoRAs do not apply to an FP8 UNet (unet_quantization 'fp8': its weights are FP8"
        " values); serve with unet_quantization 'none' to use them"
    )
    return _field_error(loc, lora_id if named else True, message)


def _names_a_folder(choice: ModelChoice) -> bool:
    return any(name.startswith((".", "/", "~")) for name in (choice.model, choice.vae))


def _field_error(field: str | tuple[str, ...], value: object, message: str) -> ValidationError:
    """A pydantic ValidationError on ``field`` (the server answers it with a 422)."""
    loc = (field,) if isinstance(field, str) else field
    return ValidationError.from_exception_data(
        "DiffusionParams",
        [{"type": "value_error", "loc": loc, "input": value, "ctx": {"error": message}}],
    )


#: Why a FaceID style image is refused.
NO_FACE = (
    "IP-Adapter FaceID found no face in the style image (buffalo_l's detector, score 0.5):"
    " use a picture of a face, or type 'regular'"
)
