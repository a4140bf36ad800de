"""The DDPM task plugged into ``loop.fit``: noise-prediction loss, validation on fixed noise, the sample grid.

Conventions: images are float32 (B, C, *spatial) in [0, 1], encoded by the run's autoencoder (pixel space: times
``b_scale``) before noising; ``t`` is drawn uniformly from {0, ..., num_train_timesteps - 1}; the network regresses
``diffusion.schedule.training_target`` (the noise for epsilon, the velocity for v_prediction, the clean sample for
sample), with an MSE loss computed in fp32.

Reproducibility: each step's timesteps and noise, the validation noise of each image and the sample grid come from
generators seeded from (seed, stream, epoch, step, rank) (``seeding``), so a run resumed from
``checkpoint_last.pth`` takes bit-for-bit the same steps as an uninterrupted one on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ddpm_ood.autoencoder.base import Autoencoder, autoencoder_for, to_image
from ddpm_ood.config import RunConfig, ScheduleConfig
from ddpm_ood.devices import autocast_context, configure_precision, make_grad_scaler
from ddpm_ood.diffusion.noise import draw_noise
from ddpm_ood.diffusion.schedule import make_ddim_scheduler, make_ddpm_scheduler, training_target
from ddpm_ood.diffusion.unet import build_unet, check_image_fits_unet, wants_fused_attention
from ddpm_ood.distributed import DistContext
from ddpm_ood.seeding import derive_generator, seed_everything
from ddpm_ood.training.ema import EMA
from ddpm_ood.training.loop import (
    STREAM_SAMPLES,
    STREAM_TRAIN,
    STREAM_VAL,
    TrainConfig,
    TrainSummary,
    fit,
    log,
)
from ddpm_ood.training.optimizer import optimizer_state_fits, optimizer_step
from ddpm_ood.training.resume import ResumePoint, check_resume_config
from ddpm_ood.upstream.legacy import precision_from_legacy
from ddpm_ood.upstream.weights import load_unet_state


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    clean: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    schedule: ScheduleConfig,
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimizer step on a batch. Returns the detached fp32 loss (scalar tensor).

    clean: (B, C, *spatial) encoded samples (``Autoencoder.encode`` of images in [0, 1]); timesteps: (B,) long in
    [0, T); noise: like clean, unit variance (Gaussian or simplex, ``diffusion.noise``).
    """
    x_t = scheduler.add_noise(original_samples=clean, noise=noise, timesteps=timesteps)
    with autocast_context(clean.device, precision):
        prediction = model(x_t, timesteps)
    target = training_target(scheduler, clean, noise, timesteps, schedule.prediction_type)
    loss = F.mse_loss(prediction.float(), target.float())
    optimizer_step(loss, optimizer, scaler)
    return loss.detach()


