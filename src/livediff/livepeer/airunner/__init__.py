"""The Livepeer face: livediff as an ai-runner live pipeline (orchestrator image).

Modules: :mod:`.params` (torch-free params classes for ai-runner's loader), :mod:`.pipeline`
(``LivediffPipeline``, the ai-runner ``Pipeline``), :mod:`.main` (the ``livediff-airunner``
entry point). They need ai-runner, which is installed only in the image (see
``docs/orchestrator.md``).

Nothing here may import torch, nor ai-runner: ai-runner imports the params class under a guard
(0.5 s, no new torch), and this file is on its import path.
"""
