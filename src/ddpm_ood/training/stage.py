"""The two training stages as library functions, each taking one frozen job: ``train_ddpm_stage`` (train_ddpm.py)
and ``train_vqvae_stage`` (train_vqvae.py). Python users run them without argv; cli/ only parses flags into a job.

Both share one frame (``run_training_stage``): stop signals become a clean stop (``preemption``), start DDP when
launched by torchrun, resolve the precision for the device, check the run folder (shared by every rank), hold the
run lock, then resume point (the newest checkpoint, mid-epoch or not) -> settings checked against the checkpoint
(before any data are read) -> datasets -> ``fit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ddpm_ood.autoencoder.vqvae import (
    VQVAE_CONFIG_FILE,
    LoadedVQVAE,
    check_image_fits_vqvae,
    load_vqvae,
    upstream_config_json,
    with_latent,
)
from ddpm_ood.checkpoint import run_config_of
from ddpm_ood.compute import ComputeOptions
from ddpm_ood.config import DataConfig, ModelConfig, RunConfig, ScheduleConfig, VQVAEConfig
from ddpm_ood.data.datasets import ImageDataset, dataset_from_csv
from ddpm_ood.devices import describe_device
from ddpm_ood.diffusion.noise import describe_noise
from ddpm_ood.diffusion.unet import check_image_fits_unet
from ddpm_ood.distributed import (
    DistContext,
    barrier,
    cleanup_distributed,
    multi_node_restart_note,
)
from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.fileio import atomic_write_text, check_output_dir, run_lock
from ddpm_ood.preemption import stop_on_signals
from ddpm_ood.results.schema import RUN_DIR_FLAGS
from ddpm_ood.training.ddpm import train
from ddpm_ood.training.loop import TrainConfig, log
from ddpm_ood.training.resume import ResumePoint, already_complete, check_resume_config, find_resume_point
from ddpm_ood.training.vqvae import VQVAELossConfig, check_vqvae_resume, train_vqvae, vqvae_checkpoint_config
from ddpm_ood.upstream.flags import noise_type_for_flags


def run_training_stage(cfg: TrainConfig, compute: ComputeOptions, *, lock_name: str,
                       body: Callable[[TrainConfig, DistContext], int]) -> int:
    """The frame of a training stage: SIGTERM/SIGUSR1 ask for a clean stop (``preemption.stop_on_signals``; the loop
    saves and raises ``Preempted``), check the run folder, join the launch (``ComputeOptions.launch``: DDP when
    launched by torchrun, ``compute.dist_timeout`` seconds bounding every wait; every rank must see the run folder;
    the precision resolved for the device), say the device and any torchrun restart, hold the run lock, then
    ``body(cfg, ctx)`` with ``cfg``'s precision and workers set from ``compute``; the process group is always torn
    down and the signal handlers restored."""
    run_dir = check_output_dir(cfg.run_dir, RUN_DIR_FLAGS)
    with stop_on_signals():
        try:
            ctx, precision = compute.launch(run_dir, RUN_DIR_FLAGS)
            cfg = dataclasses.replace(cfg, precision=precision, num_workers=compute.num_workers)
            if ctx.is_main:
                print(f"device: {describe_device(ctx.device)}; precision: {cfg.precision}"
                      + (f"; {ctx.world_size} ranks" if ctx.world_size > 1 else ""))
                if ctx.restart_count:
                    print(f"torchrun restart {ctx.restart_count} (TORCHELASTIC_RESTART_COUNT): continuing from the "
                          "newest checkpoint")
                note = multi_node_restart_note(ctx)
                if note:
                    print(note)
            with run_lock(run_dir, lock_name, enabled=ctx.is_main):
                status = body(cfg, ctx)
            # All ranks leave together (rank 0 may still be writing): none tears its process group down, or exits,
            # while another still talks to it.
            barrier(ctx)
            return status
        finally:
            cleanup_distributed()


def _val_set(validation_ids: str, train_set: ImageDataset, training_ids: str, data: DataConfig,
             cache: bool) -> ImageDataset:
    """The validation dataset, read after the training images were checked against the model (a model that cannot
    take the training images is said first); UserError when its images have another shape."""
    val_set = dataset_from_csv(validation_ids, data, cache=cache)
    if tuple(val_set.image_shape) != tuple(train_set.image_shape):
        raise UserError(f"{validation_ids}: validation images have shape {tuple(val_set.image_shape)} "
                        f"but training images ({training_ids}) have {tuple(train_set.image_shape)}")
    return val_set


# ------------------------------------------------------------------------------------------------------------- DDPM
@dataclass(frozen=True)
class DDPMTrainingJob:
    """Everything train_ddpm.py does. ``loop.run_dir`` is ``<output_dir>/<model_name>``; ``vqvae_checkpoint``:
    train in that frozen VQ-VAE's latent space (``latent_pad``: F.pad amounts for the latents, None = automatic or
    the resumed run's); ``schedule.noise_type`` "simplex" with ``--simplex_noise=1``; resuming a run started from an
    upstream checkpoint keeps upstream's noise. ``compute``: device, precision, workers (recorded as
    ``loop.num_workers``), data cache, torchrun timeout."""

    training_ids: str
    validation_ids: str
    data: DataConfig
    schedule: ScheduleConfig
    model: ModelConfig
    loop: TrainConfig
    vqvae_checkpoint: str | None = None
    latent_pad: tuple[int, ...] | None = None
    compute: ComputeOptions = ComputeOptions()

    def __post_init__(self) -> None:
        if self.latent_pad is not None and self.vqvae_checkpoint is None:
            raise ParameterError("latent_pad only applies to latent diffusion: give vqvae_checkpoint too", "latent_pad",
                                 "vqvae_checkpoint")


def train_ddpm_stage(job: DDPMTrainingJob) -> int:
    """Train (or resume) the DDPM of ``job``; 0 when trained or already complete."""
    return run_training_stage(job.loop, job.compute, lock_name="train_ddpm",
                              body=lambda cfg, ctx: _train_ddpm(job, cfg, ctx))


def _train_ddpm(job: DDPMTrainingJob, cfg: TrainConfig, ctx: DistContext) -> int:
    """Resume point, settings, datasets, checks, then ``training.ddpm.train``; the caller holds the run lock."""
    vqvae = load_vqvae(job.vqvae_checkpoint) if job.vqvae_checkpoint is not None else None  # a wrong file fails first
    resume = find_resume_point(cfg.run_dir, cfg.resume_epoch, ctx=ctx, batch_size=cfg.batch_size)
    job = _resumed_settings(job, resume, vqvae, ctx)
    if resume is not None and already_complete(resume, cfg.n_epochs, ctx):
        return 0
    train_set = dataset_from_csv(job.training_ids, job.data, cache=job.compute.cache_data)
    run_config = RunConfig(job.model, job.schedule, job.data, image_shape=tuple(train_set.image_shape))
    source = job.training_ids
    if vqvae is not None:
        run_config = with_latent(run_config, vqvae, job.latent_pad, job.training_ids)
        source = f"{job.training_ids} (latents of {vqvae.path})"
    check_image_fits_unet(run_config.model_shape, run_config.model, source)
    val_set = _val_set(job.validation_ids, train_set, job.training_ids, job.data, job.compute.cache_data)
    if resume is not None:
        check_resume_config(resume, run_config, compare_image_shape=True)
    summary = train(run_config, cfg, train_set, val_set, ctx, resume=resume)
    if ctx.is_main:
        print(f"trained {summary.epochs_completed}/{cfg.n_epochs} epochs; best validation loss "
              f"{summary.best_loss:.5f}; checkpoints in {cfg.run_dir}")
    return 0


def _resumed_settings(job: DDPMTrainingJob, resume: ResumePoint | None, vqvae: LoadedVQVAE | None,
                      ctx: DistContext) -> DDPMTrainingJob:
    """The job as it continues ``resume``: a latent run keeps its padding unless the flag says otherwise, and
    ``--simplex_noise=1`` keeps the resumed run's noise (upstream's unscaled one for a run started from an upstream
    checkpoint). Its settings are checked against the checkpoint before any data are read (a finished run with
    contradicting flags is refused too); the image shape is compared once the data are read."""
    if resume is None:
        return job
    saved = run_config_of(resume.ckpt, resume.path)
    if job.latent_pad is None and saved is not None and saved.latent is not None:
        job = dataclasses.replace(job, latent_pad=saved.latent.latent_pad)
    if job.schedule.noise_type != "gaussian":
        if saved is None:
            schedule = dataclasses.replace(job.schedule, noise_type=noise_type_for_flags(True, upstream_checkpoint=True))
            log(ctx, f"note: {resume.path} was trained by upstream ddpm-ood: resuming with its noise, "
                     f"{describe_noise(schedule.noise_type)}")
            job = dataclasses.replace(job, schedule=schedule)
        elif saved.schedule.noise_type != "gaussian":
            job = dataclasses.replace(job, schedule=dataclasses.replace(job.schedule,
                                                                        noise_type=saved.schedule.noise_type))
    if saved is not None and saved.latent is None and vqvae is not None:
        raise UserError(f"{resume.path}: flags contradict the checkpoint's configuration (a pixel-space DDPM; "
                        f"--vqvae_checkpoint={vqvae.path}); drop the flag or train under another --model_name")
    given = RunConfig(job.model, job.schedule, job.data, image_shape=saved.image_shape if saved is not None else ())
    if vqvae is not None and saved is not None:
        given = with_latent(given, vqvae, job.latent_pad, str(resume.path))
    check_resume_config(resume, given, compare_image_shape=False)
    return job


# ----------------------------------------------------------------------------------------------------------- VQ-VAE
# Upstream's train_vqvae.py defaults where they are not the DDPM's (TrainConfig's batch_size and lr, DataConfig's
# spatial_dims); train_vqvae.py's flags read them here.
VQVAE_BATCH_SIZE = 4
VQVAE_LEARNING_RATE = 3e-4
VQVAE_SPATIAL_DIMS = 3


@dataclass(frozen=True)
class VQVAETrainingJob:
    """Everything train_vqvae.py does: the VQ-VAE ``vqvae`` (MONAI core arguments) trained with ``losses`` on the
    images of ``training_ids``; ``loop.run_dir`` is ``<output_dir>/<model_name>``; ``compute`` as the DDPM's."""

    training_ids: str
    validation_ids: str
    data: DataConfig
    vqvae: VQVAEConfig
    losses: VQVAELossConfig
    loop: TrainConfig
    compute: ComputeOptions = ComputeOptions()

    def __post_init__(self) -> None:
        if self.vqvae.in_channels != self.data.channels or self.vqvae.out_channels != self.data.channels:
            raise ParameterError(f"vqvae.in_channels={self.vqvae.in_channels} vqvae.out_channels="
                                 f"{self.vqvae.out_channels} but data.is_grayscale={int(self.data.is_grayscale)} images "
                                 f"have {self.data.channels} channel(s)", "vqvae.in_channels", "vqvae.out_channels",
                                 "data.is_grayscale")


