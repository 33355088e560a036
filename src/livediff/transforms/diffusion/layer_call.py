"""The one place a UNet's wrapped attention layers look for the current call's extra inputs.

The feature bank (self-attention) and the IP-Adapter (cross-attention) wrap their layers'
processors before compiling; each wrapped layer reads its switch's ``call`` and runs the
processor it replaced while that is None. A call is active only inside :meth:`active` (worker
thread, around one eager UNet call), so the compiled UNet never sees one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

CallT = TypeVar("CallT")


class LayerSwitch(Generic[CallT]):
    """The active call of a set of wrapped layers (None: every layer runs as it did).

    ``call`` is an instance attribute from the start: compiled code guards on where it lives,
    so it must not move from the class to the instance at the first call."""

    def __init__(self) -> None:
        self.call: CallT | None = None

    @contextmanager
    def active(self, call: CallT) -> Iterator[None]:
        self.call = call
        try:
            yield
        finally:
            self.call = None
