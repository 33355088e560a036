"""Livepeer's ways in: livediff as a runner of go-livepeer's live-video-to-video pipeline.

Three doors share one core:

- :mod:`~livediff.livepeer.airunner`: the ai-runner adapter (livediff as the ai-runner live
  pipeline ``livediff``; ai-runner owns the trickle channels; ``livediff-airunner``);
- :mod:`~livediff.livepeer.native`: the native runner contract (livediff answers go-livepeer's
  runner endpoints itself, trickle in and out; ``livediff runner``);
- :mod:`~livediff.livepeer.live_runner`: the Live Runner (go-livepeer v0.9's registry of
  external apps): ``livediff serve`` registers itself and serves sessions through the
  orchestrator's proxy.

The core they share: :mod:`.switch` (one Livepeer stream at a time, a newer one replaces it;
the health go-livepeer reads), :mod:`.params` (the params only Livepeer reads, refusal
messages), :mod:`.trickle` (the trickle client and MPEG-TS framing), :mod:`.ts_ingest` /
:mod:`.ts_egress` (MPEG-TS over trickle to and from an engine session), :mod:`.trickle_stream`
(one stream's channels and lifecycle), :mod:`.control`, :mod:`.events`, :mod:`.hardware`.

Nothing in this package imports aiortc, and nothing imports torch at import time: ai-runner
imports :mod:`livediff.livepeer.airunner.params` under a guard that refuses new torch imports.
"""
