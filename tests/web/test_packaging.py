"""The page ships with livediff: every file of web/ is package data of livediff.web."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from livediff.config import Settings
from livediff.server.app import find_web_dir

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web"


def test_every_page_file_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data: dict[str, list[str]] = config["tool"]["setuptools"]["package-data"]
    left_out = []
    for path in sorted(WEB.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(WEB)
        package = ".".join(["livediff", "web", *relative.parts[:-1]])
        patterns = package_data.get(package, [])
        if not any(fnmatch.fnmatch(relative.name, pattern) for pattern in patterns):
            left_out.append(str(relative))
    assert not left_out, f"add to pyproject.toml [tool.setuptools.package-data]: {left_out}"


def test_the_package_links_to_the_page() -> None:
    bundled = ROOT / "src" / "livediff" / "web"
    assert bundled.resolve() == WEB.resolve(), "src/livediff/web must link to web/"
    found = find_web_dir(Settings())
    assert found is not None
    assert (found / "index.html").resolve() == (WEB / "index.html").resolve()
