"""The one way to open a trained run: checkpoint -> configuration -> autoencoder -> network on a device at a
precision. The reconstruction stage, ``OODScorer`` (score.py) and the benchmarks all open runs here.

Two steps, because an upstream checkpoint (no stored configuration) is only complete once its images are known:

1. ``open_run(checkpoint, flags)``: read the checkpoint; a ddpm-ood checkpoint's stored configuration is checked
   against the flags given (a contradicting flag is refused), an upstream checkpoint's is built from the flags
   (``upstream.flags``) once ``with_image_shape`` names its image shape. ``TrainedRun.data`` says how to read images.
2. ``load_run_model(run, device, precision=...)``: the UNet (EMA weights by default) and the autoencoder on the
   device, as a ``RunModel`` whose ``eps_fn`` every sampler, inversion and score family calls.

The model-source seam: a published model (diffusers, improved-diffusion, guided-diffusion; ``ddpm_ood.pretrained``)
is opened with ``open_pretrained_run`` into the same ``TrainedRun`` (its configuration describes it: the 1000-step
grid schedule, its image shape, how images are read) and loaded by the same ``load_run_model`` into the same
``RunModel``: the noise estimate on the grid, the schedule, the autoencoder that maps images in [0, 1] to the
model's data range, the sample shape. Only this module asks which source a run has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm_ood.autoencoder.base import Autoencoder, RangeAutoencoder, autoencoder_for
from ddpm_ood.autoencoder.vqvae import LoadedVQVAE, load_vqvae, with_latent
from ddpm_ood.checkpoint import inference_state_dict, load_checkpoint, run_config_of
from ddpm_ood.config import DataConfig, ModelConfig, RunConfig, ScheduleConfig
from ddpm_ood.devices import autocast_context, memory_sized_max_batch
from ddpm_ood.diffusion.eps import EpsFn, model_eps_fn
from ddpm_ood.diffusion.unet import build_unet, wants_fused_attention
from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.pretrained import PretrainedModel, open_pretrained
from ddpm_ood.results.run_dir import RunDir
from ddpm_ood.run_flags import RunFlags, check_flags
from ddpm_ood.upstream.flags import data_config_for_upstream, given_path, run_config_from_flags
from ddpm_ood.upstream.weights import is_upstream_checkpoint, load_unet_state


@dataclass(frozen=True)
class TrainedRun:
    """A DDPM checkpoint read from ``path``, with its configuration.

    ``config``: the stored RunConfig (checked against ``flags``), or for an upstream checkpoint the one its flags
    define, None until ``with_image_shape`` gives the image shape. ``vqvae``: a VQ-VAE already loaded while opening
    (an upstream latent checkpoint's), reused so it is read and hashed once. ``vqvae_checkpoint``: where a latent
    model's VQ-VAE is read from when it has moved since training (None: the recorded place).
    """

    path: Path
    ckpt: dict[str, Any]
    flags: RunFlags
    config: RunConfig | None
    vqvae_checkpoint: str | None = None
    latent_pad: tuple[int, ...] | None = None
    vqvae: LoadedVQVAE | None = None
    # A published model (``open_pretrained_run``): ``ckpt`` is then empty and ``config`` describes the model.
    pretrained: PretrainedModel | None = None

    @property
    def upstream(self) -> bool:
        """True for a checkpoint written by the reference code (it stores no configuration)."""
        return self.pretrained is None and is_upstream_checkpoint(self.ckpt)

    @property
    def data_range(self) -> tuple[float, float] | None:
        """(low, high) of clean model-space samples, images in [0, 1] mapped there: (0, b_scale) for our pixel
        models, the published model's own ([-1, 1]), None for latents (no range). DiffPath clips its x0
        predictions to it."""
        if self.pretrained is not None:
            return self.pretrained.data_range
        if self.config is None or self.config.latent is not None:
            return None
        return (0.0, float(self.config.schedule.b_scale))

    @property
    def identity(self) -> dict[str, Any] | None:
        """A published model's identity for the sidecars (format, weights hash, flags, respacing, prediction type,
        data range, and whether images are resized to it); None for our checkpoints (their path and epoch say it)."""
        if self.pretrained is None:
            return None
        return {**self.pretrained.identity(), "resize": self.config.data.image_size is not None}

    @property
    def epoch(self) -> int | None:
        return self.ckpt.get("epoch")

    @property
    def data(self) -> DataConfig:
        """How this run's images are read: the stored data settings, or an upstream checkpoint's data flags."""
        return self.config.data if self.config is not None else data_config_for_upstream(self.flags)


def open_run(checkpoint: str | os.PathLike, flags: RunFlags | None = None, *,
             vqvae_checkpoint: str | os.PathLike | None = None,
             latent_pad: Sequence[int] | None = None) -> TrainedRun:
    """Read a DDPM checkpoint and resolve its configuration (see the module doc); UserError naming the file for a
    missing, unreadable or VQ-VAE checkpoint, a flag that contradicts the stored configuration, or a
    ``latent_pad`` other than the one the model was trained with."""
    path = Path(checkpoint)
    vqvae_checkpoint = given_path(vqvae_checkpoint)
    flags = flags if flags is not None else RunFlags()
    ckpt = load_checkpoint(path)
    config = run_config_of(ckpt, path)
    pad = None if latent_pad is None else tuple(int(p) for p in latent_pad)
    if config is not None:
        check_flags(config, flags, path)
        if pad is not None and (config.latent is None or pad != config.latent.latent_pad):
            recorded = "none (pixel space)" if config.latent is None else list(config.latent.latent_pad)
            raise UserError(f"--latent_pad={list(pad)} contradicts {path} which was trained with {recorded}; "
                            "drop the flag")
    return TrainedRun(path, ckpt, flags, config, vqvae_checkpoint, pad)


PRETRAINED_PRESET = "pretrained"


def open_pretrained_run(path: str | os.PathLike, pretrained_flags: str | dict | None = None, *, resize: bool = False,
                        flags: RunFlags | None = None) -> TrainedRun:
    """A published model (``ddpm_ood.pretrained.open_pretrained``) as a ``TrainedRun``. Its configuration holds
    the grid schedule and the image shape; images are read with the model's channels and, only with ``resize``,
    resized to its size (never silently: one-sided resizing inflates AUROC). ``flags``: model, schedule and data
    flags, which a published model defines itself: any given is refused (UserError)."""
    given = [f.name for f in dataclasses.fields(RunFlags) if getattr(flags or RunFlags(), f.name) is not None]
    if given:
        raise UserError(f"--{given[0]}: --pretrained={path} defines its own model, schedule and image settings; "
                        "drop the flag (images of another size: --resize=1)")
    model = open_pretrained(path, pretrained_flags)
    channels, *spatial = model.image_shape
    if resize and len(set(spatial)) != 1:
        raise UserError(f"--resize: {path} takes non-square images {tuple(spatial)}; resize them beforehand")
    config = RunConfig(
        # Never built (load_run_model opens the published network): it names the source in the stored config.
        model=ModelConfig(preset=f"{PRETRAINED_PRESET}:{model.format}", spatial_dims=2, in_channels=channels,
                          channels=(), attention_levels=(), num_res_blocks=0, num_head_channels=0),
        schedule=model.schedule,
        data=DataConfig(is_grayscale=channels == 1, spatial_dims=2, image_size=spatial[0] if resize else None),
        image_shape=model.image_shape,
    )
    return TrainedRun(Path(path), {}, RunFlags(), config, pretrained=model)


@dataclass(frozen=True)
class RunSource:
    """Which trained model a stage uses: the run ``run_dir``'s checkpoint (``eval_checkpoint``: another checkpoint
    file, absolute, relative to the working directory or inside the run folder; ``flags``: the model flags given,
    checked against its stored configuration or defining an upstream checkpoint's model; ``vqvae_checkpoint`` /
    ``latent_pad``: a latent model's VQ-VAE where it has moved, and its padding), or the published model at
    ``pretrained`` (``pretrained_flags``: an openai model's flags; ``resize``: resize every set's images to its size).
    ``use_ema``: the EMA weights when the checkpoint has them. Either way the outputs go to ``run_dir``."""

    run_dir: RunDir
    eval_checkpoint: str | None = None
    use_ema: bool = True
    flags: RunFlags = RunFlags()
    vqvae_checkpoint: str | None = None
    latent_pad: tuple[int, ...] | None = None
    pretrained: str | None = None
    pretrained_flags: str | None = None
    resize: bool = False

    def __post_init__(self) -> None:
        # upstream's scripts pass the string "None" for "not given"
        object.__setattr__(self, "eval_checkpoint", given_path(self.eval_checkpoint))

    @property
    def checkpoint(self) -> Path:
        """The checkpoint file: ``eval_checkpoint`` where given, else the run's best."""
        if self.eval_checkpoint is None:
            return self.run_dir.checkpoint
        given = Path(self.eval_checkpoint)
        return given if given.is_absolute() or given.exists() else self.run_dir.path / given

    def open(self) -> TrainedRun:
        """The run's checkpoint (``open_run``), or the published model (``open_pretrained_run``, said in one line);
        the flags of the other source are refused (ParameterError)."""
        if self.pretrained is None:
            if self.resize or self.pretrained_flags is not None:
                given = "resize" if self.resize else "pretrained_flags"
                raise ParameterError(f"{given} applies to pretrained models only (our checkpoints resize with "
                                     "image_size, as they were trained)", given, "pretrained", "image_size")
            return open_run(self.checkpoint, self.flags, vqvae_checkpoint=self.vqvae_checkpoint,
                            latent_pad=self.latent_pad)
        other = [name for name, value in (("eval_checkpoint", self.eval_checkpoint),
                                          ("vqvae_checkpoint", self.vqvae_checkpoint), ("latent_pad", self.latent_pad))
                 if value is not None]
        if other:
            raise ParameterError(f"{other[0]}: not with pretrained (a published pixel-space model)", other[0],
                                 "pretrained")
        run = open_pretrained_run(self.pretrained, self.pretrained_flags, resize=self.resize, flags=self.flags)
        model = run.pretrained
        print(f"{model.path}: {model.format} model, images {model.image_shape} in {list(model.data_range)}, "
              f"predicts {model.prediction_type}" + (f"; respaced {model.respacing}" if model.respacing else ""))
        return run


