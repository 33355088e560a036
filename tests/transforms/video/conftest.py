"""Fixtures: a tiny random Wan transformer and VAE, built from the configs in
``livediff.testing.video_models`` (tens of thousands of parameters; no downloads)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from livediff.testing.video_models import (
    TINY_WAN_TRANSFORMER,
    TINY_WAN_VAE,
    build_wan_transformer,
    build_wan_vae,
)


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def transformer() -> Any:
    return build_wan_transformer(TINY_WAN_TRANSFORMER, seed=0)


@pytest.fixture(scope="session")
def one_layer_transformer() -> Any:
    return build_wan_transformer({**TINY_WAN_TRANSFORMER, "num_layers": 1}, seed=3)


@pytest.fixture(scope="session")
def vae() -> Any:
    return build_wan_vae(TINY_WAN_VAE, seed=0)
