"""The plug-in contract between the engine and a model.

A transform knows pixels and params; it never learns about WebRTC, HTTP or ai-runner.
All of its methods but the constructor, the class attributes, the classmethods and
:meth:`Transform.resolve_params` (the event loop's: fetching what params point at) run on the
worker thread that owns the device (the engine sends every call there), so a transform needs no
locks beyond what ``resolve_params`` shares with the worker.

The contract is generic in three types a transform declares once, so that its methods need no
runtime checks of what the engine hands back to them: its params (``ParamsT``, a
:class:`TransformParams`), its per-session state (``StateT``: what :meth:`Transform.open_session`
makes and every :class:`Job` of that session carries) and what :meth:`Transform.stage` leaves on a
job (``StagedT``). The engine holds any transform (:data:`AnyTransform`) and never looks inside
the state or the staged value: it only hands them back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field

from livediff.config import Settings
from livediff.frames import Frame, Image


class TransformParams(BaseModel):
    """Params every transform takes: the output size. Subclasses add their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    width: int = Field(512, ge=64, le=2048, multiple_of=8, description="Output width in pixels.")
    height: int = Field(512, ge=64, le=2048, multiple_of=8, description="Output height in pixels.")


#: A transform's params model.
ParamsT = TypeVar("ParamsT", bound=TransformParams)
#: A transform's per-session state (None for a transform that keeps none).
StateT = TypeVar("StateT")
#: What a transform's :meth:`Transform.stage` stores on a job (None if it stages nothing).
StagedT = TypeVar("StagedT")


@dataclass(slots=True)
class Job(Generic[ParamsT, StateT, StagedT]):
    """One frame of one session, handed to :meth:`Transform.process`."""

    session_id: str
    frame: Frame
    params: ParamsT
    state: StateT
    #: Set by a transform that repeated an earlier output instead of processing this frame
    #: (e.g. the similarity filter); the engine counts it with the dropped frames.
    skipped: bool = False
    #: Set by a transform whose safety filter replaced this frame's output (it was never
    #: sent); the engine counts it in ``livediff_frames_filtered_total``.
    filtered: bool = False
    #: The transform's own: what :meth:`Transform.stage` started for this job (e.g. pixels
    #: already on their way to the device); None when nothing was staged.
    staged: StagedT | None = None


