"""The DDPM training loop: noise-prediction loss, validation on fixed noise, checkpoints, resume, DDP, TensorBoard.

Conventions: images are float32 (B, C, *spatial) in [0, 1] and are multiplied by ``b_scale`` before noising;
``t`` is drawn uniformly from {0, ..., num_train_timesteps - 1}; the network regresses
``noise_schedule.training_target`` (the noise for epsilon, the velocity for v_prediction, the clean image for
sample), with an MSE loss computed in fp32.

Reproducibility: every random draw of the loop comes from a generator seeded from (seed, stream, epoch, step, rank)
(the epoch's shuffling, each step's timesteps and noise, the validation noise of each image, the sample grid), so a
run resumed from ``checkpoint_last.pth`` takes bit-for-bit the same steps as an uninterrupted one on CPU.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ddpm_ood.checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    config_conflicts,
    is_upstream_checkpoint,
    load_checkpoint,
    load_unet_state,
    periodic_checkpoint_name,
    run_config_of,
    save_checkpoint,
)
from ddpm_ood.config import ModelConfig, RunConfig, ScheduleConfig
from ddpm_ood.devices import (
    PRECISIONS,
    autocast_context,
    configure_precision,
    make_grad_scaler,
    precision_from_legacy,
)
from ddpm_ood.distributed import DistContext, all_reduce_sum
from ddpm_ood.errors import UserError
from ddpm_ood.networks import build_unet
from ddpm_ood.noise_schedule import make_ddim_scheduler, make_ddpm_scheduler, training_target

# Independent random streams (first key after the seed).
_STREAM_TRAIN = 0
_STREAM_VAL = 1
_STREAM_SAMPLES = 2
_STREAM_GLOBAL = 3
_STREAM_LOADER = 4
# Consecutive non-finite fp16 losses (each a step the GradScaler skipped) after which training is called diverged.
MAX_NON_FINITE_STEPS = 20


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the training loop (not of the model; those are in RunConfig and travel with the weights).

    ``resume_epoch``: resume from ``checkpoint_<resume_epoch>.pth`` instead of ``checkpoint_last.pth``.
    ``quick_test``: one training batch and one validation batch per epoch (smoke tests).
    ``ema_decay``: 0 = no EMA; else the EMA weights are updated after every step as
    ``ema = decay * ema + (1 - decay) * weights`` and used for validation, samples and inference.
    ``sample_steps``: DDIM steps of the TensorBoard sample grid drawn at each evaluation (0 = no grid).
    ``precision``: one of ``devices.PRECISIONS``, already resolved for the device (``devices.resolve_precision``).
    """

    run_dir: str
    n_epochs: int = 300
    eval_freq: int = 10
    checkpoint_every: int = 100
    resume_epoch: int | None = None
    quick_test: bool = False
    lr: float = 2.5e-5
    ema_decay: float = 0.0
    batch_size: int = 512
    num_workers: int = 8
    seed: int = 2
    precision: str = "fp32"
    sample_steps: int = 50

    def __post_init__(self) -> None:
        if self.n_epochs < 1 or self.eval_freq < 1 or self.batch_size < 1:
            raise UserError("--n_epochs, --eval_freq and --batch_size must be >= 1")
        if self.checkpoint_every < 0 or self.num_workers < 0 or self.sample_steps < 0:
            raise UserError("--checkpoint_every, --num_workers and --sample_steps must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"--ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.resume_epoch is not None and self.resume_epoch < 1:
            raise UserError(f"--ddpm_checkpoint_epoch must be >= 1, got {self.resume_epoch}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResumePoint:
    """A loaded checkpoint to continue from: ``epochs_completed`` epochs are done, the next one runs next."""

    path: Path
    ckpt: dict

    @property
    def epochs_completed(self) -> int:
        return int(self.ckpt.get("epoch", 0))

    @property
    def upstream(self) -> bool:
        return is_upstream_checkpoint(self.ckpt)


@dataclass
class TrainSummary:
    """What a call to :func:`train` did. Losses are MSE in the units of the training target."""

    start_epoch: int
    epochs_completed: int
    global_step: int
    best_loss: float
    epoch_losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)  # epochs completed -> validation loss


# ----------------------------------------------------------------------------------------------------------------
# Seeding


def derive_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed mixed from ``seed`` and integer ``keys`` (numpy SeedSequence: nearby keys give unrelated
    streams). Deterministic across machines and processes."""
    entropy = [int(seed) % 2**64, *(int(k) % 2**64 for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def derive_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` (draw on CPU, then move: same numbers on any
    device)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch's global RNGs (model initialisation draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Global RNG states in a form ``torch.load(weights_only=True)`` accepts (tensors, ints, floats, lists)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # Only the current device's state, and only if CUDA is already in use (never initialise other GPUs).
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def restore_rng_state(state: dict | None) -> None:
    """Inverse of :func:`capture_rng_state` (missing parts are skipped)."""
    if not state:
        return
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state.get("numpy")
    if n:
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    p = state.get("python")
    if p:
        random.setstate((p[0], tuple(p[1]), p[2]))


# ----------------------------------------------------------------------------------------------------------------
# Checks and resume


def check_image_fits_unet(image_shape: tuple[int, ...], model: ModelConfig, source: str) -> None:
    """UserError naming ``source`` unless (C, *spatial) images fit the UNet: C == in_channels, one size per
    spatial dim, each divisible by 2 ** (number of downsamplings)."""
    spatial = tuple(image_shape[1:])
    if len(spatial) != model.spatial_dims:
        raise UserError(f"{source}: images have {len(spatial)} spatial dimensions {spatial} but "
                        f"--spatial_dimension={model.spatial_dims}")
    if image_shape[0] != model.in_channels:
        raise UserError(f"{source}: images have {image_shape[0]} channel(s) but the model expects "
                        f"{model.in_channels}")
    factor = 2 ** (len(model.channels) - 1)
    if any(s % factor for s in spatial):
        raise UserError(
            f"{source}: image size {'x'.join(map(str, spatial))} is not divisible by {factor}, as the "
            f"{model.preset} UNet's {len(model.channels) - 1} downsamplings need; resize with --image_size "
            f"or crop with --image_roi"
        )


def find_resume_point(run_dir: str | Path, resume_epoch: int | None) -> ResumePoint | None:
    """The checkpoint to continue from, or None to start afresh.

    ``resume_epoch`` given: ``checkpoint_<resume_epoch>.pth`` must exist (UserError otherwise). Else
    ``checkpoint_last.pth`` if present, else ``checkpoint.pth`` (what upstream resumed from, and all an upstream
    run directory has).
    """
    run_dir = Path(run_dir)
    if resume_epoch is not None:
        path = run_dir / periodic_checkpoint_name(resume_epoch)
        if not path.is_file():
            present = sorted(p.name for p in run_dir.glob("checkpoint_*.pth") if p.name != LAST_CHECKPOINT)
            raise UserError(f"--ddpm_checkpoint_epoch={resume_epoch}: {path} not found "
                            f"(periodic checkpoints present: {', '.join(present) or 'none'})")
        return ResumePoint(path, load_checkpoint(path))
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        path = run_dir / name
        if path.is_file():
            return ResumePoint(path, load_checkpoint(path))
    return None


def check_resume_config(resume: ResumePoint, given: RunConfig, *, compare_image_shape: bool) -> None:
    """UserError naming the checkpoint and both values of every setting where the flags contradict it."""
    saved = run_config_of(resume.ckpt, resume.path)
    if saved is None:
        return  # upstream checkpoint: the flags define the model; load_unet_state checks the weights fit
    conflicts = config_conflicts(saved, given, compare_image_shape=compare_image_shape)
    if conflicts:
        raise UserError(
            f"{resume.path}: flags contradict the checkpoint's configuration ({'; '.join(conflicts)}); "
            f"resume with the checkpoint's settings or train under another --model_name"
        )


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (also used by benchmarks/train_speed.py)


class EMA:
    """Exponential moving average of a model's weights: ``ema = decay * ema + (1 - decay) * w`` after each step.

    Starts from the model's current weights. Buffers are copied, not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        import copy

        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict, source: str) -> None:
        load_unet_state(self.module, state_dict, source)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    images: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    schedule: ScheduleConfig,
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimizer step on a batch. Returns the detached fp32 loss (scalar tensor).

    images: (B, C, *spatial) in [0, 1]; timesteps: (B,) long in [0, T); noise: like images, standard normal.
    """
    clean = images * schedule.b_scale
    x_t = scheduler.add_noise(original_samples=clean, noise=noise, timesteps=timesteps)
    with autocast_context(images.device, precision):
        prediction = model(x_t, timesteps)
    target = training_target(scheduler, clean, noise, timesteps, schedule.prediction_type)
    loss = F.mse_loss(prediction.float(), target.float())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def draw_train_noise(seed: int, epoch: int, step: int, rank: int, shape: tuple[int, ...], num_timesteps: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (B,) long uniform in [0, num_timesteps), noise of ``shape`` ~ N(0, 1)) for one training step,
    a pure function of (seed, epoch, step, rank)."""
    g = derive_generator(seed, _STREAM_TRAIN, epoch, step, rank)
    timesteps = torch.randint(0, num_timesteps, (shape[0],), generator=g)
    noise = torch.randn(shape, generator=g)
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
        ts, noises = [], []
        for index in batch["index"].tolist():
            g = derive_generator(seed, _STREAM_VAL, index)
            ts.append(torch.randint(0, scheduler.num_train_timesteps, (1,), generator=g))
            noises.append(torch.randn(tuple(images.shape[1:]), generator=g))
        timesteps = torch.cat(ts).to(device)
        noise = torch.stack(noises).to(device)
        clean = images.to(device) * schedule.b_scale
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
    image_shape: tuple[int, ...],
    n: int,
    num_steps: int,
    generator: torch.Generator,
    device: torch.device,
    *,
    precision: str = "fp32",
) -> torch.Tensor:
    """Draw ``n`` images with a deterministic DDIM sampler (eta = 0, ``num_steps`` steps).

    Returns float32 (n, C, *spatial) in [0, 1] (divided by b_scale, then clamped).
    """
    model.eval()
    scheduler = make_ddim_scheduler(schedule, num_steps)
    # MONAI clips the predicted x0 to [-1, 1]; the data live in [0, b_scale], so widen the clip for b_scale > 1.
    scheduler.clip_sample_values = (-max(1.0, schedule.b_scale), max(1.0, schedule.b_scale))
    x = torch.randn((n, *image_shape), generator=generator).to(device)
    for t in scheduler.timesteps:
        t_int = int(t)
        with autocast_context(device, precision):
            out = model(x, torch.full((n,), t_int, device=device, dtype=torch.long))
        x, _ = scheduler.step(out.float(), t_int, x)
    return (x / schedule.b_scale).clamp(0.0, 1.0).float().cpu()


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


