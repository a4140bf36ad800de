"""The reconstruct.py stage: checkpoint -> model, sets -> resumable results files, optionally sharded by torchrun."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ddpm_ood.checkpoint import BEST_CHECKPOINT
from ddpm_ood.data.datasets import ImageDataset, dataset_from_csv
from ddpm_ood.devices import describe_device, resolve_precision
from ddpm_ood.diffusion.noise import describe_noise, row_noise_batch
from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.distributed import (
    DistContext,
    barrier,
    broadcast_object,
    cleanup_distributed,
    gather_objects,
    init_distributed,
)
from ddpm_ood.errors import UserError
from ddpm_ood.fileio import check_output_dir, image_stem, run_lock
from ddpm_ood.reconstruction.metrics import ReconstructionMetrics
from ddpm_ood.reconstruction.pipeline import ENGINES, ReconstructionPlan, SetBatch, measured_rows
from ddpm_ood.results.schema import IN_NAME, VAL_NAME, ood_dir, out_set_name, results_path
from ddpm_ood.results.writer import PARTIAL_COLUMNS, ResumableResults, reconstruction_settings
from ddpm_ood.run_flags import RunFlags
from ddpm_ood.runs import RunModel, TrainedRun, check_image_shape, load_run_model, open_run, with_image_shape
from ddpm_ood.seeding import NOISE_KEY_RULE, noise_key
from ddpm_ood.upstream.flags import given_path


@dataclass(frozen=True)
class ReconstructionJob:
    """Everything reconstruct.py does, as one frozen value (the flags of the same names; ``flags``: the model flags
    given explicitly, checked against the checkpoint's configuration or defining an upstream checkpoint's model)."""

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
    flags: RunFlags = RunFlags()
    vqvae_checkpoint: str | None = None
    latent_pad: tuple[int, ...] | None = None


def checkpoint_path(job: ReconstructionJob) -> Path:
    """The checkpoint to reconstruct with: ``--eval_checkpoint`` (absolute, relative to the working directory, or
    inside the run folder), else the run's best checkpoint."""
    run_dir = Path(job.output_dir) / job.model_name
    if given_path(job.eval_checkpoint) is None:
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
    if job.engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {job.engine!r}")
    if job.engine == "reference" and job.recon_steps is not None:
        raise UserError("--recon_steps needs the batched engine (the reference loop walks the full grid)")
    sets = planned_sets(job)
    # The checkpoint first: a typo'd --model_name must not leave an empty folder behind.
    run = open_run(checkpoint_path(job), job.flags, vqvae_checkpoint=job.vqvae_checkpoint, latent_pad=job.latent_pad)
    results_dir = check_output_dir(ood_dir(job.output_dir, job.model_name), "--output_dir/--model_name")
    # Every dataset opened before any work, so a bad CSV fails with nothing written.
    datasets = {name: dataset_from_csv(csv, run.data, first_n=first_n, cache=job.cache_data)
                for name, csv, _, first_n in sets}
    first_name, first_csv = sets[0][0], sets[0][1]
    run = with_image_shape(run, datasets[first_name].image_shape, first_csv)
    if run.upstream:
        noise = run.config.schedule.noise_type
        said = "" if noise == "gaussian" else f"; noise {describe_noise(noise)}"
        print(f"{run.path}: no stored config (upstream checkpoint); using the model flags given{said}")
    for name, csv, _, _ in sets:
        check_image_shape(run.config, datasets[name].image_shape, csv)
    plan = ReconstructionPlan(start_timesteps(job.num_inference_steps, job.inference_skip_factor,
                                              run.config.schedule.num_train_timesteps),
                              job.num_inference_steps, job.seed, job.recon_steps, job.engine)
    ctx = init_distributed(job.device)
    try:
        precision = resolve_precision(ctx.device, precision=job.precision, amp=job.amp)
        if ctx.is_main:
            print(f"device: {describe_device(ctx.device)}; precision: {precision}")
        with run_lock(results_dir, "reconstruct", enabled=ctx.is_main):
            model = load_run_model(run, ctx.device, precision=precision, use_ema=job.use_ema, max_batch=job.max_batch)
            metrics = ReconstructionMetrics(ctx.device)
            written = []
            for name, csv, row_type, first_n in sets:
                writer = ResumableResults(results_path(job.output_dir, job.model_name, name),
                                          _settings(job, run, plan, csv, first_n, precision), len(plan.start_ts))
                written.append(writer.path)
                _reconstruct_set(job, ctx, writer, datasets[name], row_type, plan, model, metrics, name)
            return written
    finally:
        cleanup_distributed()


