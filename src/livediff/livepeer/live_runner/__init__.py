"""The Live Runner door: livediff registers itself with a go-livepeer (>= 0.9) orchestrator.

go-livepeer keeps a registry of external HTTP apps, lists the ready ones in discovery, reserves
sessions for clients and reverse-proxies their HTTP to the app with four ``Livepeer-*`` headers.
This door is ``livediff serve`` itself (studio, ``/v1``, WHIP/WHEP) plus:

- :mod:`.protocol`: the registry's wire format (heartbeats, channel descriptors, O2R events),
  read from go-livepeer's ``ai/runner/live_runner.go`` and ``server/ai_http.go``;
- :mod:`.registrar`: dynamic registration: bootstrap with the orchestrator's secret, heartbeats
  with the derived secret at the interval it returns, registering again after a 401 or 404,
  retries with backoff while it is unreachable, unregistering on shutdown;
- :mod:`.reservations`: the Livepeer sessions the orchestrator reserved for this runner
  (heartbeat replies are authoritative, O2R events arrive between them) and the local work tied
  to each, closed when the orchestrator releases it;
- :mod:`.o2r`: the orchestrator-to-runner channel's follower;
- :mod:`.door`: the door itself, and :mod:`.routes` (``POST /v1/trickle``: media over trickle
  channels the orchestrator creates for the session) and the proxy guard.

Nothing here imports aiortc or torch at import time.
"""
