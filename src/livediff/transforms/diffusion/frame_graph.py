"""The frame graph: a whole batch of plain frames as one function, compiled once per bucket.

The staged path (:class:`~.unet_batch.UNetBatch`) runs a batch as three planned calls (VAE
encode, UNet, VAE decode) with each session's stream-batch arithmetic between them in eager
code: a few dozen small kernels a session, and three CUDA graphs with copies between them.
For frames that need nothing else (no ControlNet, feature bank or IP-Adapter), all of it is one
function of tensors whose first dimension is the frame: the image feedback, the encode, the
latent feedback, the noising of the newest frame, the stream batch's UNet rows and their
guidance, the scheduler step, the re-noising of the unfinished frames, the latent feedback
after the step, the decode and the image feedback after it. Each session's settings are
values in those tensors (its coefficient table, guidance scale, delta, feedback weights and
whether it re-noises), not branches, so that sessions of any settings share the code: under
``--compile`` it compiles once per bucket of frames, and each bucket records ONE CUDA graph.

What fixes the code is the :class:`FrameVariant`: the steps per frame and the rows guidance
adds (none for ``self`` guidance or none at all, one per frame for ``initialize``, one per step
for ``full``). Under ``--compile`` the variants of ``Settings.frame_graph_steps`` (with
``self``/no guidance) are planned at load, at every bucket, twice (as :class:`PaddedCall`
plans); a batch of another variant runs staged, compiled too, so nothing compiles while
serving. Without ``--compile`` every variant runs here, eager, unpadded.

Invariant: a frame's result is the staged path's (same arithmetic, in :data:`STEP_DTYPE`; a
chain of feedback blends is one blend of weight ``1 - prod(1 - s)``), whatever else is in the
batch: no operation mixes frames, so padding frames never touch real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from livediff.pixels.device import constant
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.prompts import PromptEmbedding
from livediff.transforms.diffusion.schedule import STEP_DTYPE, Schedule, StepTable
from livediff.transforms.diffusion.shapes import PaddedCall, cudnn_autotuning
from livediff.transforms.diffusion.state import SessionCache

#: The rows guidance adds to a frame's: none (``self`` guidance, or none), the first step's
#: (``initialize``), every step's (``full``).
Negatives = Literal["residual", "initialize", "full"]

#: Columns of the per-frame scalars (``FrameInputs.scalars``).
GUIDANCE, DELTA, GUIDED, ADD_NOISE, IMAGE_PRE, LATENT_PRE, LATENT_POST, IMAGE_POST = range(8)
SCALARS = 8


@dataclass(frozen=True)
class FrameVariant:
    """What fixes a frame graph's code: steps per frame and the rows guidance adds."""

    steps: int
    negatives: Negatives

    @classmethod
    def of(cls, params: DiffusionParams, steps: int) -> FrameVariant:
        guided = params.guided()
        if guided and params.cfg_type == "full":
            return cls(steps, "full")
        if guided and params.cfg_type == "initialize":
            return cls(steps, "initialize")
        return cls(steps, "residual")

    @property
    def negative_rows(self) -> int:
        """UNet rows guidance adds per frame."""
        return {"residual": 0, "initialize": 1, "full": self.steps}[self.negatives]


@dataclass
class FrameRow:
    """One frame of a batch: its session, params, coefficients and uploaded image (1, 3, H, W)
    in [-1, 1]."""

    state: SessionCache
    params: DiffusionParams
    table: StepTable
    image: torch.Tensor
    #: SDXL's size conditioning (1, 6); None for the SD family.
    time_ids: torch.Tensor | None = None


@dataclass
class FrameOutputs:
    """What the frame graph gives a batch, a row per frame: decoded images (F, 3, H, W) in
    [-1, 1] after ``image_postprocessing`` and latents (F, C, h, w) after
    ``latent_postprocessing``; a row means something only once its session's stream batch has
    filled (``finished``)."""

    images: torch.Tensor
    latents: torch.Tensor
    finished: list[bool]


