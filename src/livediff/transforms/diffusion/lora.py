"""LoRAs in Livepeer's StreamDiffusion shape (``lora_dict``, ``use_lcm_lora``), applied live.

Sessions name LoRAs in their params: ``{"lora_dict": {"owner/style-lora": 0.8}}`` (a hub id of
a repo holding a LoRA safetensors file, a file, or a folder), and ``use_lcm_lora`` adds
``lcm_lora_id`` at weight 1. The pool reads each LoRA once, on a loader thread (locate or
fetch it, read it, check that it fits the loaded UNet, move it to the device) while the worker
keeps serving; the worker thread fuses the set into the UNet between batches once every LoRA of
it is ready (until then the set in force stays). A LoRA of another family (a module the UNet
lacks, or another shape: an SDXL LoRA on SD 1.5) or one that cannot be found is refused when
the params arrive, with a 422 on ``lora_dict.<id>`` (``lcm_lora_id`` for the LCM-LoRA) that
says why; that check reads the safetensors header only (shapes, no weights).

Fused, not peft adapters. Measured on the CPU with the tiny model, 128 px, rank 8, 2 threads
(``benchmarks/lora.py``, ``benchmarks/results/lora-tiny-128-cpu.json``): a UNet call took
14.8 ms plain, 14.1 ms with the LoRA fused (the plain cost: nothing runs per frame) and 22.6 ms
with it as peft adapter layers (diffusers' ``load_lora_adapter`` + ``set_adapters``: 1.53x,
every targeted layer runs its two low-rank products besides its own). A weight change cost
1.8 ms re-fused (restore the touched weights, add the new sum) against 1.5 ms for
``set_adapters``: paid once per change, between batches, while the adapters' cost is paid by
every frame. Under ``torch.compile`` the adapter's scaling is a Python float dynamo guards on,
so each new weight compiled a new graph (1 for a change there and back; under max-autotune
that is minutes, and loading an adapter rewrites the module tree, another recompile); fused
weights are parameters changed in place, which compiled code and CUDA graphs read where they
are: 0 graphs. So the weights are fused: the touched weights' originals are kept (on the
device, only for the modules the set changes), and a new set or weight restores them and adds
``sum(weight_i * scale_i * up_i @ down_i)`` computed in float32; with no LoRA left the
originals are copied back bit for bit (the output is today's exactly).

One set per model. All sessions on the model run with the same LoRAs, so a session that asks
for another set (other ids or weights) than the one in force is refused with a 409
(``ModelInUseError``) while other sessions are open, and allowed to a session that is alone:
the rule ``model`` follows, without the reload (see ``Transform.affects_others`` and
``engine/worker_side.py``). The UNet part of a LoRA is applied; a text-encoder part is left out
(logged), as is a DoRA or bias term, which is refused.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic_core import ValidationError

from livediff.transforms.diffusion.models import ModelUnavailableError, hub_offline
from livediff.transforms.diffusion.params import DiffusionParams

logger = logging.getLogger(__name__)

#: LoRAs as sorted (id, weight) pairs (``DiffusionParams.loras``).
LoraSet = tuple[tuple[str, float], ...]
#: (LoRA id, download) -> its safetensors file (raises ModelUnavailableError).
Locate = Callable[[str, bool], Path]
#: The key diffusers stores a LoRA's peft config under in the safetensors metadata.
METADATA_KEY = "lora_adapter_metadata"
UNET_PREFIX = "unet."
FUSABLE = (torch.nn.Linear, torch.nn.Conv2d)


class LoraFormatError(ValueError):
    """The file is not a LoRA livediff can apply (the message says why)."""


@dataclass(frozen=True)
class LoraPart:
    """One module's low-rank update: its weight gains ``scale * up @ down``."""

    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw): lora_A
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1): lora_B
    scale: float  # alpha / rank (peft's scaling)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this part updates."""
        return (int(self.up.shape[0]), *(int(size) for size in self.down.shape[1:]))

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` in float32, shaped as the weight."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * self.scale).view(self.shape)


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA's UNet parts by module name (as in ``unet.named_modules()``)."""

    parts: dict[str, LoraPart]


# -- reading ---------------------------------------------------------------------------------------
def read_lora(
    path: Path,
    *,
    shapes_only: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoraWeights:
    """The UNet parts of the LoRA in ``path`` (any format diffusers reads: peft, diffusers,
    kohya). ``shapes_only`` reads the header alone (meta tensors: enough to check the fit)."""
    state, metadata = _read_state(path, shapes_only)
    lora_loader = importlib.import_module("diffusers.loaders").StableDiffusionLoraLoaderMixin
    state, alphas = lora_loader.lora_state_dict(state)
    parts = unet_parts(state, alphas or {}, metadata)
    if device is not None or dtype is not None:
        parts = {name: _moved(part, device, dtype) for name, part in parts.items()}
    return LoraWeights(parts)


def _read_state(path: Path, shapes_only: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's tensors (meta ones but for scalars with ``shapes_only``) and its LoRA config."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), "pt", device="cpu") as file:
        raw = (file.metadata() or {}).get(METADATA_KEY)
        for key in file.keys():  # noqa: SIM118 (a safe_open is not iterable)
            shape = file.get_slice(key).get_shape()
            if shapes_only and len(shape) > 1:
                state[key] = torch.empty(shape, device="meta")
            else:
                state[key] = file.get_tensor(key)
    return state, json.loads(raw) if raw else {}


def unet_parts(
    state: Mapping[str, torch.Tensor], alphas: Mapping[str, Any], metadata: Mapping[str, Any]
) -> dict[str, LoraPart]:
    """The UNet's parts of a LoRA state dict in diffusers' naming (``unet.<module>.lora_A...``)."""
    convert = importlib.import_module("diffusers.utils").convert_unet_state_dict_to_peft
    unet = {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if len(unet) < len(state):
        logger.info(
            "a LoRA's %d non-UNet tensors (text encoder) are left out", len(state) - len(unet)
        )
    if unet and "lora_A" not in next(iter(unet)):
        unet = convert(unet)
    config = {
        key.removeprefix(UNET_PREFIX): value
        for key, value in metadata.items()
        if key.startswith(UNET_PREFIX)
    }
    if config.get("use_dora") or any("lora_magnitude_vector" in key for key in unet):
        raise LoraFormatError("it is a DoRA, which livediff does not apply")
    pairs = _pairs(unet)
    module_alphas = {_alpha_module(key): float(value) for key, value in alphas.items()}
    return {
        module: LoraPart(down, up, _scale(module, int(up.shape[1]), module_alphas, config))
        for module, (down, up) in pairs.items()
    }


def _pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(lora_A, lora_B) weights by module; any other key is refused."""
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for marker, into in ((".lora_A.weight", downs), (".lora_B.weight", ups)):
            if key.endswith(marker):
                into[key.removesuffix(marker)] = tensor
                break
        else:
            raise LoraFormatError(f"its tensor {key!r} is not a LoRA weight livediff applies")
    if downs.keys() != ups.keys():
        unpaired = sorted(downs.keys() ^ ups.keys())[0]
        raise LoraFormatError(f"its module {unpaired!r} lacks one of lora_A / lora_B")
    return {module: (downs[module], ups[module]) for module in downs}


def _alpha_module(key: str) -> str:
    """The module an alpha of diffusers' ``network_alphas`` belongs to."""
    name = key.removeprefix(UNET_PREFIX).removesuffix(".alpha")
    for suffix in (".lora_A", ".lora.down", ".down"):
        name = name.removesuffix(suffix)
    return name


def _scale(module: str, rank: int, alphas: Mapping[str, float], config: Mapping[str, Any]) -> float:
    """peft's scaling of ``module``: alpha / rank (alpha / sqrt(rank) for rsLoRA); 1 without an
    alpha (diffusers' convention)."""
    alpha = alphas.get(module)
    if alpha is None:
        alpha = _pattern(config.get("alpha_pattern") or {}, module)
    if alpha is None:
        alpha = config.get("lora_alpha")
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _pattern(patterns: Mapping[str, Any], module: str) -> float | None:
    """The value of the first pattern naming ``module`` (peft's suffix match), or None."""
    for key, value in patterns.items():
        name = key.lstrip("^")
        if module == name or module.endswith(f".{name}"):
            return float(value)
    return None


def _moved(part: LoraPart, device: torch.device | None, dtype: torch.dtype | None) -> LoraPart:
    return LoraPart(part.down.to(device, dtype), part.up.to(device, dtype), part.scale)


def misfit(lora: LoraWeights, unet: torch.nn.Module) -> str | None:
    """Why ``lora`` cannot apply to ``unet`` (another family, nothing for the UNet), or None."""
    if not lora.parts:
        return "it holds no UNet LoRA weights (livediff applies a LoRA's UNet part)"
    for name, part in lora.parts.items():
        try:
            module = unet.get_submodule(name)
        except AttributeError:
            return (
                f"this LoRA is for another model family: it changes {name}, which the loaded"
                " UNet does not have (use a LoRA trained for this base model)"
            )
        if not isinstance(module, FUSABLE):
            return f"it changes {name}, a {type(module).__name__} (only Linear and Conv2d are)"
        if tuple(module.weight.shape) != part.shape or part.up.shape[1] != part.down.shape[0]:
            return (
                f"this LoRA is for another model family: it changes {name} as a"
                f" {list(part.shape)} weight, the loaded UNet's is {list(module.weight.shape)}"
                " (use a LoRA trained for this base model)"
            )
    return None


# -- fusing (worker thread) ------------------------------------------------------------------------
class FusedLoras:
    """LoRA updates fused into the UNet's own weights, in place; the originals of the weights
    the set changes are kept, so a new set (or none) starts from them exactly."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self._unet = unet
        #: The original weight of every module the fused set changes now.
        self._originals: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def apply(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        """Fuse ``sum(weight * delta)`` of ``loras`` into the UNet (an empty list: none)."""
        deltas = summed_deltas(loras)
        for name in [known for known in self._originals if known not in deltas]:
            self._weight(name).copy_(self._originals.pop(name))
        for name, delta in deltas.items():
            weight = self._weight(name)
            original = self._originals.setdefault(name, weight.detach().clone())
            weight.copy_(original.float() + delta)

    def _weight(self, name: str) -> torch.Tensor:
        weight = self._unet.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        return weight


def summed_deltas(loras: Sequence[tuple[LoraWeights, float]]) -> dict[str, torch.Tensor]:
    """Each module's ``sum(weight_i * scale_i * up_i @ down_i)`` in float32."""
    deltas: dict[str, torch.Tensor] = {}
    for lora, weight in loras:
        if weight == 0:
            continue
        for name, part in lora.parts.items():
            delta = part.delta() * weight
            deltas[name] = deltas[name] + delta if name in deltas else delta
    return deltas


# -- the pool --------------------------------------------------------------------------------------
class LoraPool:
    """The LoRAs sessions name, read in the background, fused into one UNet (worker thread but
    for the loader)."""

    def __init__(
        self, unet: torch.nn.Module, device: torch.device, dtype: torch.dtype, locate: Locate
    ) -> None:
        #: The UNet the LoRAs fuse into (the eager module; a compiled one shares its weights).
        self.unet = unet
        self._device = device
        self._dtype = dtype
        self._locate = locate
        self._ready: dict[str, LoraWeights] = {}
        self._loading: dict[str, concurrent.futures.Future[LoraWeights]] = {}
        self._failed: dict[str, str] = {}
        self._fused = FusedLoras(unet)
        #: The set sessions ask for (the last accepted or run) and the set fused now.
        self.wanted: LoraSet = ()
        self.applied: LoraSet = ()
        self._loader = concurrent.futures.ThreadPoolExecutor(1, "livediff-lora")

    # -- params -------------------------------------------------------------------------------
    def check(self, params: DiffusionParams) -> None:
        """Refuse (422 on the entry) a LoRA that cannot serve this UNet; accepted ones start
        loading now and become the set sessions ask for."""
        for lora_id, _ in params.loras():
            reason = self._refusal(lora_id)
            if reason is not None:
                raise entry_error(params, lora_id, reason)
        self.wanted = params.loras()
        self._start(self.wanted)

    def _refusal(self, lora_id: str) -> str | None:
        if lora_id in self._ready:
            return None
        if lora_id in self._failed:
            return self._failed[lora_id]
        try:
            path = self._locate(lora_id, False)
        except ModelUnavailableError as exc:
            if hub_offline() or lora_id.startswith((".", "/", "~")):
                return str(exc)
            return None  # fetched by the background load
        try:
            return misfit(read_lora(path, shapes_only=True), self.unet)
        except (OSError, ValueError) as exc:  # LoraFormatError, a file safetensors cannot read
            return f"cannot read it as a LoRA: {exc}"

    # -- frames -------------------------------------------------------------------------------
    def follow(self, wanted: LoraSet) -> None:
        """Before a batch: fuse ``wanted`` once all of its LoRAs are ready (those that failed
        are left out); until then the set in force stays."""
        self.wanted = wanted
        self._settle()
        usable = tuple(entry for entry in wanted if entry[0] not in self._failed)
        if usable == self.applied:
            return
        self._start(usable)
        if any(lora_id not in self._ready for lora_id, _ in usable):
            return
        started = time.perf_counter()
        self._fused.apply([(self._ready[lora_id], weight) for lora_id, weight in usable])
        self.applied = usable
        self._forget_unwanted()
        logger.info(
            "LoRAs %s fused in %.1f ms", dict(usable), 1e3 * (time.perf_counter() - started)
        )

    def _start(self, loras: LoraSet) -> None:
        for lora_id, _ in loras:
            known = lora_id in self._ready or lora_id in self._loading or lora_id in self._failed
            if not known:
                self._loading[lora_id] = self._loader.submit(self._load, lora_id)

    def _settle(self) -> None:
        """Take in the loads that finished."""
        for lora_id, future in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[lora_id]
            try:
                self._ready[lora_id] = future.result()
            except Exception as exc:  # any load failure: the LoRA is left out, and said so
                self._failed[lora_id] = f"could not load it: {exc}"
                logger.error("LoRA %s could not be loaded: %s", lora_id, exc)

    def _forget_unwanted(self) -> None:
        """Free LoRAs no session asks for (and forget failures, so a fixed file can retry)."""
        wanted = {lora_id for lora_id, _ in self.wanted}
        for table in (self._ready, self._failed):
            for lora_id in [known for known in table if known not in wanted]:
                del table[lora_id]

    def _load(self, lora_id: str) -> LoraWeights:
        """Loader thread: locate (fetch), read, check, move to the device, wait for the copies."""
        lora = read_lora(self._locate(lora_id, True), device=self._device, dtype=self._dtype)
        reason = misfit(lora, self.unet)
        if reason is not None:
            raise LoraFormatError(reason)
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()  # the loader's CUDA stream
        return lora

    def ready(self, lora_id: str) -> bool:
        """Whether the LoRA's load has ended (any thread: tests and benchmarks wait for it;
        the next batch takes it in)."""
        future = self._loading.get(lora_id)
        return lora_id in self._ready or lora_id in self._failed or bool(future and future.done())

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._ready.clear()


def entry_error(params: DiffusionParams, lora_id: str, reason: str) -> ValidationError:
    """A 422 on ``lora_dict.<id>`` (``lcm_lora_id`` for the LCM-LoRA ``use_lcm_lora`` adds)."""
    named = lora_id in (params.lora_dict or {})
    loc: tuple[str, ...] = ("lora_dict", lora_id) if named else ("lcm_lora_id",)
    return ValidationError.from_exception_data(
        "DiffusionParams",
        [{"type": "value_error", "loc": loc, "input": lora_id, "ctx": {"error": reason}}],
    )
