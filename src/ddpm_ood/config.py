"""Frozen run configuration. Built from parsed arguments in cli/, stored inside every checkpoint.

The argparse Namespace stops in cli/: the library only sees these dataclasses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ddpm_ood.diffusion.schedule import (
    DEFAULT_BETA_END,
    DEFAULT_BETA_START,
    NUM_TRAIN_TIMESTEPS,
    PREDICTION_TYPES,
    SCHEDULES_WITH_BETA_RANGE,
    canonical_schedule_name,
)
from ddpm_ood.errors import UserError


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta_schedule", canonical_schedule_name(self.beta_schedule))
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

    def schedule_args(self) -> dict:
        if self.beta_schedule in SCHEDULES_WITH_BETA_RANGE:
            return {"beta_start": self.beta_start, "beta_end": self.beta_end}
        return {}

    def to_dict(self) -> dict:
        return asdict(self)

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

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise UserError(f"--spatial_dimension must be 2 or 3, got {self.spatial_dims}")
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


@dataclass(frozen=True)
class RunConfig:
    """What a trained model is: stored as checkpoint["config"] and read back by reconstruction.

    image_shape is the (C, *spatial) shape of one training image after loading, in [0, 1].
    """

    model: ModelConfig
    schedule: ScheduleConfig
    data: DataConfig
    image_shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "schedule": self.schedule.to_dict(),
            "data": self.data.to_dict(),
            "image_shape": list(self.image_shape),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(
            model=ModelConfig.from_dict(d["model"]),
            schedule=ScheduleConfig.from_dict(d["schedule"]),
            data=DataConfig.from_dict(d["data"]),
            image_shape=tuple(d["image_shape"]),
        )