def _settings(job: ReconstructionJob, run: TrainedRun, plan: ReconstructionPlan, csv: str, first_n: int | None,
              precision: str) -> dict:
    """The sidecar of one results file: every setting its numbers depend on."""
    latent = run.config.latent
    return reconstruction_settings(
        checkpoint=run.path, checkpoint_epoch=run.epoch, csv=csv, first_n=first_n, seed=plan.seed,
        num_inference_steps=plan.num_inference_steps, inference_skip_factor=job.inference_skip_factor,
        recon_steps=plan.recon_steps, start_timesteps=plan.start_ts, use_ema=job.use_ema, precision=precision,
        noise_key=NOISE_KEY_RULE, autoencoder=None if latent is None else latent.weights_sha256,
        noise_type=run.config.schedule.noise_type,
    )


def _reconstruct_set(job: ReconstructionJob, ctx: DistContext, writer: ResumableResults, dataset: ImageDataset,
                     row_type: str, plan: ReconstructionPlan, model: RunModel, metrics: ReconstructionMetrics,
                     name: str) -> None:
    """One set: the images not yet in the partial file, sharded over the ranks, rows gathered and appended by the
    main rank after every batch."""
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
    batches = _batches_with_noise(loader, plan, ctx.device, model)
    rows_of_batches = measured_rows(model, metrics, plan, batches, row_type)
    bar = tqdm(total=len(todo), desc=f"reconstruct {name}", unit="img", disable=not ctx.is_main)
    # Every rank runs n_batches rounds (some with no images) so the per-batch gathers stay in step.
    for _ in range(n_batches):
        started = time.perf_counter()
        rows = next(rows_of_batches, None)
        rows = pd.DataFrame(columns=PARTIAL_COLUMNS) if rows is None else rows
        if ctx.distributed:
            parts = [part for part in gather_objects(rows, ctx) if len(part)]
            rows = pd.concat(parts, ignore_index=True) if parts else rows
        if ctx.is_main:
            writer.append(rows)
            n_images = rows["index"].nunique()
            bar.update(n_images)
            bar.set_postfix(img_per_s=f"{n_images / max(time.perf_counter() - started, 1e-9):.2f}")
    bar.close()
    barrier(ctx)
    if ctx.is_main:
        final = writer.finish()
        print(f"wrote {writer.path} ({final['filename'].size} rows)")
    barrier(ctx)


def _batches_with_noise(loader: DataLoader, plan: ReconstructionPlan, device: torch.device,
                        model: RunModel) -> Iterator[SetBatch]:
    """The loader's batches as ``SetBatch``es on ``device``, each with its start noise (S, B, *model_shape); the
    noise of the NEXT batch is drawn in a background thread while the caller runs this one through the network (the
    same ``diffusion.noise.row_noise_batch`` numbers, so nothing changes; in the main process, so no shared-memory
    traffic). Gaussian noise is drawn on the CPU and pinned on CUDA for a copy without a host wait; simplex noise is
    computed on ``device``."""
    noise_type = model.schedule.noise_type

    def draw(batch: dict) -> tuple[list[str], torch.Tensor]:
        keys = [noise_key(p) for p in batch["path"]]
        noise = row_noise_batch(noise_type, plan.seed, keys, plan.start_ts, model.model_shape, device)
        return keys, noise.pin_memory() if noise.device.type == "cpu" and device.type == "cuda" else noise

    def as_set_batch(batch: dict, keys: list[str], noise: torch.Tensor) -> SetBatch:
        return ([int(i) for i in batch["index"]], [image_stem(p) for p in batch["path"]],
                batch["image"].to(device, non_blocking=True), keys, noise)

    batches = iter(loader)
    with ThreadPoolExecutor(max_workers=1) as pool:
        current = next(batches, None)
        pending = pool.submit(draw, current) if current is not None else None
        while current is not None:
            following = next(batches, None)
            upcoming = pool.submit(draw, following) if following is not None else None
            yield as_set_batch(current, *pending.result())
            current, pending = following, upcoming
