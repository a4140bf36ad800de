"""Model presets and the one UNet builder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddpm_ood.config import ModelConfig
from ddpm_ood.errors import UserError

if TYPE_CHECKING:
    import torch

# small/big exactly as upstream; tiny for CPU runs and tests; tiny_fast (tiny's channels, attention only at the
# lowest resolution) for the quickstart: 1.3x faster training and a 1.5x faster forward pass on a CPU.
MODEL_PRESETS: dict[str, dict] = {
    "small": {
        "channels": (128, 256, 256),
        "attention_levels": (False, False, True),
        "num_res_blocks": 1,
        "num_head_channels": 256,
        "norm_num_groups": 32,
    },
    "big": {
        "channels": (256, 512, 768),
        "attention_levels": (True, True, True),
        "num_res_blocks": 2,
        "num_head_channels": 256,
        "norm_num_groups": 32,
    },
    "tiny": {
        "channels": (32, 64, 64),
        "attention_levels": (False, True, True),
        "num_res_blocks": 1,
        "num_head_channels": 64,
        "norm_num_groups": 32,
    },
    "tiny_fast": {
        "channels": (32, 64, 64),
        "attention_levels": (False, False, True),
        "num_res_blocks": 1,
        "num_head_channels": 64,
        "norm_num_groups": 32,
    },
}


def model_config_from_preset(preset: str, spatial_dims: int, in_channels: int) -> ModelConfig:
    if preset not in MODEL_PRESETS:
        raise UserError(f"unknown --model_type {preset!r}; accepted: {', '.join(MODEL_PRESETS)}")
    return ModelConfig(preset=preset, spatial_dims=spatial_dims, in_channels=in_channels, **MODEL_PRESETS[preset])


def randomize_zero_init_convs(model):
    """Give MONAI's zero-initialised convs (the output conv, the last conv of every residual block) PyTorch's default
    random init, in place, from the global torch RNG; returns the model.

    An untrained MONAI UNet predicts exactly 0 for every input, so tests and benchmarks on one would never exercise
    the network (two samplers would agree trivially). Never used on a model that is trained or loaded.
    """
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd) and not module.weight.any():
            module.reset_parameters()
    return model


def build_unet(config: ModelConfig, *, fused_attention: bool = False):
    """MONAI core DiffusionModelUNet, unconditioned, in_channels == out_channels.

    Forward: (x: (B, C, *spatial) float, timesteps: (B,) long in [0, num_train_timesteps)) -> (B, C, *spatial).
    Spatial sizes must be divisible by 2 ** (len(channels) - 1). ``fused_attention``: attention through PyTorch's
    scaled_dot_product_attention (MONAI's ``use_flash_attention``), whose fused kernels keep the softmax in fp32, so
    fp16 attention cannot overflow (MONAI's plain einsum attention ignores ``upcast_attention`` in these blocks).
    Same weights and state-dict keys either way; used on CUDA (``wants_fused_attention``), where fp16 runs.
    """
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(
        spatial_dims=config.spatial_dims,
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        channels=config.channels,
        attention_levels=config.attention_levels,
        num_res_blocks=config.num_res_blocks,
        num_head_channels=config.num_head_channels,
        norm_num_groups=config.norm_num_groups,
        use_flash_attention=fused_attention,
    )


def wants_fused_attention(device: torch.device | str) -> bool:
    """Fused (SDPA) attention on CUDA; on a CPU the plain attention keeps the numbers every test and table was made
    with (SDPA did not pay there: benchmarks/README.md)."""
    return getattr(device, "type", str(device)) == "cuda"


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
