"""The native runner contract: livediff answering go-livepeer itself, without ai-runner.

``livediff runner`` serves :func:`~livediff.livepeer.native.app.create_runner_app`: the HTTP
endpoints go-livepeer calls on a live runner container (``/health``, ``/hardware/info``,
``/version``, ``POST /live-video-to-video``), with media and messages over the stream's trickle
channels (:mod:`livediff.livepeer.trickle`). One :class:`~livediff.engine.Engine` serves the
streams, as it serves ``livediff serve`` and the ai-runner adapter
(:mod:`livediff.livepeer.airunner`).

Modules: :mod:`.app` (routes), :mod:`.contract` (``NativeRunner``: the engine and its stream
switch), :mod:`.schemas` (the contract's bodies). A stream's lifecycle, channels, threads,
control and events are the Livepeer core's (:mod:`livediff.livepeer.trickle_stream` and its
neighbours), which the Live Runner door shares. Nothing here imports torch at import time, nor
aiortc.
"""
