"""Image -> metrics, the path reconstruct.py and the scorer share: encode -> noise and denoise (engine) -> decode ->
clamp to [0, 1] -> MSE and LPIPS against the input image.

The engine works in the autoencoder's model space and never asks whether it is pixel or latent space; only here are
samples encoded, decoded and clamped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddpm_ood.autoencoder.base import Autoencoder, autoencoder_for, to_image
from ddpm_ood.config import RunConfig, ScheduleConfig
from ddpm_ood.reconstruction.engine import EpsFn, reconstruct_batched, reconstruct_reference
from ddpm_ood.results.schema import METRIC_COLUMNS

if TYPE_CHECKING:
    from ddpm_ood.reconstruction.metrics import ReconstructionMetrics

ENGINES = ("batched", "reference")


@dataclass(frozen=True)
class ReconstructionModel:
    """A trained diffusion model ready to reconstruct: its noise estimate, schedule and autoencoder."""

    eps_fn: EpsFn
    schedule: ScheduleConfig
    autoencoder: Autoencoder


def load_model(
    ckpt: dict,
    run: RunConfig,
    source: str | Path,
    device: torch.device,
    *,
    use_ema: bool = True,
    max_batch: int | None = None,
    precision: str = "fp32",
) -> ReconstructionModel:
    """The checkpoint's UNet (EMA weights if present and ``use_ema``) on ``device`` in eval mode, with its schedule
    and autoencoder. ``source`` names the checkpoint in error messages; ``precision`` (resolved,
    ``devices.PRECISIONS``) is the forward pass's; ``max_batch`` bounds the samples per network call."""
    from ddpm_ood.checkpoint import inference_state_dict, load_unet_state
    from ddpm_ood.devices import autocast_context
    from ddpm_ood.diffusion.unet import build_unet
    from ddpm_ood.reconstruction.engine import model_eps_fn

    model = build_unet(run.model)
    load_unet_state(model, inference_state_dict(ckpt, use_ema=use_ema), str(source))
    model.to(device).eval()
    eps_fn = model_eps_fn(model, run.schedule, max_batch=max_batch,
                          autocast=lambda: autocast_context(device, precision))
    return ReconstructionModel(eps_fn, run.schedule, autoencoder_for(run))


def reconstruct_images(
    model: ReconstructionModel,
    images: torch.Tensor,
    keys: Sequence[str],
    start_ts: Sequence[int],
    num_inference_steps: int,
    seed: int,
    *,
    recon_steps: int | None = None,
    engine: str = "batched",
) -> torch.Tensor:
    """Reconstructions (S, B, C, *spatial) in [0, 1] of images (B, C, *spatial) in [0, 1] from every start t.

    keys[b]: the noise key of image b (``seeding.noise_key(path)`` for a file); row s belongs to start_ts[s].
    ``engine``: ``batched`` (default) or ``reference`` (the plain loop; same numbers, needs ``recon_steps=None``).
    """
    x0 = model.autoencoder.encode(images)
    if engine == "reference":
        samples = reconstruct_reference(model.eps_fn, model.schedule, x0, keys, start_ts, num_inference_steps, seed)
    else:
        samples = reconstruct_batched(
            model.eps_fn, model.schedule, x0, keys, start_ts, num_inference_steps, seed, recon_steps
        )
    decoded = model.autoencoder.decode(samples.reshape((-1,) + samples.shape[2:]))
    return to_image(decoded).reshape((len(start_ts), images.shape[0]) + tuple(images.shape[1:]))


def measure_batch(
    model: ReconstructionModel,
    metrics: ReconstructionMetrics,
    images: torch.Tensor,
    keys: Sequence[str],
    start_ts: Sequence[int],
    num_inference_steps: int,
    seed: int,
    *,
    recon_steps: int | None = None,
    engine: str = "batched",
) -> dict[str, torch.Tensor]:
    """Reconstruct a batch from every start t and measure it: ``{metric name: (S, B) float32 CPU}``.

    images: (B, C, *spatial) in [0, 1] on the model's device; S = len(start_ts), row s for start_ts[s]. Metric
    names: ``METRIC_COLUMNS``.
    """
    recons = reconstruct_images(model, images, keys, start_ts, num_inference_steps, seed,
                                recon_steps=recon_steps, engine=engine)
    originals = images.unsqueeze(0).expand_as(recons).reshape((-1,) + images.shape[1:])
    values = metrics(originals, recons.reshape((-1,) + images.shape[1:]))
    return {name: v.reshape(len(start_ts), images.shape[0]).cpu() for name, v in values.items()}


def result_rows(
    indices: Sequence[int],
    filenames: Sequence[str],
    row_type: str,
    start_ts: Sequence[int],
    values: dict[str, torch.Tensor],
) -> list[dict]:
    """Results rows (``index`` + the results CSV columns) of a measured batch, image-major then t ascending
    as given. ``values`` is ``measure_batch``'s output; column b belongs to indices[b] / filenames[b]."""
    rows = []
    for j, i in enumerate(indices):
        for s, t in enumerate(start_ts):
            row = {"index": int(i), "filename": filenames[j], "type": row_type, "t": int(t)}
            row.update({name: float(values[name][s, j]) for name in METRIC_COLUMNS})
            rows.append(row)
    return rows
