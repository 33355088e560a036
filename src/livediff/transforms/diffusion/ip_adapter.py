"""IP-Adapter (``ip_adapter``), per session and live, in one UNet batch.

A style image steers every frame: its CLIP image embedding (the image encoder runs once per
style image, never per frame) is projected to ``tokens`` extra tokens (``image_proj``: a linear
layer to tokens x cross_attention_dim, then LayerNorm), and every cross-attention layer ``l``
(``attn2`` of each transformer block) adds ``scale * weight_l * attention(query, to_k_ip_l(tokens),
to_v_ip_l(tokens))`` to its text attention before its output projection: diffusers'
``IPAdapterAttnProcessor2_0``, but with a scale per row, so sessions with different style
images, scales, weight types or none at all share one UNet call. FaceID (``type: "faceid"``,
:mod:`.ip_adapter_faceid`) differs only in the embedding (a face's ArcFace embedding) and the
projection (an MLP); the pool loads it as a kind of adapter and the attention path is this one.

The UNet is never converted (diffusers' ``load_ip_adapter`` would replace its processors and
add ``encoder_hid_proj``, which changes every call and the compiled graph): at load,
:func:`install_ip_adapter` wraps every cross-attention processor (before compiling, as the
feature bank wraps the self-attention ones), and the wrapper delegates to the processor it
replaced unless an :class:`IPAdapterCall` is active. A batch with one runs the UNet eager, like
the feature bank's and ControlNets' batches, so nothing compiles when it turns on, off, or
changes scale, weight type or image.

Invariants:
- a row whose session has no IP-Adapter gets scale 0 in every layer: its output is today's
  (``x + 0 * y`` is ``x``), and a layer no row uses is skipped;
- guidance rows (``cfg_type`` full / initialize) attend to the projection of a zero embedding,
  as diffusers' negative image embeds are;
- the weights come from the adapter's state dict (h94's keys ``image_proj.*`` and
  ``ip_adapter.N.to_k_ip.weight``: ``N`` = 2 i + 1 for the i-th cross-attention in diffusers'
  processor order, attn1 and attn2 counted alike) and are checked against the UNet: an adapter
  whose tokens are not the UNet's cross-attention width (e.g. any h94 adapter on SD 2.1 /
  sd-turbo, 1024 wide) is refused with a 422 on ``ip_adapter``.

Weight types (:func:`layer_weights`) follow ComfyUI_IPAdapter_plus (Livepeer's names): layers
are numbered by spatial transformer in the order input (down blocks), middle, output (up
blocks): 16 for SD 1.5 (6 + 1 + 9), 11 for SDXL (4 + 1 + 6); a transformer's blocks share its
weight. The "precise" types keep their image-conditioned layers only (ComfyUI also moves the
image into the negative rows of the others; here negative rows always use the zero image).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from livediff.pixels.device import constant
from livediff.transforms.diffusion.layer_call import LayerSwitch
from livediff.transforms.diffusion.models import (
    FACEID_FILES,
    IP_ADAPTER_FILES,
    ModelUnavailableError,
)

logger = logging.getLogger(__name__)

#: Cross-attention widths h94/IP-Adapter serves: its families, for the refusal's message.
SERVED = "the SD 1.5 family (cross-attention 768, models/) and SDXL (2048, sdxl_models/)"
#: (repo or folder, sdxl) -> the adapter's folder (the family's subfolder, downloaded if asked).
Locate = Callable[[str, bool, bool], Path]


# -- the cross-attention processor ---------------------------------------------------------------
@dataclass
class IPAdapterCall:
    """What one UNet call's cross-attention layers add: every row's image tokens (B, T, D),
    and per layer the rows' scales (B,) or None where no row uses that layer."""

    tokens: torch.Tensor
    scales: list[torch.Tensor | None]
    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]


@dataclass
class IPAdapterSwitch(LayerSwitch[IPAdapterCall]):
    """The cross-attention layers' shared switch (its call, None: plain attention), and each
    layer's spatial transformer (its name) and block kind (input/middle/output)."""

    transformers: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def layers(self) -> int:
        return len(self.transformers)


