"""An improved-diffusion or guided-diffusion checkpoint: a ``.pt`` state dict plus the model and diffusion flags
its README prints (the file stores no architecture).

Flags are given as one string (``--image_size 32 --num_channels 128 ...``, ``--flag=value`` too, as the READMEs'
MODEL_FLAGS and DIFFUSION_FLAGS print them) or as a small JSON file ({"image_size": 32, ...}). Flags not given take
their codebase's defaults, which differ: improved-diffusion rescales timesteps by default
(``rescale_timesteps=True``), guided-diffusion does not. The codebase is guided-diffusion when a flag only it has
is given (``num_head_channels``, ``resblock_updown``, ``use_fp16``, ``use_new_attention_order``,
``channel_mult``), else improved-diffusion; ``--codebase=guided-diffusion`` (ours, not theirs) says it outright.

Diffusion: ``noise_schedule`` linear (betas from 1e-4 to 0.02 scaled by 1000 / T, float64) or cosine (Nichol &
Dhariwal eq. 17); T = ``diffusion_steps``, respaced onto the 1000-step grid (``model.grid_steps``). The network
predicts eps (x0 with ``predict_xstart``); ``learn_sigma`` adds C variance channels, dropped. ``class_cond``
models are refused (unconditional only). Images are in [-1, 1].
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

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
from ddpm_ood.pretrained.openai_unet import (
    OpenAIUNet,
    OpenAIUNetConfig,
    attention_rates,
    default_channel_mult,
)

IMPROVED, GUIDED = "improved-diffusion", "guided-diffusion"
# Each codebase's defaults (their script_util.py model_and_diffusion_defaults), for the flags that matter here.
_COMMON = {"image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
           "attention_resolutions": "16,8", "dropout": 0.0, "learn_sigma": False, "class_cond": False,
           "diffusion_steps": 1000, "noise_schedule": "linear", "use_scale_shift_norm": True, "predict_xstart": False}
DEFAULTS = {
    IMPROVED: {**_COMMON, "rescale_timesteps": True},
    GUIDED: {**_COMMON, "rescale_timesteps": False, "num_head_channels": -1, "channel_mult": "",
             "resblock_updown": False, "use_fp16": False, "use_new_attention_order": False},
}
GUIDED_ONLY = ("num_head_channels", "channel_mult", "resblock_updown", "use_fp16", "use_new_attention_order")
# Flags that do not change the network's noise estimate (training, sampling or variance settings): accepted, kept
# in the record, otherwise unused.
IGNORED = ("sigma_small", "use_kl", "rescale_learned_sigmas", "use_checkpoint", "timestep_respacing",
           "batch_size", "num_samples", "use_ddim", "clip_denoised", "model_path")
NOISE_SCHEDULES = ("linear", "cosine")
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_flags(text: str | Mapping[str, Any] | None, source: str = "--pretrained_flags") -> dict[str, Any]:
    """The flags of ``text``: a path to a JSON object, or a string of ``--name value`` / ``--name=value``
    pairs; values stay strings from a string (``resolve_flags`` converts them); a mapping (a sidecar's record)
    is taken as it is. UserError naming ``source``."""
    if isinstance(text, Mapping):
        return {str(k).lstrip("-"): v for k, v in text.items()}
    if text is None or not str(text).strip():
        raise UserError(f"{source}: an openai checkpoint stores no architecture: give the model and diffusion "
                        "flags its README prints, e.g. --pretrained_flags=\"--image_size 32 --num_channels 128 "
                        "--num_res_blocks 3 --learn_sigma True --diffusion_steps 4000 --noise_schedule cosine\"")
    text = str(text).strip()
    if text.endswith(".json") and not text.startswith("-"):
        try:
            data = json.loads(Path(text).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{text}: cannot be read as a JSON flags file ({exc})") from None
        if not isinstance(data, dict):
            raise UserError(f"{text}: a flags file is a JSON object of flag names and values")
        return {str(k).lstrip("-"): v for k, v in data.items()}
    words, flags = shlex.split(text), {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise UserError(f"{source}: expected --name value pairs, got {word!r}")
        if "=" in word:
            name, value = word[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(words) or words[i + 1].startswith("--"):
                raise UserError(f"{source}: {word} has no value")
            name, value = word[2:], words[i + 1]
            i += 2
        flags[name] = value
    return flags


def _as(kind: type, name: str, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        v = str(value).strip().lower()
        if v not in _BOOL:
            raise UserError(f"--pretrained_flags: --{name} expects True or False, got {value!r}")
        return _BOOL[v]
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"--pretrained_flags: --{name} expects {kind.__name__}, got {value!r}") from None


def resolve_flags(given: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(codebase, every flag with its value: the given ones converted, the codebase's defaults for the rest).
    Unknown flags and class-conditional models are refused."""
    given = dict(given)
    codebase = given.pop("codebase", None)
    if codebase is None:
        codebase = GUIDED if any(k in given for k in GUIDED_ONLY) else IMPROVED
    if codebase not in DEFAULTS:
        raise UserError(f"--pretrained_flags: --codebase must be {IMPROVED} or {GUIDED}, got {codebase!r}")
    defaults = DEFAULTS[codebase]
    unknown = [k for k in given if k not in defaults and k not in IGNORED]
    if unknown:
        raise UserError(f"--pretrained_flags: unknown flag --{unknown[0]} for {codebase}; accepted: "
                        f"{', '.join(sorted(defaults))} (and, unused: {', '.join(IGNORED)})")
    flags = {}
    for name, default in defaults.items():
        value = given.get(name, default)
        kind = type(default)
        flags[name] = _as(kind, name, value) if name in given else default
    if flags["class_cond"]:
        raise UserError("--pretrained_flags: --class_cond True is a class-conditional model; only unconditional "
                        "models are supported")
    if flags["noise_schedule"] not in NOISE_SCHEDULES:
        raise UserError(f"--pretrained_flags: --noise_schedule must be one of {', '.join(NOISE_SCHEDULES)}, got "
                        f"{flags['noise_schedule']!r}")
    return codebase, flags


def unet_config(flags: dict[str, Any]) -> OpenAIUNetConfig:
    """The network of resolved ``flags`` (``resolve_flags``)."""
    size = flags["image_size"]
    mult_flag = str(flags.get("channel_mult", "") or "")
    mult = tuple(float(m) for m in mult_flag.split(",")) if mult_flag else default_channel_mult(size)
    if mult is None:
        raise UserError(f"--pretrained_flags: no default channel multipliers for --image_size {size}; give "
                        "--channel_mult")
    try:
        rates = attention_rates(size, [r for r in str(flags["attention_resolutions"]).split(",") if r.strip()])
    except ValueError:
        raise UserError(f"--pretrained_flags: --attention_resolutions must be comma-separated integers, got "
                        f"{flags['attention_resolutions']!r}") from None
    return OpenAIUNetConfig(
        image_size=size, model_channels=flags["num_channels"], out_channels=6 if flags["learn_sigma"] else 3,
        num_res_blocks=flags["num_res_blocks"], attention_ds=rates, channel_mult=mult, num_heads=flags["num_heads"],
        num_head_channels=flags.get("num_head_channels", -1), num_heads_upsample=flags["num_heads_upsample"],
        use_scale_shift_norm=flags["use_scale_shift_norm"], resblock_updown=flags.get("resblock_updown", False),
        use_new_attention_order=flags.get("use_new_attention_order", False), dropout=flags["dropout"])


def model_betas(flags: dict[str, Any]) -> np.ndarray:
    """(T,) float64 betas of ``noise_schedule`` over ``diffusion_steps`` (module doc)."""
    steps = flags["diffusion_steps"]
    if flags["noise_schedule"] == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    return cosine_alpha_bar_betas(steps)


def _call(network, x, t):
    return network(x, t)


def read_openai(path: str | Path, flags_text: str | Mapping[str, Any] | None) -> PretrainedModel:
    """The openai checkpoint ``path`` (``.pt``) with its flags (module doc); UserError naming the file for an
    unreadable or unsafe pickle, flags that do not match the state dict (the first mismatching key, both
    shapes), or a conditional model."""
    path = Path(path)
    codebase, flags = resolve_flags(parse_flags(flags_text))
    state = load_weights(path)
    if "label_emb.weight" in state:
        raise UserError(f"{path}: a class-conditional model (it has label_emb.weight); only unconditional models "
                        "are supported")
    try:
        network = OpenAIUNet(unet_config(flags))
    except ValueError as exc:  # e.g. channels that GroupNorm(32) or the attention heads cannot split
        raise UserError(f"--pretrained_flags: these flags give no valid network ({exc})") from None
    load_strict(network, state, str(path), "the architecture of the flags given")
    network.eval()
    betas = model_betas(flags)
    schedule, steps = grid_schedule(betas, "sample" if flags["predict_xstart"] else "epsilon")
    time_scale = 1000.0 / len(betas) if flags["rescale_timesteps"] else None
    size = flags["image_size"]
    return PretrainedModel(
        format=codebase, path=path, weights_sha256=file_sha256(path), flags=flags, model_steps=len(betas),
        respacing=describe_respacing(len(betas)), image_shape=(3, size, size), data_range=SIGNED_UNIT_RANGE,
        schedule=schedule, network=GridNetwork(network, steps, 3, _call, time_scale),
    )