def train_vqvae_stage(job: VQVAETrainingJob) -> int:
    """Train (or resume) the VQ-VAE of ``job``; 0 when trained or already complete."""
    return run_training_stage(job.loop, job.compute, lock_name="train_vqvae",
                              body=lambda cfg, ctx: _train_vqvae(job, cfg, ctx))


def _train_vqvae(job: VQVAETrainingJob, cfg: TrainConfig, ctx: DistContext) -> int:
    """Resume point, datasets, checks, ``vqvae_config.json``, then ``training.vqvae.train_vqvae``."""
    run_dir = Path(cfg.run_dir)
    resume = find_resume_point(run_dir, None, kind="vqvae", ctx=ctx, batch_size=cfg.batch_size)
    if resume is not None:  # settings before any data is read: a finished run with contradicting flags is refused
        check_vqvae_resume(resume, vqvae_checkpoint_config(job.vqvae, job.data, ()), job.losses,
                           compare_image_shape=False)
    if already_complete(resume, cfg.n_epochs, ctx):
        return 0
    train_set = dataset_from_csv(job.training_ids, job.data, cache=job.compute.cache_data)
    image_shape = tuple(train_set.image_shape)
    check_image_fits_vqvae(image_shape, job.vqvae, job.training_ids)
    val_set = _val_set(job.validation_ids, train_set, job.training_ids, job.data, job.compute.cache_data)
    if ctx.is_main:
        atomic_write_text(run_dir / VQVAE_CONFIG_FILE, upstream_config_json(job.vqvae))
    summary = train_vqvae(job.vqvae, job.data, job.losses, cfg, train_set, val_set, image_shape, ctx, resume=resume)
    if ctx.is_main:
        print(f"trained {summary.epochs_completed}/{cfg.n_epochs} epochs; best validation L1 "
              f"{summary.best_loss:.5f}; checkpoints in {run_dir}")
    return 0
