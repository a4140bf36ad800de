"""Image -> metrics, the path reconstruct.py and the scorer share: encode -> noise and denoise (engine) -> decode ->
clamp to [0, 1] -> MSE and LPIPS against the input image.

The engine works in the autoencoder's model space and never asks whether it is pixel or latent space; only here are
samples encoded, decoded and clamped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ddpm_ood.autoencoder.base import Autoencoder, autoencoder_for, to_image
from ddpm_ood.config import RunConfig, ScheduleConfig
from ddpm_ood.reconstruction.engine import EpsFn, reconstruct_batched, reconstruct_reference
from ddpm_ood.results.schema import METRIC_COLUMNS

if TYPE_CHECKING:
    from ddpm_ood.reconstruction.metrics import ReconstructionMetrics

ENGINES = ("batched", "reference")
# Share of the free GPU memory that one network call may take when --max_batch is not given (the rest: the engine's
# per-trajectory state, LPIPS, the allocator's fragmentation).
MEMORY_FRACTION = 0.6
# Image voxels (rows x C x spatial) of reconstructions decoded and measured at once (64 MiB in fp32): bounds the
# memory of a batch of volumes; 2D batches of the usual sizes are one chunk.
MEASURE_VOXELS = 2**24


@dataclass(frozen=True)
class ReconstructionModel:
    """A trained diffusion model ready to reconstruct: its noise estimate, schedule and autoencoder.
    ``sample_shape``: (C', *spatial') of one model-space sample (the start noise of one (image, t))."""

    eps_fn: EpsFn
    schedule: ScheduleConfig
    autoencoder: Autoencoder
    sample_shape: tuple[int, ...]


def load_model(
    ckpt: dict,
    run: RunConfig,
    source: str | Path,
    device: torch.device,
    *,
    use_ema: bool = True,
    max_batch: int | None = None,
    precision: str = "fp32",
    vqvae_checkpoint: str | Path | None = None,
) -> ReconstructionModel:
    """The checkpoint's UNet (EMA weights if present and ``use_ema``) on ``device`` in eval mode, with its schedule
    and autoencoder (``autoencoder_for``; ``vqvae_checkpoint`` overrides where a latent model's VQ-VAE is read from).
    ``source`` names the checkpoint in error messages; ``precision`` (resolved, ``devices.PRECISIONS``) is the
    forward pass's; ``max_batch`` bounds the samples per network call."""
    from ddpm_ood.checkpoint import inference_state_dict, load_unet_state
    from ddpm_ood.devices import autocast_context
    from ddpm_ood.diffusion.unet import build_unet, wants_fused_attention
    from ddpm_ood.reconstruction.engine import model_eps_fn

    autoencoder = autoencoder_for(run, device, vqvae_checkpoint=vqvae_checkpoint, source=str(source))
    model = build_unet(run.model, fused_attention=wants_fused_attention(device))
    load_unet_state(model, inference_state_dict(ckpt, use_ema=use_ema), str(source))
    model.to(device).eval()

    def autocast() -> contextlib.AbstractContextManager:
        return autocast_context(device, precision)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # tick shapes repeat from batch to batch: autotune the convolutions
        if max_batch is None:
            max_batch = memory_sized_max_batch(model, run.model_shape, device, autocast)
    eps_fn = model_eps_fn(model, run.schedule, max_batch=max_batch, autocast=autocast)
    return ReconstructionModel(eps_fn, run.schedule, autoencoder, run.model_shape)


def max_batch_for_memory(free_bytes: int, bytes_per_sample: float, fraction: float = MEMORY_FRACTION) -> int:
    """Samples per network call that use at most ``fraction`` of ``free_bytes`` at ``bytes_per_sample`` each
    (at least 1)."""
    return max(1, int(fraction * free_bytes / max(bytes_per_sample, 1.0)))


def memory_sized_max_batch(model: torch.nn.Module, sample_shape: tuple[int, ...], device: torch.device,
                           autocast: Callable[[], contextlib.AbstractContextManager], probe: int = 8) -> int:
    """Samples per network call sized from the free GPU memory: the peak memory of one forward pass of ``probe``
    samples gives the bytes per sample, and calls may use ``MEMORY_FRACTION`` of what is free. Said in one line.
    Chunking changes numbers only by float rounding (the kernels round differently for other call sizes, about
    1e-6 in fp32), as any other batch composition does."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x = torch.zeros((probe, *sample_shape), device=device)
    t = torch.zeros((probe,), dtype=torch.long, device=device)
    with torch.inference_mode(), autocast():
        model(x, timesteps=t)
    torch.cuda.synchronize(device)
    per_sample = (torch.cuda.max_memory_allocated(device) - base) / probe
    free, _ = torch.cuda.mem_get_info(device)
    chosen = max_batch_for_memory(free, per_sample)
    print(f"samples per network call: at most {chosen} (sized from {free / 2**30:.1f} GiB free GPU memory, "
          f"{per_sample / 2**20:.1f} MiB per sample; --max_batch sets it)")
    return chosen


def reconstruct_samples(
    model: ReconstructionModel,
    images: torch.Tensor,
    keys: Sequence[str],
    start_ts: Sequence[int],
    num_inference_steps: int,
    seed: int,
    *,
    recon_steps: int | None = None,
    engine: str = "batched",
    noise: torch.Tensor | None = None,
    balanced: bool = True,
) -> torch.Tensor:
    """Model-space reconstructions (S, B, *sample_shape) of images (B, C, *spatial) in [0, 1] from every start t,
    not decoded.

    keys[b]: the noise key of image b (``seeding.noise_key(path)`` for a file); row s belongs to start_ts[s].
    ``engine``: ``batched`` (default) or ``reference`` (the plain loop; same numbers, needs ``recon_steps=None``).
    ``noise``: the (S, B, *model-space shape) start noise when drawn ahead (``seeding.noise_batch``), else None.
    ``balanced``: the batched engine's even tick sizes (the default; False only for the benchmark's ablation).
    """
    x0 = model.autoencoder.encode(images)
    if engine == "reference":
        return reconstruct_reference(model.eps_fn, model.schedule, x0, keys, start_ts, num_inference_steps, seed,
                                     noise=noise)
    return reconstruct_batched(model.eps_fn, model.schedule, x0, keys, start_ts, num_inference_steps, seed,
                               recon_steps, balanced=balanced, noise=noise)


def reconstruct_images(model: ReconstructionModel, images: torch.Tensor, keys: Sequence[str],
                       start_ts: Sequence[int], num_inference_steps: int, seed: int, **engine_options) -> torch.Tensor:
    """Reconstructions (S, B, C, *spatial) in [0, 1] of images (B, C, *spatial) in [0, 1] from every start t: the
    ``reconstruct_samples`` (same arguments) decoded and clamped, all at once (``measure_batch`` decodes in
    chunks instead)."""
    samples = reconstruct_samples(model, images, keys, start_ts, num_inference_steps, seed, **engine_options)
    decoded = model.autoencoder.decode(samples.reshape((-1,) + samples.shape[2:]))
    return to_image(decoded).reshape((len(start_ts), images.shape[0]) + tuple(images.shape[1:]))


def measure_chunk_rows(image_voxels: int, lpips_batch_size: int) -> int:
    """Reconstructions decoded and measured at once, for images of ``image_voxels`` voxels (C x spatial): about
    ``MEASURE_VOXELS`` voxels, rounded down to whole LPIPS batches where one fits (so 2D LPIPS calls see the same
    images whatever the chunking), at least 1."""
    rows = max(1, MEASURE_VOXELS // max(image_voxels, 1))
    return rows - rows % lpips_batch_size if rows >= lpips_batch_size else rows


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
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Reconstruct a batch from every start t and measure it: ``{metric name: (S, B) float32 CPU}``.

    images: (B, C, *spatial) in [0, 1] on the model's device; S = len(start_ts), row s for start_ts[s]. Metric
    names: ``METRIC_COLUMNS``. The S x B reconstructions are decoded, clamped and measured ``measure_chunk_rows`` at
    a time: a batch of volumes never holds all its decoded reconstructions (upstream's Decathlon command, 32
    volumes of 128^3 from 50 start points, would hold 12.5 GiB of them, and as much again for their originals).
    """
    samples = reconstruct_samples(model, images, keys, start_ts, num_inference_steps, seed,
                                  recon_steps=recon_steps, engine=engine, noise=noise)
    flat = samples.reshape((-1,) + samples.shape[2:])  # row r: start_ts[r // B], image r % B
    n_images = images.shape[0]
    step = measure_chunk_rows(images[0].numel(), metrics.perceptual.batch_size)
    parts = []
    for first in range(0, flat.shape[0], step):
        rows = torch.arange(first, min(first + step, flat.shape[0]), device=images.device)
        recons = to_image(model.autoencoder.decode(flat[first : first + step]))
        parts.append(metrics(images[rows % n_images], recons))
    return {name: torch.cat([part[name] for part in parts]).reshape(len(start_ts), n_images)
            for name in parts[0]}


def result_rows(
    indices: Sequence[int],
    filenames: Sequence[str],
    row_type: str,
    start_ts: Sequence[int],
    values: dict[str, torch.Tensor],
) -> pd.DataFrame:
    """Results rows (``index`` + the results CSV columns) of a measured batch, image-major then t ascending as
    given, built column-wise (no Python per row). ``values`` is ``measure_batch``'s output; column b belongs to
    indices[b] / filenames[b]."""
    n_t = len(start_ts)
    frame = pd.DataFrame({
        "index": np.repeat(np.asarray(indices, dtype=np.int64), n_t),
        "filename": np.repeat(np.asarray(filenames, dtype=object), n_t),
        "type": row_type,
        "t": np.tile(np.asarray(start_ts, dtype=np.int64), len(indices)),
    })
    for name in METRIC_COLUMNS:
        # (S, B) -> image-major rows; fp32 values widened to float64 exactly, as float() would.
        frame[name] = values[name].T.reshape(-1).numpy().astype(np.float64)
    return frame