def optimizer_state_fits(optimizer: torch.optim.Optimizer, state_dict: dict) -> bool:
    """True if a saved optimizer state matches the parameters (count and moment shapes), so that loading it
    cannot fail later inside ``step``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = state_dict.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        return False
    if sum(len(g["params"]) for g in groups) != len(params):
        return False
    ids = [i for g in groups for i in g["params"]]
    for param_id, param in zip(ids, params, strict=True):
        st = state_dict.get("state", {}).get(param_id, {})
        for v in st.values():
            if torch.is_tensor(v) and v.ndim > 0 and tuple(v.shape) != tuple(param.shape):
                return False
    return True


def _clean_loader_errors(batches: Iterable[dict]) -> Iterator[dict]:
    """Re-raise a UserError from a DataLoader worker as a one-line UserError (the worker wrapper adds the
    worker's traceback to the message)."""
    try:
        yield from batches
    except UserError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        prefix = "ddpm_ood.errors.UserError: "
        raise UserError(last[len(prefix):] if last.startswith(prefix) else last) from None


# ----------------------------------------------------------------------------------------------------------------
# The loop


def _log(ctx: DistContext, message: str) -> None:
    if ctx.is_main:
        from tqdm import tqdm

        tqdm.write(message)


def _make_loaders(train_set: Dataset, val_set: Dataset, cfg: TrainConfig, ctx: DistContext):
    # DistributedSampler also with one process: its permutation comes from a generator seeded with
    # seed + epoch (set_epoch), so shuffling never depends on global RNG state.
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    common = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "persistent_workers": cfg.num_workers > 0,
        "pin_memory": ctx.device.type == "cuda",
    }
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=False,
                              generator=derive_generator(cfg.seed, _STREAM_LOADER, ctx.rank), **common)
    # Validation shards are disjoint and unpadded (no repeated images), so sums over ranks are exact.
    val_shard = Subset(val_set, list(range(ctx.rank, len(val_set), ctx.world_size)))
    val_loader = DataLoader(val_shard, shuffle=False, drop_last=False, **common)
    return sampler, train_loader, val_loader


