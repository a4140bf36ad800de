"""A diffusers model folder read offline: a ``UNet2DModel`` (``config.json`` + ``diffusion_pytorch_model
.safetensors`` or ``.bin``) with ``scheduler_config.json`` beside it, or a pipeline folder holding ``unet/`` and
``scheduler/``. A hub id is only the folder the user downloaded (``huggingface-cli download google/ddpm-cifar10-32
--local-dir ...``).

The network class is diffusers' own ``UNet2DModel``, built from the JSON config (only that class: nothing named in
the folder is imported). Weights come from the safetensors file when present, else from the ``.bin`` pickle read
with ``weights_only=True``; the names of diffusers' deprecated attention blocks (``query``/``key``/``value``/
``proj_attn``, as in ``google/ddpm-cifar10-32``) are renamed by diffusers' own rule.

Scheduler (``scheduler_config.json``; the legacy keys of the first diffusers releases are read too: ``timesteps``
for ``num_train_timesteps``, class ``GaussianDDPMScheduler``, ``predict_epsilon`` for ``prediction_type``): betas
as diffusers' schedulers compute them, in float32: ``linear`` torch.linspace(beta_start, beta_end, T),
``scaled_linear`` linspace(sqrt(beta_start), sqrt(beta_end), T)^2, ``squaredcos_cap_v2`` the cosine alpha-bar
betas capped at 0.999, or ``trained_betas`` as given; alphas_cumprod = cumprod(1 - betas) in float32, so ours
equal ``DDPMScheduler``'s bit for bit. ``prediction_type`` epsilon, v_prediction or sample. The data range is
[-1, 1] (diffusers' pipelines feed images as 2x - 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_ood.config import PREDICTION_TYPES
from ddpm_ood.errors import UserError
from ddpm_ood.pretrained.model import (
    SIGNED_UNIT_RANGE,
    GridNetwork,
    PretrainedModel,
    cosine_alpha_bar_betas,
    describe_respacing,
    file_sha256,
    grid_schedule,
    load_strict,
    load_weights,
)

FORMAT = "diffusers"
UNET_CLASS = "UNet2DModel"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Scheduler classes of variance-exploding or other non-DDPM processes: their configs have no betas to read.
NOT_DDPM_SCHEDULERS = ("ScoreSdeVeScheduler", "KarrasVeScheduler", "ScoreSdeVpScheduler")


def is_diffusers_folder(path: Path) -> bool:
    """A UNet folder (``config.json``) or a pipeline folder (``unet/config.json`` or ``model_index.json``)."""
    return path.is_dir() and any((path / name).is_file()
                                 for name in ("config.json", "unet/config.json", "model_index.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


def _folders(path: Path) -> tuple[Path, Path]:
    """(the UNet folder, the scheduler config file) of a UNet or pipeline folder."""
    if (path / "unet").is_dir():
        unet, scheduler = path / "unet", path / "scheduler" / "scheduler_config.json"
    else:
        unet, scheduler = path, path / "scheduler_config.json"
    if not (unet / "config.json").is_file():
        raise UserError(f"{path}: not a diffusers model folder (no config.json, nor unet/config.json)")
    if not scheduler.is_file():
        raise UserError(f"{path}: no scheduler: {scheduler.relative_to(path)} is missing (the noise schedule of "
                        "a diffusers model is in its scheduler_config.json: download it with the model)")
    return unet, scheduler


def read_scheduler(config: dict[str, Any], source: Path) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """(betas (T,) float64 holding float32 values, alphas_cumprod (T,) float64 holding diffusers' float32 cumprod,
    prediction type, the settings read) of a diffusers scheduler config, legacy keys included; UserError naming
    ``source`` for a schedule it cannot compute."""
    name = str(config.get("_class_name", ""))
    if name in NOT_DDPM_SCHEDULERS:
        raise UserError(f"{source}: {name} is not a DDPM (variance-preserving) noise schedule; only DDPM-type "
                        "models are supported")
    steps = int(config.get("num_train_timesteps", config.get("timesteps", 1000)))
    if "prediction_type" in config:
        prediction = str(config["prediction_type"])
    else:
        prediction = "epsilon" if config.get("predict_epsilon", True) else "sample"
    if prediction not in PREDICTION_TYPES:
        raise UserError(f"{source}: prediction_type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if config.get("rescale_betas_zero_snr"):
        raise UserError(f"{source}: rescale_betas_zero_snr=true is not supported")
    trained = config.get("trained_betas")
    schedule = str(config.get("beta_schedule", "linear"))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float32)
        if betas.ndim != 1 or len(betas) != steps:
            raise UserError(f"{source}: trained_betas has {betas.numel()} values for {steps} timesteps")
        schedule = "trained_betas"
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = torch.tensor(cosine_alpha_bar_betas(steps), dtype=torch.float32)
    else:
        raise UserError(f"{source}: beta_schedule {schedule!r} is not supported; accepted: "
                        f"{', '.join(BETA_SCHEDULES)} or trained_betas")
    acp = torch.cumprod(1.0 - betas, dim=0)
    settings = {"scheduler": name, "num_train_timesteps": steps, "beta_schedule": schedule,
                "prediction_type": prediction}
    if schedule in ("linear", "scaled_linear"):
        settings.update(beta_start=start, beta_end=end)
    return betas.double().numpy(), acp.double().numpy(), prediction, settings


def _check_unconditional(config: dict[str, Any], source: Path) -> None:
    name = str(config.get("_class_name", UNET_CLASS))
    if "Condition" in name or name in ("PriorTransformer", "UNet2DConditionModel"):
        raise UserError(f"{source}: {name} is a conditional model (text or class); only unconditional models "
                        "are supported")
    if name != UNET_CLASS:
        raise UserError(f"{source}: model class {name!r}; only diffusers' {UNET_CLASS} is supported")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise UserError(f"{source}: a class-conditional {UNET_CLASS} (num_class_embeds / class_embed_type); only "
                        "unconditional models are supported")


def _weights_file(unet: Path) -> Path:
    for name in WEIGHT_FILES:
        if (unet / name).is_file():
            return unet / name
    raise UserError(f"{unet}: no weights ({' or '.join(WEIGHT_FILES)})")


def _call(network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return network(x, t, return_dict=False)[0]


def read_diffusers(path: str | Path) -> PretrainedModel:
    """The diffusers model in folder ``path`` (module doc); UserError naming the file for anything unreadable,
    conditional or unsupported."""
    from diffusers import UNet2DModel

    path = Path(path)
    unet_dir, scheduler_file = _folders(path)
    unet_config = _read_json(unet_dir / "config.json")
    _check_unconditional(unet_config, unet_dir / "config.json")
    betas, acp, prediction, settings = read_scheduler(_read_json(scheduler_file), scheduler_file)
    size = unet_config.get("sample_size")
    size = size if isinstance(size, (list, tuple)) else [size, size]
    if size[0] is None:
        raise UserError(f"{unet_dir / 'config.json'}: no sample_size: the model's image size is unknown")
    channels = int(unet_config.get("in_channels", 3))
    out_channels = int(unet_config.get("out_channels", channels))
    if out_channels not in (channels, 2 * channels):
        raise UserError(f"{unet_dir / 'config.json'}: {out_channels} output channels for {channels} input "
                        "channels (expected as many, or twice as many with learned variances)")
    try:
        network = UNet2DModel.from_config({k: v for k, v in unet_config.items() if not k.startswith("_")})
    except (TypeError, ValueError) as exc:
        raise UserError(f"{unet_dir / 'config.json'}: not a valid {UNET_CLASS} config ({exc})") from None
    weights = _weights_file(unet_dir)
    state = load_weights(weights)
    fix = getattr(network, "_fix_state_dict_keys_on_load", None)
    if fix is not None:  # diffusers' own renaming of its deprecated attention blocks' parameters
        fix(state)
    load_strict(network, state, str(weights), f"{unet_dir / 'config.json'}")
    network.eval()
    schedule, steps = grid_schedule(betas, prediction, model_alphas_cumprod=acp)
    return PretrainedModel(
        format=FORMAT, path=path, weights_sha256=file_sha256(weights), flags=settings,
        model_steps=len(betas), respacing=describe_respacing(len(betas)),
        image_shape=(channels, int(size[0]), int(size[1])), data_range=SIGNED_UNIT_RANGE, schedule=schedule,
        network=GridNetwork(network, steps, channels, _call),
    )
