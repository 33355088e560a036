"""Helpers for testing and measuring livediff from the outside: numbered frames, client peers,
tiny random diffusion models built from published configs, and a diffusers reference pipeline.

Nothing in the service imports this package; tests and benchmarks do.
"""
