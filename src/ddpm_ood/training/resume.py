"""Where a training run continues from, kept apart from the loop because the stages decide it before any data are
read (``train_*_stage``: resume point -> settings checked against it -> datasets -> ``fit``), and the loop only
consumes the answer. The newest of ``checkpoint_mid_epoch.pth`` and ``checkpoint_last.pth`` wins; a mid-epoch
checkpoint from another layout (ranks, batch size) falls back to the last finished epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_ood.checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    MID_EPOCH_CHECKPOINT,
    load_checkpoint,
    periodic_checkpoint_name,
    run_config_of,
)
from ddpm_ood.config import RunConfig
from ddpm_ood.distributed import DistContext
from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.run_flags import config_conflicts
from ddpm_ood.upstream.weights import is_upstream_checkpoint


@dataclass
class ResumePoint:
    """A loaded checkpoint to continue from: ``epochs_completed`` epochs are done, the next one runs next, from its
    step ``epoch_step`` (0 unless the checkpoint was written inside that epoch)."""

    path: Path
    ckpt: dict

    @property
    def epochs_completed(self) -> int:
        return int(self.ckpt.get("epoch", 0))

    @property
    def epoch_step(self) -> int:
        return int(self.ckpt.get("epoch_step", 0))

    @property
    def upstream(self) -> bool:
        return is_upstream_checkpoint(self.ckpt)


def find_resume_point(run_dir: str | Path, resume_epoch: int | None, kind: str = "ddpm", *,
                      ctx: DistContext | None = None, batch_size: int | None = None) -> ResumePoint | None:
    """The checkpoint to continue from, or None to start afresh.

    ``resume_epoch`` given: ``checkpoint_<resume_epoch>.pth`` must exist (UserError otherwise). Else the newest of
    ``checkpoint_mid_epoch.pth`` and ``checkpoint_last.pth``, else ``checkpoint.pth`` (what upstream resumed from, and
    all an upstream run directory has). ``kind``: the checkpoint kind the run writes (``checkpoint.CHECKPOINT_KINDS``).
    A mid-epoch checkpoint taken by another number of ranks than ``ctx``'s or another ``batch_size`` is passed over
    with a note (the rest of its epoch would be other batches): the run continues from the last finished epoch.
    """
    run_dir = Path(run_dir)
    if resume_epoch is not None:
        path = run_dir / periodic_checkpoint_name(resume_epoch)
        if not path.is_file():
            present = sorted(p.name for p in run_dir.glob("checkpoint_*.pth")
                             if p.name not in (LAST_CHECKPOINT, MID_EPOCH_CHECKPOINT))
            raise ParameterError(f"resume_epoch={resume_epoch}: {path} not found "
                                 f"(periodic checkpoints present: {', '.join(present) or 'none'})", "resume_epoch")
        return ResumePoint(path, load_checkpoint(path, kind))
    mid = _mid_epoch_point(run_dir, kind, ctx or DistContext(), batch_size)
    if mid is not None:
        return mid
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        path = run_dir / name
        if path.is_file():
            return ResumePoint(path, load_checkpoint(path, kind))
    return None


def _mid_epoch_point(run_dir: Path, kind: str, ctx: DistContext, batch_size: int | None) -> ResumePoint | None:
    """``checkpoint_mid_epoch.pth`` when it is newer than ``checkpoint_last.pth`` and fits this run's layout."""
    path = run_dir / MID_EPOCH_CHECKPOINT
    if not path.is_file():
        return None
    point = ResumePoint(path, load_checkpoint(path, kind))
    if _completed_epochs(run_dir / LAST_CHECKPOINT) > point.epochs_completed:
        return None  # left over from before the last finished epoch (the run was stopped before removing it)
    saved_batch = (point.ckpt.get("train_config") or {}).get("batch_size")
    saved_ranks = int(point.ckpt.get("world_size", 1))
    if saved_ranks != ctx.world_size or (batch_size is not None and saved_batch != batch_size):
        if ctx.is_main:  # a line above any progress bar, as ``loop.log`` writes (loop.py imports this module)
            from tqdm import tqdm

            tqdm.write(f"note: {path} was written by {saved_ranks} rank(s) with --batch_size={saved_batch}; with "
                       f"{ctx.world_size} rank(s) and --batch_size={batch_size} the rest of its epoch would be other "
                       "batches, so the run continues from its last finished epoch instead")
        return None
    return point


def _completed_epochs(path: Path) -> int:
    """The ``epoch`` entry of a checkpoint, read without loading its tensors (-1: absent or unreadable)."""
    if not path.is_file():
        return -1
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch", 0))
    except Exception:  # a torn or foreign file: the mid-epoch checkpoint is the better bet
        return -1


def already_complete(resume: ResumePoint | None, n_epochs: int, ctx: DistContext) -> bool:
    """True (said on the main rank) when ``resume`` already holds ``n_epochs`` epochs: nothing to train, and the
    data need not be loaded."""
    if resume is None or resume.epochs_completed < n_epochs:
        return False
    if ctx.is_main:
        print(f"training already complete: {resume.path} holds {resume.epochs_completed} epoch(s), "
              f"--n_epochs={n_epochs}; nothing to do")
    return True


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
