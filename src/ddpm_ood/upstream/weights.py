"""Loading UNet weights as the reference code saved them (MONAI Generative key names), and naming the flags an
upstream checkpoint needs when the given ones do not fit it.

Upstream checkpoints carry no configuration, so the UNet is built from the flags and the weights must fit it;
``DiffusionModelUNet.load_old_state_dict`` converts Generative's key names to MONAI core's.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping

import torch

from ddpm_ood.checkpoint import strip_module_prefix
from ddpm_ood.diffusion.unet import MODEL_PRESETS, build_unet, model_config_from_preset
from ddpm_ood.errors import UserError


def is_upstream_checkpoint(ckpt: Mapping[str, object]) -> bool:
    """True for a checkpoint written by the reference code: epoch, global_step, weights (MONAI Generative key
    names), optimizer state and best (TRAIN) loss, but no stored configuration."""
    return ckpt.get("config") is None


def _shape_signature(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Sorted tensor shapes: identifies an architecture independently of key names (old and new names differ)."""
    return sorted(tuple(v.shape) for v in state_dict.values())


def guess_model_flags(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Which preset/grayscale/dimension flags build a UNet with exactly these tensor shapes, e.g.
    ``--model_type=small --is_grayscale=1 --spatial_dimension=2``; None if no preset fits."""
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
