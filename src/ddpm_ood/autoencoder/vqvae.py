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

from ddpm_ood.config import DataConfig, LatentConfig, RunConfig, VQVAEConfig
from ddpm_ood.errors import UserError, one_line

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
    (B, embedding_dim, *spatial / downsampling). Its quantiser always runs in fp32 (see ``_fp32_forward``)."""
    from monai.networks.nets import VQVAE

    model = VQVAE(**config.to_dict())
    model.quantizer.forward = _fp32_forward(model.quantizer.forward)
    return model


def _fp32_forward(forward):
    """``forward`` with autocast off and fp32 inputs. MONAI's quantiser turns off CUDA autocast only: under CPU bf16
    autocast its code distances and EMA codebook updates would run in bf16 and could pick other codes. Set on the
    instance, so the state-dict keys stay MONAI's."""

    def fp32_forward(inputs: torch.Tensor):
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            return forward(inputs.float())

    return fp32_forward


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
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Voxels (pixels) per VQ-VAE call when encoding or decoding: the full-resolution activations of the first and last
# levels dominate memory (a 128^3 volume at 256 channels is 2 GiB in fp32), so calls are chunked by image size.
VOXELS_PER_CALL = 2**20


class VQVAEAutoencoder:
    """A frozen VQ-VAE as the diffusion model's autoencoder.

    ``encode``: images (B, C, *spatial) in [0, 1] -> ``b_scale`` times the padded quantised latents (B, embedding_dim,
    *latent spatial); ``decode``: latents -> divided by ``b_scale``, crop, re-quantise, decode -> images (B, C,
    *spatial), not clamped. Both in fp32 without gradients, in chunks of at most ``VOXELS_PER_CALL`` image voxels.
    (Upstream multiplies latents by b_scale too, but divides the decoded image instead of the latent.)
    """

    def __init__(self, model: torch.nn.Module, latent_pad: Sequence[int] = (), b_scale: float = 1.0,
                 downsampling: int = 1) -> None:
        if not b_scale > 0:
            raise ValueError(f"b_scale must be > 0, got {b_scale}")
        self.model = model.eval().requires_grad_(False)
        self.downsampling = int(downsampling)  # image side / latent side (VQVAEConfig.downsampling), for chunk sizes
        self.latent_pad = tuple(int(p) for p in latent_pad)
        self.b_scale = float(b_scale)

    def _chunks(self, x: torch.Tensor, voxels_per_item: int) -> list[torch.Tensor]:
        return list(torch.split(x, max(1, VOXELS_PER_CALL // max(voxels_per_item, 1))))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = torch.cat([self.model.encode_stage_2_inputs(chunk.float())
                                 for chunk in self._chunks(images, images[0].numel())])
        latents = F.pad(latents, self.latent_pad) if any(self.latent_pad) else latents
        return latents * self.b_scale if self.b_scale != 1.0 else latents

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        samples = samples / self.b_scale if self.b_scale != 1.0 else samples
        if any(self.latent_pad):
            samples = F.pad(samples, [-p for p in self.latent_pad])  # negative padding crops
        factor = self.downsampling ** (samples.ndim - 2)
        with torch.no_grad():
            return torch.cat([self.model.decode_stage_2_outputs(chunk.float())
                              for chunk in self._chunks(samples, samples[0, :1].numel() * factor)])

    @property
    def sample_range(self) -> tuple[float, float]:
        # Quantised latents are codebook vectors (and the zero padding), times b_scale: they bound clean samples.
        codebook = self.model.quantizer.quantizer.embedding.weight
        return (self.b_scale * min(0.0, float(codebook.min())), self.b_scale * max(0.0, float(codebook.max())))

    def __repr__(self) -> str:
        return f"VQVAEAutoencoder(latent_pad={list(self.latent_pad)}, b_scale={self.b_scale:g})"


def check_image_fits_vqvae(image_shape: Sequence[int], config: VQVAEConfig, source: str) -> tuple[int, ...]:
    """The latent spatial size of images (C, *spatial), from a dry run on the meta device; UserError naming ``source``
    unless the images go through the VQ-VAE and come back the same size."""
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
    return tuple(int(s) for s in latent.shape[2:])


def auto_latent_pad(spatial: Sequence[int], factor: int) -> tuple[int, ...]:
    """``F.pad`` amounts (last dim first) that zero-pad every dim of ``spatial`` up to a multiple of ``factor``,
    split floor/ceil between the two sides."""
    pads: list[int] = []
    for size in reversed(tuple(spatial)):
        extra = math.ceil(size / factor) * factor - size
        pads += [extra // 2, extra - extra // 2]
    return tuple(pads)


def padded_spatial(spatial: Sequence[int], latent_pad: Sequence[int]) -> tuple[int, ...]:
    """Spatial size after ``F.pad(latent_pad)`` (last dim first, (before, after) pairs; missing pairs are 0)."""
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
    from ddpm_ood.checkpoint import load_checkpoint, load_state_strict

    path = Path(path)
    ckpt = load_checkpoint(path, kind="vqvae")
    stored = ckpt.get("config")
    data = image_shape = None
    if isinstance(stored, dict):
        try:
            config = VQVAEConfig.from_dict(stored["vqvae"])
            data = DataConfig.from_dict(stored["data"])
            image_shape = tuple(int(s) for s in stored["image_shape"])
        except (KeyError, TypeError, ValueError, UserError) as exc:
            raise UserError(f"{path}: stored VQ-VAE configuration is malformed ({one_line(exc)})") from None
    else:
        config = read_vqvae_config_json(path.parent / VQVAE_CONFIG_FILE)
    try:
        model = build_vqvae(config)
    except (TypeError, ValueError, AssertionError) as exc:  # MONAI's checks of the configuration
        raise UserError(f"{path}: its VQ-VAE configuration does not build ({one_line(exc)})") from None
    state = load_state_strict(model, ckpt["model_state_dict"], str(path), "its VQ-VAE configuration")
    return LoadedVQVAE(path, model.eval(), config, weights_hash(state), data, image_shape)


def latent_config(vqvae: LoadedVQVAE, image_shape: Sequence[int], unet_levels: int,
                  latent_pad: Sequence[int] | None, source: str, data: DataConfig | None = None) -> LatentConfig:
    """The LatentConfig of a DDPM trained on ``vqvae``'s latents of images (C, *spatial) loaded with ``data``:
    images checked against the VQ-VAE (shape, channels, round trip, BraTS channel), the padding given
    (``--latent_pad``, F.pad order) or chosen so that the UNet's ``unet_levels - 1`` halvings fit."""
    image_shape = tuple(int(s) for s in image_shape)
    if vqvae.image_shape is not None and image_shape != vqvae.image_shape:
        raise UserError(f"{source}: images load as {image_shape} but the VQ-VAE {vqvae.path} was trained on "
                        f"{vqvae.image_shape} (check --is_grayscale / --spatial_dimension / --image_size / "
                        "--image_roi)")
    if vqvae.data is not None and data is not None:
        # The same shape is not the same data: a crop then resize (--image_roi) or another BraTS channel would feed
        # the VQ-VAE images it never saw.
        from ddpm_ood.run_flags import data_flag_values, flag_conflicts

        conflicts = flag_conflicts(data_flag_values(vqvae.data), data_flag_values(data), skip_not_given=False)
        if conflicts:
            raise UserError("; ".join(f"{flag}={given}: the VQ-VAE {vqvae.path} was trained with {flag}={stored}"
                                      for flag, stored, given in conflicts) + " (give its data flags)")
    spatial = check_image_fits_vqvae(image_shape, vqvae.config, f"{source} (VQ-VAE {vqvae.path})")
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


def with_latent(run: RunConfig, vqvae: LoadedVQVAE, latent_pad: Sequence[int] | None, source: str) -> RunConfig:
    """``run`` (built for pixel space) moved into ``vqvae``'s latent space: the UNet takes ``embedding_dim`` channels
    and the run records the VQ-VAE (``latent_config``). The one place a latent run configuration is assembled."""
    import dataclasses

    model = dataclasses.replace(run.model, in_channels=vqvae.config.embedding_dim)
    latent = latent_config(vqvae, run.image_shape, len(model.channels), latent_pad, source, run.data)
    return dataclasses.replace(run, model=model, latent=latent)
