"""The score families by name, and the one way to compute several of them with shared network calls.

``ALL_SCORES`` are the names a user may ask for: ``reconstruction`` (the paper's score, computed by the
reconstruction engine, never here) and the ``FEATURE_FAMILIES`` this package computes. ``parse_families`` reads a
comma list, ``all``, and the alias ``diffpath`` (= diffpath6d and diffpath1d); ``compute_features`` and ``nfe_of``
take feature-family names only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ddpm_ood.errors import UserError
from ddpm_ood.families.base import CallGroup, EpsFn, FamilySettings, ScoreFamily
from ddpm_ood.families.diffpath import COLUMNS_1D, COLUMNS_6D, DIFFPATH1D, DIFFPATH6D, DIFFPATH_GROUP
from ddpm_ood.families.noise_levels import DENOISING_ERROR, EPS_NORM, NOISE_LEVEL_GROUP, level_columns

RECONSTRUCTION = "reconstruction"
ALL_KEYWORD = "all"

FAMILIES: dict[str, ScoreFamily] = {
    family.name: family
    for family in (
        ScoreFamily(EPS_NORM, "L2 norm of the predicted noise at each level (MSMA-style)", NOISE_LEVEL_GROUP,
                    lambda settings: level_columns(EPS_NORM, settings)),
        ScoreFamily(DENOISING_ERROR, "mean squared error of the predicted noise at each level", NOISE_LEVEL_GROUP,
                    lambda settings: level_columns(DENOISING_ERROR, settings)),
        ScoreFamily(DIFFPATH6D, "DiffPath-6D: sums of eps, eps^2, eps^3 and of their rates of change along the "
                    "DDIM inversion", DIFFPATH_GROUP, lambda settings: list(COLUMNS_6D)),
        ScoreFamily(DIFFPATH1D, "DiffPath-1D: root of the summed squared rate of change of eps along the DDIM "
                    "inversion", DIFFPATH_GROUP, lambda settings: list(COLUMNS_1D)),
    )
}
FEATURE_FAMILIES: tuple[str, ...] = tuple(FAMILIES)
ALL_SCORES: tuple[str, ...] = (RECONSTRUCTION, *FEATURE_FAMILIES)
ALIASES: dict[str, tuple[str, ...]] = {"diffpath": (DIFFPATH6D, DIFFPATH1D)}


def _accepted() -> str:
    return ", ".join([*ALL_SCORES, *ALIASES, ALL_KEYWORD])


def get_family(name: str) -> ScoreFamily:
    """The feature family ``name``; UserError listing the accepted names otherwise (``reconstruction`` included,
    with a word on where it is computed)."""
    if name == RECONSTRUCTION:
        raise UserError(f"{RECONSTRUCTION!r} is computed by the reconstruction engine, not as a feature family; "
                        f"feature families: {', '.join(FEATURE_FAMILIES)}")
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown score family {name!r}; accepted: {_accepted()}") from None


def parse_families(text: str) -> list[str]:
    """Score names from a comma list (``"eps_norm,diffpath"``), ``"all"`` or an alias, in ``ALL_SCORES`` order,
    without repeats. May include ``reconstruction``; pass the rest to ``compute_features``."""
    chosen: set[str] = set()
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"no score family given; accepted: {_accepted()}")
    for item in items:
        if item == ALL_KEYWORD:
            chosen.update(ALL_SCORES)
        elif item in ALIASES:
            chosen.update(ALIASES[item])
        elif item in ALL_SCORES:
            chosen.add(item)
        else:
            raise UserError(f"unknown score family {item!r}; accepted: {_accepted()}")
    return [name for name in ALL_SCORES if name in chosen]


def feature_families(names: Iterable[str]) -> list[str]:
    """``names`` without ``reconstruction`` (which the reconstruction engine computes)."""
    return [name for name in names if name != RECONSTRUCTION]


def _groups(families: Sequence[str]) -> dict[str, tuple[CallGroup, list[str]]]:
    """The call groups that ``families`` need, each with its requested members, in the order first needed."""
    groups: dict[str, tuple[CallGroup, list[str]]] = {}
    for name in families:
        family = get_family(name)
        groups.setdefault(family.group.name, (family.group, []))[1].append(name)
    return groups


def nfe_of(families: Sequence[str], settings: FamilySettings) -> int:
    """Network evaluations per image to compute ``families`` together: each shared group of calls counted once."""
    return sum(group.nfe(settings) for group, _ in _groups(families).values())


def compute_features(families: Sequence[str], eps_fn: EpsFn, x0: torch.Tensor, keys: Sequence[str],
                     acp: torch.Tensor, settings: FamilySettings) -> dict[str, np.ndarray]:
    """{family: (B, D) float64} for the B images ``x0``, running each shared group of network calls once.

    families: feature-family names (``FEATURE_FAMILIES``; ``reconstruction`` is refused: the engine computes it).
    x0: (B, C, *spatial) float32 in model space; keys: the B noise keys; acp: the (1000,) alphas_cumprod.
    """
    out: dict[str, np.ndarray] = {}
    for group, members in _groups(families).values():
        features = group.run(eps_fn, x0, keys, acp, settings)
        for name in members:
            out[name] = features[name]
    return {name: out[name] for name in families}