def with_image_shape(run: TrainedRun, image_shape: Sequence[int], source: str) -> TrainedRun:
    """``run`` with its configuration complete, for images of ``image_shape`` (C, *spatial) read from ``source``.

    An upstream checkpoint's model comes from its flags (upstream's defaults otherwise), in the latent space of
    ``--vqvae_checkpoint`` when given; a run whose model was trained on other images is refused (UserError)."""
    shape = tuple(int(s) for s in image_shape)
    if run.config is not None:
        check_image_shape(run.config, shape, source)
        return run
    config = run_config_from_flags(run.flags, shape)
    if run.vqvae_checkpoint is None:
        if run.latent_pad is not None:
            raise UserError("--latent_pad only applies to latent diffusion: give --vqvae_checkpoint too")
        return dataclasses.replace(run, config=config)
    vqvae = load_vqvae(run.vqvae_checkpoint)
    return dataclasses.replace(run, config=with_latent(config, vqvae, run.latent_pad, source), vqvae=vqvae)


def check_image_shape(config: RunConfig, image_shape: Sequence[int], source: str) -> None:
    """UserError naming ``source`` when its images (``image_shape``) are not the ones the model was trained on."""
    if tuple(image_shape) != tuple(config.image_shape):
        if config.model.preset.startswith(PRETRAINED_PRESET + ":"):
            raise UserError(f"{source}: images load as {tuple(image_shape)} but the pretrained model takes "
                            f"{tuple(config.image_shape)}; --resize=1 resizes them (the in- and out-distribution "
                            "sets alike: one-sided resizing inflates AUROC)")
        raise UserError(f"{source}: images load as {tuple(image_shape)} but the model was trained on "
                        f"{tuple(config.image_shape)} (check --is_grayscale / --image_size)")


