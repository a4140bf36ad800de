"""Image -> metrics, the path reconstruct.py and the scorer share: encode -> noise and denoise (engine) -> decode ->
clamp to [0, 1] -> MSE and LPIPS against the input image.

The engine works in the autoencoder's model space and never asks whether it is pixel or latent space; only here are
samples encoded, decoded and clamped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ddpm_ood.autoencoder.base import to_image
from ddpm_ood.diffusion.noise import row_noise_batch
from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.families import compute_features, get_family
from ddpm_ood.fileio import image_stem
from ddpm_ood.preemption import stop_signals_blocked
from ddpm_ood.reconstruction.engine import reconstruct_batched, reconstruct_reference
from ddpm_ood.reconstruction.plan import ReconstructionPlan
from ddpm_ood.results.schema import METRIC_COLUMNS
from ddpm_ood.runs import RunModel
from ddpm_ood.seeding import noise_key

if TYPE_CHECKING:
    from ddpm_ood.reconstruction.metrics import ReconstructionMetrics

# One batch of a set: (indices in the set, results filenames, images (B, C, *spatial) in [0, 1] on the model's
# device, noise keys, start noise (S, B, *model_shape) drawn ahead or None).
SetBatch = tuple[Sequence[int], Sequence[str], torch.Tensor, Sequence[str], "torch.Tensor | None"]


def measured_rows(model: RunModel, metrics: ReconstructionMetrics, plan: ReconstructionPlan,
                  batches: Iterable[SetBatch], row_type: str) -> Iterator[pd.DataFrame]:
    """The results rows of a set, one frame per batch (``result_rows``): the one set-level path of reconstruct.py's
    stage and of ``OODScorer``, so a file scores exactly as its row in ``results_<set>.csv``."""
    for indices, filenames, images, keys, noise in batches:
        values = measure_batch(model, metrics, images, keys, plan, noise=noise)
        yield result_rows(indices, filenames, row_type, plan.starts, values)


# Image voxels (rows x C x spatial) of reconstructions decoded and measured at once (64 MiB in fp32): bounds the
# memory of a batch of volumes; 2D batches of the usual sizes are one chunk.
MEASURE_VOXELS = 2**24


def feature_rows(model: RunModel, families: Sequence[str], settings: Mapping[str, Any], batches: Iterable[SetBatch],
                 row_type: str) -> Iterator[dict[str, pd.DataFrame]]:
    """The feature rows of a set, one {family: frame} per batch: each family's file rows (``index``, then
    ``FEATURE_KEY_COLUMNS``, then its feature columns) for the batch's images, the families' shared network calls
    run once (``families.compute_features``; ``settings``: {family: its settings}). The one set-level path of the
    stage and of ``OODScorer``."""
    acp = alphas_cumprod(model.schedule)
    for indices, filenames, images, keys, _ in batches:
        with torch.inference_mode():
            x0 = model.autoencoder.encode(images)
        features = compute_features(families, model.eps_fn, x0, keys, acp.to(images.device), settings)
        frames = {}
        for family in families:
            columns = get_family(family).columns(settings[family])
            frame = pd.DataFrame({"index": np.asarray(indices, dtype=np.int64),
                                  "filename": np.asarray(filenames, dtype=object), "type": row_type})
            frame[columns] = features[family]
            frames[family] = frame
        yield frames


def reconstruct_samples(model: RunModel, images: torch.Tensor, keys: Sequence[str], plan: ReconstructionPlan, *,
                        noise: torch.Tensor | None = None, balanced: bool = True) -> torch.Tensor:
    """Model-space reconstructions (S, B, *model.model_shape) of images (B, C, *spatial) in [0, 1] from every start t
    of the plan, not decoded, by the plan's engine (``batched`` or ``reference``: the plain loop, same numbers).

    keys[b]: the noise key of image b (``seeding.noise_key(path)`` for a file); row s belongs to plan.starts[s].
    ``noise``: the (S, B, *model-space shape) start noise when drawn ahead (``noise_batch``), else None.
    ``balanced``: the batched engine's even tick sizes (the default; False only for the benchmark's ablation).
    """
    x0 = model.autoencoder.encode(images)
    if plan.engine == "reference":
        return reconstruct_reference(model.eps_fn, model.schedule, x0, keys, plan, noise=noise)
    return reconstruct_batched(model.eps_fn, model.schedule, x0, keys, plan, balanced=balanced, noise=noise)


def reconstruct_images(model: RunModel, images: torch.Tensor, keys: Sequence[str], plan: ReconstructionPlan,
                       **engine_options) -> torch.Tensor:
    """Reconstructions (S, B, C, *spatial) in [0, 1] of images (B, C, *spatial) in [0, 1] from every start t: the
    ``reconstruct_samples`` (same arguments) decoded and clamped, all at once (``measure_batch`` decodes in
    chunks instead)."""
    samples = reconstruct_samples(model, images, keys, plan, **engine_options)
    decoded = model.autoencoder.decode(samples.reshape((-1,) + samples.shape[2:]))
    return to_image(decoded).reshape((len(plan.starts), images.shape[0]) + tuple(images.shape[1:]))


def measure_chunk_rows(image_voxels: int, lpips_batch_size: int) -> int:
    """Reconstructions decoded and measured at once, for images of ``image_voxels`` voxels (C x spatial): about
    ``MEASURE_VOXELS`` voxels, rounded down to whole LPIPS batches where one fits (so 2D LPIPS calls see the same
    images whatever the chunking), at least 1."""
    rows = max(1, MEASURE_VOXELS // max(image_voxels, 1))
    return rows - rows % lpips_batch_size if rows >= lpips_batch_size else rows


def measure_batch(model: RunModel, metrics: ReconstructionMetrics, images: torch.Tensor, keys: Sequence[str],
                  plan: ReconstructionPlan, *, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Reconstruct a batch from every start t and measure it: ``{metric name: (S, B) float32 CPU}``.

    images: (B, C, *spatial) in [0, 1] on the model's device; S = len(plan.starts), row s for plan.starts[s]. Metric
    names: ``METRIC_COLUMNS``. The S x B reconstructions are decoded, clamped and measured ``measure_chunk_rows`` at
    a time: a batch of volumes never holds all its decoded reconstructions (upstream's Decathlon command, 32
    volumes of 128^3 from 50 start points, would hold 12.5 GiB of them, and as much again for their originals).
    """
    samples = reconstruct_samples(model, images, keys, plan, noise=noise)
    flat = samples.reshape((-1,) + samples.shape[2:])  # row r: start_ts[r // B], image r % B
    n_images = images.shape[0]
    step = measure_chunk_rows(images[0].numel(), metrics.perceptual.batch_size)
    parts = []
    for first in range(0, flat.shape[0], step):
        rows = torch.arange(first, min(first + step, flat.shape[0]), device=images.device)
        recons = to_image(model.autoencoder.decode(flat[first : first + step]))
        parts.append(metrics(images[rows % n_images], recons))
    return {name: torch.cat([part[name] for part in parts]).reshape(len(plan.starts), n_images)
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


def set_batches(loader: DataLoader, plan: ReconstructionPlan, device: torch.device, model: RunModel,
                with_noise: bool = True) -> Iterator[SetBatch]:
    """The loader's batches (``data.datasets.ImageDataset`` items) as ``SetBatch``es on ``device``, each with its
    start noise (S, B, *model_shape); the noise of the NEXT batch is drawn in a background thread while the caller runs
    this one through the network (the same ``diffusion.noise.row_noise_batch`` numbers, so nothing changes; in the
    main process, so no shared-memory traffic). Gaussian noise is drawn on the CPU and pinned on CUDA for a copy
    without a host wait; simplex noise is computed on ``device``. ``with_noise`` False: no start noise (None), for
    passes that draw their own."""
    noise_type = model.schedule.noise_type

    def draw(batch: dict) -> tuple[list[str], torch.Tensor | None]:
        keys = [noise_key(p) for p in batch["path"]]
        if not with_noise:
            return keys, None
        noise = row_noise_batch(noise_type, plan.seed, plan.noise_keys(keys), plan.starts, model.model_shape, device)
        return keys, noise.pin_memory() if noise.device.type == "cpu" and device.type == "cuda" else noise

    def as_set_batch(batch: dict, keys: list[str], noise: torch.Tensor | None) -> SetBatch:
        return ([int(i) for i in batch["index"]], [image_stem(p) for p in batch["path"]],
                batch["image"].to(device, non_blocking=True), keys, noise)

    with stop_signals_blocked():  # its workers start ignoring the stop signals (preemption.ignore_stop_signals)
        batches = iter(loader)
    with ThreadPoolExecutor(max_workers=1) as pool:
        current = next(batches, None)
        pending = pool.submit(draw, current) if current is not None else None
        while current is not None:
            following = next(batches, None)
            upcoming = pool.submit(draw, following) if following is not None else None
            yield as_set_batch(current, *pending.result())
            current, pending = following, upcoming
