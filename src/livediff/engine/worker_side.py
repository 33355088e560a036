"""The engine's worker-thread half: the model policy, run where the transform lives.

Every method of :class:`WorkerSide` runs on the worker thread (it checks, see
:mod:`livediff.engine.threads`), reached from the event loop only through ``Engine``'s one
hand-off (``Engine._to_worker``). It decides what only the loaded model can tell: how a params
patch merges into a session's *current* params (so that two updates sent back to back both
count), whether the loaded model can serve them, whether a change reloads it (refused while other
sessions use it) and the warm-up of every (re)loaded model.

What the event loop needs to know of the loaded model, the defaults a new session starts from
and the params the model was loaded for, is a :class:`ModelSnapshot`: immutable, made anew and
published in one assignment by this side after every (re)load, so a reader on any thread sees one
load's defaults with the same load's params, never a mix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from livediff.config import Settings
from livediff.engine.errors import ModelInUseError
from livediff.engine.params import ParamsRules
from livediff.engine.session import Session
from livediff.engine.stats import Metrics
from livediff.engine.threads import ThreadOwner
from livediff.engine.warmup import WarmupImage
from livediff.engine.worker import Worker, WorkerFaultError
from livediff.frames import Frame
from livediff.transforms import AnyJob, AnyTransform, Job, TransformParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """What both threads know of the loaded model; replaced whole, never changed."""

    #: What a new session's params start from: the configured defaults, then (once loaded)
    #: what the transform has loaded.
    defaults: Mapping[str, Any]
    #: The params the model was loaded (or last reloaded) for; None until the first load.
    loaded_for: TransformParams | None


class WorkerSide:
    """Params policy, reload policy and warm-up: the engine's methods that run on the worker."""

    def __init__(
        self,
        settings: Settings,
        transform: AnyTransform,
        metrics: Metrics,
        rules: ParamsRules,
        *,
        warmup_image: WarmupImage,
        report_fault: Callable[[WorkerFaultError], None],
    ) -> None:
        """``report_fault`` hands a dying worker's fault to the event loop (any thread)."""
        self._settings = settings
        self._transform = transform
        self._metrics = metrics
        self._rules = rules
        self._warmup_image = warmup_image
        self._report_fault = report_fault
        #: The worker thread, claimed by every worker the engine builds as its thread starts.
        self.worker_thread = ThreadOwner("worker", strict=True)
        defaults = MappingProxyType(rules.configured_defaults(settings))
        self._snapshot = ModelSnapshot(defaults, loaded_for=None)

    @property
    def snapshot(self) -> ModelSnapshot:
        """The loaded model as last published (any thread: one read of an immutable value)."""
        return self._snapshot

    # -- hooks of the worker -------------------------------------------------------------------
    def after_load(self) -> None:
        """After ``load()``: learn the loaded params, then warm up with them."""
        self.worker_thread.assert_current()
        self._metrics.model_loads.inc()
        self.warm_up(self._publish(None))

    def worker_failed(self, fault: WorkerFaultError) -> None:
        """As the worker ends on ``fault``: count it and hand it to the loop (which restarts)."""
        self.worker_thread.assert_current()
        self._metrics.errors.labels(fault.kind).inc()
        self._report_fault(fault)

    # -- what the loop asks ----------------------------------------------------------------------
    def requires_reload(self, old: TransformParams, new: TransformParams) -> bool:
        """The transform's answer: whether moving from ``old`` to ``new`` reloads the model."""
        self.worker_thread.assert_current()
        return self._transform.requires_reload(old, new)

    def apply(self, session: Session, patch: Mapping[str, Any], others: int) -> TransformParams:
        """Merge ``patch`` into the params the session has now (so that updates sent back to
        back all count), reload when the change needs it (alone only), swap them in."""
        self.worker_thread.assert_current()
        new = self._rules.validate(patch, self._snapshot.defaults, base=session.params)
        self._reload_if_needed(session.params, new, others)
        self._transform.validate_params(new)
        session.set_params(new)
        return new

    def load_for(self, params: TransformParams, session: Session | None, others: int) -> None:
        """Reload (and warm up) for ``params`` if they need another model; ``session`` (alone
        then) takes ``params`` in the same step."""
        self.worker_thread.assert_current()
        self._reload_if_needed(self._loaded_params(), params, others)
        if session is not None:
            session.set_params(params)

    def attach(self, worker: Worker, session: Session, others: int) -> None:
        """Load the session's model if it asks for another, then serve it on ``worker``."""
        self.worker_thread.assert_current()
        self._reload_if_needed(self._loaded_params(), session.params, others)
        self._transform.validate_params(session.params)
        worker.attach_here(session)

    def reattach(self, worker: Worker, sessions: Sequence[Session]) -> None:
        """After a restart: serve the sessions still open (their state made anew) on ``worker``,
        but not one that an open already attached to it."""
        self.worker_thread.assert_current()
        attached = worker.attached
        for session in sessions:
            if session.end_reason is None and session not in attached:
                worker.attach_here(session)

    # -- the model -------------------------------------------------------------------------------
    def warm_up(self, params: TransformParams) -> None:
        """Feed test frames through the transform until one comes out.

        That compiles, autotunes and allocates for ``params`` before a client's frame arrives.
        """
        self.worker_thread.assert_current()
        transform = self._transform
        state = transform.open_session(params)
        try:
            card = self._warmup_image(params.width, params.height, transform.device)
            for index in range(self._settings.warmup_frames):
                job: AnyJob = Job("warm-up", Frame(image=card, pts=index), params, state)
                if transform.process([job])[0] is not None:
                    transform.synchronize()
                    return
        finally:
            transform.close_session(state)
        raise RuntimeError(
            f"the {transform.name} transform gave no frame for "
            f"{self._settings.warmup_frames} warm-up frames"
        )

    def _reload_if_needed(self, old: TransformParams, new: TransformParams, others: int) -> None:
        """The reload policy. One model serves every session, so only a session alone may
        change it; a reload warms the new model up before any frame reaches it. The same
        holds for what changes every session's output without a reload (LoRA weights)."""
        if others and self._transform.affects_others(new):
            self._metrics.reloads_refused.inc()
            raise ModelInUseError(
                f"these params change weights the loaded model shares with {others} other "
                "session(s) (its LoRAs); change them when no other session is open"
            )
        if not self._transform.requires_reload(old, new):
            return
        if others:
            self._metrics.reloads_refused.inc()
            raise ModelInUseError(
                f"these params need another model, but the loaded one serves {others} other "
                "session(s); change the model when no other session is open, or run another "
                "server for it"
            )
        logger.info("params change reloads the %s transform", self._transform.name)
        self._transform.reload(new)
        self._metrics.model_loads.inc()
        self.warm_up(self._publish(new))

    def _publish(self, loaded_for: TransformParams | None) -> TransformParams:
        """After a (re)load: the new defaults and the params loaded for (``loaded_for``, or the
        defaults' own), published together as one snapshot; returns those params."""
        configured = self._rules.configured_defaults(self._settings)
        defaults = MappingProxyType({**configured, **self._transform.loaded_params()})
        params = loaded_for if loaded_for is not None else self._rules.validate({}, defaults)
        self._snapshot = ModelSnapshot(defaults, params)
        return params

    def _loaded_params(self) -> TransformParams:
        snapshot = self._snapshot
        if snapshot.loaded_for is not None:
            return snapshot.loaded_for
        return self._rules.validate({}, snapshot.defaults)
