"""The score-family interface: what one registered score declares, and what every family is given.

A *score family* turns a model and an input into a feature vector (docs/development.md, Words); its *score* is the
negative log-likelihood of those features under a density fitted on the validation features only (higher = more
OOD). Like OpenOOD's postprocessors, each family is one module holding one ``ScoreFamily`` record:

- ``name``, ``description``;
- ``settings_type``: a frozen dataclass of its own settings, built by ``make_settings(options, context)`` from the
  user's ``ScoreOptions`` and the model's ``ScoreContext``, stored as-is (``dataclasses.asdict``) in every
  feature file's sidecar and read back with ``settings_from``;
- ``columns(settings)``, ``nfe(settings)`` (network evaluations per image);
- ``calls``: the ``CallGroup`` that computes its features; families whose features come from the same network calls
  share one group (``eps_norm`` and ``denoising_error`` their noised inputs; ``diffpath6d`` and ``diffpath1d`` one
  DDIM inversion), which runs once for all of them when their settings are equal and counts once in ``nfe``;
- ``fit(val_features, columns)``: the fitted score (default: ``density.FeatureDensity``), ``.score(rows)``;
- ``in_ensemble``: False for a family whose features are a part of another's (the ensemble counts each once).

Conventions of a group's ``run(eps_fn, x0, keys, acp, settings)``: ``x0`` (B, C, *spatial), 2D or 3D, float32, in
model space (``ScoreContext``); ``keys`` the B images' noise keys (``seeding.noise_key``), which seed per-image noise
row by row so batch size and order never change a number; ``acp`` the (1000,) alphas_cumprod of the model's
schedule; t always indexes the 1000-step training schedule. It returns {member family: (B, D) float64}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from ddpm_ood.config import DEFAULT_NOISE_TYPE, NUM_TRAIN_TIMESTEPS
from ddpm_ood.diffusion.eps import EpsFn
from ddpm_ood.errors import UserError
from ddpm_ood.seeding import DEFAULT_SEED, NOISE_PROTOCOLS


def even_levels(count: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """``count`` noise levels spread evenly over the schedule, the middles of ``count`` equal bins (rounded
    down to whole t): 10 -> 50, 150, ..., 950; 5 -> 100, 300, ..., 900; 3 -> 166, 500, 833."""
    if not 1 <= count <= num_train_timesteps:
        raise UserError(f"score levels: the number of levels must be between 1 and {num_train_timesteps}, "
                        f"got {count}")
    return tuple(int((2 * i + 1) * num_train_timesteps // (2 * count)) for i in range(count))


@dataclass(frozen=True)
class ScoreOptions:
    """What the user chooses for the score families (reconstruct.py's flags of the same names; the defaults are
    these fields'). Each family reads the options it has and ignores the rest.

    score_levels: the noise levels t_1..t_L of ``eps_norm`` / ``denoising_error`` (1000-step schedule).
    score_noise: ``seeding.NOISE_PROTOCOLS``; "shared" (default): one noise per level for every image, seeded by
    (seed, t); "per_image": seeded by (seed, image, t), the protocol of earlier versions. score_noise_draws: M, the
    feature is the mean over M shared draws (cost M x L). diffpath_steps: K, DiffPath's DDIM inversion steps.
    diffpath_clip: clip DiffPath's x0 predictions to the model's data range, as the authors do (latents: no range).
    """

    score_levels: tuple[int, ...] = even_levels(10)
    score_noise: str = "shared"
    score_noise_draws: int = 1
    diffpath_steps: int = 10  # DiffPath's default (--n_ddim_steps 10)
    diffpath_clip: bool = True

    def __post_init__(self) -> None:
        if self.score_noise not in NOISE_PROTOCOLS:
            raise UserError(f"unknown noise protocol {self.score_noise!r} for the score families; accepted: "
                            f"{', '.join(NOISE_PROTOCOLS)}")
        if int(self.score_noise_draws) < 1:
            raise UserError(f"score_noise_draws must be >= 1, got {self.score_noise_draws}")
        if self.score_noise == "per_image" and int(self.score_noise_draws) != 1:
            raise UserError("score_noise_draws > 1 needs score_noise='shared' (per-image noise has one draw per "
                            "image and level)")
        object.__setattr__(self, "score_levels", tuple(int(t) for t in self.score_levels))
        object.__setattr__(self, "score_noise_draws", int(self.score_noise_draws))


@dataclass(frozen=True)
class ScoreContext:
    """What a family is given besides the user's options: the run's seed (every noise draw) and what it may need of
    the model besides its noise estimate.

    seed: the run's --seed. noise_type: the forward process's noise (``diffusion.noise``). acp: (1000,) alphas_cumprod, float32.
    data_range: (low, high) of clean samples in model space ((0, b_scale) for this project's pixel models), or None
    where there is none (VQ-VAE latents). data_scale: model-space units per unit of [0, 1] image intensity
    (b_scale in pixel space; 1 for latents, whose sigmas are then in latent units).
    """

    seed: int = DEFAULT_SEED
    noise_type: str = DEFAULT_NOISE_TYPE
    acp: torch.Tensor | None = None
    data_range: tuple[float, float] | None = (0.0, 1.0)
    data_scale: float = 1.0


class FittedScore(Protocol):
    """A score fitted on validation features: ``score`` (N, D) -> (N,) float64, higher = more OOD."""

    def score(self, x: np.ndarray) -> np.ndarray: ...

    def summary(self) -> str: ...


# A group's computation: every member family's (B, D) float64 features, by family name.
GroupRun = Callable[[EpsFn, torch.Tensor, Sequence[str], torch.Tensor, Any], dict[str, np.ndarray]]


@dataclass(frozen=True)
class CallGroup:
    """Network calls shared by several families: ``run`` makes them once and returns all members' features;
    ``nfe(settings)`` counts them per image."""

    name: str
    nfe: Callable[[Any], int]
    run: GroupRun


def _density_fit(x_val: np.ndarray, columns: Sequence[str]) -> FittedScore:
    from ddpm_ood.families.density import FeatureDensity

    return FeatureDensity().fit(x_val, columns=list(columns))


@dataclass(frozen=True)
class ScoreFamily:
    """One registered score family (module docstring)."""

    name: str
    description: str
    settings_type: type
    make_settings: Callable[[ScoreOptions, ScoreContext], Any]
    columns: Callable[[Any], list[str]]
    calls: CallGroup
    fit: Callable[[np.ndarray, Sequence[str]], FittedScore] = _density_fit
    in_ensemble: bool = True

    def nfe(self, settings: Any) -> int:
        """Network evaluations per image (shared with the other families of its call group)."""
        return self.calls.nfe(settings)

    def features(self, eps_fn: EpsFn, x0: torch.Tensor, keys: Sequence[str], acp: torch.Tensor,
                 settings: Any) -> np.ndarray:
        """(B, D) float64 features of the B images ``x0`` (module docstring for the conventions)."""
        return self.calls.run(eps_fn, x0, keys, acp, settings)[self.name]

    def fit_on(self, features: pd.DataFrame) -> FittedScore:
        """This family's score fitted on its validation ``features`` (rows = images, columns = features): the one
        place a family's score is fitted, for ood_detection.py and score.py alike."""
        return self.fit(features.to_numpy(), list(features.columns))

    def settings_record(self, settings: Any) -> dict[str, Any]:
        """The settings as stored in a sidecar (JSON-able)."""
        return json_ready(dataclasses.asdict(settings))

    def feature_sidecar(self, settings: Any, noise_type: str) -> dict[str, Any]:
        """What this family adds to the sidecar of each of its feature files: its name, feature columns, network
        evaluations per image, the model's noise type and its own settings as stored (``settings_record``)."""
        return {"family": self.name, "features": self.columns(settings), "nfe": self.nfe(settings),
                "noise_type": noise_type, "settings": self.settings_record(settings)}

    def settings_from(self, record: dict[str, Any]) -> Any:
        """The settings stored by ``settings_record``; UserError when they do not fit this family's settings."""
        try:
            return self.settings_type(**record)
        except TypeError as exc:
            raise UserError(f"{self.name}: stored settings {record} do not fit this version ({exc})") from None


def json_ready(value: Any) -> Any:
    """Tuples as lists, recursively, as JSON stores them (so a record compares equal to its file)."""
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value


def check_batch(x0: torch.Tensor, keys: Sequence[str]) -> None:
    """x0 must be (B, C, *spatial) with one key per image."""
    if x0.ndim < 3:
        raise ValueError(f"x0 must be (B, C, *spatial), got shape {tuple(x0.shape)}")
    if len(keys) != x0.shape[0]:
        raise ValueError(f"{x0.shape[0]} images but {len(keys)} noise keys")


def check_levels(levels: Sequence[int], what: str) -> tuple[int, ...]:
    """``levels`` as distinct ints in [0, 1000); UserError naming ``what`` otherwise."""
    levels = tuple(int(t) for t in levels)
    if not levels:
        raise UserError(f"{what}: at least one noise level is needed")
    bad = [t for t in levels if not 0 <= t < NUM_TRAIN_TIMESTEPS]
    if bad:
        raise UserError(f"{what}: noise levels must be in [0, {NUM_TRAIN_TIMESTEPS}), got {bad}")
    if len(set(levels)) != len(levels):
        raise UserError(f"{what}: noise levels must be distinct, got {list(levels)}")
    return levels


def per_image(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, n) float64: every non-batch element of each image, for float64 reductions."""
    return x.reshape(x.shape[0], -1).double()
