"""The README's custom-transform example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from livediff.config import Settings
from livediff.frames import Frame
from livediff.transforms import Job, Transform, TransformParams

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_custom_transform_example_inverts_frames() -> None:
    section = README.read_text().split("## Writing your own transform", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    invert_class = namespace["Invert"]
    assert isinstance(invert_class, type) and issubclass(invert_class, Transform)
    transform = invert_class(Settings())
    image = np.full((64, 64, 3), 10, dtype=np.uint8)
    params = TransformParams(width=64, height=64)
    [out] = transform.process([Job("s", Frame(image=image, pts=0), params, None)])
    assert isinstance(out, np.ndarray) and int(out[0, 0, 0]) == 245
