"""The Livepeer doors never load aiortc: a runner container has no WebRTC in its path, and an
aiortc release (or its absence) must not touch it."""

from __future__ import annotations

import subprocess
import sys

LIVEPEER_MODULES = (
    "livediff.livepeer.native.app",
    "livediff.livepeer.native.contract",
    "livediff.livepeer.trickle_stream",
    "livediff.livepeer.ts_ingest",
    "livediff.livepeer.ts_egress",
    "livediff.livepeer.switch",
    "livediff.livepeer.params",
    "livediff.livepeer.airunner.streams",
    "livediff.livepeer.airunner.tensors",
)


def test_no_livepeer_module_imports_aiortc() -> None:
    script = (
        "import importlib, sys\n"
        f"for name in {LIVEPEER_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('aiortc', 'aioice'))\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"aiortc loaded by a Livepeer door: {done.stdout}"