def draw_train_noise(seed: int, epoch: int, step: int, rank: int, shape: tuple[int, ...], num_timesteps: int,
                     noise_type: str = "gaussian", device: torch.device | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (B,) long uniform in [0, num_timesteps) on the CPU, unit-variance noise of ``shape`` of
    ``noise_type`` (``diffusion.noise.draw_noise``: Gaussian on the CPU, simplex on ``device``)) for one training
    step, a pure function of (seed, epoch, step, rank)."""
    g = derive_generator(seed, STREAM_TRAIN, epoch, step, rank)
    timesteps = torch.randint(0, num_timesteps, (shape[0],), generator=g)
    noise = draw_noise(noise_type, g, shape, timesteps, device)
    return timesteps, noise


@torch.no_grad()
def validation_loss_sums(
    model: torch.nn.Module,
    scheduler,
    loader: Iterable[dict],
    schedule: ScheduleConfig,
    seed: int,
    device: torch.device,
    *,
    autoencoder: Autoencoder,
    precision: str = "fp32",
    max_batches: int | None = None,
) -> tuple[float, int]:
    """(sum over images of the per-image MSE loss, number of images).

    Each validation image gets its own fixed (t, noise), drawn from a generator seeded from (seed, image index),
    so the loss of an epoch is comparable with every other epoch's, whatever the batch size or number of ranks.
    """
    model.eval()
    total, count = 0.0, 0
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        images = batch["image"]
        clean = autoencoder.encode(images.to(device))
        ts, generators = [], []
        for index in batch["index"].tolist():
            g = derive_generator(seed, STREAM_VAL, index)
            ts.append(torch.randint(0, scheduler.num_train_timesteps, (1,), generator=g))
            generators.append(g)
        timesteps = torch.cat(ts)
        # Each image's noise from its own generator, after its t (the run's noise type).
        noise = draw_noise(schedule.noise_type, generators, tuple(clean.shape), timesteps, device).to(device)
        timesteps = timesteps.to(device)
        x_t = scheduler.add_noise(original_samples=clean, noise=noise, timesteps=timesteps)
        with autocast_context(device, precision):
            prediction = model(x_t, timesteps)
        target = training_target(scheduler, clean, noise, timesteps, schedule.prediction_type)
        per_image = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        total += float(per_image.double().sum())
        count += images.shape[0]
    return total, count


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    schedule: ScheduleConfig,
    sample_shape: tuple[int, ...],
    n: int,
    num_steps: int,
    generator: torch.Generator,
    device: torch.device,
    *,
    autoencoder: Autoencoder,
    precision: str = "fp32",
) -> torch.Tensor:
    """Draw ``n`` images with a deterministic DDIM sampler (eta = 0, ``num_steps`` steps) in model space
    (``sample_shape`` = (C', *spatial') of one model-space sample).

    Returns float32 (n, C, *spatial) images in [0, 1] (decoded, then clamped).
    """
    model.eval()
    scheduler = make_ddim_scheduler(schedule, num_steps)
    # MONAI clips the predicted x0 to [-1, 1]; clean samples live in the autoencoder's range.
    scheduler.clip_sample_values = autoencoder.sample_range
    start = torch.full((n,), schedule.num_train_timesteps - 1, dtype=torch.long)
    x = draw_noise(schedule.noise_type, generator, (n, *sample_shape), start, device).to(device)
    for t in scheduler.timesteps:
        t_int = int(t)
        with autocast_context(device, precision):
            out = model(x, torch.full((n,), t_int, device=device, dtype=torch.long))
        x, _ = scheduler.step(out.float(), t_int, x)
    return to_image(autoencoder.decode(x)).float().cpu()


def image_grid(samples: torch.Tensor) -> torch.Tensor:
    """(3, H', W') grid in [0, 1] for TensorBoard. 2D: one tile per sample, 4 per row. 3D (n, C, D, H, W):
    per sample the slices at 25/50/75 % of the last axis, one sample per row."""
    from torchvision.utils import make_grid

    if samples.ndim == 5:
        depth = samples.shape[-1]
        idx = [min(depth - 1, int(depth * f)) for f in (0.25, 0.5, 0.75)]
        tiles = torch.stack([samples[..., i] for i in idx], dim=1).flatten(0, 1)  # (n*3, C, D, H)
        return make_grid(tiles, nrow=3, padding=2, pad_value=1.0)
    return make_grid(samples, nrow=4, padding=2, pad_value=1.0)


def num_grid_samples(image_shape: tuple[int, ...]) -> int:
    """Upstream's grid sizes: 8 images below 128 pixels a side, 4 from 128, 2 volumes in 3D."""
    spatial = image_shape[1:]
    if len(spatial) == 3:
        return 2
    return 8 if max(spatial) < 128 else 4


