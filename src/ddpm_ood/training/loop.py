"""The training loop every model family plugs into: ``fit(task, ...)`` owns epochs, resume, evaluation cadence, the
best/periodic/last checkpoints, TensorBoard, DDP data sharding and Ctrl-C; a task (``training.ddpm.DDPMTask``) owns
its networks, optimizers, loss, validation loss and logged images.

Reproducibility: the epoch's shuffling comes from a generator seeded with (seed, epoch), the global RNG (dropout) is
re-seeded from (seed, epoch, step, rank) before every step, and tasks draw their randomness from ``seeding``
generators keyed by (seed, stream, epoch, step, rank): the position (epoch, step) is all a resumed run needs to take
bit-for-bit the steps an uninterrupted one takes. ``checkpoint_last.pth`` is written last in every epoch, atomically:
it always holds a finished epoch.

Inside an epoch (preemption): at the end of every optimizer step the ranks agree (``distributed.any_rank``) whether a
stop signal arrived on any of them (``preemption``) or, on rank 0's clock, ``checkpoint_every_minutes`` have passed
since the last checkpoint. Either way rank 0 writes ``checkpoint_mid_epoch.pth`` (atomically: the previous one stays
whole until the new one is complete) with the position (``epoch_step``), the task's state (weights, optimizers, EMA,
scaler, discriminator) and the epoch's running loss sums; at a stop every rank then raises ``Preempted``. Resuming
takes the newest of ``checkpoint_last.pth`` and ``checkpoint_mid_epoch.pth`` and skips the batches already done (the
same per-epoch order, ``loaders._EpochSampler``). Where a run continues from is decided before ``fit``
(``training.resume``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from ddpm_ood.checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    MID_EPOCH_CHECKPOINT,
    periodic_checkpoint_name,
    save_checkpoint,
)
from ddpm_ood.compute import ComputeOptions
from ddpm_ood.devices import PRECISIONS
from ddpm_ood.distributed import DistContext, all_reduce_sum, any_rank, barrier
from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.preemption import Preempted, iterate_loader, stop_requested
from ddpm_ood.seeding import DEFAULT_SEED, capture_rng_state, derive_seed
from ddpm_ood.training.loaders import clean_loader_errors, make_loaders
from ddpm_ood.training.resume import ResumePoint

# Independent random streams (first key after the seed).
STREAM_TRAIN = 0
STREAM_VAL = 1
STREAM_SAMPLES = 2
STREAM_GLOBAL = 3
STREAM_LOADER = 4
# Consecutive non-finite fp16 losses (each a step the GradScaler skipped) after which training is called diverged.
MAX_NON_FINITE_STEPS = 20
# Training losses are brought to the host this many steps at a time on a GPU (one transfer, no wait per step); on a
# CPU every step, where reading a loss costs nothing and the progress bar stays live. On a GPU a diverged fp32 run is
# therefore stopped up to this many steps late; no checkpoint is written in between (only at the epoch's end).
CUDA_LOSS_READBACK_STEPS = 25
# Default --checkpoint_every_minutes: a mid-epoch checkpoint this often, so a SIGKILL (node failure, OOM killer) loses
# at most this much training. The `small` preset's training state (weights, Adam, EMA: 0.3 GB in 2D, 0.75 GB in 3D)
# is written in about a second (benchmarks/checkpoint_cost.py), about 0.1% of the interval.
DEFAULT_CHECKPOINT_MINUTES = 15.0
# Periodic mid-epoch checkpoints are spaced at least (last write time) / this, so they never cost more than this share
# of the training time, whatever the checkpoint size and the filesystem (the `big` 3D preset's 7 GB on a slow
# network filesystem take minutes to write).
MAX_CHECKPOINT_SHARE = 0.02


def loss_readback_every(device: torch.device) -> int:
    """Steps whose losses are read back together on ``device``."""
    return CUDA_LOSS_READBACK_STEPS if device.type == "cuda" else 1


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the training loop (not of the model; those are in RunConfig and travel with the weights).

    ``resume_epoch``: resume from ``checkpoint_<resume_epoch>.pth`` instead of ``checkpoint_last.pth``.
    ``quick_test``: one training batch and one validation batch per epoch (smoke tests).
    ``ema_decay``: 0 = no EMA; else the EMA weights are updated after every step as
    ``ema = decay * ema + (1 - decay) * weights`` and used for validation, samples and inference.
    ``sample_steps``: DDIM steps of the TensorBoard sample grid drawn at each evaluation (0 = no grid).
    ``precision``: one of ``devices.PRECISIONS``, already resolved for the device (``devices.resolve_precision``).
    ``checkpoint_every_minutes``: also write ``checkpoint_mid_epoch.pth`` inside an epoch when this many minutes have
    passed since the last checkpoint, and 50 times as long as the last checkpoint took to write
    (``MAX_CHECKPOINT_SHARE``); 0 = only at stop signals and epoch ends.
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
    num_workers: int = ComputeOptions.num_workers  # the stage sets the job's (compute.num_workers)
    seed: int = DEFAULT_SEED
    precision: str = "fp32"
    sample_steps: int = 50
    checkpoint_every_minutes: float = DEFAULT_CHECKPOINT_MINUTES

    def __post_init__(self) -> None:
        if self.n_epochs < 1 or self.eval_freq < 1 or self.batch_size < 1:
            raise ParameterError("n_epochs, eval_freq and batch_size must be >= 1", "n_epochs", "eval_freq",
                                 "batch_size")
        if self.checkpoint_every < 0 or self.num_workers < 0 or self.sample_steps < 0:
            raise ParameterError("checkpoint_every, num_workers and sample_steps must be >= 0", "checkpoint_every",
                                 "num_workers", "sample_steps")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ParameterError(f"lr must be a positive number, got {self.lr}", "lr")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ParameterError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}", "ema_decay")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not (self.checkpoint_every_minutes >= 0 and math.isfinite(self.checkpoint_every_minutes)):
            raise ParameterError(f"checkpoint_every_minutes must be a number >= 0 (0 = off), got "
                                 f"{self.checkpoint_every_minutes}", "checkpoint_every_minutes")
        if self.resume_epoch is not None and self.resume_epoch < 1:
            raise ParameterError(f"resume_epoch must be >= 1, got {self.resume_epoch}", "resume_epoch")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainSummary:
    """What a call to :func:`fit` did. Losses are in the task's units (for a DDPM: MSE of the training target)."""

    start_epoch: int
    epochs_completed: int
    global_step: int
    best_loss: float
    epoch_losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)  # epochs completed -> validation loss