class FrameForward:
    """The frame graph's function for one variant (see the module docstring); called with the
    inputs :meth:`FrameGraphs.inputs` makes, in that order, every one frames-first."""

    def __init__(
        self,
        variant: FrameVariant,
        *,
        unet: Callable[..., torch.Tensor],
        encode: Callable[[torch.Tensor], torch.Tensor],
        decode: Callable[[torch.Tensor], torch.Tensor],
        schedule: Schedule,
        dtype: torch.dtype,
        vae_dtype: torch.dtype,
        sdxl: bool,
    ) -> None:
        """``unet(x_t, timesteps, hidden, added)`` -> noise estimate in the model dtype;
        ``encode`` images in the VAE dtype -> scaled latents in STEP_DTYPE; ``decode`` scaled
        latents in STEP_DTYPE -> images in the model dtype."""
        self.variant = variant
        self.unet = unet
        self.encode = encode
        self.decode = decode
        self.schedule = schedule
        self.dtype = dtype
        self.vae_dtype = vae_dtype
        self.sdxl = sdxl

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (images, latents[, carried latents, carried sources]) of every frame."""
        steps = self.variant.steps
        images, previous_image, previous_latent, scalars, table, timesteps, noise = inputs[:7]
        rest = list(inputs[7:])
        carried = (rest.pop(0), rest.pop(0)) if steps > 1 else None
        prompts = rest

        pixels = _blend(images, previous_image, _column(scalars, IMAGE_PRE))
        source = self.encode(pixels.to(self.vae_dtype))
        source = _blend(source, previous_latent, _column(scalars, LATENT_PRE))
        alpha, beta, c_skip, c_out = (table[:, index, :, None, None, None] for index in range(4))
        newest = Schedule.noised(source, noise[:, 0], alpha[:, 0], beta[:, 0])
        x_t, sources = newest[:, None], source[:, None]
        if carried is not None:
            x_t = torch.cat((x_t, carried[0]), dim=1)
            sources = torch.cat((sources, carried[1]), dim=1)
        output = self._unet_rows(x_t, timesteps, prompts).to(STEP_DTYPE)
        epsilon = self._guided(output, x_t, sources, scalars, alpha=alpha, beta=beta)
        denoised = (x_t - beta * epsilon) / alpha * c_out + c_skip * x_t
        latent = _blend(denoised[:, -1], previous_latent, _column(scalars, LATENT_POST))
        decoded = self.decode(latent)
        decoded = _blend(decoded, previous_image, _column(scalars, IMAGE_POST)).to(self.dtype)
        if carried is None:
            return decoded, latent
        kept = alpha[:, 1:] * denoised[:, :-1]
        renoised = kept + beta[:, 1:] * noise[:, 1:]
        add_noise = _column(scalars, ADD_NOISE)[:, None] > 0
        return decoded, latent, torch.where(add_noise, renoised, kept), sources[:, :-1]

    def _unet_rows(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, prompts: list[torch.Tensor]
    ) -> torch.Tensor:
        """The UNet over every frame's step rows (frame-major), then its guidance rows (the
        first ``take`` steps of each frame, with the unconditional prompt)."""
        conditioning = _Conditioning.unpack(prompts, self.sdxl, self.variant.negatives)
        parts = [_rows(x_t, timesteps, conditioning.cond, conditioning.time_ids)]
        take = self.variant.negative_rows
        if take:
            assert conditioning.uncond is not None
            uncond = conditioning.uncond
            parts.append(_rows(x_t[:, :take], timesteps[:, :take], uncond, conditioning.time_ids))
        rows, times, hidden, pooled, time_ids = (
            torch.cat(column) if column[0] is not None else None
            for column in zip(*parts, strict=True)
        )
        assert rows is not None and times is not None and hidden is not None
        added = (pooled, time_ids) if pooled is not None and time_ids is not None else None
        return self.unet(rows.to(self.dtype), times, hidden, added)

    def _guided(
        self,
        output: torch.Tensor,
        x_t: torch.Tensor,
        sources: torch.Tensor,
        scalars: torch.Tensor,
        *,
        alpha: torch.Tensor,
        beta: torch.Tensor,
    ) -> torch.Tensor:
        """Each frame's noise estimate after its guidance (frames, steps, C, h, w)."""
        frames, steps = x_t.shape[:2]
        shape = x_t.shape[2:]
        conditioned = output[: frames * steps].view(frames, steps, *shape)
        epsilon = self.schedule.to_epsilon(conditioned, x_t, alpha, beta)
        scale = _column(scalars, GUIDANCE)[:, None]
        negatives = self.variant.negatives
        if negatives == "full":
            unconditioned = output[frames * steps :].view(frames, steps, *shape)
            negative = self.schedule.to_epsilon(unconditioned, x_t, alpha, beta)
            return negative + scale * (epsilon - negative)
        delta = _column(scalars, DELTA)[:, None]
        negative = Schedule.residual_noise(x_t, sources, alpha, beta) * delta
        if negatives == "initialize":
            first = output[frames * steps :].view(frames, 1, *shape)
            first = self.schedule.to_epsilon(first, x_t[:, :1], alpha[:, :1], beta[:, :1])
            negative = torch.cat((first, negative[:, 1:]), dim=1)
            return negative + scale * (epsilon - negative)
        guided = _column(scalars, GUIDED)[:, None] > 0
        return torch.where(guided, negative + scale * (epsilon - negative), epsilon)