class Transform(ABC, Generic[ParamsT, StateT, StagedT]):
    """Turns frames into frames. Subclass it and register it by name or 'module:Class'.

    A subclass names its types: ``class Mine(Transform[MyParams, MyState, None])``; a bare
    ``Transform`` subclass gets ``Any`` for each (as untyped code does).
    """

    #: The name `--pipeline` selects it by.
    name: ClassVar[str]
    #: Its params; a torch-free pydantic model (extra='forbid', frozen), ``ParamsT`` or a
    #: subclass of it (a class variable cannot name a type variable).
    params_model: ClassVar[type[TransformParams]] = TransformParams

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def device(self) -> str:
        """The device this transform computes on ('cpu', 'cuda', 'cuda:1', ...)."""
        return "cpu"

    @classmethod
    def default_params(cls, settings: Settings) -> dict[str, Any]:
        """Values that a new session's params start from (before the client's own), as
        configured; pure, so any thread may ask (the ai-runner spec is built from it)."""
        return {"width": settings.width, "height": settings.height}

    @classmethod
    def check_available(cls, settings: Settings) -> None:
        """Raise (a LookupError saying how to fix it) when what ``settings`` configure cannot
        be loaded on this machine, so that a command fails at start rather than at load."""

    @classmethod
    def model_ids(cls, params: ParamsT) -> dict[tuple[str | int, ...], str]:
        """The model ids (hub ids or folders) that ``params`` name, by the field's location
        (``("model",)``, ``("controlnets", 0, "model")``): the engine refuses any that is not
        on the server's allow-list (the configured model and vae, ``--allow-model``) before
        the transform sees it. Pure, like :meth:`default_params`; none by default."""
        return {}

    @classmethod
    def configured_model_ids(cls, settings: Settings) -> set[str]:
        """The model ids the server's own settings name (allowed without ``--allow-model``):
        by default those its default params name."""
        defaults = cls.params_model.model_construct(**cls.default_params(settings))
        return set(cls.model_ids(cast(ParamsT, defaults)).values())

    def loaded_params(self) -> dict[str, Any]:
        """Defaults that follow what is loaded now (e.g. the model), over :meth:`default_params`,
        so that a new session does not ask for a reload. Asked after every (re)load."""
        return {}

    def load(self) -> None:
        """Load models and warm up. Runs once, on the worker thread, before any frame."""

    def open_session(self, params: ParamsT) -> StateT:
        """Per-session state (caches, filter memory); passed back in every :class:`Job`.

        The default keeps none: it is for transforms whose ``StateT`` is None, and a transform
        with a state type overrides it."""
        return cast(StateT, None)

    def close_session(self, state: StateT) -> None:
        """Release what :meth:`open_session` made."""

    async def resolve_params(self, params: ParamsT) -> None:
        """Fetch what ``params`` point at (e.g. a style image URL) before they reach the worker.

        The one method that runs on the event loop: the engine awaits it as a session opens and
        before every params change, so the worker never waits on the network. It must touch
        only thread-safe state (a cache the worker reads); a refusal is a pydantic
        ValidationError naming the field. Default: nothing to fetch."""
        return None

    def validate_params(self, params: ParamsT) -> None:
        """Refuse params the loaded model cannot serve (raise pydantic's ValidationError, which
        the faces answer with a 422); called before a session takes them."""

    def affects_others(self, params: ParamsT) -> bool:
        """True when ``params`` change, without a reload, what the loaded model gives every
        session (the diffusion transform's LoRAs): the engine then allows them only to a
        session that is alone, as it does a reload."""
        return False

    def requires_reload(self, old: ParamsT, new: ParamsT) -> bool:
        """True when moving from ``old`` to ``new`` params means reloading weights."""
        return False

    def reload(self, params: ParamsT) -> None:
        """Reload weights for ``params`` (only called when :meth:`requires_reload` said so)."""

    def stage(self, jobs: Sequence[Job[ParamsT, StateT, StagedT]]) -> None:
        """Start moving the inputs of ``jobs`` (the next batch) onto the device, while the batch
        in flight still computes; store what :meth:`process` needs in ``job.staged``."""

    @abstractmethod
    def process(self, jobs: Sequence[Job[ParamsT, StateT, StagedT]]) -> list[Image | None]:
        """Transform a batch (at most one frame per session); one output per job, in order.

        An output is an image at the job's ``params.width`` x ``params.height``, or None when
        the transform has nothing to show for this frame yet (e.g. a pipeline still filling).

        With two batches in flight (``batches_in_flight``) the engine calls ``process`` again
        before it has read the previous call's outputs (device tensors still computing), and a
        session may have a job in both: a session's state must be brought up to date (on the
        device, in stream order) by the time ``process`` returns, and an output must not be
        written to again by a later call.
        """

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (after warm-up)."""

    def close(self) -> None:
        """Free models and device memory."""

    @classmethod
    def describe_session(cls, params: ParamsT) -> dict[str, Any]:
        """What this pipeline reports of a session with ``params`` beside its stats (pure: any
        thread may ask), e.g. the diffusion pipeline's active temporal tools."""
        return {}

    @classmethod
    def pipeline_info(cls) -> dict[str, Any]:
        """What clients may ask of this transform: its name and params JSON schema."""
        return {"name": cls.name, "params_schema": cls.params_model.model_json_schema()}


#: What the engine holds: a transform of any params, state and staged types (it only hands the
#: state and the staged value back to the transform that made them).
AnyTransform: TypeAlias = Transform[Any, Any, Any]
#: A job of any transform, as the engine's sessions and worker make and pass them.
AnyJob: TypeAlias = Job[Any, Any, Any]
