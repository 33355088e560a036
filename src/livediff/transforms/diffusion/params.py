"""Params of the diffusion transform. Torch-free: the ai-runner loader imports this under a guard.

Every field can change on a live session. Only ``model`` and ``vae`` reload weights; a new
prompt costs one text-encoder pass (then cached), a new seed one noise draw, new steps a new
table of scheduler coefficients.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from livediff.config import DEFAULT_MODEL, DEFAULT_VAE, MAX_STEPS
from livediff.transforms.base import TransformParams
from livediff.transforms.diffusion.control_params import (
    MAX_CONTROLNETS,
    TEMPORAL_NET,
    ControlNetSpec,
)
from livediff.transforms.diffusion.ip_adapter_params import IPAdapterConfig
from livediff.transforms.diffusion.temporal_params import (
    CachedAttention,
    ImageProcessing,
    ImageProcessor,
    LatentProcessing,
    LatentProcessor,
    MotionNoise,
)

#: The timestep grid ``t_index_list`` indexes: this many steps, 'trailing' spacing over the
#: model's training timesteps (index 0 = the noisiest step, t = 999 for 1000 train steps).
TIMESTEP_GRID = 50
#: Most entries in a weighted prompt or seed list.
MAX_BLEND = 8

CfgType = Literal["none", "self", "initialize", "full"]
PromptText = Annotated[str, Field(max_length=1000)]
Weight = Annotated[float, Field(ge=0, le=100)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]

#: The four processing blocks (Livepeer's names), in the order a frame meets them.
PROCESSING_BLOCKS = (
    "image_preprocessing",
    "latent_preprocessing",
    "latent_postprocessing",
    "image_postprocessing",
)

#: Livepeer's earlier spellings of ``cached_attention`` (ai-runner still folds them in):
#: top-level keys -> the block's fields.
LEGACY_BANK_KEYS = {
    "use_cached_attn": "enabled",
    "cache_maxframes": "max_frames",
    "cache_interval": "interval",
}

#: ``vae`` value meaning "the model's own (full) VAE" instead of a Tiny AutoEncoder.
FULL_VAE = "full"

#: Most LoRAs one params set may name (``lora_dict``), and the range of their weights.
MAX_LORAS = 8
LORA_WEIGHT_LIMIT = 5.0
#: The LCM-LoRA ``use_lcm_lora`` adds (Livepeer's StreamDiffusion default for SD 1.5).
DEFAULT_LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"
LoraId = Annotated[str, Field(min_length=1, max_length=500)]
LoraWeight = Annotated[float, Field(ge=-LORA_WEIGHT_LIMIT, le=LORA_WEIGHT_LIMIT)]


def _check_blend(pairs: list[tuple[Any, float]], field: str) -> None:
    """A weighted list: 1 to MAX_BLEND [value, weight] pairs whose weights add up above 0."""
    if not 1 <= len(pairs) <= MAX_BLEND:
        raise ValueError(f"give 1 to {MAX_BLEND} [{field}, weight] pairs")
    if sum(weight for _, weight in pairs) <= 0:
        raise ValueError(f"the {field} weights must add up to more than 0")


class DiffusionParams(TransformParams):
    """What a session asks of the diffusion transform (img2img on every frame)."""

    width: int = Field(
        512, ge=64, le=2048, multiple_of=64, description="Output width in pixels (multiple of 64)."
    )
    height: int = Field(
        512, ge=64, le=2048, multiple_of=64, description="Output height in pixels (multiple of 64)."
    )
    prompt: PromptText | list[tuple[PromptText, Weight]] = Field(
        "an oil painting, vivid colours, thick brush strokes",
        description="Text, or [[text, weight], ...] pairs whose embeddings blend by weight.",
    )
    negative_prompt: PromptText = Field(
        "", description="What to steer away from (used by cfg_type 'initialize' and 'full')."
    )
    seed: Seed | list[tuple[Seed, Weight]] = Field(
        2, description="Noise seed, or [[seed, weight], ...] pairs whose noises blend by weight."
    )
    strength: float = Field(
        0.5,
        gt=0,
        le=1,
        description="How far one denoising step starts from the input (1 = from pure noise)."
        " Ignored when t_index_list is given.",
    )
    t_index_list: list[Annotated[int, Field(ge=0, lt=TIMESTEP_GRID)]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_STEPS,
        description=f"Denoising steps as increasing indices into a {TIMESTEP_GRID}-step grid"
        " (0 = noisiest); several steps run as one stream batch. Wins over strength.",
    )
    guidance_scale: float = Field(
        1.0, ge=0, le=20, description="Classifier-free guidance; 1 or less turns it off."
    )
    delta: float = Field(
        1.0, ge=0, le=5, description="Weight of the residual noise in residual CFG (self, init)."
    )
    cfg_type: CfgType = Field(
        "self",
        description="Guidance: none, self (residual, no extra UNet rows), initialize (one"
        " negative row per frame), full (a negative row per step).",
    )
    similarity_threshold: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Skip a frame this similar (cosine) to the last one processed and repeat"
        " the last output; 0 = off, 0.98 is a good start.",
    )
    controlnets: list[ControlNetSpec] = Field(
        default_factory=list,
        max_length=MAX_CONTROLNETS,
        description="ControlNets that steer every frame with its edges, depth or own map;"
        " several combine (their residuals add up). Changes apply live, no reload.",
    )
    do_add_noise: bool = Field(
        True,
        description="Re-noise each frame between its denoising steps with the session's noise"
        " (StreamDiffusion's do_add_noise); off carries alpha * x_0 alone to the next step.",
    )
    motion_noise: MotionNoise = Field(
        default_factory=MotionNoise,
        description="Motion-aware noise: the first step's strength follows how much the input"
        " moved, between min_strength and max_strength (off by default).",
    )
    cached_attention: CachedAttention = Field(
        default_factory=lambda: CachedAttention(enabled=False),
        description="Feature bank (StreamV2V): self-attention also attends to the keys and"
        " values of up to max_frames earlier frames, refreshed every interval frames (off by"
        " default).",
    )
    prompt_clears_history: bool = Field(
        False,
        description="A new prompt clears the temporal history (feature bank, feedback, motion):"
        " the new look takes hold at once instead of blending in.",
    )
    image_preprocessing: ImageProcessing = Field(
        default_factory=ImageProcessing,
        description="Processors on the input frame before encoding (feedback: blend the"
        " previous output in).",
    )
    image_postprocessing: ImageProcessing = Field(
        default_factory=ImageProcessing,
        description="Processors on the output frame (feedback: blend the previous output in).",
    )
    latent_preprocessing: LatentProcessing = Field(
        default_factory=LatentProcessing,
        description="Processors on the input latent before noising (latent_feedback: blend the"
        " previous output latent in).",
    )
    latent_postprocessing: LatentProcessing = Field(
        default_factory=LatentProcessing,
        description="Processors on the denoised latent before decoding (latent_feedback).",
    )
    use_safety_checker: bool = Field(
        False,
        description="Replace every output frame the NSFW classifier flags (Livepeer's"
        " StreamDiffusion param) by the session's last safe output, or a black frame; the"
        " default is the server's (LIVEDIFF_SAFETY_CHECKER: off for serve, on in the"
        " orchestrator image).",
    )
    safety_checker_threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="NSFW score (1 - P(neutral)) at which a frame is replaced; higher values"
        " allow more NSFW images to pass through.",
    )
    lora_dict: dict[LoraId, LoraWeight] | None = Field(
        None,
        max_length=MAX_LORAS,
        description=f"LoRAs fused into the UNet: {{id_or_path: weight}} (hub id of a repo with a"
        f" LoRA safetensors file, a file or a folder), up to {MAX_LORAS}, weights"
        f" -{LORA_WEIGHT_LIMIT:g} to {LORA_WEIGHT_LIMIT:g}; null or empty = none. One set serves"
        " every session on the model: a change is allowed to a session that is alone. Weights"
        " change live (no reload).",
    )
    use_lcm_lora: bool = Field(
        False,
        description="Add the LCM-LoRA (lcm_lora_id, weight 1) to the LoRAs. Livepeer's"
        " StreamDiffusion defaults it to true; here it is false, so that params that do not"
        " name it keep today's output.",
    )
    lcm_lora_id: LoraId = Field(
        DEFAULT_LCM_LORA,
        description="The LCM-LoRA use_lcm_lora adds (hub id, file or folder).",
    )
    ip_adapter: IPAdapterConfig = Field(
        default_factory=lambda: IPAdapterConfig(enabled=False),
        description="IP-Adapter (Livepeer's shape): the style image steers every frame through"
        " extra cross-attention tokens; type, scale, weight_type, enabled (off by default).",
    )
    ip_adapter_style_image_url: str = Field(
        "",
        max_length=14_000_000,
        description="The IP-Adapter's style image: an http(s) URL or a data:image/...;base64,"
        " URL (fetched once, bounded in size and time; a new one applies within a few frames).",
    )
    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        max_length=500,
        description="Diffusers model: hub id or local folder (SD 1.5 / 2.1 / sd-turbo, SDXL).",
    )
    vae: str = Field(
        DEFAULT_VAE,
        min_length=1,
        max_length=500,
        description=f"Tiny AutoEncoder (hub id or folder), or '{FULL_VAE}' for the model's VAE.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_bank(cls, values: object) -> object:
        """Fold Livepeer's earlier feature-bank keys into ``cached_attention``."""
        if not isinstance(values, dict) or not LEGACY_BANK_KEYS.keys() & values.keys():
            return values
        folded = {key: value for key, value in values.items() if key not in LEGACY_BANK_KEYS}
        block = dict(folded.get("cached_attention") or {})
        for legacy, name in LEGACY_BANK_KEYS.items():
            if legacy in values:
                block.setdefault(name, values[legacy])
        folded["cached_attention"] = block
        return folded

    @field_validator("cached_attention", mode="before")
    @classmethod
    def _null_bank(cls, value: object) -> object:
        """An absent (null) block is the feature bank off."""
        return {"enabled": False} if value is None else value

    @field_validator("ip_adapter", mode="before")
    @classmethod
    def _null_ip_adapter(cls, value: object) -> object:
        """An absent (null) block is the IP-Adapter off (Livepeer's default)."""
        return {"enabled": False} if value is None else value

    @field_validator(*PROCESSING_BLOCKS, mode="before")
    @classmethod
    def _null_block(cls, value: object) -> object:
        """Livepeer sends an absent block as null: the same as an empty block."""
        return {} if value is None else value

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[tuple[str, float]]) -> str | list[tuple[str, float]]:
        if isinstance(value, list):
            _check_blend(value, "prompt")
        return value

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | list[tuple[int, float]]) -> int | list[tuple[int, float]]:
        if isinstance(value, list):
            _check_blend(value, "seed")
        return value

    @field_validator("t_index_list")
    @classmethod
    def _check_steps(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(b <= a for a, b in pairwise(value)):
            raise ValueError("t_index_list must be strictly increasing (noisiest step first)")
        return value

    # -- derived values (what the engine computes from) -------------------------------------
    def steps(self) -> tuple[int, ...]:
        """Grid indices of the denoising steps: ``t_index_list``, else the nearest to strength."""
        if self.t_index_list is not None:
            return tuple(self.t_index_list)
        return (strength_to_index(self.strength),)

    def timesteps(self, train_steps: int = 1000) -> tuple[int, ...]:
        """The training timesteps the denoising steps run at (what the engine uses)."""
        if self.t_index_list is not None:
            return tuple(grid_timestep(index, train_steps) for index in self.t_index_list)
        return (strength_timestep(self.strength, train_steps),)

    def weighted_prompts(self) -> tuple[tuple[str, float], ...]:
        """The prompt as (text, weight) pairs."""
        if isinstance(self.prompt, str):
            return ((self.prompt, 1.0),)
        return tuple((text, float(weight)) for text, weight in self.prompt)

    def weighted_seeds(self) -> tuple[tuple[int, float], ...]:
        """The seed as (seed, weight) pairs."""
        if isinstance(self.seed, int):
            return ((self.seed, 1.0),)
        return tuple((seed, float(weight)) for seed, weight in self.seed)

    def temporal_tools(self) -> list[str]:
        """The temporal tools that act on this session's frames, e.g.
        ``["latent_preprocessing.latent_feedback", "do_add_noise=false"]`` (session info)."""
        tools = [
            f"{name}.{processor.type}"
            for name in PROCESSING_BLOCKS
            for processor in _active(getattr(self, name))
        ]
        if self.cached_attention.enabled:
            tools.append(f"cached_attention.max_frames={self.cached_attention.max_frames}")
        tools += [
            f"controlnets.{spec.preprocessor}"
            for spec in self.controlnets
            if spec.preprocessor in TEMPORAL_NET and spec.enabled
        ]
        if not self.do_add_noise:
            tools.append("do_add_noise=false")
        if self.motion_noise.enabled:
            tools.append("motion_noise")
        return tools

    def loras(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs these params ask for, as sorted (id, weight) pairs: ``lora_dict``, and the
        LCM-LoRA at weight 1 with ``use_lcm_lora`` (unless ``lora_dict`` names it itself)."""
        chosen = dict(self.lora_dict or {})
        if self.use_lcm_lora:
            chosen.setdefault(self.lcm_lora_id, 1.0)
        return tuple(sorted((lora_id, float(weight)) for lora_id, weight in chosen.items()))

    def ip_adapter_active(self) -> bool:
        """Whether the IP-Adapter changes this session's frames."""
        return self.ip_adapter.active(self.ip_adapter_style_image_url)

    def guided(self) -> bool:
        """True when classifier-free guidance (of any kind) changes the result."""
        return self.cfg_type != "none" and self.guidance_scale > 1.0


def grid_timestep(index: int, train_steps: int = 1000) -> int:
    """Training timestep of grid ``index`` ('trailing' spacing: index 0 is train_steps - 1)."""
    if not 0 <= index < TIMESTEP_GRID:
        raise ValueError(f"timestep index {index} is outside 0..{TIMESTEP_GRID - 1}")
    return round(train_steps - index * train_steps / TIMESTEP_GRID) - 1


def strength_timestep(strength: float, train_steps: int = 1000) -> int:
    """Timestep of one img2img step at ``strength``: diffusers' img2img starts there whenever
    ``num_inference_steps * strength`` is whole (trailing spacing), e.g. 0.5 -> t = 499."""
    return max(round(train_steps * strength) - 1, 0)


def strength_to_index(strength: float) -> int:
    """The grid index nearest to ``strength``'s timestep."""
    index = round((1.0 - strength) * TIMESTEP_GRID)
    return min(max(index, 0), TIMESTEP_GRID - 1)


def _active(block: ImageProcessing | LatentProcessing) -> list[ImageProcessor | LatentProcessor]:
    """The block's processors that act (enabled, in an enabled block, strength above 0)."""
    if not block.enabled:
        return []
    return [p for p in block.processors if p.enabled and p.strength > 0]
