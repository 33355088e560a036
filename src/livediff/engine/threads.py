"""Which thread may run what: the owner of each side of the engine, checked where a method starts.

The engine has two sides. The event loop runs the facade the faces call
(:class:`livediff.engine.Engine`); the worker thread runs everything that touches the transform
(:class:`livediff.engine.worker_side.WorkerSide`, :class:`livediff.engine.worker.Worker`). A
method of one side called on the other thread is a race that shows up rarely and far from its
cause, so each side's methods begin with ``owner.assert_current()``, which fails at once with
:class:`WrongThreadError` instead.

The check is on unless Python runs optimised (``-O``, where ``__debug__`` is False), and
``LIVEDIFF_THREAD_CHECKS=1``/``0`` turns it on or off either way. It is left on in production
because it is cheap where it stands: one ``threading.get_ident()`` and one integer comparison, at
the entry of methods that run a few times per session (open, params, reload, close), never per
frame.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _checks_enabled() -> bool:
    setting = os.environ.get("LIVEDIFF_THREAD_CHECKS", "").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    return __debug__


#: Whether :meth:`ThreadOwner.assert_current` checks (read once, at import).
THREAD_CHECKS = _checks_enabled()


class WrongThreadError(AssertionError):
    """A method of one side of the engine ran on another thread: a bug in the caller."""


class ThreadOwner:
    """The one thread allowed to run one side's methods (``side`` names it in errors).

    The thread that serves the side calls :meth:`claim` as it starts (the event loop's in
    ``Engine.start``, each new worker thread in its ``_main``). A ``strict`` owner refuses every
    thread until one claimed it (nothing may run on a worker that has not started); a lenient
    one lets any thread through until then (an engine not started yet runs on one thread only).
    """

    def __init__(self, side: str, *, strict: bool) -> None:
        self.side = side
        self._strict = strict
        self._ident: int | None = None

    def claim(self) -> None:
        """The calling thread owns the side from now on (replacing one that ended)."""
        self._ident = threading.get_ident()

    def is_current(self) -> bool:
        """Whether the calling thread is the owner."""
        return self._ident == threading.get_ident()

    def assert_current(self) -> None:
        """Raise :class:`WrongThreadError` unless the calling thread owns the side (when
        :data:`THREAD_CHECKS` is on)."""
        if not THREAD_CHECKS or self._ident == threading.get_ident():
            return
        if self._ident is None and not self._strict:
            return
        caller = sys._getframe(1).f_code.co_qualname
        raise WrongThreadError(
            f"{caller} runs on the {self.side} thread only, not on"
            f" {threading.current_thread().name!r}"
        )


def post_to_loop(
    loop: asyncio.AbstractEventLoop | None, callback: Callable[[T], object], arg: T
) -> bool:
    """Any thread to the event loop: run ``callback(arg)`` there soon; False when there is no
    loop to run it (not started, or closed)."""
    if loop is None:
        return False
    try:
        loop.call_soon_threadsafe(callback, arg)
    except RuntimeError:  # the loop has closed: nobody is left to serve
        return False
    return True