def _payload(*, epoch: int, global_step: int, model: torch.nn.Module, optimizer, best_loss: float,
             ema: EMA | None, scaler, run_config: RunConfig, cfg: TrainConfig) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "global_step": global_step,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "best_loss": float(best_loss),
        "ema_state_dict": ema.state_dict() if ema is not None else None,
        "scaler_state_dict": scaler.state_dict() if scaler is not None else None,
        "rng_state": capture_rng_state(),
        "config": run_config.to_dict(),
        "train_config": cfg.to_dict(),
    }


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
    epoch index ``resume.epochs_completed``. Only rank 0 writes files. KeyboardInterrupt is re-raised after
    saying which completed epoch ``checkpoint_last.pth`` holds (it is written atomically after every epoch).
    """
    ctx = ctx or DistContext()
    device = ctx.device
    run_dir = Path(cfg.run_dir)
    schedule = run_config.schedule
    check_image_fits_unet(tuple(run_config.image_shape), run_config.model, "training images")

    seed_everything(cfg.seed)
    model = build_unet(run_config.model)  # initial weights from the seeded global RNG: same on every rank
    start_epoch, global_step, best_loss = 0, 0, math.inf
    if resume is not None:
        check_resume_config(resume, run_config, compare_image_shape=True)
        load_unet_state(model, resume.ckpt["model_state_dict"], str(resume.path))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    configure_precision(cfg.precision, device)
    scaler = make_grad_scaler(device, cfg.precision)
    ema = None
    if resume is not None:
        ck = resume.ckpt
        start_epoch = resume.epochs_completed
        global_step = int(ck.get("global_step", 0))
        opt_state = ck.get("optimizer_state_dict")
        if opt_state is not None and optimizer_state_fits(optimizer, opt_state):
            optimizer.load_state_dict(opt_state)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr  # --lr wins over the saved value
        else:
            _log(ctx, f"note: {resume.path}: optimizer state does not fit the model; starting a fresh Adam")
        if resume.upstream:
            # Upstream's best_loss is a TRAIN loss, not comparable with our fixed-noise validation loss.
            _log(ctx, f"note: {resume.path} was written by the upstream code; its best_loss is ignored")
        else:
            best_loss = float(ck.get("best_loss", math.inf))
        trained_in = precision_from_legacy(ck.get("train_config") or {})
        if trained_in is not None and trained_in != cfg.precision:
            _log(ctx, f"note: {resume.path} was trained in {trained_in}; continuing in {cfg.precision} (the run no "
                      "longer equals an uninterrupted one)")
        if scaler is not None and ck.get("scaler_state_dict"):
            scaler.load_state_dict(ck["scaler_state_dict"])
        restore_rng_state(ck.get("rng_state"))
    if cfg.ema_decay > 0:
        ema = EMA(model, cfg.ema_decay)
        if resume is not None and resume.ckpt.get("ema_state_dict") is not None:
            ema.load_state_dict(resume.ckpt["ema_state_dict"], f"{resume.path} (ema_state_dict)")
        elif resume is not None:
            _log(ctx, f"note: {resume.path} has no EMA weights; EMA starts from the current weights")
    elif resume is not None and resume.ckpt.get("ema_state_dict") is not None:
        _log(ctx, f"note: {resume.path} has EMA weights but --ema_decay=0: they are dropped from now on")

    summary = TrainSummary(start_epoch=start_epoch, epochs_completed=start_epoch, global_step=global_step,
                           best_loss=best_loss)
    if start_epoch >= cfg.n_epochs:
        _log(ctx, f"training already complete: {start_epoch} of {cfg.n_epochs} epochs done ({run_dir})")
        return summary
    if resume is not None:
        _log(ctx, f"resuming from {resume.path}: {start_epoch} epoch(s) done, continuing at epoch "
                  f"{start_epoch + 1}/{cfg.n_epochs}")

    train_model: torch.nn.Module = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    scheduler = make_ddpm_scheduler(schedule)
    sampler, train_loader, val_loader = _make_loaders(train_set, val_set, cfg, ctx)

    writers = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events an interrupted run logged after the checkpoint we resume from.
        purge = global_step if resume is not None else None
        writers = {name: SummaryWriter(str(run_dir / name), purge_step=purge) for name in ("train", "val")}

    from tqdm import tqdm

    epoch = start_epoch
    non_finite_run = 0
    try:
        for epoch in range(start_epoch, cfg.n_epochs):
            sampler.set_epoch(epoch)
            # Global RNG re-seeded per epoch: anything that might draw from it (none of our code does) cannot
            # make a resumed run differ.
            torch.manual_seed(derive_seed(cfg.seed, _STREAM_GLOBAL, epoch, ctx.rank))
            train_model.train()
            n_batches = 1 if cfg.quick_test else len(train_loader)
            losses: list[torch.Tensor] = []
            n_images = 0
            start = time.perf_counter()
            with tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{cfg.n_epochs}", disable=not ctx.is_main,
                       dynamic_ncols=True, leave=False) as bar:
                for step, batch in enumerate(_clean_loader_errors(train_loader)):
                    if step >= n_batches:
                        break
                    images = batch["image"].to(device, non_blocking=True)
                    timesteps, noise = draw_train_noise(cfg.seed, epoch, step, ctx.rank, tuple(images.shape),
                                                        schedule.num_train_timesteps)
                    loss = train_step(train_model, optimizer, scheduler, images, timesteps.to(device),
                                      noise.to(device), schedule, precision=cfg.precision, scaler=scaler)
                    if ema is not None:
                        ema.update(model)
                    global_step += 1
                    n_images += images.shape[0]
                    loss_value = float(loss)
                    if math.isfinite(loss_value):
                        losses.append(loss)
                        non_finite_run = 0
                    else:
                        # fp16: the GradScaler has skipped this step and lowered its scale; only a persistent
                        # non-finite loss is divergence. Without a scaler the step was taken: stop now.
                        non_finite_run += 1
                        if scaler is None or non_finite_run >= MAX_NON_FINITE_STEPS:
                            raise UserError(f"training diverged: loss is {loss_value} at epoch {epoch + 1}, step "
                                            f"{step + 1}; lower --lr or use --precision=fp32")
                        _log(ctx, f"note: non-finite fp16 loss at epoch {epoch + 1}, step {step + 1}: "
                                  "the GradScaler skipped the step")
                    if writers:
                        writers["train"].add_scalar("loss", loss_value, global_step)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{n_images * ctx.world_size / elapsed:.1f}")
                    bar.update(1)
            elapsed = time.perf_counter() - start
            loss_sum, batch_count, image_count = all_reduce_sum(
                [float(torch.stack(losses).double().sum()) if losses else 0.0, len(losses), n_images], ctx)
            epoch_loss = loss_sum / max(batch_count, 1)
            throughput = image_count / max(elapsed, 1e-9)
            summary.epoch_losses.append(epoch_loss)
            if writers:
                writers["train"].add_scalar("epoch_loss", epoch_loss, global_step)
                writers["train"].add_scalar("lr", optimizer.param_groups[0]["lr"], global_step)
                writers["train"].add_scalar("images_per_second", throughput, global_step)

            done = epoch + 1
            message = f"epoch {done}/{cfg.n_epochs}: train loss {epoch_loss:.5f}, {throughput:.1f} images/s"
            is_best = False
            if done % cfg.eval_freq == 0 or done == cfg.n_epochs:
                eval_model = ema.module if ema is not None else model
                val_sum, val_count = validation_loss_sums(
                    eval_model, scheduler, _clean_loader_errors(val_loader), schedule, cfg.seed, device,
                    precision=cfg.precision, max_batches=1 if cfg.quick_test else None)
                val_sum, val_count = all_reduce_sum([val_sum, val_count], ctx)
                val_loss = val_sum / max(val_count, 1)
                summary.val_losses[done] = val_loss
                is_best = val_loss < best_loss
                if is_best:
                    best_loss = val_loss
                message += f", val loss {val_loss:.5f}{' (best)' if is_best else ''}"
                if writers:
                    writers["val"].add_scalar("loss", val_loss, global_step)
                    if cfg.sample_steps > 0:
                        shape = tuple(run_config.image_shape)
                        samples = sample_images(eval_model, schedule, shape, num_grid_samples(shape),
                                                cfg.sample_steps, derive_generator(cfg.seed, _STREAM_SAMPLES),
                                                device, precision=cfg.precision)
                        writers["val"].add_image("samples", image_grid(samples), global_step)
                    writers["val"].flush()
                train_model.train()

            if ctx.is_main:
                payload = _payload(epoch=done, global_step=global_step, model=model, optimizer=optimizer,
                                   best_loss=best_loss, ema=ema, scaler=scaler, run_config=run_config, cfg=cfg)
                if is_best:
                    save_checkpoint(run_dir / BEST_CHECKPOINT, payload)
                if cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0:
                    save_checkpoint(run_dir / periodic_checkpoint_name(done), payload)
                # Written last: checkpoint_last.pth always holds a fully finished epoch (training, evaluation
                # and the other checkpoints of that epoch), so resuming never skips or half-repeats work.
                save_checkpoint(run_dir / LAST_CHECKPOINT, payload)
                writers["train"].flush()
            summary.epochs_completed = done
            summary.global_step = global_step
            summary.best_loss = best_loss
            _log(ctx, message)
    except KeyboardInterrupt:
        if (run_dir / LAST_CHECKPOINT).is_file() or resume is not None:
            _log(ctx, f"interrupted during epoch {epoch + 1}; {run_dir / LAST_CHECKPOINT} holds "
                      f"{summary.epochs_completed} completed epoch(s); run the same command to resume")
        else:
            _log(ctx, f"interrupted during epoch {epoch + 1}, before any epoch completed; nothing to resume")
        raise
    finally:
        if writers:
            for w in writers.values():
                w.close()
    return summary
