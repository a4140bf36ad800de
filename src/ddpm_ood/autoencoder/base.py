"""The autoencoder seam: the diffusion model works in "model space", an autoencoder maps images there and back.

Pixel-space diffusion is the identity autoencoder scaled by upstream's ``b_scale`` (data are multiplied by it before
noising); latent diffusion (a VQ-VAE) plugs in the same way. Training encodes its batches, reconstruction encodes,
noises and denoises in model space (no clamping there), decodes, and only then clamps to the image range, so neither
asks "latent or not". ``autoencoder_for`` is the one place that picks the autoencoder of a run.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

import torch

from ddpm_ood.autoencoder.vqvae import LoadedVQVAE, VQVAEAutoencoder, load_vqvae
from ddpm_ood.errors import UserError

if TYPE_CHECKING:
    from ddpm_ood.config import RunConfig


class Autoencoder(Protocol):
    """``encode``: images (B, C, *spatial) float32 in [0, 1] -> model-space samples (B, C', *spatial'), which the
    diffusion model noises and denoises; ``decode``: model-space samples -> images (B, C, *spatial), not clamped."""

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, samples: torch.Tensor) -> torch.Tensor: ...

    @property
    def sample_range(self) -> tuple[float, float]:
        """(low, high) that bounds clean model-space samples, for samplers that clip their x0 estimate."""
        ...


class IdentityAutoencoder:
    """Pixel space: ``encode(x) = b_scale * x``, ``decode(z) = z / b_scale`` (b_scale > 0; upstream's knob, 1 by
    default). The only place ``b_scale`` is applied."""

    def __init__(self, b_scale: float = 1.0) -> None:
        if not b_scale > 0:
            raise ValueError(f"b_scale must be > 0, got {b_scale}")
        self.b_scale = float(b_scale)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.b_scale

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return samples / self.b_scale

    @property
    def sample_range(self) -> tuple[float, float]:
        # Images in [0, 1] live in [0, b_scale]; MONAI's default clip is [-1, 1], kept when it is wider.
        return (-max(1.0, self.b_scale), max(1.0, self.b_scale))

    def __repr__(self) -> str:
        return f"IdentityAutoencoder(b_scale={self.b_scale:g})"


class RangeAutoencoder:
    """Pixel space of a published model (``ddpm_ood.pretrained``) that expects its data in [low, high] ([-1, 1] for
    diffusers and openai models): ``encode(x) = low + (high - low) x`` maps images in [0, 1] onto that range,
    ``decode`` inverts it. ``IdentityAutoencoder(b)`` is the same map for the range [0, b]."""

    def __init__(self, low: float, high: float) -> None:
        if not low < high:
            raise ValueError(f"a data range needs low < high, got ({low}, {high})")
        self.low, self.high = float(low), float(high)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * images

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return (samples - self.low) / (self.high - self.low)

    @property
    def sample_range(self) -> tuple[float, float]:
        return (self.low, self.high)

    def __repr__(self) -> str:
        return f"RangeAutoencoder([{self.low:g}, {self.high:g}])"


def to_image(decoded: torch.Tensor) -> torch.Tensor:
    """Decoded samples clamped to the image range [0, 1] (where reconstructions are measured)."""
    return decoded.clamp(0.0, 1.0)


def autoencoder_for(run: RunConfig, device: torch.device | str = "cpu", *,
                    vqvae_checkpoint: str | os.PathLike | None = None, loaded: LoadedVQVAE | None = None,
                    source: str = "checkpoint") -> Autoencoder:
    """The autoencoder a run's diffusion model works with, on ``device``.

    Pixel space: the identity scaled by the schedule's ``b_scale``. Latent space: the VQ-VAE the run was trained on,
    read from ``vqvae_checkpoint`` if given, else from where it was at training time; its weights must hash to the
    recorded ones (UserError naming both files otherwise); ``loaded``: that VQ-VAE when the caller has already read
    it (it is then not read and hashed again). ``source`` names the diffusion checkpoint in errors.
    """
    if run.latent is None:
        if vqvae_checkpoint is not None:
            raise UserError(f"--vqvae_checkpoint={vqvae_checkpoint}: {source} is a pixel-space DDPM (trained "
                            "without a VQ-VAE); drop the flag")
        return IdentityAutoencoder(run.schedule.b_scale)
    path = vqvae_checkpoint if vqvae_checkpoint is not None else run.latent.checkpoint
    if loaded is None and vqvae_checkpoint is None and not os.path.isfile(path):
        raise UserError(f"{path}: not found: the VQ-VAE {source} was trained on (recorded there) has moved or gone; "
                        "give its location with --vqvae_checkpoint")
    vqvae = loaded if loaded is not None else load_vqvae(path)
    if vqvae.sha256 != run.latent.weights_sha256 or vqvae.config != run.latent.vqvae:
        what = "configuration" if vqvae.config != run.latent.vqvae else "weights"
        raise UserError(f"{path}: VQ-VAE {what} differ from the one {source} was trained on "
                        f"({run.latent.checkpoint}, weights sha256 {run.latent.weights_sha256[:12]}); "
                        "reconstruct with that VQ-VAE or retrain the DDPM")
    return VQVAEAutoencoder(vqvae.model.to(device), run.latent.latent_pad, run.schedule.b_scale,
                            run.latent.vqvae.downsampling)