class IPCrossAttention:
    """A cross-attention processor: the one it replaced (``inner``) while no IP-Adapter call
    is active, else diffusers' IP-Adapter attention with per-row scales."""

    def __init__(self, inner: Any, switch: IPAdapterSwitch, layer: int) -> None:
        self.inner = inner
        self.switch = switch
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = self.switch.call
        scale = None if call is None else call.scales[self.layer]
        if call is None or scale is None or encoder_hidden_states is None:
            return self.inner(  # type: ignore[no-any-return]
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        return ip_attention(
            attn, hidden_states, encoder_hidden_states, temb, call=call, layer=self.layer
        )


def _heads(part: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return part.view(batch, -1, heads, part.shape[-1] // heads).transpose(1, 2)


def ip_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor | None,
    *,
    call: IPAdapterCall,
    layer: int,
) -> torch.Tensor:
    """diffusers' ``IPAdapterAttnProcessor2_0`` (no mask) with a scale per row."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial = hidden_states.shape if hidden_states.ndim == 4 else None
    if spatial is not None:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    batch, heads = hidden_states.shape[0], attn.heads
    query = attn.to_q(hidden_states)
    text = encoder_hidden_states
    if attn.norm_cross:
        text = attn.norm_encoder_hidden_states(text)
    key, value = attn.to_k(text), attn.to_v(text)
    query, key, value = (_heads(part, batch, heads) for part in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value)
    out = out.transpose(1, 2).reshape(batch, -1, key.shape[1] * key.shape[-1]).to(query.dtype)
    tokens = call.tokens
    ip_key = _heads(F.linear(tokens, call.keys[layer]), batch, heads)
    ip_value = _heads(F.linear(tokens, call.values[layer]), batch, heads)
    image = F.scaled_dot_product_attention(query, ip_key, ip_value)
    image = image.transpose(1, 2).reshape(batch, -1, out.shape[-1]).to(query.dtype)
    scale = call.scales[layer]
    assert scale is not None
    out = out + scale.view(-1, 1, 1) * image
    out = attn.to_out[1](attn.to_out[0](out))
    if spatial is not None:
        out = out.transpose(-1, -2).reshape(spatial)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor  # type: ignore[no-any-return]


def install_ip_adapter(unet: Any) -> IPAdapterSwitch:
    """Wrap every cross-attention processor of ``unet`` (before it is compiled) and return the
    switch their calls go through; layers are numbered in diffusers' processor order."""
    switch = IPAdapterSwitch()
    processors = dict(unet.attn_processors)
    for name, processor in processors.items():
        if _is_cross_attention(unet, name):
            processors[name] = IPCrossAttention(processor, switch, switch.layers)
            switch.transformers.append(name.split(".transformer_blocks.")[0])
            switch.kinds.append(_block_kind(name))
    unet.set_attn_processor(processors)
    return switch


def _is_cross_attention(unet: Any, name: str) -> bool:
    module = unet.get_submodule(name.removesuffix(".processor"))
    attention = importlib.import_module("diffusers.models.attention_processor").Attention
    return isinstance(module, attention) and bool(module.is_cross_attention)


def _block_kind(name: str) -> str:
    """ComfyUI's block kind of a processor: input (down), middle (mid) or output (up)."""
    if name.startswith("down_blocks"):
        return "input"
    return "middle" if name.startswith("mid_block") else "output"


# -- weight types ---------------------------------------------------------------------------------
def _indices(*spans: tuple[int, int]) -> dict[int, float]:
    return {index: 1.0 for start, stop in spans for index in range(start, stop + 1)}


#: Per-transformer weights of the table-driven types (ComfyUI_IPAdapter_plus): SD 1.5's 16
#: transformers (input 0-5, middle 6, output 7-15), SDXL's 11 (input 0-3, middle 4, output
#: 5-10); a transformer not named gets 0.
SD_TABLES: dict[str, dict[int, float]] = {
    "style transfer": _indices((0, 3), (9, 15)),
    "composition": {4: 0.25, 5: 1.0},
    "strong style transfer": _indices((0, 3), (6, 15)),
    "style and composition": {**_indices((0, 3), (9, 15)), 4: 0.25, 5: 1.0},
    "style transfer precise": _indices((0, 3), (9, 15)),
    "composition precise": {4: 0.25, 5: 1.0},
}
SDXL_TABLES: dict[str, dict[int, float]] = {
    "style transfer": {6: 1.0},
    "composition": {3: 1.0},
    "strong style transfer": _indices((0, 2), (4, 10)),
    "style and composition": {3: 1.0, 6: 1.0},
    "style transfer precise": {6: 1.0},
    "composition precise": {3: 1.0},
}
#: The "weak"/"strong" types: 0.2 on the block kinds named, 1 elsewhere.
WEAK = {
    "weak input": ("input",),
    "weak output": ("output",),
    "weak middle": ("middle",),
    "strong middle": ("input", "output"),
}


def transformer_order(switch: IPAdapterSwitch) -> list[str]:
    """The spatial transformers in ComfyUI's order: input, middle, output."""
    ordered: list[str] = []
    for kind in ("input", "middle", "output"):
        for name, found in zip(switch.transformers, switch.kinds, strict=True):
            if found == kind and name not in ordered:
                ordered.append(name)
    return ordered


def transformer_weight(weight_type: str, index: int, count: int, kind: str, sdxl: bool) -> float:
    """The multiplier of spatial transformer ``index`` (of ``count``, ComfyUI's order)."""
    half = count / 2
    if weight_type == "ease in":
        return 0.05 + 0.95 * (1 - index / count)
    if weight_type == "ease out":
        return 0.05 + 0.95 * (index / count)
    if weight_type == "ease in-out":
        return 0.05 + 0.95 * (1 - abs(index - half) / half)
    if weight_type == "reverse in-out":
        return 0.05 + 0.95 * (abs(index - half) / half)
    if weight_type in WEAK:
        return 0.2 if kind in WEAK[weight_type] else 1.0
    table = (SDXL_TABLES if sdxl else SD_TABLES).get(weight_type)
    return 1.0 if table is None else table.get(index, 0.0)


def layer_weights(weight_type: str, switch: IPAdapterSwitch, sdxl: bool) -> tuple[float, ...]:
    """The multiplier of every cross-attention layer (``switch``'s order) for ``weight_type``."""
    order = transformer_order(switch)
    kinds = dict(zip(switch.transformers, switch.kinds, strict=True))
    by_name = {
        name: transformer_weight(weight_type, index, len(order), kinds[name], sdxl)
        for index, name in enumerate(order)
    }
    return tuple(by_name[name] for name in switch.transformers)


# -- the adapter's weights ------------------------------------------------------------------------
#: An adapter file's tensors in h94's layout: {"image_proj": {...}, "ip_adapter": {...}}.
AdapterState = dict[str, dict[str, torch.Tensor]]


@dataclass
class IPAdapterWeights:
    """An adapter on the device: the image projection and each cross-attention layer's
    ``to_k_ip`` / ``to_v_ip`` weights (out, cross_attention_dim), and its image encoder."""

    proj: torch.nn.Module
    norm: torch.nn.LayerNorm
    tokens: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    #: The width of the embeddings ``proj`` takes.
    embed_dim: int = 0
    encoder: Any = None
    #: The encoder's input size (pixels a side) and its preprocessor.
    processor: Any = None
    _negative: torch.Tensor | None = None

    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """Image embeds (B, E) -> image tokens (B, tokens, D): diffusers' ImageProjection."""
        projected = self.proj(embeds.to(self.norm.weight.dtype))
        return self.norm(projected.reshape(embeds.shape[0], self.tokens, -1))  # type: ignore[no-any-return]

    def negative(self) -> torch.Tensor:
        """The tokens of a zero embedding (1, tokens, D): what guidance rows attend to."""
        if self._negative is None:
            zeros = self.norm.weight.new_zeros((1, self.embed_dim))
            self._negative = self.project(zeros)
        return self._negative

    @torch.inference_mode()
    def encode(self, image: Any) -> torch.Tensor:
        """A style image (PIL) -> its tokens (1, tokens, D): its embedding, projected."""
        return self.project(self.embed(image))

    def embed(self, image: Any) -> torch.Tensor:
        """The image encoder's projected embedding (1, E) (CLIP preprocessing: resize, centre
        crop, normalise)."""
        pixels = self.processor(images=image, return_tensors="pt").pixel_values
        encoder = self.encoder
        weight = next(encoder.parameters())
        return encoder(pixels.to(weight.device, weight.dtype)).image_embeds  # type: ignore[no-any-return]


def read_state(path: Path) -> AdapterState:
    """An adapter file in h94's format: ``{"image_proj": {...}, "ip_adapter": {...}}`` (a
    .bin, or a .safetensors with the two prefixes flattened)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        state: AdapterState = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            part, _, rest = key.partition(".")
            state.setdefault(part, {})[rest] = value
        return state
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) torch file cannot be memory-mapped
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    return loaded  # type: ignore[no-any-return]


def misfit(state: AdapterState, unet: Any, switch: IPAdapterSwitch) -> str | None:
    """Why the adapter in ``state`` cannot serve ``unet``, or None (shapes only, no names)."""
    proj = state.get("image_proj", {}).get("proj.weight")
    if proj is None:
        return "this is not an IP-Adapter of the plain kind (no image_proj.proj.weight)"
    width = int(unet.config.cross_attention_dim)
    tokens_width = int(proj.shape[0]) // 4
    if tokens_width != width:
        return (
            f"this IP-Adapter makes image tokens {tokens_width} wide, the loaded model's"
            f" cross-attention is {width} wide: h94/IP-Adapter serves {SERVED}; SD 2.1 /"
            " sd-turbo (1024) have none"
        )
    return layers_misfit(state, unet, f"it serves {SERVED}")


def layers_misfit(state: AdapterState, unet: Any, serves: str) -> str | None:
    """Why the adapter's per-layer ``to_k_ip`` do not fit ``unet``'s cross-attention, or None."""
    layers = state.get("ip_adapter", {})
    for index, name in enumerate(_cross_names(unet)):
        key = layers.get(f"{2 * index + 1}.to_k_ip.weight")
        wanted = unet.get_submodule(name).to_k.weight.shape
        if key is None or tuple(key.shape) != tuple(wanted):
            return (
                f"this IP-Adapter does not fit the loaded model's cross-attention layer"
                f" {index} ({name}): {serves}"
            )
    return None


def _cross_names(unet: Any) -> list[str]:
    names = [name.removesuffix(".processor") for name in unet.attn_processors]
    return [name for name in names if name.endswith("attn2")]


def build_weights(
    state: AdapterState, layers: int, device: torch.device, dtype: torch.dtype
) -> IPAdapterWeights:
    """The projection and per-layer weights of a checked ``state``, on ``device``."""
    image_proj = state["image_proj"]
    out_features, in_features = image_proj["proj.weight"].shape
    proj = torch.nn.Linear(in_features, out_features)
    proj.load_state_dict({"weight": image_proj["proj.weight"], "bias": image_proj["proj.bias"]})
    norm = torch.nn.LayerNorm(out_features // 4)
    norm.load_state_dict({"weight": image_proj["norm.weight"], "bias": image_proj["norm.bias"]})
    adapter = state["ip_adapter"]

    def moved(name: str, index: int) -> torch.Tensor:
        return adapter[f"{2 * index + 1}.{name}.weight"].to(device, dtype).contiguous()

    return IPAdapterWeights(
        proj=proj.to(device, dtype).eval().requires_grad_(False),
        norm=norm.to(device, dtype).eval().requires_grad_(False),
        tokens=4,
        embed_dim=int(in_features),
        keys=[moved("to_k_ip", index) for index in range(layers)],
        values=[moved("to_v_ip", index) for index in range(layers)],
    )


def weights_file(folder: Path, sdxl: bool) -> Path:
    """The adapter file in a family folder (h94's name, else the only .bin/.safetensors)."""
    wanted = folder / IP_ADAPTER_FILES[sdxl][1]
    if wanted.is_file():
        return wanted
    found = sorted(folder.glob("ip-adapter*.bin")) + sorted(folder.glob("ip-adapter*.safetensors"))
    if len(found) != 1:
        raise ModelUnavailableError(
            f"{folder} holds no {wanted.name} (nor one other ip-adapter file)", "ip_adapter"
        )
    return found[0]


# -- the pool: load in the background, check params, encode images ------------------------------
class IPAdapterPool:
    """The IP-Adapters sessions name (by repo or folder), loaded off the worker thread."""

    def __init__(
        self,
        unet: Any,
        switch: IPAdapterSwitch,
        device: torch.device,
        dtype: torch.dtype,
        locate: Locate,
        *,
        sdxl: bool,
        style_image: Callable[[str], Any] = lambda _url: None,
        locate_faceid: Locate | None = None,
        locate_face: Callable[[], Path] | None = None,
    ) -> None:
        """``style_image(url)``: the decoded style image the event loop fetched, or None;
        ``locate_faceid`` / ``locate_face``: FaceID adapters and the face model (None: no
        FaceID)."""
        self.unet = unet
        self.style_image = style_image
        self.switch = switch
        self.device = device
        self.dtype = dtype
        self.sdxl = sdxl
        self._locate = locate
        self._locate_faceid = locate_faceid
        self._locate_face = locate_face
        #: Each repo's kind (True: FaceID), set by the first ``refusal`` that names it.
        self._faceid: dict[str, bool] = {}
        self._face: Any = None
        self._face_lock = threading.Lock()
        self._ready: dict[str, IPAdapterWeights] = {}
        self._failed: dict[str, str] = {}
        self._loading: dict[str, concurrent.futures.Future[IPAdapterWeights]] = {}
        self._lock = threading.Lock()
        self._loader = concurrent.futures.ThreadPoolExecutor(1, "livediff-ip-adapter")
        self._weights: dict[str, tuple[float, ...]] = {}

    def refusal(self, repo: str, *, faceid: bool = False) -> str | None:
        """Why the adapter of ``repo`` cannot serve this model (None: fine, or loading); an
        adapter on disk is checked now (its shapes, memory-mapped), else its load starts.
        ``faceid``: as an IP-Adapter FaceID (a repo serves as one kind)."""
        kind = self._faceid.setdefault(repo, faceid)
        if kind != faceid:
            return f"{repo!r} serves as {'a FaceID' if kind else 'a plain'} IP-Adapter already"
        if repo in self._ready:
            return None
        if repo in self._failed:
            return self._failed[repo]
        try:
            folder = self._folder(repo, download=False)
        except ModelUnavailableError as exc:
            if repo.startswith((".", "/", "~")) or (faceid and self._locate_faceid is None):
                return str(exc)
            self.get(repo)  # fetched by the background load
            return None
        try:
            reason = self._misfit(read_state(self._file(folder, faceid)), faceid)
        except ModelUnavailableError as exc:
            reason = str(exc)
        if reason is not None:
            self._failed[repo] = reason
        else:
            self.get(repo)
        return reason

    def get(self, repo: str) -> IPAdapterWeights | None:
        """The loaded adapter, or None while it loads (its load starts on first ask)."""
        found = self._ready.get(repo)
        if found is not None or repo in self._failed:
            return found
        with self._lock:
            future = self._loading.get(repo)
            if future is None:
                self._loading[repo] = self._loader.submit(self._load, repo)
                return None
        if not future.done():
            return None
        with self._lock:
            self._loading.pop(repo, None)
        try:
            self._ready[repo] = future.result()
        except Exception as exc:
            self._failed[repo] = f"could not load it: {exc}"
            logger.error("IP-Adapter %s could not be loaded: %s", repo, exc)
            return None
        logger.info("IP-Adapter %s joined", repo)
        return self._ready[repo]

    def _folder(self, repo: str, *, download: bool) -> Path:
        """The adapter's folder (the family's, for a plain one), by its kind."""
        if not self._faceid.get(repo, False):
            return self._locate(repo, self.sdxl, download)
        if self._locate_faceid is None:
            raise ModelUnavailableError("IP-Adapter FaceID is not served here", "ip_adapter")
        return self._locate_faceid(repo, self.sdxl, download)

    def _file(self, folder: Path, faceid: bool) -> Path:
        return folder / FACEID_FILES[self.sdxl] if faceid else weights_file(folder, self.sdxl)

    def _misfit(self, state: AdapterState, faceid: bool) -> str | None:
        if not faceid:
            return misfit(state, self.unet, self.switch)
        from livediff.transforms.diffusion.ip_adapter_faceid import faceid_misfit

        return faceid_misfit(state, self.unet)

    def face_model(self) -> Any:
        """FaceID's face model (:class:`.ip_adapter_faceid.FaceModel`), loaded on first ask;
        raises ModelUnavailableError when it cannot be found or loaded."""
        with self._face_lock:
            if self._face is None:
                if self._locate_face is None:
                    raise ModelUnavailableError("no face model is served here", "ip_adapter")
                from livediff.transforms.diffusion.ip_adapter_faceid import FaceModel

                folder = self._locate_face()
                try:
                    self._face = FaceModel(folder, cuda=self.device.type == "cuda")
                except Exception as exc:  # onnxruntime's errors have no common base
                    raise ModelUnavailableError(
                        f"the face model in {folder} could not be loaded: {exc}", "ip_adapter"
                    ) from exc
            return self._face

    def _load(self, repo: str) -> IPAdapterWeights:
        """Loader thread: the adapter and its image encoder (FaceID: the face model), on the
        device."""
        faceid = self._faceid.get(repo, False)
        folder = self._folder(repo, download=True)
        state = read_state(self._file(folder, faceid))
        reason = self._misfit(state, faceid)
        if reason is not None:
            raise ValueError(reason)
        if faceid:
            return self._load_faceid(state)
        weights = build_weights(state, self.switch.layers, self.device, self.dtype)
        transformers = importlib.import_module("transformers")
        encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(
            folder / "image_encoder"
        )
        weights.encoder = encoder.to(self.device, self.dtype).eval().requires_grad_(False)
        size = int(encoder.config.image_size)
        weights.processor = transformers.CLIPImageProcessor(size=size, crop_size=size)
        self._synchronize()
        return weights

    def _load_faceid(self, state: AdapterState) -> IPAdapterWeights:
        from livediff.transforms.diffusion.ip_adapter_faceid import build_faceid_weights

        weights = build_faceid_weights(state, self.switch.layers, self.device, self.dtype)
        weights.face = self.face_model()
        self._synchronize()
        return weights

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def layer_weights(self, weight_type: str) -> tuple[float, ...]:
        """Every cross-attention layer's multiplier for ``weight_type`` (cached)."""
        if weight_type not in self._weights:
            self._weights[weight_type] = layer_weights(weight_type, self.switch, self.sdxl)
        return self._weights[weight_type]

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._ready.clear()


@dataclass
class IPRows:
    """One session's rows in a UNet call: its tokens (None: no IP-Adapter), how many rows
    attend to them (its steps) and how many to the zero image (its guidance rows)."""

    rows: int
    cond_rows: int
    tokens: torch.Tensor | None
    scale: float
    weights: tuple[float, ...]


def ip_call(
    sessions: Sequence[IPRows], adapter: IPAdapterWeights, layers: int, device: torch.device
) -> IPAdapterCall:
    """The call of a batch's rows, in order; the scales are device constants per value."""
    parts: list[torch.Tensor] = []
    negative = adapter.negative()
    for rows in sessions:
        cond = negative if rows.tokens is None else rows.tokens
        parts.append(cond.expand(rows.cond_rows, -1, -1))
        parts.append(negative.expand(rows.rows - rows.cond_rows, -1, -1))
    tokens = torch.cat(parts)
    scales: list[torch.Tensor | None] = []
    for layer in range(layers):
        row_scales = tuple(
            rows.scale * rows.weights[layer] if rows.tokens is not None else 0.0
            for rows in sessions
            for _ in range(rows.rows)
        )
        used = any(value != 0.0 for value in row_scales)
        scales.append(constant(row_scales, device, tokens.dtype) if used else None)
    return IPAdapterCall(tokens, scales, adapter.keys, adapter.values)
