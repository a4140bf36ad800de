"""Checkpoint files (our format): names, reading, writing, and loading weights strictly.

A checkpoint written by ddpm-ood is a dict loadable with ``torch.load(weights_only=True)``:

=====================  ======================================================================================
``epoch``              epochs completed (resume starts at this 0-based epoch index)
``global_step``        optimizer steps taken so far
``model_state_dict``   UNet weights (MONAI core key names, unwrapped from DDP)
``optimizer_state_dict``  Adam state
``best_loss``          lowest validation loss seen so far (``inf`` before the first evaluation)
``ema_state_dict``     EMA weights (same keys as the model) or None when EMA is off
``scaler_state_dict``  fp16 GradScaler state or None
``rng_state``          torch/numpy/python global RNG states (informational: training draws its randomness from
                       generators seeded from (seed, epoch, step, rank), so resuming does not depend on them)
``config``             ``RunConfig.to_dict()``: model, schedule, data settings and image shape
``train_config``       the loop settings (seed, lr, batch size, ...) for reference
=====================  ======================================================================================

A mid-epoch checkpoint (``checkpoint_mid_epoch.pth``: at a stop signal, or every ``--checkpoint_every_minutes``) has
the same entries, ``epoch`` still counting COMPLETED epochs, plus ``epoch_step`` (optimizer steps done in the next
epoch), ``world_size`` (ranks that took them), ``epoch_totals`` (the epoch's loss sum, batch and image counts so
far, over all ranks) and ``task_epoch_state`` (the task's own running sums, e.g. the VQ-VAE's loss terms).

A checkpoint without ``config`` (the reference code's) is read by the same functions; ``upstream/`` knows the rest
of its format.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddpm_ood.config import RunConfig
from ddpm_ood.errors import UserError, one_line
from ddpm_ood.fileio import atomic_torch_save

BEST_CHECKPOINT = "checkpoint.pth"
LAST_CHECKPOINT = "checkpoint_last.pth"
MID_EPOCH_CHECKPOINT = "checkpoint_mid_epoch.pth"


def periodic_checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint saved after ``epoch`` completed epochs (upstream's ``checkpoint_<epoch>.pth``)."""
    return f"checkpoint_{int(epoch)}.pth"


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` atomically: ``path`` is either the old file or the complete new one, never half-written."""
    atomic_torch_save(dict(payload), path)


CHECKPOINT_KINDS = ("ddpm", "vqvae")
_KIND_WRITERS = {"ddpm": "train_ddpm.py", "vqvae": "train_vqvae.py"}


def checkpoint_kind(ckpt: Mapping[str, Any]) -> str:
    """``"vqvae"`` for a VQ-VAE checkpoint, else ``"ddpm"``: the stored config says; a checkpoint without one is
    recognised by its weights (MONAI's VQVAE has ``quantizer.`` weights, a UNet none)."""
    config = ckpt.get("config")
    if isinstance(config, dict):
        return "vqvae" if config.get("kind") == "vqvae" else "ddpm"
    keys = [k[len("module."):] if k.startswith("module.") else k for k in ckpt.get("model_state_dict", {})]
    return "vqvae" if any(k.startswith("quantizer.") for k in keys) else "ddpm"


def load_checkpoint(path: str | os.PathLike, kind: str = "ddpm") -> dict:
    """Read a checkpoint of ``kind`` (``CHECKPOINT_KINDS``) onto the CPU (``weights_only=True``: no code runs on load).

    Raises UserError naming the file if it is missing, unreadable, not a checkpoint dict with model weights, or a
    checkpoint of the other kind (a VQ-VAE where a DDPM is expected, or the reverse).
    """
    path = Path(path)
    if not path.is_file():
        not_a_folder = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f" ({not_a_folder} is a file, not a folder)" if not_a_folder is not None else ""
        raise UserError(f"{path}: checkpoint not found{why}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError, IndexError, KeyError) as exc:
        raise UserError(f"{path}: not a readable checkpoint ({one_line(exc)})") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise UserError(f"{path}: not a {kind} checkpoint (no 'model_state_dict' entry)")
    found = checkpoint_kind(ckpt)
    if found != kind:
        hint = " (give it as --vqvae_checkpoint)" if found == "vqvae" else ""
        raise UserError(f"{path}: is a {found.upper()} checkpoint (written by {_KIND_WRITERS[found]}), but a "
                        f"{kind.upper()} checkpoint is expected here{hint}")
    return ckpt


def run_config_of(ckpt: Mapping[str, Any], source: str | os.PathLike = "checkpoint") -> RunConfig | None:
    """The RunConfig stored by ddpm-ood, or None for an upstream checkpoint (which carries none)."""
    config = ckpt.get("config")
    if config is None:
        return None
    try:
        return RunConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{source}: stored run configuration is malformed ({one_line(exc)})") from None


def inference_state_dict(ckpt: Mapping[str, Any], use_ema: bool = True) -> dict:
    """The UNet weights to run: the EMA weights when present and ``use_ema``, else the trained weights."""
    ema = ckpt.get("ema_state_dict")
    if use_ema and ema is not None:
        return ema
    return ckpt["model_state_dict"]


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Drop a ``module.`` prefix (a state dict saved from a DDP-wrapped model by other code)."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_state_strict(module: torch.nn.Module, state_dict: Mapping[str, Any], source: str, what: str) -> dict:
    """Load ``state_dict`` (a ``module.`` prefix dropped) into ``module``: every tensor present, used and of the
    module's shape, else one UserError naming ``source`` and ``what`` the weights should fit (not torch's list of
    every key). Returns the state dict as loaded. UNet weights that may be upstream's: ``upstream.weights.load_unet_state``."""
    state = strip_module_prefix(state_dict)
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state)
                 if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or bad:
        raise UserError(f"{source}: weights do not fit {what} ({len(missing)} missing, {len(unexpected)} unexpected, "
                        f"{len(bad)} not a tensor of the network's shape; first {(missing or unexpected or bad)[0]})")
    module.load_state_dict(state, strict=True)
    return state