@dataclass(frozen=True)
class _Conditioning:
    """The prompt inputs of a batch, frames first: each frame's (hidden, SDXL pooled) for its
    prompt and (guidance rows only) its negative prompt, and SDXL's time ids."""

    cond: tuple[torch.Tensor, torch.Tensor | None]
    uncond: tuple[torch.Tensor, torch.Tensor | None] | None
    time_ids: torch.Tensor | None

    @classmethod
    def unpack(cls, prompts: list[torch.Tensor], sdxl: bool, negatives: Negatives) -> _Conditioning:
        """From :func:`prompt_inputs`' order: hidden, [negative hidden], then for SDXL pooled,
        [negative pooled], time ids."""
        guided = negatives != "residual"
        parts = iter(prompts)
        hidden = next(parts)
        negative_hidden = next(parts) if guided else None
        pooled = next(parts) if sdxl else None
        negative_pooled = next(parts) if sdxl and guided else None
        time_ids = next(parts) if sdxl else None
        uncond = (negative_hidden, negative_pooled) if negative_hidden is not None else None
        return cls((hidden, pooled), uncond, time_ids)


def _rows(
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    prompt: tuple[torch.Tensor, torch.Tensor | None],
    time_ids: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """UNet rows of frames (frames, steps, ...): x_t, timesteps, hidden, pooled, time ids, each
    frame's prompt and time ids repeated for its steps."""
    steps = x_t.shape[1]

    def repeated(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        return tensor[:, None].expand(-1, steps, *tensor.shape[1:]).flatten(0, 1)

    hidden, pooled = prompt
    return (
        x_t.flatten(0, 1),
        timesteps.flatten(),
        repeated(hidden),
        repeated(pooled),
        repeated(time_ids),
    )


def _column(scalars: torch.Tensor, index: int) -> torch.Tensor:
    """One per-frame scalar, shaped (frames, 1, 1, 1) to scale images and latents."""
    return scalars[:, index, None, None, None]


def _blend(current: torch.Tensor, previous: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(1 - w) current + w previous`` in STEP_DTYPE (w = 0: ``current``, as a float)."""
    current = current.to(STEP_DTYPE)
    return current * (1 - weight) + previous.to(STEP_DTYPE) * weight


def chained_weight(strengths: tuple[float, ...]) -> float:
    """The one blend weight equal to feedback blends of these strengths in turn."""
    kept = 1.0
    for strength in strengths:
        kept *= 1 - strength
    return 1 - kept


class FrameGraphs:
    """The frame graph's calls by variant (worker thread only): padded to the buckets and
    compiled under ``--compile`` (planned variants only), eager and unpadded otherwise."""

    def __init__(
        self,
        make_forward: Callable[[FrameVariant], Callable[..., Any]],
        buckets: Sequence[int] | None,
        *,
        static_buffers: bool,
        device: torch.device,
    ) -> None:
        """``make_forward(variant)``: the variant's function as it is to run (compiled or not);
        ``buckets`` None: no plan, every variant runs eager and unpadded."""
        self.make_forward = make_forward
        self.buckets = list(buckets) if buckets else None
        self.static_buffers = static_buffers
        self.device = device
        self._calls: dict[FrameVariant, PaddedCall] = {}
        self._zeros: dict[tuple[object, ...], torch.Tensor] = {}

    @property
    def planned(self) -> list[FrameVariant]:
        return list(self._calls)

    def call(self, variant: FrameVariant) -> PaddedCall | None:
        """The variant's call: planned ones under a plan, any without (made on first use)."""
        found = self._calls.get(variant)
        if found is None and self.buckets is None:
            found = self._calls[variant] = self._padded(variant)
        return found

    def plan(self, variant: FrameVariant, examples: Sequence[torch.Tensor]) -> None:
        """Compile (and record) ``variant`` at every bucket, with inputs like ``examples``
        (one frame each; see :meth:`PaddedCall.precompile`)."""
        call = self._calls.get(variant) or self._padded(variant)
        with cudnn_autotuning():
            call.precompile(*examples)
        self._calls[variant] = call

    def _padded(self, variant: FrameVariant) -> PaddedCall:
        return PaddedCall(
            self.make_forward(variant),
            self.buckets,
            static_buffers=self.static_buffers,
            name=f"frame-{variant.steps}-{variant.negatives}",
            memory_format=torch.channels_last,
        )

    def run(self, variant: FrameVariant, rows: Sequence[FrameRow]) -> FrameOutputs:
        """Every row through ``variant``'s graph; each session's stream batch moves on."""
        call = self.call(variant)
        if call is None:
            raise LookupError(f"no frame graph is planned for {variant}")
        outputs = call(*self.inputs(variant, rows))
        for index, row in enumerate(rows):
            if variant.steps > 1:
                row.state.latents, row.state.sources = outputs[2][index], outputs[3][index]
            row.state.filled += 1
        finished = [row.state.filled >= variant.steps for row in rows]
        return FrameOutputs(outputs[0], outputs[1], finished)

    def inputs(self, variant: FrameVariant, rows: Sequence[FrameRow]) -> list[torch.Tensor]:
        """The graph's inputs, frames first (see :meth:`FrameForward.__call__`)."""
        first = rows[0]
        images = torch.cat([row.image for row in rows])
        latent_shape = (1, *_noise_of(first.state).shape[1:])
        image_history = [_usable(row.state.previous_image, first.image.shape) for row in rows]
        latent_history = [_usable(row.state.previous_latent, latent_shape) for row in rows]
        previous_image = self._stack(image_history, first.image)
        previous_latent = self._stack(latent_history, self._zero(latent_shape, STEP_DTYPE))
        scalars = torch.stack(
            [
                self._scalars(row, image is not None, latent is not None)
                for row, image, latent in zip(rows, image_history, latent_history, strict=True)
            ]
        )
        table = torch.stack([row.table.packed for row in rows])
        timesteps = torch.stack([row.table.timesteps for row in rows])
        noise = torch.stack([_noise_of(row.state) for row in rows])
        inputs = [images, previous_image, previous_latent, scalars, table, timesteps, noise]
        if variant.steps > 1:
            inputs += [
                torch.stack([_carried(row.state, "latents") for row in rows]),
                torch.stack([_carried(row.state, "sources") for row in rows]),
            ]
        return inputs + prompt_inputs(rows, variant.negatives)

    def _stack(self, tensors: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        """Each history tensor, or zeros like ``like`` where a session has none."""
        zero = self._zero(tuple(like.shape), like.dtype)
        return torch.cat([zero if tensor is None else tensor for tensor in tensors])

    def _zero(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        found = self._zeros.get(key)
        if found is None:
            found = self._zeros[key] = torch.zeros(shape, dtype=dtype, device=self.device)
        return found

    @staticmethod
    def _scalars(row: FrameRow, image_history: bool, latent_history: bool) -> torch.Tensor:
        """The frame's settings as one row of values (a cached device constant: no copy); a
        feedback weight is 0 where the session has no history of that kind."""
        params = row.params
        values = [0.0] * SCALARS
        values[GUIDANCE] = params.guidance_scale
        values[DELTA] = params.delta
        values[GUIDED] = float(params.guided())
        values[ADD_NOISE] = float(params.do_add_noise)
        if image_history:
            values[IMAGE_PRE] = chained_weight(params.image_preprocessing.strengths())
            values[IMAGE_POST] = chained_weight(params.image_postprocessing.strengths())
        if latent_history:
            values[LATENT_PRE] = chained_weight(params.latent_preprocessing.strengths())
            values[LATENT_POST] = chained_weight(params.latent_postprocessing.strengths())
        return constant(tuple(values), row.image.device, STEP_DTYPE)


def _usable(history: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A session's history tensor when it can blend with this frame (same shape), else None:
    as the staged path's feedback, which leaves a frame alone after a size change."""
    return history if history is not None and tuple(history.shape) == tuple(shape) else None


def _noise_of(state: SessionCache) -> torch.Tensor:
    assert state.noise is not None
    return state.noise


def _carried(state: SessionCache, name: Literal["latents", "sources"]) -> torch.Tensor:
    """The session's frames in flight (steps - 1, C, h, w): zeros while it fills, as staged."""
    found = getattr(state, name)
    if found is None:
        assert state.noise is not None
        found = torch.zeros_like(state.noise[1:])
        setattr(state, name, found)
    return cast(torch.Tensor, found)


def prompt_inputs(rows: Sequence[FrameRow], negatives: Negatives) -> list[torch.Tensor]:
    """The prompt inputs, frames first, in :meth:`_Conditioning.unpack`'s order."""
    guided = negatives != "residual"
    conds = [_prompt(row.state.cond) for row in rows]
    unconds = [_prompt(row.state.uncond) for row in rows] if guided else []
    inputs = [torch.cat([p.hidden for p in prompts]) for prompts in (conds, unconds) if prompts]
    if conds[0].pooled is None:
        return inputs
    for prompts in (conds, unconds):
        if prompts:
            inputs.append(torch.cat([_pooled(p) for p in prompts]))
    time_ids = [row.time_ids for row in rows]
    inputs.append(torch.cat([t for t in time_ids if t is not None]))
    return inputs


def _prompt(prompt: PromptEmbedding | None) -> PromptEmbedding:
    assert prompt is not None, "a session's prompts are encoded before its frames run"
    return prompt


def _pooled(prompt: PromptEmbedding) -> torch.Tensor:
    assert prompt.pooled is not None
    return prompt.pooled
