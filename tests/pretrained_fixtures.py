"""Tiny published models written as their codebases write them: diffusers folders (``save_pretrained``) and openai
``.pt`` state dicts, random weights, 8x8..32x32 images."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ddpm_ood.pretrained.openai_format import parse_flags, resolve_flags, unet_config
from ddpm_ood.pretrained.openai_unet import OpenAIUNet

# A small improved-diffusion model: 32x32 (channel_mult 1,2,2,2 by its size), 32 channels, attention at 16x16.
TINY_OPENAI_FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 "
                     "--num_heads 2 --learn_sigma True --diffusion_steps 4000 --noise_schedule cosine")


def save_diffusers_unet(folder: Path, *, channels: int = 3, attention: bool = True, size: int = 8,
                        prediction_type: str = "epsilon", seed: int = 0, scheduler: dict | None = None,
                        pipeline: bool = False, safetensors: bool = True, out_channels: int | None = None):
    """A random-weight ``UNet2DModel`` (8/16 channels, attention at the second level or none) saved with
    ``save_pretrained``, and its ``DDPMScheduler`` config (``scheduler`` overrides its arguments); in a pipeline
    layout (``unet/``, ``scheduler/``) with ``pipeline``. Returns the model (eval mode)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=out_channels or channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"),
    ).eval()
    unet_dir = folder / "unet" if pipeline else folder
    model.save_pretrained(unet_dir, safe_serialization=safetensors)
    args = {"num_train_timesteps": 1000, "prediction_type": prediction_type, **(scheduler or {})}
    DDPMScheduler(**args).save_pretrained(folder / "scheduler" if pipeline else folder)
    if pipeline:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return model


def openai_network(flags_text: str = TINY_OPENAI_FLAGS, seed: int = 0) -> OpenAIUNet:
    """Our OpenAIUNet of ``flags_text`` with every parameter random (the published models zero-initialise some
    convolutions, which would hide errors)."""
    _, flags = resolve_flags(parse_flags(flags_text))
    torch.manual_seed(seed)
    net = OpenAIUNet(unet_config(flags)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return net


def save_openai(path: Path, flags_text: str = TINY_OPENAI_FLAGS, seed: int = 0) -> OpenAIUNet:
    """``openai_network`` saved as the openai scripts save theirs: ``torch.save(model.state_dict(), path)``."""
    net = openai_network(flags_text, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net