class TrainingTask(Protocol):
    """One model family's training, as ``fit`` drives it (see ``training.ddpm.DDPMTask``).

    A task that keeps running sums over an epoch (the VQ-VAE's loss terms) also has ``epoch_state() -> dict`` (the
    sums so far over all ranks; every rank calls it) and ``load_epoch_state(state)`` (called on rank 0 when resuming
    inside an epoch), so that a mid-epoch checkpoint carries them."""

    train_module: torch.nn.Module  # put in train mode at each epoch start (DDP-wrapped where distributed)
    skips_non_finite: bool  # True when a non-finite loss means the step was skipped (fp16 GradScaler)

    def train_step(self, batch: dict, epoch: int, step: int) -> torch.Tensor:
        """One optimizer step; the detached scalar loss."""

    def validation_loss(self, loader: Iterable[dict], max_batches: int | None) -> tuple[float, int]:
        """(sum of per-item losses, number of items) over this rank's validation shard."""

    def log_evaluation(self, writer: Any, global_step: int) -> None:
        """Images (samples, reconstructions) to the validation TensorBoard writer, on the main rank."""

    def state_dict(self) -> dict[str, Any]:
        """The task's part of a checkpoint (weights, optimizer states, its configuration)."""

    def scalars(self) -> dict[str, float]:
        """Per-epoch values for the training TensorBoard writer (e.g. the learning rate); called on every rank at
        each epoch's end, so it may all-reduce."""


