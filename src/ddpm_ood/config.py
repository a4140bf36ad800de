"""Frozen run configuration. Built from parsed arguments in cli/, stored inside every checkpoint.

The argparse Namespace stops in cli/: the library only sees these dataclasses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ddpm_ood.errors import UserError

# Canonical MONAI names, and the paper-era / diffusers spellings users type (README_additional uses
# `scaled_linear`, upstream reconstruct.py defaults to `linear`). Names may be added, never renamed.
SCHEDULE_ALIASES: dict[str, str] = {
    "linear_beta": "linear_beta",
    "linear": "linear_beta",
    "scaled_linear_beta": "scaled_linear_beta",
    "scaled_linear": "scaled_linear_beta",
    "sigmoid_beta": "sigmoid_beta",
    "sigmoid": "sigmoid_beta",
    "cosine": "cosine",
}
SCHEDULES_WITH_BETA_RANGE = ("linear_beta", "scaled_linear_beta", "sigmoid_beta")
DEFAULT_BETA_START = 1e-4
DEFAULT_BETA_END = 2e-2
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
NUM_TRAIN_TIMESTEPS = 1000
# The schedule of a published model (``ddpm_ood.pretrained``): its betas given explicitly (``trained_betas``, as
# diffusers names them), not a named formula. Not a --beta_schedule choice: only model readers build it.
EXPLICIT_BETAS = "trained_betas"


def canonical_schedule_name(name: str) -> str:
    """Map any accepted spelling to MONAI's name; unknown names fail listing the accepted ones."""
    try:
        return SCHEDULE_ALIASES[name]
    except KeyError:
        raise UserError(
            f"unknown beta schedule {name!r}; accepted: {', '.join(SCHEDULE_ALIASES)}"
        ) from None


# The noise types (implemented in diffusion.noise.NOISE_TYPES; --simplex_noise=1 is "simplex"; "simplex_upstream" is
# upstream's unscaled simplex sum, only for its checkpoints).
NOISE_TYPE_NAMES = ("gaussian", "simplex", "simplex_upstream")
DEFAULT_NOISE_TYPE = "gaussian"


def check_noise_type(name: str) -> str:
    """``name`` if it is a noise type, else UserError listing the accepted ones."""
    if name not in NOISE_TYPE_NAMES:
        raise UserError(f"unknown noise type {name!r}; accepted: {', '.join(NOISE_TYPE_NAMES)}")
    return name



