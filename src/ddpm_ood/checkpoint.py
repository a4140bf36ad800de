"""Checkpoint files: names, reading, writing, and loading UNet weights (ours or upstream's).

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

A checkpoint written by the upstream code has only epoch, global_step, model_state_dict (MONAI Generative key
names), optimizer_state_dict and best_loss (the best TRAIN loss); it carries no config.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddpm_ood.config import RunConfig
from ddpm_ood.errors import UserError
from ddpm_ood.io import atomic_torch_save

BEST_CHECKPOINT = "checkpoint.pth"
LAST_CHECKPOINT = "checkpoint_last.pth"


def periodic_checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint saved after ``epoch`` completed epochs (upstream's ``checkpoint_<epoch>.pth``)."""
    return f"checkpoint_{int(epoch)}.pth"


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` atomically: ``path`` is either the old file or the complete new one, never half-written."""
    atomic_torch_save(dict(payload), path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint onto the CPU (``weights_only=True``: no code runs on load).

    Raises UserError naming the file if it is missing, unreadable, or not a checkpoint dict with model weights.
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
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {first_line})") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise UserError(f"{path}: not a ddpm checkpoint (no 'model_state_dict' entry)")
    return ckpt


def run_config_of(ckpt: Mapping[str, Any], source: str | os.PathLike = "checkpoint") -> RunConfig | None:
    """The RunConfig stored by ddpm-ood, or None for an upstream checkpoint (which carries none)."""
    config = ckpt.get("config")
    if config is None:
        return None
    try:
        return RunConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{source}: stored run configuration is malformed ({exc.__class__.__name__}: {exc})") from None


def is_upstream_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """True for a checkpoint written by the reference code (no stored config)."""
    return ckpt.get("config") is None


def inference_state_dict(ckpt: Mapping[str, Any], use_ema: bool = True) -> dict:
    """The UNet weights to run: the EMA weights when present and ``use_ema``, else the trained weights."""
    ema = ckpt.get("ema_state_dict")
    if use_ema and ema is not None:
        return ema
    return ckpt["model_state_dict"]


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Drop a ``module.`` prefix (a state dict saved from a DDP-wrapped model by other code)."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _shape_signature(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Sorted tensor shapes: identifies an architecture independently of key names (old and new names differ)."""
    return sorted(tuple(v.shape) for v in state_dict.values())


def guess_model_flags(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Which preset/grayscale/dimension flags build a UNet with exactly these tensor shapes, e.g.
    ``--model_type=small --is_grayscale=1 --spatial_dimension=2``; None if no preset fits."""
    from ddpm_ood.networks import MODEL_PRESETS, build_unet, model_config_from_preset

    state_dict = _strip_prefix(state_dict)
    conv_in = state_dict.get("conv_in.conv.weight")
    if conv_in is None or conv_in.ndim not in (4, 5):
        return None
    spatial_dims = conv_in.ndim - 2
    in_channels = int(conv_in.shape[1])
    if in_channels not in (1, 3):
        return None
    target = _shape_signature(state_dict)
    for preset in MODEL_PRESETS:
        # Built on the meta device: no memory, no init cost; only the shapes matter.
        with torch.device("meta"):
            candidate = build_unet(model_config_from_preset(preset, spatial_dims, in_channels))
        if _shape_signature(candidate.state_dict()) == target:
            return f"--model_type={preset} --is_grayscale={int(in_channels == 1)} --spatial_dimension={spatial_dims}"
    return None


def _mismatch_error(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                    detail: str) -> UserError:
    guess = guess_model_flags(state_dict)
    hint = f"it seems to need {guess}" if guess else "no model preset matches it"
    n_model = len(model.state_dict())
    return UserError(
        f"{source}: weights do not fit the UNet built from the flags ({detail}; checkpoint has {len(state_dict)} "
        f"tensors, model {n_model}); {hint}"
    )


def load_unet_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load UNet weights into ``model`` (a MONAI core DiffusionModelUNet), strictly.

    Accepts our key names, a ``module.``-prefixed dict, and MONAI Generative (upstream) key names, converted with
    ``DiffusionModelUNet.load_old_state_dict``. Every model tensor must be provided and every checkpoint tensor
    used, with equal shapes; otherwise UserError naming ``source`` and the flags the weights seem to need.
    """
    state_dict = _strip_prefix(state_dict)
    own = model.state_dict()
    if set(state_dict) == set(own):
        bad = [k for k in own if tuple(own[k].shape) != tuple(state_dict[k].shape)]
        if bad:
            raise _mismatch_error(model, state_dict, source,
                                  f"{len(bad)} tensor shape(s) differ, first {bad[0]}: checkpoint "
                                  f"{tuple(state_dict[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}")
        model.load_state_dict(state_dict, strict=True)
        return
    if len(state_dict) != len(own):
        raise _mismatch_error(model, state_dict, source, "different number of tensors")
    convert = getattr(model, "load_old_state_dict", None)
    if convert is None:
        raise _mismatch_error(model, state_dict, source, "key names differ")
    # load_old_state_dict pops the keys it uses from the dict it is given, and silently keeps the model's own
    # values for keys it does not find: hand it a copy and require that every checkpoint tensor was consumed.
    remaining = dict(state_dict)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "All keys match, ..." on the fast path
            convert(remaining)
    except (KeyError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _mismatch_error(model, state_dict, source,
                              f"old-style key conversion failed: {exc.__class__.__name__} {first_line}") from None
    if remaining:
        raise _mismatch_error(model, state_dict, source,
                              f"{len(remaining)} checkpoint tensor(s) unused, first {next(iter(remaining))}")


def config_conflicts(saved: RunConfig, given: RunConfig, *, compare_image_shape: bool = True) -> list[str]:
    """Human-readable differences between a checkpoint's config and the one the flags build.

    Each entry names the flag and both values, e.g. ``--model_type: checkpoint tiny, flags small``.
    """
    out: list[str] = []

    def check(flag: str, a: Any, b: Any) -> None:
        if a != b:
            out.append(f"{flag}: checkpoint {a}, flags {b}")

    check("--model_type", saved.model.preset, given.model.preset)
    if saved.model.preset == given.model.preset:
        check("model architecture", saved.model.to_dict(), given.model.to_dict())
    check("--spatial_dimension", saved.data.spatial_dims, given.data.spatial_dims)
    check("--is_grayscale", int(saved.data.is_grayscale), int(given.data.is_grayscale))
    check("--image_size", saved.data.image_size, given.data.image_size)
    check("--image_roi", saved.data.image_roi, given.data.image_roi)
    s, g = saved.schedule, given.schedule
    check("--beta_schedule", s.beta_schedule, g.beta_schedule)
    check("--beta_start", s.beta_start, g.beta_start)
    check("--beta_end", s.beta_end, g.beta_end)
    check("--prediction_type", s.prediction_type, g.prediction_type)
    check("--b_scale", s.b_scale, g.b_scale)
    check("--snr_shift", s.snr_shift, g.snr_shift)
    check("num_train_timesteps", s.num_train_timesteps, g.num_train_timesteps)
    if compare_image_shape:
        check("image shape (C, *spatial)", tuple(saved.image_shape), tuple(given.image_shape))
    return out