def log(ctx: DistContext, message: str) -> None:
    """A line on the main rank, above any progress bar."""
    if ctx.is_main:
        from tqdm import tqdm

        tqdm.write(message)


class _Fit:
    """The state of one ``fit`` call: counters, loaders, writers; one method per phase of an epoch."""

    def __init__(self, task: TrainingTask, cfg: TrainConfig, train_set: Dataset, val_set: Dataset,
                 ctx: DistContext, resume: ResumePoint | None) -> None:
        self.task, self.cfg, self.ctx = task, cfg, ctx
        self.run_dir = Path(cfg.run_dir)
        self.summary = TrainSummary(start_epoch=0, epochs_completed=0, global_step=0, best_loss=math.inf)
        self.start_step = 0  # steps of the first epoch done before (a mid-epoch checkpoint)
        # The running epoch's loss sum and batch count from before the resume, over all ranks (kept on rank 0 only,
        # so the end-of-epoch sum over ranks counts them once).
        self.carried = [0.0, 0.0]
        if resume is not None:
            ck = resume.ckpt
            self.summary.start_epoch = self.summary.epochs_completed = resume.epochs_completed
            self.summary.global_step = int(ck.get("global_step", 0))
            if resume.upstream:
                # Upstream's best_loss is a TRAIN loss, not comparable with our fixed-noise validation loss.
                log(ctx, f"note: {resume.path} was written by the upstream code; its best_loss is ignored")
            else:
                self.summary.best_loss = float(ck.get("best_loss", math.inf))
            self.start_step = resume.epoch_step
            if self.start_step and ctx.is_main:
                self.carried = [float(v) for v in ck.get("epoch_totals", self.carried)]
                if ck.get("task_epoch_state") and hasattr(task, "load_epoch_state"):
                    task.load_epoch_state(ck["task_epoch_state"])
        self.sampler, self.train_loader, self.val_loader = make_loaders(
            train_set, val_set, ctx, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
            stream=STREAM_LOADER)
        self.writers = None
        self.non_finite_run = 0
        self.throughput = 0.0  # images/s of the last epoch
        self.last_save = time.monotonic()  # rank 0's clock decides when a periodic mid-epoch checkpoint is due
        self.last_write_s = 0.0  # how long rank 0 took to write the last checkpoint

    def open_writers(self, resumed: bool) -> None:
        if self.ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events an interrupted run logged after the checkpoint we resume from.
            purge = self.summary.global_step if resumed else None
            self.writers = {name: SummaryWriter(str(self.run_dir / name), purge_step=purge)
                            for name in ("train", "val")}

    def close_writers(self) -> None:
        for w in (self.writers or {}).values():
            w.close()

    def train_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Train epoch ``epoch`` from its step ``start_step`` (the steps before it were done by an earlier run).
        Raises Preempted, after writing the mid-epoch checkpoint, when a stop signal arrived on any rank."""
        from tqdm import tqdm

        cfg, ctx = self.cfg, self.ctx
        self.sampler.set_epoch(epoch)
        self.sampler.skip = start_step * cfg.batch_size
        self.task.train_module.train()
        n_batches = 1 if cfg.quick_test else math.ceil(self.sampler.num_samples / cfg.batch_size)
        losses: list[torch.Tensor] = []
        pending: list[tuple[int, int, torch.Tensor]] = []  # (step, global step, loss on the device)
        every = loss_readback_every(ctx.device)
        n_images = 0
        start = time.perf_counter()
        with tqdm(total=n_batches, initial=min(start_step, n_batches), desc=f"epoch {epoch + 1}/{cfg.n_epochs}",
                  disable=not ctx.is_main, dynamic_ncols=True, leave=False) as bar:
            for step, batch in enumerate(clean_loader_errors(iterate_loader(self.train_loader)), start=start_step):
                if step >= n_batches:
                    break
                # Global RNG re-seeded per step: dropout, or anything else drawing from it, takes the same numbers in
                # a run resumed at any step.
                torch.manual_seed(derive_seed(cfg.seed, STREAM_GLOBAL, epoch, step, ctx.rank))
                self.summary.global_step += 1
                pending.append((step, self.summary.global_step, self.task.train_step(batch, epoch, step)))
                n_images += batch["image"].shape[0]
                if len(pending) >= every:
                    loss_value = self._read_back(pending, losses, epoch)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{n_images * ctx.world_size / elapsed:.1f}")
                bar.update(1)
                stop, due = any_rank([stop_requested() is not None, self._checkpoint_due(step + 1, n_batches)], ctx)
                if stop or due:
                    self._read_back(pending, losses, epoch)
                    self.save_mid_epoch(epoch, step + 1, losses)
                if stop:
                    raise Preempted(f"{stop_requested() or 'a stop signal on another rank'}: stopped at epoch "
                                    f"{epoch + 1}/{cfg.n_epochs}, step {step + 1}/{n_batches}; "
                                    f"{self.run_dir / MID_EPOCH_CHECKPOINT} holds the run up to there; run the "
                                    "same command to continue")
            self._read_back(pending, losses, epoch)
        self._end_of_epoch(losses, n_images, time.perf_counter() - start)

    def _checkpoint_due(self, steps_done: int, n_batches: int) -> bool:
        """On rank 0: a periodic mid-epoch checkpoint is due (not at the epoch's last step: its end saves anyway)."""
        minutes = self.cfg.checkpoint_every_minutes
        spacing = max(60.0 * minutes, self.last_write_s / MAX_CHECKPOINT_SHARE)
        return (self.ctx.is_main and minutes > 0 and steps_done < n_batches
                and time.monotonic() - self.last_save >= spacing)

    def _payload(self, completed_epochs: int) -> dict[str, Any]:
        return {"epoch": completed_epochs, "global_step": self.summary.global_step, **self.task.state_dict(),
                "best_loss": float(self.summary.best_loss), "rng_state": capture_rng_state(),
                "train_config": self.cfg.to_dict()}

    def save_mid_epoch(self, epoch: int, steps_done: int, losses: list[torch.Tensor]) -> None:
        """``checkpoint_mid_epoch.pth`` after ``steps_done`` steps of 0-based ``epoch`` (every rank calls it: the
        running sums are summed over the ranks; rank 0 writes; no rank returns before the file is complete)."""
        totals = all_reduce_sum([self.carried[0] + (float(torch.stack(losses).double().sum()) if losses else 0.0),
                                 self.carried[1] + len(losses)], self.ctx)
        task_state = self.task.epoch_state() if hasattr(self.task, "epoch_state") else {}
        if self.ctx.is_main:
            payload = {**self._payload(epoch), "epoch_step": steps_done, "world_size": self.ctx.world_size,
                       "epoch_totals": totals, "task_epoch_state": task_state}
            started = time.monotonic()
            save_checkpoint(self.run_dir / MID_EPOCH_CHECKPOINT, payload)
            self.last_write_s = time.monotonic() - started
            if self.writers:
                self.writers["train"].flush()
        barrier(self.ctx)
        self.last_save = time.monotonic()

    def stop_if_requested(self, where: str) -> None:
        """Raise Preempted on every rank when a stop signal arrived on any (nothing to save: ``where`` says why)."""
        if any_rank([stop_requested() is not None], self.ctx)[0]:
            raise Preempted(f"{stop_requested() or 'a stop signal on another rank'}: stopped {where}; run the same "
                            "command to continue")

    def _read_back(self, pending: list[tuple[int, int, torch.Tensor]], losses: list[torch.Tensor],
                   epoch: int) -> float:
        """Bring the pending losses to the host in one transfer, check and log each; returns the last value."""
        loss_value = math.nan
        if pending:
            values = torch.stack([loss for _, _, loss in pending]).float().cpu().tolist()
            for (step, global_step, loss), loss_value in zip(pending, values, strict=True):
                self._checked(loss_value, loss, losses, epoch, step)
                if self.writers:
                    self.writers["train"].add_scalar("loss", loss_value, global_step)
            pending.clear()
        return loss_value

    def _checked(self, loss_value: float, loss: torch.Tensor, losses: list[torch.Tensor], epoch: int,
                 step: int) -> float:
        if math.isfinite(loss_value):
            losses.append(loss)
            self.non_finite_run = 0
            return loss_value
        # fp16: the GradScaler has skipped this step and lowered its scale; only a persistent non-finite loss is
        # divergence. Without a scaler the step was taken: stop now.
        self.non_finite_run += 1
        if not self.task.skips_non_finite or self.non_finite_run >= MAX_NON_FINITE_STEPS:
            raise UserError(f"training diverged: loss is {loss_value} at epoch {epoch + 1}, step {step + 1}; "
                            "lower --lr or use --precision=fp32")
        log(self.ctx, f"note: non-finite fp16 loss at epoch {epoch + 1}, step {step + 1}: the GradScaler "
                      "skipped the step")
        return loss_value

    def _end_of_epoch(self, losses: list[torch.Tensor], n_images: int, elapsed: float) -> None:
        own_sum = float(torch.stack(losses).double().sum()) if losses else 0.0
        loss_sum, batch_count, image_count = all_reduce_sum(
            [self.carried[0] + own_sum, self.carried[1] + len(losses), n_images], self.ctx)
        self.carried = [0.0, 0.0]
        epoch_loss = loss_sum / max(batch_count, 1)
        self.throughput = image_count / max(elapsed, 1e-9)
        self.summary.epoch_losses.append(epoch_loss)
        scalars = self.task.scalars()  # on every rank: a task may all-reduce its values
        if self.writers:
            step = self.summary.global_step
            self.writers["train"].add_scalar("epoch_loss", epoch_loss, step)
            self.writers["train"].add_scalar("images_per_second", self.throughput, step)
            for name, value in scalars.items():
                self.writers["train"].add_scalar(name, value, step)

    def evaluate(self, done: int) -> tuple[bool, str]:
        """Validation loss (and logged images) after ``done`` epochs: (is it the best so far, message part)."""
        cfg = self.cfg
        if not (done % cfg.eval_freq == 0 or done == cfg.n_epochs):
            return False, ""
        val_sum, val_count = self.task.validation_loss(clean_loader_errors(iterate_loader(self.val_loader)),
                                                       1 if cfg.quick_test else None)
        val_sum, val_count = all_reduce_sum([val_sum, val_count], self.ctx)
        val_loss = val_sum / max(val_count, 1)
        self.summary.val_losses[done] = val_loss
        is_best = val_loss < self.summary.best_loss
        if is_best:
            self.summary.best_loss = val_loss
        if self.writers:
            self.writers["val"].add_scalar("loss", val_loss, self.summary.global_step)
            self.task.log_evaluation(self.writers["val"], self.summary.global_step)
            self.writers["val"].flush()
        self.task.train_module.train()
        return is_best, f", val loss {val_loss:.5f}{' (best)' if is_best else ''}"

    def save(self, done: int, is_best: bool) -> None:
        if not self.ctx.is_main:
            return
        payload = self._payload(done)
        if is_best:
            save_checkpoint(self.run_dir / BEST_CHECKPOINT, payload)
        if self.cfg.checkpoint_every > 0 and done % self.cfg.checkpoint_every == 0:
            save_checkpoint(self.run_dir / periodic_checkpoint_name(done), payload)
        # Written last: checkpoint_last.pth always holds a fully finished epoch (training, evaluation and the other
        # checkpoints of that epoch), so resuming never skips or half-repeats work.
        started = time.monotonic()
        save_checkpoint(self.run_dir / LAST_CHECKPOINT, payload)
        self.last_write_s = time.monotonic() - started
        # Older than checkpoint_last.pth now (removed after it is written: a stop in between leaves both, and
        # resume.find_resume_point takes the newer).
        (self.run_dir / MID_EPOCH_CHECKPOINT).unlink(missing_ok=True)
        self.writers["train"].flush()
        self.last_save = time.monotonic()


def fit(
    task: TrainingTask,
    cfg: TrainConfig,
    train_set: Dataset,
    val_set: Dataset,
    ctx: DistContext,
    resume: ResumePoint | None = None,
) -> TrainSummary:
    """Train ``task`` from epoch ``resume.epochs_completed`` (0 without ``resume``) to ``cfg.n_epochs``.

    ``train_set``/``val_set`` items are dicts with "image" and "index" (int, stable per item). After every epoch:
    validation every ``cfg.eval_freq`` epochs and at the last (lowest loss -> ``checkpoint.pth``), a periodic
    checkpoint every ``cfg.checkpoint_every``, then ``checkpoint_last.pth``. Only rank 0 writes files. A resume point
    written inside an epoch continues that epoch at its step.
    A stop signal (``preemption.stop_on_signals``) on any rank: every rank finishes its step, rank 0 writes
    ``checkpoint_mid_epoch.pth``, and ``Preempted`` is raised (at an epoch's end, after ``checkpoint_last.pth``).
    KeyboardInterrupt is re-raised after saying which completed epoch ``checkpoint_last.pth`` holds.
    """
    run = _Fit(task, cfg, train_set, val_set, ctx, resume)
    summary = run.summary
    if summary.start_epoch >= cfg.n_epochs:
        log(ctx, f"training already complete: {summary.start_epoch} of {cfg.n_epochs} epochs done ({run.run_dir})")
        return summary
    if resume is not None:
        inside = f" and {run.start_step} step(s) of epoch {summary.start_epoch + 1}" if run.start_step else ""
        log(ctx, f"resuming from {resume.path}: {summary.start_epoch} epoch(s){inside} done, continuing at epoch "
                 f"{summary.start_epoch + 1}/{cfg.n_epochs}" + (f", step {run.start_step + 1}" if inside else ""))
    if ctx.is_main and (resume is None or resume.path.name != MID_EPOCH_CHECKPOINT):
        # Not continuing from it (--ddpm_checkpoint_epoch, or a mid-epoch checkpoint of another layout): a mid-epoch
        # checkpoint left in the folder must not be taken for the newest state later.
        (run.run_dir / MID_EPOCH_CHECKPOINT).unlink(missing_ok=True)
    run.open_writers(resumed=resume is not None)
    epoch = summary.start_epoch
    try:
        run.stop_if_requested("before training (nothing new to save)")
        for epoch in range(summary.start_epoch, cfg.n_epochs):
            run.train_epoch(epoch, run.start_step if epoch == summary.start_epoch else 0)
            done = epoch + 1
            is_best, val_message = run.evaluate(done)
            run.save(done, is_best)
            summary.epochs_completed = done
            log(ctx, f"epoch {done}/{cfg.n_epochs}: train loss {summary.epoch_losses[-1]:.5f}, "
                     f"{run.throughput:.1f} images/s{val_message}")
            if done < cfg.n_epochs:
                run.stop_if_requested(f"after epoch {done}/{cfg.n_epochs}; {run.run_dir / LAST_CHECKPOINT} holds it")
    except KeyboardInterrupt:
        if (run.run_dir / LAST_CHECKPOINT).is_file() or resume is not None:
            log(ctx, f"interrupted during epoch {epoch + 1}; {run.run_dir / LAST_CHECKPOINT} holds "
                     f"{summary.epochs_completed} completed epoch(s); run the same command to resume")
        else:
            log(ctx, f"interrupted during epoch {epoch + 1}, before any epoch completed; nothing to resume")
        raise
    finally:
        run.close_writers()
    return summary
