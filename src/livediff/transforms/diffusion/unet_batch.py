"""The UNet batch: StreamDiffusion-class img2img on diffusers' UNet and VAE.

Named for what it runs (one UNet batch for every session's rows), so that it is not taken for
a Livepeer stream or a CUDA stream; "stream batch" below is StreamDiffusion's name for the
technique. One call of :meth:`UNetBatch.process` takes the newest frame of several sessions and
- uploads each once and converts/resizes it on the device,
- skips frames the similarity filter finds unchanged (repeating the last output),
- encodes all frames of a size in one VAE batch,
- runs ONE UNet batch over every session's rows: with ``t_index_list`` of N steps a session
  contributes N rows (stream batch: the new frame at step 1, the frame before it at step 2,
  ...), plus its guidance rows (``full``: N negative rows, ``initialize``: one, ``self`` and
  ``none``: none), each row with its own timestep and prompt embedding,
- applies guidance (residual CFG uses the virtual residual noise
  ``(x_t - alpha_t * x_0(input)) / beta_t`` instead of a negative UNet row), the scheduler step
  and re-noises the unfinished frames for their next step, all in float32 (``STEP_DTYPE``: the
  latents between steps too); only what goes into the UNet and the ControlNets is cast to the
  model's dtype,
- decodes the frames that finished their last step in one VAE batch,
- and, per session, the temporal tools (docs/diffusion.md, "Temporal coherence"): feedback
  blends of its previous output image / latent before encoding, before noising, before
  decoding and after decoding, ``do_add_noise``, and the motion-aware noise controller, which
  picks the first step's coefficients on the device from the input's motion.

A session with N steps shows frame k when frame k + N - 1 arrives; until its stream batch has
filled, it has no output (None).

Under ``--compile`` the UNet runs in the shape buckets (:mod:`.shapes`) in two planned variants:
its plain call, planned at load, and its call with ControlNet residuals, planned with the first
ControlNet a session names (:meth:`UNetBatch._plan_controlnet`, which plans that ControlNet in
the same buckets). Batches with a feature bank or an IP-Adapter run the UNet eager, unpadded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, cast

import torch

from livediff.config import FrameGraphGuidance
from livediff.frames import Image
from livediff.pixels.device import FrameUploader, StagedUpload, constant, to_output_images
from livediff.transforms.base import Job
from livediff.transforms.diffusion.bundle import TIME_IDS, CompileOptions, ModelBundle, compiled
from livediff.transforms.diffusion.clock import StageClock
from livediff.transforms.diffusion.control import (
    ControlNetForward,
    ControlNetPool,
    RowControl,
    controlnet_forward,
    residuals,
)
from livediff.transforms.diffusion.control_params import ControlNetSpec
from livediff.transforms.diffusion.feature_bank import (
    BankCall,
    BankRows,
    FeatureBankHistory,
    install_feature_bank,
)
from livediff.transforms.diffusion.frame_graph import (
    FrameForward,
    FrameGraphs,
    FrameRow,
    FrameVariant,
)
from livediff.transforms.diffusion.ip_adapter import (
    IPAdapterCall,
    IPAdapterPool,
    IPAdapterWeights,
    IPRows,
    install_ip_adapter,
    ip_call,
)
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.prompts import PromptEmbedding, PromptEncoder
from livediff.transforms.diffusion.safety import SafetyFilter
from livediff.transforms.diffusion.schedule import STEP_DTYPE, Schedule, StepTable
from livediff.transforms.diffusion.shapes import PaddedCall, cudnn_autotuning
from livediff.transforms.diffusion.state import LatentShape, SessionCache, follow_params
from livediff.transforms.diffusion.temporal_net import history

#: Frames (B, 3, H, W) in [0, 1] -> control images of the same shape, by preprocessor and params.
Preprocess = Callable[[str, torch.Tensor, Mapping[str, Any]], torch.Tensor]
#: SDXL's added conditioning of a batch's rows: pooled text embeddings (B, P), time ids (B, 6).
Added = tuple[torch.Tensor, torch.Tensor]
#: A job of the diffusion transform: its params, its session's cache, its staged upload.
DiffusionJob = Job[DiffusionParams, SessionCache, StagedUpload]


def control_key(spec: ControlNetSpec) -> tuple[Any, ...]:
    """What a control image depends on: the preprocessor and its params (not the model)."""
    return (spec.preprocessor, tuple(sorted(spec.preprocessor_params.items())))


@dataclass(frozen=True)
class _PlanningInputs:
    """One row of each input the planned calls take, for one frame size (inference tensors,
    like the ones served: dynamo guards on the difference)."""

    #: (1, C, h, w) in the model's dtype, in the UNet's memory format.
    latent: torch.Tensor
    #: (1, 3, H, W) in the VAE's dtype, in its memory format.
    pixels: torch.Tensor
    timestep: torch.Tensor
    hidden: torch.Tensor
    #: SDXL's pooled text embeddings and time ids; empty for the SD family.
    added: tuple[torch.Tensor, ...]


@dataclass
class _Entry:
    """A job on its way through one batch."""

    index: int
    state: SessionCache
    params: DiffusionParams
    image: torch.Tensor
    source: torch.Tensor | None = None
    x_t: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    rows: int = 0
    #: The denoising step of each of the entry's UNet rows (guidance rows repeat their step).
    row_steps: list[int] = field(default_factory=list)
    #: This frame's coefficients: the session's table, its first row chosen by the motion
    #: controller when that is on.
    table: StepTable | None = None
    #: Whether the safety filter replaced this frame's output.
    filtered: bool = False


class UNetBatch:
    """Runs the stream batch for any number of sessions on one device (worker thread only)."""

    def __init__(
        self,
        bundle: ModelBundle,
        device: torch.device,
        dtype: torch.dtype,
        *,
        prompt_cache_size: int = 64,
        max_skip: int = 10,
        cuda_graphs: bool = False,
        channels_last: bool = True,
        buckets: Sequence[int] | None = None,
        controlnets: ControlNetPool | None = None,
        preprocess: Preprocess | None = None,
        safety: SafetyFilter | None = None,
        ip_adapters: IPAdapterPool | None = None,
        compile_options: CompileOptions | None = None,
        frame_graph: bool = True,
        frame_graph_steps: Sequence[int] = (1,),
        frame_graph_guidance: Sequence[FrameGraphGuidance] = ("self",),
    ) -> None:
        """``controlnets`` and ``preprocess`` (frames -> control images) serve sessions whose
        params name ControlNets, ``ip_adapters`` those with an IP-Adapter; without them such
        entries are ignored. ``compile_options``: how the UNet was compiled (None: it was not),
        how :meth:`precompile` has the ControlNets and the frame graphs compiled too.
        ``frame_graph``: plain batches run as one function (:mod:`.frame_graph`); under a plan
        (``buckets``), the variants of ``frame_graph_steps`` steps with each of
        ``frame_graph_guidance`` (``cfg_type`` values) are planned at load."""
        self.bundle = bundle
        self.device = device
        self.dtype = dtype
        self.max_skip = max_skip
        self.cuda_graphs = cuda_graphs
        #: Memory format of what goes into the UNet and the VAE (match the weights' format).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.schedule = Schedule(bundle.scheduler, device)
        self.prompts = PromptEncoder(
            bundle.text_encoders,
            device,
            dtype,
            prompt_cache_size,
            zeros_for_empty=bundle.zeros_for_empty_prompt,
        )
        self.upload = FrameUploader(device, dtype)
        self.generation = 0
        #: Stage timings for benchmarks (None: off, no cost).
        self.clock: StageClock | None = None
        self.controlnets = controlnets
        self.preprocess = preprocess
        #: The NSFW filter of sessions with ``use_safety_checker`` (its model loads on first use).
        self.safety = safety if safety is not None else SafetyFilter(device, dtype)
        #: A ControlNet no frame used for this long is freed.
        self.controlnet_idle_s = 30.0
        if bundle.bank is None:  # prepare() installs it before compiling
            bundle.bank = install_feature_bank(bundle.uncompiled_unet)
        self.bank = bundle.bank
        if bundle.ip_switch is None:  # prepare() installs it before compiling
            bundle.ip_switch = install_ip_adapter(bundle.uncompiled_unet)
        self.ip_switch = bundle.ip_switch
        self.ip_adapters = ip_adapters
        self._unet_call = PaddedCall(
            self._unet_forward, buckets, static_buffers=cuda_graphs, name="unet"
        )
        self._encode_call = PaddedCall(
            self._encode_forward, buckets, static_buffers=cuda_graphs, name="vae-encode"
        )
        self._decode_call = PaddedCall(
            self._decode_forward, buckets, static_buffers=cuda_graphs, name="vae-decode"
        )
        self.compile_options = compile_options
        #: The UNet with ControlNet residuals as extra inputs (after SDXL's added ones).
        self._control_unet_call = PaddedCall(
            self._control_unet_forward, buckets, static_buffers=cuda_graphs, name="unet+controlnet"
        )
        self._added_inputs = 2 if bundle.sdxl else 0
        #: Whether ``_control_unet_call`` is planned (with the first planned ControlNet).
        self._residuals_planned = False
        #: The frame size (width, height) :meth:`precompile` planned for.
        self._planned_size: tuple[int, int] | None = None
        #: The whole-frame calls of plain batches, by variant (None: every batch runs staged).
        self.frames = (
            FrameGraphs(self._frame_forward, buckets, static_buffers=cuda_graphs, device=device)
            if frame_graph
            else None
        )
        self.frame_graph_steps = sorted(set(frame_graph_steps))
        self.frame_graph_guidance = list(dict.fromkeys(frame_graph_guidance))
        #: Same-size groups run so far, by path ("frame", "staged"): what took the frame graph.
        self.paths: dict[str, int] = defaultdict(int)

    # -- sessions ---------------------------------------------------------------------------------
    def open_session(self) -> SessionCache:
        return SessionCache(generation=self.generation)

    def latent_shape(self, params: DiffusionParams) -> LatentShape:
        factor = self.bundle.vae_scale_factor
        return LatentShape(
            self.bundle.latent_channels, params.height // factor, params.width // factor
        )

    def _follow(self, state: SessionCache, params: DiffusionParams) -> None:
        if state.generation != self.generation:
            state.release()
            state.generation = self.generation
        if params != state.params:  # a new look must not be skipped as "the same frame"
            state.filter.forget()
            state.params = params
        follow_params(state, params, self.prompts, self.schedule, self.latent_shape(params))

    # -- frames -----------------------------------------------------------------------------------
    def stage(self, jobs: Sequence[DiffusionJob]) -> None:
        """Start the next batch's uploads on the CUDA copy stream (see
        :meth:`FrameUploader.stage`)."""
        for job in jobs:
            job.staged = self.upload.stage(job.frame.image)

    @torch.inference_mode()
    def process(self, jobs: Sequence[DiffusionJob]) -> list[Image | None]:
        """One output per job: the session's newest finished frame, or None while filling."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        outputs: list[Image | None] = [None] * len(jobs)
        groups: dict[tuple[int, int], list[_Entry]] = {}
        self._mark(None)
        if self.controlnets is not None:
            self.controlnets.release_idle(self.controlnet_idle_s)
        entries = [self._admit(index, job) for index, job in enumerate(jobs)]
        self._mark("upload")
        for entry, skip in zip(entries, self._skips(entries), strict=True):
            if skip:
                outputs[entry.index] = entry.state.last_output
                jobs[entry.index].skipped = True
                continue
            groups.setdefault((entry.params.width, entry.params.height), []).append(entry)
        for group in groups.values():
            for entry, image in self._run(group):
                outputs[entry.index] = entry.state.last_output = image
                jobs[entry.index].filtered = entry.filtered
        return outputs

    def _skips(self, entries: list[_Entry]) -> list[bool]:
        """The similarity filter's decision for each entry: the similarities of every session
        that filters are computed together and read back with one device sync (none when no
        session filters, the default)."""
        asking = [
            entry
            for entry in entries
            if entry.state.filter.compares(
                entry.image, entry.params.similarity_threshold, entry.state.last_output is not None
            )
        ]
        similarities = dict(zip(map(id, asking), similarities_of(asking), strict=True))
        return [
            entry.state.filter.decide(
                entry.image,
                entry.params.similarity_threshold,
                self.max_skip,
                similarities.get(id(entry)),
            )
            for entry in entries
        ]

    def _admit(self, index: int, job: DiffusionJob) -> _Entry:
        params, state = job.params, job.state
        self._follow(state, params)
        image = self.upload(job.frame.image, params.width, params.height, job.staged)
        return _Entry(index, state, params, image)

    def _run(self, group: list[_Entry]) -> list[tuple[_Entry, torch.Tensor]]:
        """Encode, denoise and decode one batch of same-size frames: as one frame graph when
        it is plain and its variant has one (:meth:`_frame_variant`), else in stages."""
        _drop_unused_history(group)
        variant = self._frame_variant(group)
        self.paths["staged" if variant is None else "frame"] += 1
        if variant is not None:
            return self._run_frames(group, variant)
        return self._run_staged(group)

    def _run_staged(self, group: list[_Entry]) -> list[tuple[_Entry, torch.Tensor]]:
        """Encode, denoise and decode in planned calls, each session's step math between."""
        sources = self.encode(torch.cat([_image_feedback(entry) for entry in group]))
        self._mark("encode")
        for entry, source in zip(group, sources.tensor_split(len(group)), strict=True):
            strengths = entry.params.latent_preprocessing.strengths()
            entry.source = feedback(source, entry.state.previous_latent, strengths)
            entry.table = self._frame_table(entry)
        x_t, timesteps, embeddings, added = self._unet_inputs(group)
        x_model = x_t.to(self.dtype)  # the step arithmetic stays in STEP_DTYPE
        extra = self._control_residuals(group, x_model, timesteps, embeddings, added)
        self._mark("controlnet")
        bank = self._bank_call(group)
        ip = self._ip_call(group)
        output = self.unet(x_model, timesteps, embeddings, extra, bank, added=added, ip=ip)
        output = output.to(STEP_DTYPE)
        if bank is not None:
            bank.store()
        self._mark("unet")
        finished: list[_Entry] = []
        finished_latents: list[torch.Tensor] = []
        bounds = list(accumulate(entry.rows for entry in group))[:-1]
        for entry, rows in zip(group, output.tensor_split(bounds), strict=True):
            latent = self._advance(entry, rows)
            if latent is not None:
                strengths = entry.params.latent_postprocessing.strengths()
                latent = feedback(latent, entry.state.previous_latent, strengths)
                entry.state.previous_latent = latent
                finished.append(entry)
                finished_latents.append(latent)
        if not finished:
            return []
        images = _image_postprocessing(finished, self.decode(torch.cat(finished_latents)))
        images = self.safety.apply(finished, images)
        self._mark("decode")
        return list(zip(finished, to_output_images(images), strict=True))

    # -- the frame graph --------------------------------------------------------------------------
    def _frame_variant(self, group: list[_Entry]) -> FrameVariant | None:
        """The group's frame-graph variant: None when a session of it needs the staged path (a
        ControlNet, the feature bank, an IP-Adapter), the sessions' variants differ, or the
        variant is not planned."""
        if self.frames is None:
            return None
        for entry in group:
            params = entry.params
            if params.controlnets or params.cached_attention.enabled:
                return None
            if params.ip_adapter_active():
                return None
        variants = set()
        for entry in group:
            assert entry.state.table is not None
            variants.add(FrameVariant.of(entry.params, entry.state.table.steps))
        if len(variants) != 1:
            return None
        variant = variants.pop()
        return variant if self.frames.call(variant) is not None else None

    def _run_frames(
        self, group: list[_Entry], variant: FrameVariant
    ) -> list[tuple[_Entry, torch.Tensor]]:
        """The group through its variant's frame graph; the finished frames' images."""
        assert self.frames is not None
        outputs = self.frames.run(variant, [self._frame_row(entry) for entry in group])
        done = [index for index, finished in enumerate(outputs.finished) if finished]
        finished = [group[index] for index in done]
        if not finished:
            self._mark("frame")
            return []
        images, latents = outputs.images, outputs.latents
        if len(done) < len(group):  # sessions still filling their stream batch: no output
            images = torch.cat([images[index : index + 1] for index in done])
            latents = torch.cat([latents[index : index + 1] for index in done])
        for index, entry in enumerate(finished):
            entry.state.previous_image = images[index : index + 1]
            entry.state.previous_latent = latents[index : index + 1]
        images = self.safety.apply(finished, images)
        self._mark("frame")
        return list(zip(finished, to_output_images(images), strict=True))

    def _frame_row(self, entry: _Entry) -> FrameRow:
        entry.table = self._frame_table(entry)
        time_ids = self._time_ids(entry.params) if self.bundle.sdxl else None
        return FrameRow(entry.state, entry.params, entry.table, entry.image, time_ids)

    def _frame_forward(self, variant: FrameVariant) -> Callable[..., Any]:
        """``variant``'s frame graph: compiled as the UNet is under ``--compile``."""
        forward = FrameForward(
            variant,
            unet=self._frame_unet,
            encode=self._frame_encode,
            decode=self._frame_decode,
            schedule=self.schedule,
            dtype=self.dtype,
            vae_dtype=self.bundle.vae_dtype,
            sdxl=self.bundle.sdxl,
        )
        if self.compile_options is None:
            return forward
        return cast(Callable[..., Any], compiled(forward.__call__, self.compile_options))

    def _frame_unet(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        added: Added | None,
    ) -> torch.Tensor:
        x_t = x_t.contiguous(memory_format=self.memory_format)
        return _run_unet(self.bundle.uncompiled_unet, x_t, timesteps, embeddings, added=added)

    def _frame_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._encode_forward(pixels.contiguous(memory_format=self.memory_format))

    def _frame_decode(self, latents: torch.Tensor) -> torch.Tensor:
        scaled = (latents / self.bundle.vae_scaling).to(self.bundle.vae_dtype)
        return self._decode_forward(scaled.contiguous(memory_format=self.memory_format))

    def _plan_frames(self, width: int, height: int) -> None:
        """Compile (and record) the frame graph of every planned step count and guidance at
        every bucket, with inputs made as served ones are."""
        assert self.frames is not None
        for steps in self.frame_graph_steps:
            for guidance in self.frame_graph_guidance:
                self._plan_frame_variant(
                    DiffusionParams(
                        width=width,
                        height=height,
                        t_index_list=list(range(20, 20 + steps)),
                        cfg_type=guidance,
                        guidance_scale=1.0 if guidance == "self" else 1.5,
                    )
                )

    def _plan_frame_variant(self, params: DiffusionParams) -> None:
        """Plan the variant of ``params`` with a session of its own, released after."""
        assert self.frames is not None
        width, height, steps = params.width, params.height, len(params.steps())
        state = self.open_session()
        self._follow(state, params)
        image = torch.zeros((1, 3, height, width), device=self.device, dtype=self.dtype)
        row = self._frame_row(_Entry(0, state, params, image))
        variant = FrameVariant.of(params, steps)
        self.frames.plan(variant, self.frames.inputs(variant, [row]))
        state.release()

    def _mark(self, stage: str | None) -> None:
        if self.clock is None:
            return
        if stage is None:
            self.clock.begin()
        else:
            self.clock.mark(stage)

    # -- the motion-aware noise controller -------------------------------------------------------
    def _frame_table(self, entry: _Entry) -> StepTable:
        """The coefficients this frame runs at: the session's table, or with ``motion_noise``
        on, its first row at the strength the input's motion maps to (all on the device:
        same shapes, so the same buckets and compiled code)."""
        state, motion = entry.state, entry.params.motion_noise
        table = state.table
        assert table is not None
        if not motion.enabled:
            state.forget_motion()
            return table
        pooled = torch.nn.functional.avg_pool2d(entry.image.to(STEP_DTYPE), 8)
        previous, strength = state.motion_input, state.motion_strength
        if previous is None or strength is None or previous.shape != pooled.shape:
            strength = torch.full((1,), motion.min_strength, device=self.device)
        else:
            moved = (pooled - previous).abs().mean().reshape(1) / 2  # on the 0..1 scale
            share = (moved * motion.sensitivity).clamp(max=1.0)
            target = share * (motion.max_strength - motion.min_strength) + motion.min_strength
            strength = strength * motion.smoothing + target * (1 - motion.smoothing)
        state.motion_input, state.motion_strength = pooled, strength
        row = self.schedule.row(strength, table.timesteps[1:2] if table.steps > 1 else None)
        if table.steps == 1:
            return row
        return StepTable(
            *(
                torch.cat((first, rest[1:]))
                for first, rest in (
                    (row.timesteps, table.timesteps),
                    (row.alpha, table.alpha),
                    (row.beta, table.beta),
                    (row.c_skip, table.c_skip),
                    (row.c_out, table.c_out),
                )
            )
        )

    # -- the feature bank -------------------------------------------------------------------------
    def _bank_call(self, group: list[_Entry]) -> BankCall | None:
        """The group's feature-bank call, None when no session of it uses the bank (a session
        that turned it off drops its bank here)."""
        if not any(entry.params.cached_attention.enabled for entry in group):
            return None
        return BankCall([_bank_rows(entry) for entry in group], self.device)

    # -- the IP-Adapter ---------------------------------------------------------------------------
    def _ip_call(self, group: list[_Entry]) -> IPAdapterCall | None:
        """The group's IP-Adapter call, None when no session of it uses one (or its adapter is
        still loading). One adapter serves a call: that of the first session using one; a
        session naming another runs without it meanwhile (one per model family in practice)."""
        pool = self.ip_adapters
        active = [entry for entry in group if entry.params.ip_adapter_active()]
        if pool is None or not active:
            return None
        repo = active[0].params.ip_adapter.ipadapter_model_path
        adapter = pool.get(repo)
        if adapter is None:
            return None
        rows = [self._ip_rows(entry, pool, adapter, repo) for entry in group]
        if all(row.tokens is None for row in rows):
            return None
        return ip_call(rows, adapter, self.ip_switch.layers, self.device)

    def _ip_rows(
        self, entry: _Entry, pool: IPAdapterPool, adapter: IPAdapterWeights, repo: str
    ) -> IPRows:
        """The entry's rows: its steps attend to its style image's tokens (encoded once per
        image), its guidance rows to the zero image's."""
        params, state, table = entry.params, entry.state, entry.table
        assert table is not None
        settings = params.ip_adapter
        if not params.ip_adapter_active() or settings.ipadapter_model_path != repo:
            return IPRows(entry.rows, table.steps, None, 0.0, ())
        key = (repo, params.ip_adapter_style_image_url)
        if state.ip_key != key:
            image = pool.style_image(params.ip_adapter_style_image_url)
            if image is None:  # not fetched (a face that skipped resolve_params): no style
                return IPRows(entry.rows, table.steps, None, 0.0, ())
            state.ip_tokens, state.ip_key = adapter.encode(image), key
        weights = pool.layer_weights(settings.weight_type)
        return IPRows(entry.rows, table.steps, state.ip_tokens, settings.scale, weights)

    # -- the stream batch -------------------------------------------------------------------------
    def _unet_inputs(
        self, group: list[_Entry]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Added | None]:
        """Every row of the group: x_t, timesteps, prompt embeddings and (SDXL) the added
        conditioning."""
        x_parts, t_parts, e_parts, pooled_parts, time_parts = [], [], [], [], []
        for entry in group:
            x_t, timesteps, embeddings, pooled = self._session_rows(entry)
            entry.rows = x_t.shape[0]
            x_parts.append(x_t)
            t_parts.append(timesteps)
            e_parts.append(embeddings)
            if pooled is not None:
                pooled_parts.append(pooled)
                time_parts.append(self._time_ids(entry.params).expand(entry.rows, -1))
        added = (torch.cat(pooled_parts), torch.cat(time_parts)) if pooled_parts else None
        return torch.cat(x_parts), torch.cat(t_parts), torch.cat(e_parts), added

    def _time_ids(self, params: DiffusionParams) -> torch.Tensor:
        """SDXL's size conditioning (1, 6): original size, crop top-left (0, 0), target size,
        all the session's output size (what diffusers' img2img passes by default)."""
        size = (params.height, params.width)
        return constant((*size, 0, 0, *size), self.device, self.dtype).view(1, TIME_IDS)

    def _session_rows(
        self, entry: _Entry
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A session's UNet rows: its N steps (newest frame first), then its negative rows;
        the last item is SDXL's pooled text embeddings of those rows (None for the SD family)."""
        state, table = entry.state, entry.table
        assert table is not None and state.noise is not None and state.cond is not None
        assert entry.source is not None
        steps = table.steps
        newest = Schedule.noised(entry.source, state.noise[:1], table.alpha[:1], table.beta[:1])
        if steps > 1 and state.latents is None:
            state.latents = torch.zeros_like(state.noise[1:])
            state.sources = torch.zeros_like(state.noise[1:])
        if steps > 1:
            assert state.latents is not None and state.sources is not None
            entry.x_t = torch.cat((newest, state.latents))
            entry.sources = torch.cat((entry.source, state.sources))
        else:
            entry.x_t, entry.sources = newest, entry.source
        x_t, timesteps = entry.x_t, table.timesteps
        entry.row_steps = list(range(steps))
        prompts: list[tuple[PromptEmbedding | None, int]] = [(state.cond, steps)]
        if entry.params.guided() and entry.params.cfg_type == "full":
            x_t = torch.cat((x_t, x_t))
            timesteps = torch.cat((timesteps, timesteps))
            prompts.append((state.uncond, steps))
            entry.row_steps += list(range(steps))
        elif entry.params.guided() and entry.params.cfg_type == "initialize":
            x_t = torch.cat((x_t, x_t[:1]))
            timesteps = torch.cat((timesteps, timesteps[:1]))
            prompts.append((state.uncond, 1))
            entry.row_steps.append(0)
        embeddings, pooled = _prompt_rows(prompts)
        return x_t, timesteps, embeddings, pooled

    def _advance(self, entry: _Entry, output: torch.Tensor) -> torch.Tensor | None:
        """Guidance and the scheduler step for one session; returns its finished latent."""
        state, table, params = entry.state, entry.table, entry.params
        assert table is not None and state.noise is not None
        assert entry.x_t is not None and entry.sources is not None
        steps, x_t = table.steps, entry.x_t
        epsilon = self.schedule.to_epsilon(output[:steps], x_t, table.alpha, table.beta)
        if params.guided():
            negative = self._negative_epsilon(entry, output)
            epsilon = negative + params.guidance_scale * (epsilon - negative)
        denoised = self.schedule.denoise(epsilon, x_t, table)
        if steps > 1:
            state.latents = _renoised(denoised[:-1], state.noise[1:], table, params.do_add_noise)
            state.sources = entry.sources[:-1]
        state.filled += 1
        return denoised[-1:] if state.filled >= steps else None

    def _negative_epsilon(self, entry: _Entry, output: torch.Tensor) -> torch.Tensor:
        """The unconditional noise estimate each step's guidance steers away from."""
        table, params = entry.table, entry.params
        assert table is not None and entry.x_t is not None and entry.sources is not None
        steps, x_t = table.steps, entry.x_t
        if params.cfg_type == "full":
            return self.schedule.to_epsilon(output[steps:], x_t, table.alpha, table.beta)
        virtual = Schedule.residual_noise(x_t, entry.sources, table.alpha, table.beta)
        residual = virtual * params.delta
        if params.cfg_type == "initialize":
            first = self.schedule.to_epsilon(
                output[steps:], x_t[:1], table.alpha[:1], table.beta[:1]
            )
            return torch.cat((first, residual[1:]))
        return residual

    # -- the models -------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/8, W/8) in STEP_DTYPE."""
        pixels = images.to(self.bundle.vae_dtype).contiguous(memory_format=self.memory_format)
        return cast(torch.Tensor, self._encode_call(pixels))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [-1, 1]."""
        scaled = (latents / self.bundle.vae_scaling).to(self.bundle.vae_dtype)
        return cast(
            torch.Tensor, self._decode_call(scaled.contiguous(memory_format=self.memory_format))
        )

    def unet(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        residuals: tuple[torch.Tensor, ...] | None = None,
        bank: BankCall | None = None,
        *,
        added: Added | None = None,
        ip: IPAdapterCall | None = None,
    ) -> torch.Tensor:
        """The UNet's noise estimate (in the model's dtype; ``x_t`` is cast to it).

        With ``residuals`` (ControlNets' down blocks..., mid) alone, it runs its variant with
        residuals: padded and compiled once planned (:meth:`_plan_controlnet`), eager before.
        With a feature ``bank`` or an IP-Adapter call (``ip``) it runs uncompiled and unpadded:
        no variant of those is planned, and one would compile (and record graphs) while
        serving. ``added``: SDXL's pooled text embeddings and time ids, row by row."""
        x_t = x_t.to(self.dtype).contiguous(memory_format=self.memory_format)
        inputs = (x_t, timesteps, embeddings, *(added or ()))
        if bank is None and ip is None:
            if residuals is None:
                return cast(torch.Tensor, self._unet_call(*inputs))
            if self._residuals_planned or not self._control_unet_call.buckets:
                return cast(torch.Tensor, self._control_unet_call(*inputs, *residuals))
        unet = self.bundle.uncompiled_unet
        with ExitStack() as switches:
            if bank is not None:
                assert self.bank is not None
                switches.enter_context(self.bank.active(bank))
            if ip is not None:
                switches.enter_context(self.ip_switch.active(ip))
            return _run_unet(unet, x_t, timesteps, embeddings, *(residuals or ()), added=added)

    @torch.inference_mode()
    def precompile(self, width: int, height: int) -> None:
        """Run the UNet and both VAE halves at every bucket for ``width`` x ``height`` frames,
        each twice (see :meth:`PaddedCall.precompile`), with cuDNN's autotuner on only here:
        compiling, autotuning and CUDA graph recording happen at load, never while serving.
        From then on the ControlNet pool plans its ControlNets for this size too (see
        :meth:`_plan_controlnet`)."""
        inputs = self._planning_inputs(width, height)
        with cudnn_autotuning():
            self._unet_call.precompile(inputs.latent, inputs.timestep, inputs.hidden, *inputs.added)
            self._encode_call.precompile(inputs.pixels)
            self._decode_call.precompile(inputs.latent.to(self.bundle.vae_dtype))
        self._planned_size = (width, height)
        if self.frames is not None and self.compile_options is not None:
            self._plan_frames(width, height)
        if self.controlnets is not None and self.compile_options is not None:
            self.controlnets.plan_with(self._plan_controlnet)

    def _planning_inputs(self, width: int, height: int) -> _PlanningInputs:
        factor = self.bundle.vae_scale_factor
        latent = torch.zeros(
            (1, self.bundle.latent_channels, height // factor, width // factor),
            device=self.device,
            dtype=self.dtype,
        ).contiguous(memory_format=self.memory_format)
        pixels = torch.zeros((1, 3, height, width), device=self.device, dtype=self.bundle.vae_dtype)
        prompt = self.prompts.encode("")
        timestep = self.schedule.table((self.schedule.train_steps // 2,)).timesteps[:1]
        added: tuple[torch.Tensor, ...] = ()
        if prompt.pooled is not None:
            added = (prompt.pooled, self._time_ids(DiffusionParams(width=width, height=height)))
        pixels = pixels.contiguous(memory_format=self.memory_format)
        return _PlanningInputs(latent, pixels, timestep, prompt.hidden, added)

    @torch.inference_mode()
    def _plan_controlnet(self, model: Any, channels: int) -> ControlNetForward:
        """``model`` (a ControlNetModel on the device, taking ``channels``-channel control
        images) compiled as the UNet is and run at every bucket twice for the planned frame
        size, as :meth:`precompile` does; the first one also plans the UNet's variant with
        residuals. The pool's planner: worker thread, between batches, so that a served batch
        only replays what was compiled and recorded here."""
        assert self.compile_options is not None and self._planned_size is not None
        width, height = self._planned_size
        model.to(memory_format=self.memory_format)  # as the UNet's weights
        call = PaddedCall(
            controlnet_forward(compiled(model, self.compile_options)),
            self._unet_call.buckets,
            static_buffers=self.cuda_graphs,
            name="controlnet",
            memory_format=self.memory_format,
        )
        inputs = self._planning_inputs(width, height)
        rows = (inputs.latent, inputs.timestep, inputs.hidden)
        cond = torch.zeros((1, channels, height, width), device=self.device, dtype=self.dtype)
        with cudnn_autotuning():
            call.precompile(*rows, cond, *inputs.added)
            if not self._residuals_planned:
                self._plan_residuals(controlnet_forward(model)(*rows, cond, *inputs.added), inputs)
        return call

    def _plan_residuals(self, example: tuple[torch.Tensor, ...], inputs: _PlanningInputs) -> None:
        """Plan the UNet's variant with residuals shaped like ``example`` (one row of a
        ControlNet's down blocks..., mid): zeros, contiguous, as :func:`residuals` makes them."""
        zeros = [torch.zeros(part.shape, dtype=part.dtype, device=part.device) for part in example]
        self._control_unet_call.precompile(
            inputs.latent, inputs.timestep, inputs.hidden, *inputs.added, *zeros
        )
        self._residuals_planned = True

    def _encode_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        encoded = self.bundle.vae.encode(pixels)
        latents = getattr(encoded, "latents", None)
        if latents is None:
            latents = encoded.latent_dist.mode()
        return latents.to(STEP_DTYPE) * self.bundle.vae_scaling  # type: ignore[no-any-return]

    def _decode_forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.bundle.vae.decode(latents, return_dict=False)[0].to(self.dtype)  # type: ignore[no-any-return]

    def _unet_forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        *added: torch.Tensor,
    ) -> torch.Tensor:
        pair = (added[0], added[1]) if added else None
        return _run_unet(self.bundle.unet, x_t, timesteps, embeddings, added=pair)

    def _control_unet_forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        *extra: torch.Tensor,
    ) -> torch.Tensor:
        """The UNet with SDXL's added conditioning (if any) and ControlNet residuals, in that
        order, in ``extra``."""
        added, residual_parts = extra[: self._added_inputs], extra[self._added_inputs :]
        pair = (added[0], added[1]) if added else None
        return _run_unet(self.bundle.unet, x_t, timesteps, embeddings, *residual_parts, added=pair)

    # -- ControlNets ------------------------------------------------------------------------------
    def _control_residuals(
        self,
        group: list[_Entry],
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        added: Added | None,
    ) -> tuple[torch.Tensor, ...] | None:
        """The summed residuals of the ControlNets the group's sessions use (None: none)."""
        pool = self.controlnets
        if pool is None or self.preprocess is None:
            return None
        if not any(entry.params.controlnets for entry in group):
            return None
        self._update_control_images(group)
        uses: dict[str, list[RowControl]] = defaultdict(list)
        offset = 0
        for entry in group:
            for spec in entry.params.controlnets:
                uses[spec.model_id] += _row_controls(entry, spec, offset)
            offset += entry.rows
        return residuals(uses, pool, x_t, timesteps, embeddings, added=added)

    def _update_control_images(self, group: list[_Entry]) -> None:
        """Each new frame's control images, one preprocessor call per kind and params for the
        whole group; kept per session with its frames in flight (newest first). TemporalNet's
        kinds also get each session's history (its previous output, and for TemporalNet2 its
        previous input, which this frame then replaces)."""
        assert self.preprocess is not None
        wanted: dict[tuple[Any, ...], list[_Entry]] = defaultdict(list)
        for entry in group:
            for key in {control_key(spec) for spec in entry.params.controlnets}:
                wanted[key].append(entry)
        for key, entries in wanted.items():
            kind, params = key[0], dict(key[1])
            frames = torch.cat([(entry.image.to(torch.float32) + 1) / 2 for entry in entries])
            params.update(history(kind, [entry.state for entry in entries]))
            images = self.preprocess(kind, frames, params)
            for entry, image in zip(entries, images.tensor_split(len(entries)), strict=True):
                entry.state.push_control(key, image)
        _remember_flow_inputs(group)


def _drop_unused_history(group: list[_Entry]) -> None:
    """A session that turned the feature bank off drops its bank, one without an IP-Adapter
    its style image's tokens."""
    for entry in group:
        if not entry.params.cached_attention.enabled:
            entry.state.bank = None
        if not entry.params.ip_adapter_active():
            entry.state.ip_tokens = entry.state.ip_key = None


def _remember_flow_inputs(group: list[_Entry]) -> None:
    """Each session's new frame (1, 3, H, W) in [0, 1], where TemporalNet2's next flow starts;
    a session that does not use TemporalNet2 keeps none (a later one starts afresh)."""
    for entry in group:
        specs = entry.params.controlnets
        flows = any(spec.preprocessor == "temporal_net_tensorrt" for spec in specs)
        entry.state.flow_input = (entry.image.to(torch.float32) + 1) / 2 if flows else None


def _bank_rows(entry: _Entry) -> BankRows:
    """The entry's rows in a feature-bank call: its bank (made, or trimmed to ``max_frames``),
    and whether this frame refreshes it (an empty bank, or ``interval`` frames since the last)."""
    table, settings, state = entry.table, entry.params.cached_attention, entry.state
    assert table is not None
    steps, row_steps = table.steps, tuple(entry.row_steps)
    if not settings.enabled:
        return BankRows(entry.rows, row_steps, None, refresh=False, steps=steps, keep=1)
    history = state.bank
    if history is None or history.steps != steps:
        history = state.bank = FeatureBankHistory(steps)
    history.trim(settings.max_frames)
    history.since_refresh += 1
    refresh = history.frames == 0 or history.since_refresh >= settings.interval
    return BankRows(entry.rows, row_steps, history, refresh, steps, settings.max_frames)


def _prompt_rows(
    prompts: Sequence[tuple[PromptEmbedding | None, int]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each prompt's embedding repeated for its rows, in order: the hidden states, and SDXL's
    pooled embeddings (None for the SD family)."""
    hidden, pooled = [], []
    for prompt, rows in prompts:
        assert prompt is not None
        hidden.append(prompt.hidden.expand(rows, -1, -1))
        if prompt.pooled is not None:
            pooled.append(prompt.pooled.expand(rows, -1))
    return torch.cat(hidden), torch.cat(pooled) if pooled else None


def _renoised(
    denoised: torch.Tensor, noise: torch.Tensor, table: StepTable, add_noise: bool
) -> torch.Tensor:
    """Unfinished frames on to their next step: ``alpha_next x0_hat + beta_next noise``, or
    with ``do_add_noise`` off (StreamDiffusion's rule) ``alpha_next x0_hat`` alone."""
    if add_noise:
        return Schedule.noised(denoised, noise, table.alpha[1:], table.beta[1:])
    return table.alpha[1:] * denoised


def feedback(
    current: torch.Tensor, previous: torch.Tensor | None, strengths: tuple[float, ...]
) -> torch.Tensor:
    """The feedback processors' chain: ``current = (1 - s) current + s previous`` for each
    strength in order; ``current`` itself when there is no history (or nothing to do)."""
    if previous is None or previous.shape != current.shape:
        return current
    for strength in strengths:
        current = current * (1 - strength) + previous * strength
    return current


def _image_feedback(entry: _Entry) -> torch.Tensor:
    """The entry's frame (-1..1) after ``image_preprocessing``, what the VAE encodes."""
    strengths = entry.params.image_preprocessing.strengths()
    return feedback(entry.image, entry.state.previous_image, strengths)


def _image_postprocessing(finished: list[_Entry], decoded: torch.Tensor) -> torch.Tensor:
    """The decoded frames (-1..1) after each session's ``image_postprocessing``; each
    session keeps its output as the history its feedback blends in next time."""
    rows = decoded.tensor_split(len(finished))
    blended = [
        feedback(row, entry.state.previous_image, entry.params.image_postprocessing.strengths())
        for entry, row in zip(finished, rows, strict=True)
    ]
    for entry, row in zip(finished, blended, strict=True):
        entry.state.previous_image = row
    if all(row is original for row, original in zip(blended, rows, strict=True)):
        return decoded  # nothing blended: the batch as decoded
    return torch.cat(blended)


def _run_unet(
    unet: Any,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    embeddings: torch.Tensor,
    *residuals: torch.Tensor,
    added: Added | None = None,
) -> torch.Tensor:
    """``unet``'s noise estimate, with ControlNet ``residuals`` (down blocks..., mid) and SDXL's
    ``added`` conditioning (pooled text embeddings, time ids) if any."""
    extra: dict[str, Any] = {}
    if added is not None:
        extra["added_cond_kwargs"] = {"text_embeds": added[0], "time_ids": added[1]}
    if residuals:
        extra["down_block_additional_residuals"] = residuals[:-1]
        extra["mid_block_additional_residual"] = residuals[-1]
    return unet(  # type: ignore[no-any-return]
        x_t, timesteps, encoder_hidden_states=embeddings, return_dict=False, **extra
    )[0]


def similarities_of(entries: list[_Entry]) -> list[float]:
    """Cosine similarity of each entry's frame to its filter's reference, one sync for all."""
    if not entries:
        return []
    values = [entry.state.filter.similarity_to(entry.image) for entry in entries]
    return [float(value) for value in torch.stack(values).tolist()]


def _row_controls(entry: _Entry, spec: ControlNetSpec, offset: int) -> list[RowControl]:
    """The entry's UNet rows (from ``offset`` in the batch) that ``spec`` acts on."""
    images = entry.state.controls[control_key(spec)]
    steps = images.shape[0]
    return [
        RowControl(offset + row, spec.conditioning_scale, images[step : step + 1])
        for row, step in enumerate(entry.row_steps)
        if spec.active(step, steps)
    ]
