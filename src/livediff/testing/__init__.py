"""Helpers for testing and measuring livediff from the outside: numbered frames, client peers,
tiny random diffusion models built from published configs, a diffusers reference pipeline, real
servers in-process (:mod:`.servers`), and both sides of a Livepeer trickle stream (the gateway's,
:mod:`.trickle`, and a double of go-livepeer's trickle server, :mod:`.trickle_server`).

Nothing in the service imports this package; tests and benchmarks do, and they share these
helpers instead of importing each other (benchmarks import nothing from ``tests/``).
"""
