"""One session's place in the UNet batch: what its params resolved to, and its frames in flight.

Every cache here follows the params by value: a new prompt re-encodes (once, through the shared
cache), a new seed draws new noise, a new number of steps or a new size restarts the stream
batch; nothing reloads the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from livediff.transforms.diffusion.feature_bank import FeatureBankHistory
from livediff.transforms.diffusion.filter import SimilarityFilter
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.prompts import PromptEmbedding, PromptEncoder
from livediff.transforms.diffusion.schedule import Schedule, StepTable


@dataclass(frozen=True)
class LatentShape:
    """Latent channels and size of a session's frames."""

    channels: int
    height: int
    width: int


@dataclass
class SessionCache:
    """Per-session state of the UNet batch (made by ``open_session``, worker thread only)."""

    generation: int
    #: The params of the last frame (to notice any change).
    params: DiffusionParams | None = None
    shape: LatentShape | None = None
    filter: SimilarityFilter = field(default_factory=SimilarityFilter)
    prompt_key: tuple[object, ...] | None = None
    cond: PromptEmbedding | None = None
    uncond: PromptEmbedding | None = None
    noise_key: tuple[object, ...] | None = None
    noise: torch.Tensor | None = None
    table: StepTable | None = None
    #: x_t of the frames at steps 1..N-1 (row j waits for step j + 1), oldest last.
    latents: torch.Tensor | None = None
    #: The input latents (x_0 of the camera frame) of those frames, for residual CFG.
    sources: torch.Tensor | None = None
    #: Frames that entered the stream batch since it last (re)started.
    filled: int = 0
    #: Control images of the frames in flight (N, 3, H, W), newest first, per preprocessor key.
    controls: dict[tuple[object, ...], torch.Tensor] = field(default_factory=dict)
    last_output: torch.Tensor | None = None
    #: The safety filter's last output of this session as sent, decoded (1, 3, H, W) in
    #: [-1, 1]: what replaces a flagged frame (None while the session does not filter).
    safe_output: torch.Tensor | None = None
    #: The temporal tools' history (feedback processors): the decoded image (1, 3, H, W) in
    #: [-1, 1] and the latent (1, C, h, w) the session's last output came from. Its own,
    #: on the device; cleared by a new size and a model reload (:meth:`forget_history`).
    previous_image: torch.Tensor | None = None
    previous_latent: torch.Tensor | None = None
    #: The motion-aware noise controller's history: the last input, pooled (1, 3, H/8, W/8),
    #: and the smoothed strength (1,) it chose, both on the device.
    motion_input: torch.Tensor | None = None
    motion_strength: torch.Tensor | None = None
    #: TemporalNet2's history: the last input frame (1, 3, H, W) in [0, 1], the start of the
    #: optical flow to the next one.
    flow_input: torch.Tensor | None = None
    #: The feature bank (``cached_attention``): keys and values of earlier frames, per layer.
    bank: FeatureBankHistory | None = None
    #: The IP-Adapter's image tokens of the session's style image (1, tokens, dim), and what
    #: they were made from (adapter, style image URL): the image encoder runs once per change.
    ip_tokens: torch.Tensor | None = None
    ip_key: tuple[object, ...] | None = None

    def forget_history(self) -> None:
        """Drop the temporal tools' history (the next frame starts without feedback, an empty
        feature bank, TemporalNet from its own frame, and the motion controller from its
        ``min_strength``)."""
        self.previous_image = self.previous_latent = self.flow_input = None
        self.bank = None
        self.forget_motion()

    def forget_motion(self) -> None:
        self.motion_input = self.motion_strength = None

    def restart(self) -> None:
        """Empty the stream batch (the next N - 1 frames refill it)."""
        self.latents = self.sources = None
        self.filled = 0
        self.controls = {}

    def push_control(self, key: tuple[object, ...], image: torch.Tensor) -> None:
        """The newest frame's control image for ``key``: the frames in flight move one step on
        (a key new to the session fills its earlier frames with this image)."""
        steps = self.table.steps if self.table is not None else 1
        earlier = self.controls.get(key)
        if earlier is None or earlier.shape[1:] != image.shape[1:]:
            self.controls[key] = image.expand(steps, -1, -1, -1).contiguous()
            return
        self.controls[key] = torch.cat((image, earlier[: steps - 1]))

    def release(self) -> None:
        """Drop every tensor (the session is closing)."""
        self.restart()
        self.forget_history()
        self.cond = self.uncond = self.noise = self.last_output = self.safe_output = None
        self.prompt_key = self.noise_key = None
        self.table = None
        self.params = None
        self.ip_tokens = self.ip_key = None
        self.filter.forget()


def follow_params(
    state: SessionCache,
    params: DiffusionParams,
    prompts: PromptEncoder,
    schedule: Schedule,
    shape: LatentShape,
) -> None:
    """Bring ``state``'s embeddings, noise, coefficients and buffers in line with ``params``."""
    prompt_key = (params.weighted_prompts(), params.negative_prompt)
    if prompt_key != state.prompt_key:
        if state.prompt_key is not None and params.prompt_clears_history:
            state.forget_history()
        state.cond = prompts.blend(params.weighted_prompts())
        state.uncond = None
        state.prompt_key = prompt_key
    if state.uncond is None and params.guided() and params.cfg_type in ("initialize", "full"):
        state.uncond = prompts.negative(params.negative_prompt)
    steps = params.timesteps(schedule.train_steps)
    noise_key = (params.weighted_seeds(), len(steps), shape)
    if noise_key != state.noise_key:
        state.noise = blended_noise(params.weighted_seeds(), len(steps), shape, schedule)
        state.noise_key = noise_key
    table = schedule.table(steps)
    if state.shape != shape:
        state.forget_history()
    if state.table is None or state.table.steps != table.steps or state.shape != shape:
        state.restart()
    state.table = table
    state.shape = shape


def blended_noise(
    seeds: tuple[tuple[int, float], ...],
    steps: int,
    shape: LatentShape,
    schedule: Schedule,
) -> torch.Tensor:
    """Unit-variance noise for every step: one draw per seed, mixed by weight.

    Drawn on the CPU so that a seed gives the same noise on every device (and the same as
    diffusers with ``torch.Generator().manual_seed(seed)`` for the first step).
    """
    size = (steps, shape.channels, shape.height, shape.width)
    mixed = torch.zeros(size, dtype=torch.float32)
    for seed, weight in seeds:
        generator = torch.Generator().manual_seed(seed)
        mixed.add_(torch.randn(size, generator=generator, dtype=torch.float32), alpha=weight)
    norm = sum(weight * weight for _, weight in seeds) ** 0.5
    return mixed.div_(norm).to(schedule.device, schedule.dtype)