@dataclass(frozen=True)
class RunModel:
    """A trained diffusion model ready to run: its noise estimate, schedule and autoencoder.

    ``eps_fn(x_t, t)``: model-space samples (N, *model_shape), t (N,) long on the 1000-step schedule -> the noise
    estimate (N, *model_shape) float32. ``autoencoder``: images (B, C, *spatial) in [0, 1] <-> model space (the
    identity times b_scale in pixel space). ``model_shape``: (C', *spatial') of one model-space sample
    (``RunConfig.model_shape``; the start noise of one (image, t))."""

    eps_fn: EpsFn
    schedule: ScheduleConfig
    autoencoder: Autoencoder
    model_shape: tuple[int, ...]


def load_run_model(run: TrainedRun, device: torch.device, *, precision: str = "fp32", use_ema: bool = True,
                   max_batch: int | None = None) -> RunModel:
    """The run's UNet (EMA weights if present and ``use_ema``) on ``device`` in eval mode, with its autoencoder.
    ``precision`` (resolved, ``devices.PRECISIONS``) is the forward pass's; ``max_batch`` bounds the samples per
    network call (None: unbounded on a CPU, sized from the free memory on CUDA). The configuration must be complete
    (``with_image_shape`` for an upstream checkpoint)."""
    if run.config is None:
        raise ValueError("an upstream checkpoint's configuration needs its image shape first (with_image_shape)")
    config = run.config
    if run.pretrained is None:
        autoencoder = autoencoder_for(config, device, vqvae_checkpoint=run.vqvae_checkpoint, loaded=run.vqvae,
                                      source=str(run.path))
        network = build_unet(config.model, fused_attention=wants_fused_attention(device))
        load_unet_state(network, inference_state_dict(run.ckpt, use_ema=use_ema), str(run.path))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # tick shapes repeat from batch to batch: autotune the convolutions
    else:
        autoencoder = RangeAutoencoder(*run.pretrained.data_range)
        network = run.pretrained.network
    network = network.to(device).eval()

    def autocast() -> contextlib.AbstractContextManager:
        return autocast_context(device, precision)

    if device.type == "cuda" and max_batch is None:
        max_batch = memory_sized_max_batch(network, config.model_shape, device, autocast)
    eps_fn = model_eps_fn(network, config.schedule, max_batch=max_batch, autocast=autocast)
    return RunModel(eps_fn, config.schedule, autoencoder, config.model_shape)
