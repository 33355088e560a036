"""The stochastic similarity filter: skip frames that barely differ from the last one processed.

A frame whose cosine similarity to the last processed input is ``s`` is skipped with
probability ``max(0, (s - threshold) / (1 - threshold))`` (StreamDiffusion's rule), and the
session shows its last output again. An identical frame is always skipped; one below the
threshold never is; at most ``max_skip`` frames in a row are skipped, so a slow drift still
gets through.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

#: Similarities this close to 1 count as identical frames (float32 rounding).
IDENTICAL = 1.0 - 1e-5


def skip_chance(similarity: float, threshold: float) -> float:
    """Probability of skipping a frame this similar to the last processed one."""
    if similarity >= IDENTICAL:
        return 1.0
    return min(1.0, max(0.0, (similarity - threshold) / (1.0 - threshold)))


class SimilarityFilter:
    """Per-session memory of the last processed input and the run of skipped frames."""

    def __init__(self, seed: int = 0) -> None:
        self._previous: torch.Tensor | None = None
        self._random = random.Random(seed)
        self.skipped_in_a_row = 0

    def compares(self, image: torch.Tensor, threshold: float, allowed: bool) -> bool:
        """Whether deciding on ``image`` needs its similarity to the reference (filter on, a
        reference of that shape, and something to show instead: ``allowed``)."""
        previous = self._previous
        return allowed and threshold > 0 and previous is not None and previous.shape == image.shape

    def similarity_to(self, image: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of ``image`` to the reference, as a 0-d tensor on the device
        (read back for a whole batch at once: see ``unet_batch.similarities_of``)."""
        assert self._previous is not None
        return F.cosine_similarity(
            self._previous.reshape(1, -1).to(torch.float32),
            image.reshape(1, -1).to(torch.float32),
            eps=1e-6,
        )[0]

    def decide(
        self, image: torch.Tensor, threshold: float, max_skip: int, similarity: float | None
    ) -> bool:
        """True when ``image`` is skipped; otherwise it becomes the new reference.

        ``similarity`` is None when :meth:`compares` said no: the frame is then only recorded.
        """
        if similarity is not None:
            chance = skip_chance(similarity, threshold)
            if self.skipped_in_a_row < max_skip and self._random.random() < chance:
                self.skipped_in_a_row += 1
                return True
        self._previous = image if threshold > 0 else None
        self.skipped_in_a_row = 0
        return False

    def forget(self) -> None:
        self._previous = None
        self.skipped_in_a_row = 0
