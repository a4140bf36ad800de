"""The VQ-VAE of latent diffusion (upstream's LDM route): building it, its upstream ``vqvae_config.json``, loading a
trained one, and the ``Autoencoder`` a latent DDPM works through.

Model space of a latent DDPM = the VQ-VAE's quantised latent (``encode_stage_2_inputs``: encoder, then the nearest
codebook vectors), zero-padded by ``latent_pad`` so the UNet can halve it; decoding removes the padding and
re-quantises before the decoder (``decode_stage_2_outputs``, as the reference does). The VQ-VAE is frozen: eval mode
(its EMA codebook never updates) and no gradients.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_ood.config import DataConfig, LatentConfig, VQVAEConfig
from ddpm_ood.errors import UserError

VQVAE_CONFIG_FILE = "vqvae_config.json"
# Upstream's vqvae_config.json keys (MONAI Generative's VQVAE arguments) -> our VQVAEConfig fields.
_UPSTREAM_KEYS = {
    "spatial_dims": "spatial_dims", "in_channels": "in_channels", "out_channels": "out_channels",
    "num_res_layers": "num_res_layers", "downsample_parameters": "downsample_parameters",
    "upsample_parameters": "upsample_parameters", "num_channels": "channels", "channels": "channels",
    "num_res_channels": "num_res_channels", "num_embeddings": "num_embeddings", "embedding_dim": "embedding_dim",
    "decay": "decay", "commitment_cost": "commitment_cost", "epsilon": "epsilon", "dropout": "dropout",
    "ddp_sync": "ddp_sync",
}


def build_vqvae(config: VQVAEConfig) -> torch.nn.Module:
    """MONAI core ``VQVAE``: images (B, in_channels, *spatial) -> (reconstruction, quantisation loss); latents
    (B, embedding_dim, *spatial / downsampling)."""
    from monai.networks.nets import VQVAE

    return VQVAE(**config.to_dict())


def upstream_config_json(config: VQVAEConfig) -> str:
    """``vqvae_config.json`` as upstream writes it (MONAI Generative's keyword names: ``num_channels``)."""
    d = config.to_dict()
    d["num_channels"] = list(d.pop("channels"))
    return json.dumps(d, indent=2)


def read_vqvae_config_json(path: str | os.PathLike) -> VQVAEConfig:
    """Read a ``vqvae_config.json`` (upstream's, with ``num_channels``, or MONAI core's ``channels``); unknown keys,
    bad JSON or bad values are a UserError naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found (a VQ-VAE checkpoint without a stored configuration needs its "
                        f"{VQVAE_CONFIG_FILE} beside it)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot be read as JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object of VQ-VAE arguments")
    unknown = sorted(k for k in raw if k not in _UPSTREAM_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown VQ-VAE key(s) {', '.join(unknown)}; accepted: "
                        f"{', '.join(sorted(_UPSTREAM_KEYS))}")
    try:
        return VQVAEConfig(**{_UPSTREAM_KEYS[k]: v for k, v in raw.items()})
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: malformed VQ-VAE arguments ({exc})") from None


def weights_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes and bytes, in key order): identifies trained weights."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class VQVAEAutoencoder:
    """A frozen VQ-VAE as the diffusion model's autoencoder.

    ``encode``: images (B, C, *spatial) in [0, 1] -> padded quantised latents (B, embedding_dim, *latent spatial);
    ``decode``: latents -> images (B, C, *spatial), not clamped. Both in fp32 without gradients.
    """

    def __init__(self, model: torch.nn.Module, latent_pad: Sequence[int] = ()) -> None:
        self.model = model.eval().requires_grad_(False)
        self.latent_pad = tuple(int(p) for p in latent_pad)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = self.model.encode_stage_2_inputs(images.float())
        return F.pad(latents, self.latent_pad) if any(self.latent_pad) else latents

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        if any(self.latent_pad):
            samples = F.pad(samples, [-p for p in self.latent_pad])  # negative padding crops
        with torch.no_grad():
            return self.model.decode_stage_2_outputs(samples.float())

    @property
    def sample_range(self) -> tuple[float, float]:
        # Quantised latents are codebook vectors (and the zero padding): their values bound clean samples.
        codebook = self.model.quantizer.quantizer.embedding.weight
        return (min(0.0, float(codebook.min())), max(0.0, float(codebook.max())))

    def __repr__(self) -> str:
        return f"VQVAEAutoencoder(latent_pad={list(self.latent_pad)})"


def latent_spatial(image_spatial: Sequence[int], config: VQVAEConfig) -> tuple[int, ...]:
    """Latent spatial size of an image of this size (a zero tensor through the encoder on the meta device)."""
    with torch.device("meta"):
        model = build_vqvae(config)
        out = model.encode(torch.zeros((1, config.in_channels, *image_spatial)))
    return tuple(int(s) for s in out.shape[2:])


def check_image_fits_vqvae(image_shape: Sequence[int], config: VQVAEConfig, source: str) -> None:
    """UserError naming ``source`` unless images (C, *spatial) go through the VQ-VAE and come back the same size."""
    spatial = tuple(int(s) for s in image_shape[1:])
    if len(spatial) != config.spatial_dims:
        raise UserError(f"{source}: images have {len(spatial)} spatial dimensions {spatial} but the VQ-VAE is "
                        f"{config.spatial_dims}D (--spatial_dimension)")
    if image_shape[0] != config.in_channels:
        raise UserError(f"{source}: images have {image_shape[0]} channel(s) but the VQ-VAE takes {config.in_channels}")
    try:
        with torch.device("meta"):
            model = build_vqvae(config)
            latent = model.encode(torch.zeros((1, config.in_channels, *spatial)))
            out = model.decode(latent)
        same = tuple(out.shape[2:]) == spatial
    except RuntimeError:
        same = False
    if not same:
        raise UserError(f"{source}: image size {'x'.join(map(str, spatial))} does not come back through the VQ-VAE's "
                        f"{len(config.channels)} levels (downsampling x{config.downsampling}); resize with "
                        "--image_size to a multiple of it")


def auto_latent_pad(spatial: Sequence[int], factor: int) -> tuple[int, ...]:
    """``F.pad`` amounts (last dim first) that zero-pad every dim of ``spatial`` up to a multiple of ``factor``,
    split floor/ceil between the two sides."""
    pads: list[int] = []
    for size in reversed(tuple(spatial)):
        extra = math.ceil(size / factor) * factor - size
        pads += [extra // 2, extra - extra // 2]
    return tuple(pads)


def padded_spatial(spatial: Sequence[int], latent_pad: Sequence[int]) -> tuple[int, ...]:
    pads = list(latent_pad) + [0] * (2 * len(spatial) - len(latent_pad))
    return tuple(s + pads[2 * i] + pads[2 * i + 1] for i, s in enumerate(reversed(tuple(spatial))))[::-1]


@dataclass(frozen=True)
class LoadedVQVAE:
    """A trained VQ-VAE read from a checkpoint: the network (eval, CPU), its config, weights hash and, for ours, the
    DataConfig and image shape it was trained on (None for upstream checkpoints)."""

    path: Path
    model: torch.nn.Module
    config: VQVAEConfig
    sha256: str
    data: DataConfig | None
    image_shape: tuple[int, ...] | None


def load_vqvae(path: str | os.PathLike) -> LoadedVQVAE:
    """Load a VQ-VAE checkpoint written by train_vqvae.py (config stored inside) or by the reference code (weights
    only; ``vqvae_config.json`` beside it). Errors name the file: missing, not a VQ-VAE (a DDPM checkpoint), or
    weights that do not fit the configuration."""
    from ddpm_ood.checkpoint import load_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path, kind="vqvae")
    stored = ckpt.get("config")
    data = image_shape = None
    if isinstance(stored, dict):
        try:
            config = VQVAEConfig.from_dict(stored["vqvae"])
            data = DataConfig.from_dict(stored["data"])
            image_shape = tuple(int(s) for s in stored["image_shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: stored VQ-VAE configuration is malformed ({exc.__class__.__name__}: {exc})"
                            ) from None
    else:
        config = read_vqvae_config_json(path.parent / VQVAE_CONFIG_FILE)
    model = build_vqvae(config)
    state = ckpt["model_state_dict"]
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    bad = [k for k in set(state) & set(model.state_dict()) if state[k].shape != model.state_dict()[k].shape]
    if missing or unexpected or bad:
        first = sorted(missing or unexpected or bad)[0]
        raise UserError(f"{path}: weights do not fit its VQ-VAE configuration ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(bad)} of another shape; first {first})")
    model.load_state_dict(state, strict=True)
    return LoadedVQVAE(path, model.eval(), config, weights_hash(state), data, image_shape)


def latent_config(vqvae: LoadedVQVAE, image_shape: Sequence[int], unet_levels: int,
                  latent_pad: Sequence[int] | None, source: str) -> LatentConfig:
    """The LatentConfig of a DDPM trained on ``vqvae``'s latents of images (C, *spatial): channels checked, the
    padding given (``--latent_pad``, F.pad order) or chosen so that the UNet's ``unet_levels - 1`` halvings fit."""
    image_shape = tuple(int(s) for s in image_shape)
    if image_shape[0] != vqvae.config.in_channels:
        raise UserError(f"{source}: images have {image_shape[0]} channel(s) but the VQ-VAE {vqvae.path} takes "
                        f"{vqvae.config.in_channels} (check --is_grayscale)")
    if len(image_shape) - 1 != vqvae.config.spatial_dims:
        raise UserError(f"{source}: images have {len(image_shape) - 1} spatial dimensions but the VQ-VAE "
                        f"{vqvae.path} is {vqvae.config.spatial_dims}D (check --spatial_dimension)")
    if vqvae.image_shape is not None and image_shape != vqvae.image_shape:
        raise UserError(f"{source}: images load as {image_shape} but the VQ-VAE {vqvae.path} was trained on "
                        f"{vqvae.image_shape} (check --image_size / --image_roi)")
    spatial = latent_spatial(image_shape[1:], vqvae.config)
    factor = 2 ** (unet_levels - 1)
    if latent_pad is None:
        pad = auto_latent_pad(spatial, factor)
    else:
        pad = tuple(int(p) for p in latent_pad)
        if len(pad) != 2 * len(spatial) or min(pad) < 0:
            raise UserError(f"--latent_pad={list(pad)}: needs {2 * len(spatial)} values >= 0 (F.pad order: last "
                            f"dim first, before/after), for latents of size {'x'.join(map(str, spatial))}")
    padded = padded_spatial(spatial, pad)
    if any(s % factor for s in padded):
        raise UserError(f"--latent_pad={list(pad)}: padded latent {'x'.join(map(str, padded))} is not divisible by "
                        f"{factor}, as the UNet's {unet_levels - 1} downsamplings need (leave --latent_pad out to "
                        "choose it automatically)")
    return LatentConfig(vqvae=vqvae.config, weights_sha256=vqvae.sha256, checkpoint=str(vqvae.path.resolve()),
                        latent_pad=pad, latent_shape=(vqvae.config.embedding_dim, *padded))
