"""The per-(image, t) metric set, defined once: MSE and LPIPS between an image and its reconstruction.

Names and order are ``ddpm_ood.results.schema.METRIC_COLUMNS`` = ("mse", "perceptual_difference"); both are >= 0 and
higher means a worse reconstruction (more OOD-like).

- ``mse``: mean over all non-batch dims of (x - y)^2, both in [0, 1].
- ``perceptual_difference``: LPIPS v0.1 (``perceptual.lpips.PerceptualDistance``: 2D, or 2.5D for volumes).
"""

from __future__ import annotations

import contextlib

import torch

from ddpm_ood.perceptual.lpips import PerceptualDistance, build_lpips
from ddpm_ood.results.schema import METRIC_COLUMNS


def _autocast_off() -> contextlib.ExitStack:
    # Metrics are computed in fp32 whatever autocast region the caller is in (CPU bf16 or CUDA fp16).
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


class ReconstructionMetrics:
    """The metric set, built once per run: ``metrics(original, reconstruction) -> {name: (B,) float32}``.

    Args:
        device: where LPIPS runs; inputs are moved there.
        lpips_net: an ``lpips.LPIPS``-like module (``forward(x, y, normalize=True) -> (N, 1, 1, 1)``);
            default ``build_lpips(device)`` with the real backbone.
        lpips_batch_size: at most this many 2D pairs (images, or slices of volumes) per LPIPS forward pass;
            bounds memory only, values do not depend on it.
    """

    names = METRIC_COLUMNS

    def __init__(
        self,
        device: str | torch.device = "cpu",
        lpips_net: torch.nn.Module | None = None,
        lpips_batch_size: int = 256,
    ) -> None:
        self.device = torch.device(device)
        net = lpips_net if lpips_net is not None else build_lpips(self.device)
        self.perceptual = PerceptualDistance(net.to(self.device), batch_size=lpips_batch_size)

    def __call__(self, original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pair metrics of (B, C, H, W) or (B, C, D, H, W) images in [0, 1], C = 1 or 3.

        Returns ``{"mse": (B,), "perceptual_difference": (B,)}``, float32 on the CPU, row i for pair i
        (independent of B and of the other rows).
        """
        if original.shape != reconstruction.shape:
            raise ValueError(
                f"original {tuple(original.shape)} and reconstruction {tuple(reconstruction.shape)} differ"
            )
        if original.ndim not in (4, 5) or original.shape[1] not in (1, 3):
            raise ValueError(
                f"expected (B, C, H, W) or (B, C, D, H, W) with C = 1 or 3, got {tuple(original.shape)}"
            )
        with _autocast_off(), torch.no_grad():
            x = original.to(self.device, torch.float32)
            y = reconstruction.to(self.device, torch.float32)
            values = {"mse": mse(x, y), "perceptual_difference": self.perceptual(x, y)}
        return {name: values[name].float().cpu() for name in self.names}


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims of (x - y)^2: (B, ...) -> (B,)."""
    return (x - y).pow(2).flatten(1).mean(dim=1)
