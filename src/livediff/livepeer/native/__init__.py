"""The native runner contract: livediff answering go-livepeer itself, without ai-runner.

``livediff runner`` serves :func:`~livediff.livepeer.native.app.create_runner_app`: the HTTP
endpoints go-livepeer calls on a live runner container (``/health``, ``/hardware/info``,
``/version``, ``POST /live-video-to-video``), with media and messages over the stream's trickle
channels (:mod:`livediff.livepeer.trickle`). One :class:`~livediff.engine.Engine` serves the
streams, as it serves ``livediff serve`` and the ai-runner adapter
(:mod:`livediff.livepeer.airunner`).

Modules: :mod:`.app` (routes), :mod:`.runner` (the engine and the current stream),
:mod:`.stream` (one stream's lifecycle), :mod:`.ingest` / :mod:`.egress` (decoder and encoder
threads), :mod:`.control` (params updates), :mod:`.events` (status and error events),
:mod:`.schemas`, :mod:`.hardware`. Nothing here imports torch at import time.
"""
