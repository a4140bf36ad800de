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
import dataclasses
import io
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig
from ddpm_ood.errors import UserError, one_line
from ddpm_ood.io import atomic_torch_save

BEST_CHECKPOINT = "checkpoint.pth"
LAST_CHECKPOINT = "checkpoint_last.pth"


def periodic_checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint saved after ``epoch`` completed epochs (upstream's ``checkpoint_<epoch>.pth``)."""
    return f"checkpoint_{int(epoch)}.pth"


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` atomically: ``path`` is either the old file or the complete new one, never half-written."""
    atomic_torch_save(dict(payload), path)


CHECKPOINT_KINDS = ("ddpm", "vqvae")
_KIND_WRITERS = {"ddpm": "train_ddpm.py", "vqvae": "train_vqvae.py"}


def checkpoint_kind(ckpt: Mapping[str, Any]) -> str:
    """``"vqvae"`` for a VQ-VAE checkpoint (ours say so in their config; upstream's have ``quantizer.`` weights),
    else ``"ddpm"``."""
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


def is_upstream_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """True for a checkpoint written by the reference code (no stored config)."""
    return ckpt.get("config") is None


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
    every key). Returns the state dict as loaded. For UNets, ``load_unet_state`` (it also converts upstream key
    names)."""
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


def _shape_signature(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Sorted tensor shapes: identifies an architecture independently of key names (old and new names differ)."""
    return sorted(tuple(v.shape) for v in state_dict.values())


def guess_model_flags(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Which preset/grayscale/dimension flags build a UNet with exactly these tensor shapes, e.g.
    ``--model_type=small --is_grayscale=1 --spatial_dimension=2``; None if no preset fits."""
    from ddpm_ood.diffusion.unet import MODEL_PRESETS, build_unet, model_config_from_preset

    state_dict = strip_module_prefix(state_dict)
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
    state_dict = strip_module_prefix(state_dict)
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


def data_flag_values(data: DataConfig) -> dict[str, Any]:
    """How images are read and preprocessed, under the flags that set it (``--is_grayscale`` as 0/1)."""
    return {
        "--spatial_dimension": data.spatial_dims,
        "--is_grayscale": int(data.is_grayscale),
        "--image_size": data.image_size,
        "--image_roi": None if data.image_roi is None else tuple(data.image_roi),
        "--channel": data.channel,
    }


def flag_values(run: RunConfig) -> dict[str, Any]:
    """A run's settings under the command-line flags that set them (``--is_grayscale`` as 0/1)."""
    return {
        "--model_type": run.model.preset,
        **data_flag_values(run.data),
        "--beta_schedule": run.schedule.beta_schedule,
        "--beta_start": run.schedule.beta_start,
        "--beta_end": run.schedule.beta_end,
        "--prediction_type": run.schedule.prediction_type,
        "--b_scale": run.schedule.b_scale,
        "--snr_shift": run.schedule.snr_shift,
        "--simplex_noise": int(run.schedule.noise_type != "gaussian"),
    }


def flag_conflicts(stored: Mapping[str, Any], given: Mapping[str, Any], *,
                   skip_not_given: bool) -> list[tuple[str, Any, Any]]:
    """(flag, stored value, given value) for every flag in ``given`` whose value differs from ``stored`` (floats
    within a relative 1e-12). The one comparison of flags against a checkpoint's configuration, used when training
    resumes (every setting compared: None is a value, e.g. no --image_roi) and when reconstruction reads a
    checkpoint (``skip_not_given``: None = the flag was not given, the checkpoint decides)."""
    out = []
    for flag, value in given.items():
        if value is None and skip_not_given:
            continue
        want = stored[flag]
        if isinstance(want, float) and isinstance(value, (int, float)):
            same = abs(value - want) <= 1e-12 * max(1.0, abs(want))
        else:
            same = value == want
        if not same:
            out.append((flag, want, value))
    return out


def config_conflicts(saved: RunConfig, given: RunConfig, *, compare_image_shape: bool = True) -> list[str]:
    """Human-readable differences between a checkpoint's config and the one the flags build.

    Each entry names the flag and both values, e.g. ``--model_type: checkpoint tiny, flags small``.
    """
    stored, wanted = flag_values(saved), flag_values(given)
    wanted["model architecture"] = given.model.to_dict()
    stored["model architecture"] = saved.model.to_dict() if saved.model.preset == given.model.preset else None
    wanted["num_train_timesteps"] = given.schedule.num_train_timesteps
    stored["num_train_timesteps"] = saved.schedule.num_train_timesteps
    wanted["--vqvae_checkpoint (VQ-VAE weights)"] = _latent_identity(given)
    stored["--vqvae_checkpoint (VQ-VAE weights)"] = _latent_identity(saved)
    if compare_image_shape:
        wanted["image shape (C, *spatial)"] = tuple(given.image_shape)
        stored["image shape (C, *spatial)"] = tuple(saved.image_shape)
    if stored["model architecture"] is None:
        del wanted["model architecture"]  # another preset: --model_type already says so
    return [f"{flag}: checkpoint {a}, flags {b}" for flag, a, b in flag_conflicts(stored, wanted, skip_not_given=False)]


def _latent_identity(run: RunConfig) -> str:
    """How a run's autoencoder is named in a config conflict: pixel space, or its VQ-VAE's weights and latents."""
    if run.latent is None:
        return "none (pixel space)"
    return (f"VQ-VAE sha256 {run.latent.weights_sha256[:12]}, latent {'x'.join(map(str, run.latent.latent_shape))}"
            f", --latent_pad={list(run.latent.latent_pad)}")


# --------------------------------------------------------------------------------------------------------------
# The one resolve-config-or-upstream path


@dataclass(frozen=True)
class ModelFlags:
    """Model/schedule/data flags given explicitly on the command line (None = not given).

    With a ddpm-ood checkpoint they must agree with its stored config; with an upstream checkpoint (no config) they
    define the model, upstream's defaults filling the rest.
    """

    model_type: str | None = None
    is_grayscale: bool | None = None
    spatial_dims: int | None = None
    image_size: int | None = None
    image_roi: tuple[int, ...] | None = None
    channel: int | None = None
    beta_schedule: str | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    prediction_type: str | None = None
    b_scale: float | None = None
    snr_shift: float | None = None
    simplex_noise: bool | None = None


def resolve_run_config(ckpt: dict, flags: ModelFlags, source: Path) -> RunConfig | None:
    """The checkpoint's config, checked against explicit flags; None for an upstream checkpoint (no config)."""
    from ddpm_ood.diffusion.schedule import canonical_schedule_name

    run = run_config_of(ckpt)
    if run is None:
        return None
    given = {("--spatial_dimension" if name == "spatial_dims" else f"--{name}"): value
             for name, value in dataclasses.asdict(flags).items()}
    if flags.beta_schedule is not None:
        given["--beta_schedule"] = canonical_schedule_name(flags.beta_schedule)
    if flags.image_roi is not None:
        given["--image_roi"] = tuple(flags.image_roi)
    if flags.is_grayscale is not None:
        given["--is_grayscale"] = int(flags.is_grayscale)
    if flags.simplex_noise is not None:
        given["--simplex_noise"] = int(flags.simplex_noise)
    conflicts = flag_conflicts(flag_values(run), given, skip_not_given=True)
    if conflicts:
        flag, want, value = conflicts[0]
        raise UserError(f"{flag}={value} contradicts {source} which was trained with {want}; drop the flag")
    return run


def run_config_from_flags(flags: ModelFlags, image_shape: Sequence[int]) -> RunConfig:
    """For upstream checkpoints: the model defined by the flags (upstream defaults otherwise)."""
    from ddpm_ood.diffusion.noise import noise_type_for_flags
    from ddpm_ood.diffusion.unet import model_config_from_preset

    data = data_config_for_upstream(flags)
    schedule = ScheduleConfig(
        beta_schedule=flags.beta_schedule or "linear_beta",
        beta_start=flags.beta_start,
        beta_end=flags.beta_end,
        prediction_type=flags.prediction_type or "epsilon",
        b_scale=flags.b_scale if flags.b_scale is not None else 1.0,
        snr_shift=flags.snr_shift if flags.snr_shift is not None else 1.0,
        noise_type=noise_type_for_flags(bool(flags.simplex_noise), upstream_checkpoint=True),
    )
    model = model_config_from_preset(flags.model_type or "small", data.spatial_dims, data.channels)
    return RunConfig(model=model, schedule=schedule, data=data, image_shape=tuple(image_shape))


def data_config_for_upstream(flags: ModelFlags) -> DataConfig:
    return DataConfig(
        is_grayscale=bool(flags.is_grayscale),
        spatial_dims=flags.spatial_dims or 2,
        image_size=flags.image_size,
        image_roi=flags.image_roi,
        channel=flags.channel or 0,
    )
