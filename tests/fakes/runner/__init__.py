"""TEST DOUBLE of livepeer/ai-runner's ``runner`` package (v0.14.1): only what livediff uses.

Not the real thing: see ``tests/fakes/README.md``. The real package is installed from its git tag
in the orchestrator image; where it is importable, the tests use it instead of this.
"""
