"""The reconstruct.py stage: checkpoint -> model, sets -> resumable results files, optionally sharded by torchrun."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ddpm_ood.checkpoint import (
    ModelFlags,
    data_config_for_upstream,
    resolve_run_config,
    run_config_from_flags,
)
from ddpm_ood.config import RunConfig
from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.errors import UserError
from ddpm_ood.reconstruction.pipeline import ENGINES, load_model, measure_batch, result_rows
from ddpm_ood.results.schema import IN_NAME, VAL_NAME, ood_dir, out_set_name, results_path
from ddpm_ood.results.writer import PARTIAL_COLUMNS


@dataclass(frozen=True)
class ReconstructionJob:
    output_dir: str
    model_name: str
    validation_ids: str | None = None
    in_ids: str | None = None
    out_ids: tuple[str, ...] = ()
    run_val: bool = True
    run_in: bool = True
    run_out: bool = True
    first_n_val: int | None = None
    first_n: int | None = None
    eval_checkpoint: str | None = None
    use_ema: bool = True
    batch_size: int = 256
    num_workers: int = 0
    cache_data: bool = False
    seed: int = 2
    num_inference_steps: int = 100
    inference_skip_factor: int = 1
    recon_steps: int | None = None
    engine: str = "batched"
    max_batch: int | None = None
    amp: bool = False
    precision: str | None = None
    device: str = "auto"
    flags: ModelFlags = ModelFlags()
    vqvae_checkpoint: str | None = None
    latent_pad: tuple[int, ...] | None = None


def checkpoint_path(job: ReconstructionJob) -> Path:
    from ddpm_ood.checkpoint import BEST_CHECKPOINT

    run_dir = Path(job.output_dir) / job.model_name
    if job.eval_checkpoint in (None, "", "None"):
        return run_dir / BEST_CHECKPOINT
    given = Path(job.eval_checkpoint)
    return given if given.is_absolute() or given.exists() else run_dir / given


def planned_sets(job: ReconstructionJob) -> list[tuple[str, str, str, int | None]]:
    """(results name, csv path, row type, first_n) for every set to run; duplicate names are an error."""
    sets: list[tuple[str, str, str, int | None]] = []
    if job.run_val:
        if not job.validation_ids:
            raise UserError("--run_val=1 needs --validation_ids")
        sets.append((VAL_NAME, job.validation_ids, "val", job.first_n_val))
    if job.run_in:
        if not job.in_ids:
            raise UserError("--run_in=1 needs --in_ids")
        sets.append((IN_NAME, job.in_ids, "in", job.first_n))
    if job.run_out:
        if not job.out_ids:
            raise UserError("--run_out=1 needs --out_ids")
        seen: dict[str, str] = {}
        for csv in job.out_ids:
            name = out_set_name(csv)
            if name in (VAL_NAME, IN_NAME) or name in seen:
                other = seen.get(name, f"the {name} set")
                raise UserError(f"--out_ids: {csv} and {other} would both write results_{name}.csv; rename one CSV")
            seen[name] = csv
            sets.append((name, csv, "out", job.first_n))
    if not sets:
        raise UserError("nothing to do: --run_val, --run_in and --run_out are all 0")
    return sets


def run_reconstruction(job: ReconstructionJob) -> list[Path]:
    """Reconstruct every planned set; return the results files written (or already complete)."""
    from ddpm_ood.checkpoint import load_checkpoint
    from ddpm_ood.data.datasets import dataset_from_csv
    from ddpm_ood.devices import describe_device, resolve_precision
    from ddpm_ood.diffusion.noise import describe_noise
    from ddpm_ood.distributed import cleanup_distributed, init_distributed
    from ddpm_ood.io import check_output_dir, run_lock

    if job.engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {job.engine!r}")
    if job.engine == "reference" and job.recon_steps is not None:
        raise UserError("--recon_steps needs the batched engine (the reference loop walks the full grid)")
    sets = planned_sets(job)
    ckpt_file = checkpoint_path(job)
    ckpt = load_checkpoint(ckpt_file)  # first: a typo'd --model_name must not leave an empty folder behind
    results_dir = check_output_dir(ood_dir(job.output_dir, job.model_name), "--output_dir/--model_name")
    run = resolve_run_config(ckpt, job.flags, ckpt_file)
    data_config = run.data if run is not None else data_config_for_upstream(job.flags)

    # Open every dataset before any work, so a bad CSV fails with nothing written.
    datasets = {}
    for name, csv, _, first_n in sets:
        ds = dataset_from_csv(csv, data_config, first_n=first_n, cache=job.cache_data)
        datasets[name] = ds
    if run is None:
        run = _upstream_run_config(job, datasets[sets[0][0]].image_shape, sets[0][1])
        noise = "" if run.schedule.noise_type == "gaussian" else f"; noise {describe_noise(run.schedule.noise_type)}"
        print(f"{ckpt_file}: no stored config (upstream checkpoint); using the model flags given{noise}")
    elif job.latent_pad is not None and (run.latent is None or tuple(job.latent_pad) != run.latent.latent_pad):
        recorded = "none (pixel space)" if run.latent is None else list(run.latent.latent_pad)
        raise UserError(f"--latent_pad={list(job.latent_pad)} contradicts {ckpt_file} which was trained with "
                        f"{recorded}; drop the flag")
    for name, csv, _, _ in sets:
        shape = tuple(datasets[name].image_shape)
        if shape != tuple(run.image_shape):
            raise UserError(
                f"{csv}: images load as {shape} but the model was trained on {tuple(run.image_shape)} "
                f"(check --is_grayscale / --image_size)"
            )

    start_ts = start_timesteps(job.num_inference_steps, job.inference_skip_factor, run.schedule.num_train_timesteps)
    ctx = init_distributed(job.device)
    try:
        precision = resolve_precision(ctx.device, precision=job.precision, amp=job.amp)
        if ctx.is_main:
            print(f"device: {describe_device(ctx.device)}; precision: {precision}")
        with run_lock(results_dir, "reconstruct", enabled=ctx.is_main):
            return _reconstruct_sets(job, ctx, sets, datasets, ckpt, ckpt_file, run, start_ts, precision)
    finally:
        cleanup_distributed()


def _upstream_run_config(job: ReconstructionJob, image_shape: tuple[int, ...], csv: str) -> RunConfig:
    """An upstream checkpoint's model from the flags; with --vqvae_checkpoint, in that VQ-VAE's latent space."""
    run = run_config_from_flags(job.flags, image_shape)
    if job.vqvae_checkpoint is None:
        if job.latent_pad is not None:
            raise UserError("--latent_pad only applies to latent diffusion: give --vqvae_checkpoint too")
        return run
    from ddpm_ood.autoencoder.vqvae import load_vqvae, with_latent

    return with_latent(run, load_vqvae(job.vqvae_checkpoint), job.latent_pad, csv)


def _reconstruct_sets(job: ReconstructionJob, ctx, sets: list[tuple[str, str, str, int | None]], datasets: dict,
                      ckpt: dict, ckpt_file: Path, run: RunConfig, start_ts: list[int], precision: str) -> list[Path]:
    """Every planned set in turn (the caller holds the run lock); returns the results files."""
    from ddpm_ood.reconstruction.metrics import ReconstructionMetrics
    from ddpm_ood.results.writer import ResumableResults, reconstruction_settings
    from ddpm_ood.seeding import NOISE_KEY_RULE

    model = load_model(
        ckpt, run, ckpt_file, ctx.device, use_ema=job.use_ema, max_batch=job.max_batch, precision=precision,
        vqvae_checkpoint=job.vqvae_checkpoint,
    )
    metrics = ReconstructionMetrics(ctx.device)
    written = []
    for name, csv, row_type, first_n in sets:
        settings = reconstruction_settings(
            checkpoint=ckpt_file, checkpoint_epoch=ckpt.get("epoch"), csv=csv, first_n=first_n, seed=job.seed,
            num_inference_steps=job.num_inference_steps, inference_skip_factor=job.inference_skip_factor,
            recon_steps=job.recon_steps, start_timesteps=start_ts, use_ema=job.use_ema, precision=precision,
            noise_key=NOISE_KEY_RULE, autoencoder=None if run.latent is None else run.latent.weights_sha256,
            noise_type=run.schedule.noise_type,
        )
        writer = ResumableResults(results_path(job.output_dir, job.model_name, name), settings, len(start_ts))
        written.append(writer.path)
        _reconstruct_set(job, ctx, writer, datasets[name], row_type, start_ts, model, metrics, name)
    return written


def _reconstruct_set(job, ctx, writer, dataset, row_type, start_ts, model, metrics, name) -> None:
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from ddpm_ood.data.datasets import image_stem
    from ddpm_ood.distributed import barrier, broadcast_object, gather_objects

    if writer.is_complete():
        if ctx.is_main:
            print(f"{writer.path}: already complete, skipped")
        return
    done = writer.start() if ctx.is_main else set()
    done = set(broadcast_object(sorted(done), ctx))
    todo = [i for i in range(len(dataset)) if i not in done]
    mine = todo[ctx.rank :: ctx.world_size]
    n_batches = max((len(todo) + job.batch_size * ctx.world_size - 1) // (job.batch_size * ctx.world_size), 1)
    loader = DataLoader(Subset(dataset, mine), batch_size=job.batch_size, shuffle=False, num_workers=job.num_workers,
                        pin_memory=ctx.device.type == "cuda")
    batches = _batches_with_noise(loader, job.seed, start_ts, ctx.device, model.sample_shape,
                                  model.schedule.noise_type)
    bar = tqdm(total=len(todo), desc=f"reconstruct {name}", unit="img", disable=not ctx.is_main)
    # Every rank runs n_batches rounds (some with no images) so the per-batch gathers stay in step.
    for _ in range(n_batches):
        batch, keys, noise = next(batches, (None, None, None))
        rows = pd.DataFrame(columns=PARTIAL_COLUMNS)
        started = time.perf_counter()
        if batch is not None:
            idx = [int(i) for i in batch["index"]]
            values = measure_batch(
                model, metrics, batch["image"].to(ctx.device, non_blocking=True), keys, start_ts,
                job.num_inference_steps, job.seed, recon_steps=job.recon_steps, engine=job.engine,
                noise=noise,
            )
            rows = result_rows(idx, [image_stem(p) for p in batch["path"]], row_type, start_ts, values)
        if ctx.distributed:
            parts = [part for part in gather_objects(rows, ctx) if len(part)]
            rows = pd.concat(parts, ignore_index=True) if parts else rows
        if ctx.is_main:
            writer.append(rows)
            n_images = rows["index"].nunique()
            bar.update(n_images)
            elapsed = time.perf_counter() - started
            bar.set_postfix(img_per_s=f"{n_images / max(elapsed, 1e-9):.2f}")
    bar.close()
    barrier(ctx)
    if ctx.is_main:
        final = writer.finish()
        print(f"wrote {writer.path} ({final['filename'].size} rows)")
    barrier(ctx)


def _batches_with_noise(loader, seed: int, start_ts: list[int], device: torch.device, sample_shape: tuple[int, ...],
                        noise_type: str = "gaussian") -> Iterator[tuple[dict, list[str], torch.Tensor]]:
    """(batch, its noise keys, its start noise (S, B, *sample_shape)) triples (``sample_shape``: one model-space
    sample, the image shape in pixel space); the noise of the NEXT batch is drawn in a background
    thread while the caller runs this one through the network (the same ``diffusion.noise.row_noise_batch`` numbers
    of ``noise_type``, so nothing changes; in the main process, so no shared-memory traffic). Gaussian noise is drawn
    on the CPU and pinned on CUDA for a copy without a host wait; simplex noise is computed on ``device``."""
    from concurrent.futures import ThreadPoolExecutor

    from ddpm_ood.diffusion.noise import row_noise_batch
    from ddpm_ood.seeding import noise_key

    def draw(batch: dict) -> tuple[list[str], torch.Tensor]:
        keys = [noise_key(p) for p in batch["path"]]
        noise = row_noise_batch(noise_type, seed, keys, start_ts, sample_shape, device)
        return keys, noise.pin_memory() if noise.device.type == "cpu" and device.type == "cuda" else noise

    batches = iter(loader)
    with ThreadPoolExecutor(max_workers=1) as pool:
        current = next(batches, None)
        pending = pool.submit(draw, current) if current is not None else None
        while current is not None:
            following = next(batches, None)
            upcoming = pool.submit(draw, following) if following is not None else None
            yield current, *pending.result()
            current, pending = following, upcoming