@dataclass(frozen=True)
class ScheduleConfig:
    """Everything that defines the forward process. Stored in every checkpoint."""

    beta_schedule: str = "linear_beta"
    beta_start: float | None = DEFAULT_BETA_START
    beta_end: float | None = DEFAULT_BETA_END
    prediction_type: str = "epsilon"
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    # Upstream knobs: data are multiplied by b_scale before noising; snr_shift rescales the SNR of every t.
    b_scale: float = 1.0
    snr_shift: float = 1.0
    # The noise eps of x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (diffusion.noise.NOISE_TYPES; --simplex_noise=1 is
    # "simplex"). Checkpoints written before it existed have none: Gaussian.
    noise_type: str = DEFAULT_NOISE_TYPE

    # EXPLICIT_BETAS only: the (num_train_timesteps,) betas in [0, 1) (a published model's, possibly respaced onto
    # the 1000-step grid, where a repeated step has beta 0). None for the named schedules.
    trained_betas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.trained_betas is not None or self.beta_schedule == EXPLICIT_BETAS:
            self._check_trained_betas()
        else:
            object.__setattr__(self, "beta_schedule", canonical_schedule_name(self.beta_schedule))
        check_noise_type(self.noise_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(
                f"unknown prediction type {self.prediction_type!r}; accepted: {', '.join(PREDICTION_TYPES)}"
            )
        if self.beta_schedule in SCHEDULES_WITH_BETA_RANGE:
            if self.beta_start is None:
                object.__setattr__(self, "beta_start", DEFAULT_BETA_START)
            if self.beta_end is None:
                object.__setattr__(self, "beta_end", DEFAULT_BETA_END)
            if not 0 < self.beta_start < self.beta_end < 1:
                raise UserError(
                    f"beta range must satisfy 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
                )
        elif self.beta_start is not None or self.beta_end is not None:
            raise UserError(
                f"the {self.beta_schedule} schedule takes no --beta_start/--beta_end "
                f"(got {self.beta_start}, {self.beta_end})"
            )
        if self.b_scale <= 0 or self.snr_shift <= 0:
            raise UserError(f"b_scale and snr_shift must be > 0, got {self.b_scale}, {self.snr_shift}")

    def _check_trained_betas(self) -> None:
        betas = self.trained_betas
        if self.beta_schedule != EXPLICIT_BETAS or betas is None:
            raise UserError(f"explicit betas need beta_schedule={EXPLICIT_BETAS!r} and trained_betas, got "
                            f"{self.beta_schedule!r} and {'none' if betas is None else f'{len(betas)} betas'}")
        betas = tuple(float(b) for b in betas)
        object.__setattr__(self, "trained_betas", betas)
        if len(betas) != self.num_train_timesteps:
            raise UserError(f"trained_betas: {len(betas)} values for {self.num_train_timesteps} timesteps")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise UserError("trained_betas must lie in [0, 1)")
        if self.beta_start is not None or self.beta_end is not None:
            object.__setattr__(self, "beta_start", None)
            object.__setattr__(self, "beta_end", None)

    def schedule_args(self) -> dict:
        if self.beta_schedule in SCHEDULES_WITH_BETA_RANGE:
            return {"beta_start": self.beta_start, "beta_end": self.beta_end}
        return {}

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.trained_betas is None:  # named schedules keep exactly their earlier stored content
            del d["trained_betas"]
        else:
            d["trained_betas"] = list(self.trained_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ScheduleConfig:
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """MONAI DiffusionModelUNet arguments (see diffusion.unet.MODEL_PRESETS). in_channels == out_channels."""

    preset: str
    spatial_dims: int
    in_channels: int
    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_res_blocks: int
    num_head_channels: int
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class DataConfig:
    """How images are read and shaped, identically for training, reconstruction and scoring."""

    is_grayscale: bool = False
    spatial_dims: int = 2
    image_size: int | None = None
    image_roi: tuple[int, ...] | None = None
    # With is_grayscale: the channel kept of multi-channel NIfTI volumes (BraTS: 0 FLAIR, as upstream, 1 T1w, 2 t1gd,
    # 3 T2w). Single-channel images are used as they are.
    channel: int = 0

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise UserError(f"--spatial_dimension must be 2 or 3, got {self.spatial_dims}")
        if not isinstance(self.channel, int) or self.channel < 0:
            raise UserError(f"--channel must be an integer >= 0, got {self.channel!r}")
        if self.channel and not self.is_grayscale:
            raise UserError(f"--channel={self.channel} picks one channel of multi-channel volumes: it needs "
                            "--is_grayscale=1")
        if self.image_roi is not None:
            object.__setattr__(self, "image_roi", tuple(int(v) for v in self.image_roi))
            if len(self.image_roi) != self.spatial_dims:
                raise UserError(
                    f"--image_roi needs {self.spatial_dims} values (one per spatial dim), got {list(self.image_roi)}"
                )

    @property
    def channels(self) -> int:
        return 1 if self.is_grayscale else 3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def _int_tuples(value) -> tuple:
    """Nested lists of ints -> nested tuples (JSON gives lists; frozen configs hold tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_int_tuples(v) for v in value)
    return int(value)


@dataclass(frozen=True)
class VQVAEConfig:
    """MONAI core ``VQVAE`` arguments, named as MONAI core names them (upstream's ``vqvae_config.json`` calls
    ``channels`` ``num_channels``; ``autoencoder.vqvae`` reads and writes that file). Stored in VQ-VAE checkpoints
    and, for a latent DDPM, inside its RunConfig."""

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    num_res_layers: int = 3
    downsample_parameters: tuple[tuple[int, ...], ...] = ((2, 4, 1, 1),) * 4
    upsample_parameters: tuple[tuple[int, ...], ...] = ((2, 4, 1, 1, 0),) * 4
    channels: tuple[int, ...] = (128, 128, 128, 256)
    num_res_channels: tuple[int, ...] = (128, 128, 128, 256)
    num_embeddings: int = 256
    embedding_dim: int = 256
    decay: float = 0.99
    commitment_cost: float = 0.25
    epsilon: float = 1e-5
    dropout: float = 0.0
    ddp_sync: bool = True

    def __post_init__(self) -> None:
        for name in ("downsample_parameters", "upsample_parameters", "channels", "num_res_channels"):
            object.__setattr__(self, name, _int_tuples(getattr(self, name)))
        levels = len(self.channels)
        if self.spatial_dims not in (2, 3):
            raise UserError(f"VQ-VAE spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.num_res_channels) != levels or len(self.downsample_parameters) != levels or \
                len(self.upsample_parameters) != levels:
            raise UserError(
                f"VQ-VAE: --vqvae_num_channels, --vqvae_num_res_channels, --vqvae_downsample_parameters and "
                f"--vqvae_upsample_parameters need one entry per level, got {levels}, {len(self.num_res_channels)}, "
                f"{len(self.downsample_parameters)}, {len(self.upsample_parameters)}"
            )
        if any(len(p) != 4 for p in self.downsample_parameters) or any(len(p) != 5 for p in self.upsample_parameters):
            raise UserError("VQ-VAE: each downsample level is [stride,kernel,dilation,padding] and each upsample level "
                            "[stride,kernel,dilation,padding,output_padding]")
        if min(self.num_embeddings, self.embedding_dim, self.in_channels, self.out_channels, *self.channels) < 1:
            raise UserError("VQ-VAE: channel counts, --vqvae_num_embeddings and --vqvae_embedding_dim must be >= 1")

    @property
    def downsampling(self) -> int:
        """Image side / latent side (the product of the downsampling strides)."""
        factor = 1
        for stride, *_ in self.downsample_parameters:
            factor *= stride
        return factor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VQVAEConfig:
        return cls(**d)


@dataclass(frozen=True)
class LatentConfig:
    """The frozen VQ-VAE a latent DDPM was trained on (its model space is the VQ-VAE's quantised latent).

    ``weights_sha256``: hash of the VQ-VAE weights (``autoencoder.vqvae.weights_hash``), so another VQ-VAE is refused;
    ``checkpoint``: where it was when training started (the default for reconstruction); ``latent_pad``: ``F.pad``
    amounts (last spatial dim first, (before, after) pairs, >= 0) applied after encoding so the UNet can halve the
    latent, removed before decoding; ``latent_shape``: (C', *spatial') of a padded latent.
    """

    vqvae: VQVAEConfig
    weights_sha256: str
    checkpoint: str
    latent_pad: tuple[int, ...]
    latent_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_pad", tuple(int(p) for p in self.latent_pad))
        object.__setattr__(self, "latent_shape", tuple(int(s) for s in self.latent_shape))

    def to_dict(self) -> dict:
        return {"vqvae": self.vqvae.to_dict(), "weights_sha256": self.weights_sha256, "checkpoint": self.checkpoint,
                "latent_pad": list(self.latent_pad), "latent_shape": list(self.latent_shape)}

    @classmethod
    def from_dict(cls, d: dict) -> LatentConfig:
        return cls(vqvae=VQVAEConfig.from_dict(d["vqvae"]), weights_sha256=str(d["weights_sha256"]),
                   checkpoint=str(d["checkpoint"]), latent_pad=d["latent_pad"], latent_shape=d["latent_shape"])


@dataclass(frozen=True)
class RunConfig:
    """What a trained model is: stored as checkpoint["config"] and read back by reconstruction.

    image_shape is the (C, *spatial) shape of one training image after loading, in [0, 1]. ``latent``: None for
    pixel-space diffusion, else the VQ-VAE whose latent space the UNet works in (``model.in_channels`` is then the
    VQ-VAE's embedding dimension).
    """

    model: ModelConfig
    schedule: ScheduleConfig
    data: DataConfig
    image_shape: tuple[int, ...]
    latent: LatentConfig | None = None

    @property
    def model_shape(self) -> tuple[int, ...]:
        """(C, *spatial) of the samples the diffusion model noises and denoises."""
        return tuple(self.image_shape) if self.latent is None else tuple(self.latent.latent_shape)

    def to_dict(self) -> dict:
        d = {
            "model": self.model.to_dict(),
            "schedule": self.schedule.to_dict(),
            "data": self.data.to_dict(),
            "image_shape": list(self.image_shape),
        }
        if self.latent is not None:  # pixel-space checkpoints keep exactly their earlier content
            d["latent"] = self.latent.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(
            model=ModelConfig.from_dict(d["model"]),
            schedule=ScheduleConfig.from_dict(d["schedule"]),
            data=DataConfig.from_dict(d["data"]),
            image_shape=tuple(d["image_shape"]),
            latent=LatentConfig.from_dict(d["latent"]) if d.get("latent") is not None else None,
        )
