"""Scheduler coefficients, computed once per choice of timesteps and kept on the device.

The engine denoises in the variance-preserving form every SD-family scheduler shares:
``x_t = alpha_t * x_0 + beta_t * noise`` with ``alpha_t = sqrt(alphas_cumprod[t])`` and
``beta_t = sqrt(1 - alphas_cumprod[t])``. One step predicts the noise (or v, or x_0), turns it
into ``x_0``, and applies the consistency-model boundary condition
``denoised = c_out * x_0 + c_skip * x_t`` (c_skip = 0, c_out = 1 unless the model's scheduler is
an LCMScheduler). With one step and a trailing Euler scheduler this is exactly diffusers'
img2img: Euler scales its input by ``1 / sqrt(sigma^2 + 1) = alpha_t`` and its last step lands
on ``x_0``.

The tables and all the step arithmetic are float32 whatever the model's dtype (:data:`STEP_DTYPE`):
residual CFG's ``(x_t - alpha * x_0) / beta`` subtracts two nearly equal numbers and divides
by a small one, which in bfloat16 (8 bits of mantissa) leaves mostly rounding error. Only the
UNet's and the ControlNets' inputs are cast to the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: The dtype of the coefficient tables, the latents between steps and the step arithmetic.
STEP_DTYPE = torch.float32


@dataclass(frozen=True)
class StepTable:
    """Per-step coefficients of one ``t_index_list``, each shaped (steps, 1, 1, 1), in
    :data:`STEP_DTYPE`."""

    timesteps: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    @cached_property
    def packed(self) -> torch.Tensor:
        """alpha, beta, c_skip, c_out as one (4, steps) tensor (made once per table): the
        frame graph's per-frame coefficients."""
        columns = (self.alpha, self.beta, self.c_skip, self.c_out)
        return torch.cat([column.view(1, -1) for column in columns])


class Schedule:
    """The model scheduler's noise levels, as per-step coefficient tables."""

    def __init__(self, scheduler: Any, device: torch.device) -> None:
        config = scheduler.config
        self.prediction_type = str(config.get("prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self.train_steps = int(config.num_train_timesteps)
        self._alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32).cpu()
        self._boundary = getattr(scheduler, "get_scalings_for_boundary_condition_discrete", None)
        self.device = device
        self.dtype = STEP_DTYPE
        self._tables: dict[tuple[int, ...], StepTable] = {}
        self._all: tuple[torch.Tensor, ...] | None = None

    def table(self, timesteps: tuple[int, ...]) -> StepTable:
        """Coefficients of steps at these training timesteps (cached)."""
        found = self._tables.get(timesteps)
        if found is None:
            found = self._tables[timesteps] = self._build(timesteps)
        return found

    def _build(self, timesteps: tuple[int, ...]) -> StepTable:
        if not all(0 <= t < self.train_steps for t in timesteps):
            raise ValueError(f"timesteps {timesteps} are outside 0..{self.train_steps - 1}")
        cumprod = self._alphas_cumprod[list(timesteps)]
        scalings = [self._scalings(t) for t in timesteps]

        def column(values: torch.Tensor | list[float]) -> torch.Tensor:
            tensor = torch.as_tensor(values, dtype=STEP_DTYPE).view(-1, 1, 1, 1)
            return tensor.to(self.device)

        return StepTable(
            timesteps=torch.tensor(timesteps, dtype=torch.long, device=self.device),
            alpha=column(cumprod.sqrt()),
            beta=column((1 - cumprod).sqrt()),
            c_skip=column([skip for skip, _ in scalings]),
            c_out=column([out for _, out in scalings]),
        )

    def row(self, strength: torch.Tensor, above: torch.Tensor | None = None) -> StepTable:
        """A one-step table at ``strength`` (a device tensor of one value, 0 to 1), picked on
        the device: timestep ``round(train_steps strength) - 1`` (at least ``above + 1`` when
        given), clamped to the training range. No host sync: what the motion-aware noise
        controller uses to change a row's noise level each frame."""
        every = self._every()
        timestep = (strength.reshape(1) * self.train_steps).round().long() - 1
        if above is not None:
            timestep = torch.maximum(timestep, above.reshape(1) + 1)
        timestep = timestep.clamp(0, self.train_steps - 1)
        alpha, beta, c_skip, c_out = (
            torch.index_select(column, 0, timestep).view(-1, 1, 1, 1) for column in every
        )
        return StepTable(timestep, alpha, beta, c_skip, c_out)

    def _every(self) -> tuple[torch.Tensor, ...]:
        """alpha, beta, c_skip, c_out of every training timestep, on the device (made once)."""
        if self._all is None:
            every = self.table(tuple(range(self.train_steps)))
            self._all = tuple(
                column.view(-1) for column in (every.alpha, every.beta, every.c_skip, every.c_out)
            )
        return self._all

    def _scalings(self, timestep: int) -> tuple[float, float]:
        if self._boundary is None:
            return 0.0, 1.0
        c_skip, c_out = self._boundary(timestep)
        return float(c_skip), float(c_out)

    # -- the per-row maths (rows: a slice of the UNet batch and its table rows) ------------------
    # Every argument is in STEP_DTYPE (the UNet's output is cast up before it gets here).
    @staticmethod
    def noised(
        x_0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """``x_t = alpha x_0 + beta noise``."""
        return alpha * x_0 + beta * noise

    @staticmethod
    def residual_noise(
        x_t: torch.Tensor, x_0: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """Residual CFG's virtual noise: the noise that takes ``x_0`` to ``x_t``."""
        return (x_t - alpha * x_0) / beta

    def to_epsilon(
        self, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's output expressed as predicted noise."""
        if self.prediction_type == "epsilon":
            return output
        if self.prediction_type == "v_prediction":
            return alpha * output + beta * x_t
        return self.residual_noise(x_t, output, alpha, beta)

    @staticmethod
    def denoise(epsilon: torch.Tensor, x_t: torch.Tensor, table: StepTable) -> torch.Tensor:
        """The boundary-conditioned x_0 estimate of ``x_t`` given its predicted noise."""
        x_0 = (x_t - table.beta * epsilon) / table.alpha
        return table.c_out * x_0 + table.c_skip * x_t