class DDPMTask:
    """The DDPM training task for ``loop.fit``: the UNet (and its EMA), Adam, the fp16 GradScaler, the noise
    schedule and the run's autoencoder, built and (when ``resume`` is given) restored in a fixed order, so that
    the seeded initial weights are the same on every rank and every run."""

    def __init__(self, run_config: RunConfig, cfg: TrainConfig, ctx: DistContext,
                 resume: ResumePoint | None = None) -> None:
        self.run_config, self.cfg, self.ctx = run_config, cfg, ctx
        self.device = ctx.device
        self.schedule = run_config.schedule
        self.autoencoder = autoencoder_for(run_config, self.device)
        check_image_fits_unet(run_config.model_shape, run_config.model,
                              "training latents" if run_config.latent is not None else "training images")
        seed_everything(cfg.seed)
        # Initial weights from the seeded global RNG: the same on every rank.
        self.model = build_unet(run_config.model, fused_attention=wants_fused_attention(self.device))
        if resume is not None:
            check_resume_config(resume, run_config, compare_image_shape=True)
            load_unet_state(self.model, resume.ckpt["model_state_dict"], str(resume.path))
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        configure_precision(cfg.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # training shapes repeat every step: autotune the convolutions
        self.scaler = make_grad_scaler(self.device, cfg.precision)
        self.skips_non_finite = self.scaler is not None
        if resume is not None:
            self._restore(resume)
        self.ema = self._make_ema(resume)
        self.train_module: torch.nn.Module = self.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.model, device_ids=ids)
        self.scheduler = make_ddpm_scheduler(self.schedule)

    def _restore(self, resume: ResumePoint) -> None:
        from ddpm_ood.seeding import restore_rng_state

        ck = resume.ckpt
        opt_state = ck.get("optimizer_state_dict")
        if opt_state is not None and optimizer_state_fits(self.optimizer, opt_state):
            self.optimizer.load_state_dict(opt_state)
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr  # --lr wins over the saved value
        else:
            log(self.ctx, f"note: {resume.path}: optimizer state does not fit the model; starting a fresh Adam")
        trained_in = precision_from_legacy(ck.get("train_config") or {})
        if trained_in is not None and trained_in != self.cfg.precision:
            log(self.ctx, f"note: {resume.path} was trained in {trained_in}; continuing in {self.cfg.precision} "
                          "(the run no longer equals an uninterrupted one)")
        if self.scaler is not None and ck.get("scaler_state_dict"):
            self.scaler.load_state_dict(ck["scaler_state_dict"])
        restore_rng_state(ck.get("rng_state"))

    def _make_ema(self, resume: ResumePoint | None) -> EMA | None:
        saved = resume.ckpt.get("ema_state_dict") if resume is not None else None
        if self.cfg.ema_decay <= 0:
            if saved is not None:
                log(self.ctx, f"note: {resume.path} has EMA weights but --ema_decay=0: they are dropped from now on")
            return None
        ema = EMA(self.model, self.cfg.ema_decay)
        if saved is not None:
            ema.load_state_dict(saved, f"{resume.path} (ema_state_dict)")
        elif resume is not None:
            log(self.ctx, f"note: {resume.path} has no EMA weights; EMA starts from the current weights")
        return ema

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def train_step(self, batch: dict, epoch: int, step: int) -> torch.Tensor:
        clean = self.autoencoder.encode(batch["image"].to(self.device, non_blocking=True))
        timesteps, noise = draw_train_noise(self.cfg.seed, epoch, step, self.ctx.rank, tuple(clean.shape),
                                            self.schedule.num_train_timesteps, self.schedule.noise_type, self.device)
        if self.device.type == "cuda":
            # Drawn on the CPU (the same numbers on every device), copied from pinned memory without a host wait.
            # (Simplex noise is computed on the device already.)
            timesteps = timesteps.pin_memory()
            noise = noise.pin_memory() if noise.device.type == "cpu" else noise
        loss = train_step(self.train_module, self.optimizer, self.scheduler, clean,
                          timesteps.to(self.device, non_blocking=True), noise.to(self.device, non_blocking=True),
                          self.schedule, precision=self.cfg.precision, scaler=self.scaler)
        if self.ema is not None:
            self.ema.update(self.model)
        return loss

    def validation_loss(self, loader: Iterable[dict], max_batches: int | None) -> tuple[float, int]:
        return validation_loss_sums(self.eval_model, self.scheduler, loader, self.schedule, self.cfg.seed,
                                    self.device, autoencoder=self.autoencoder, precision=self.cfg.precision,
                                    max_batches=max_batches)

    def log_evaluation(self, writer: Any, global_step: int) -> None:
        if self.cfg.sample_steps > 0:
            samples = sample_images(self.eval_model, self.schedule, self.run_config.model_shape,
                                    num_grid_samples(tuple(self.run_config.image_shape)),
                                    self.cfg.sample_steps, derive_generator(self.cfg.seed, STREAM_SAMPLES),
                                    self.device, autoencoder=self.autoencoder, precision=self.cfg.precision)
            writer.add_image("samples", image_grid(samples), global_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "ema_state_dict": self.ema.state_dict() if self.ema is not None else None,
            "scaler_state_dict": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.run_config.to_dict(),
        }

    def scalars(self) -> dict[str, float]:
        return {"lr": self.optimizer.param_groups[0]["lr"]}


def train(
    run_config: RunConfig,
    cfg: TrainConfig,
    train_set: Dataset,
    val_set: Dataset,
    ctx: DistContext | None = None,
    resume: ResumePoint | None = None,
) -> TrainSummary:
    """Train (or continue training) a DDPM; write checkpoints and TensorBoard logs under ``cfg.run_dir``.

    ``train_set``/``val_set`` items are dicts with "image" (C, *spatial) float32 in [0, 1] of shape
    ``run_config.image_shape`` and "index" (int, stable per image). ``resume`` continues from a checkpoint at
    epoch index ``resume.epochs_completed``. Only rank 0 writes files.
    """
    ctx = ctx or DistContext()
    task = DDPMTask(run_config, cfg, ctx, resume)
    return fit(task, cfg, train_set, val_set, ctx, resume)
