"""The one score registry: every score a user can ask for, by name, and the one way to compute feature families
with shared network calls.

Three kinds of score, in this order (``score_names()``, the order of every table):

1. the reconstruction family (``RECONSTRUCTION``, the paper's), computed by the reconstruction engine into
   ``results_<set>.csv`` and scored by z-scores against validation (``ood.zscore``): ``RECONSTRUCTION_SCORES``;
2. the feature families registered here (``register``; one module each, ``families.base.ScoreFamily``), in the
   order registered: eps_norm, denoising_error, msma, diffpath6d, diffpath1d;
3. ``ENSEMBLE``, their combination by a rule fixed in advance (``families.ensemble``).

reconstruct.py's ``--scores`` takes family names (``family_names()``, plus the alias ``diffpath`` and ``all``);
ood_detection.py's and score.py's ``--score`` take score names. A family registered at run time (a test's) goes
through every stage like the built-in ones: nothing else lists them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ddpm_ood.errors import UserError
from ddpm_ood.families.base import CallGroup, EpsFn, ScoreContext, ScoreFamily, ScoreOptions
from ddpm_ood.families.diffpath import DIFFPATH1D, DIFFPATH1D_FAMILY, DIFFPATH6D, DIFFPATH6D_FAMILY
from ddpm_ood.families.msma import MSMA_FAMILY
from ddpm_ood.families.noise_levels import DENOISING_ERROR_FAMILY, EPS_NORM_FAMILY
from ddpm_ood.results.schema import METRIC_COLUMNS

RECONSTRUCTION = "reconstruction"
# The reconstruction family's scores -> the metric columns whose z-scores are summed per t. The paper's first.
RECONSTRUCTION_SCORES: dict[str, tuple[str, ...]] = {
    "mse+perceptual": ("mse", "perceptual_difference"),
    "mse": ("mse",),
    "perceptual": ("perceptual_difference",),
}
assert {m for ms in RECONSTRUCTION_SCORES.values() for m in ms} == set(METRIC_COLUMNS)
ENSEMBLE = "ensemble"
ALL_KEYWORD = "all"
ALIASES: dict[str, tuple[str, ...]] = {"diffpath": (DIFFPATH6D, DIFFPATH1D)}

_FAMILIES: dict[str, ScoreFamily] = {}


def register(family: ScoreFamily) -> None:
    """Add a feature family (after those registered before it); a name already taken is refused."""
    taken = (RECONSTRUCTION, *RECONSTRUCTION_SCORES, ENSEMBLE, ALL_KEYWORD, *ALIASES, *_FAMILIES)
    if family.name in taken or "," in family.name or "/" in family.name:
        raise ValueError(f"cannot register a score family named {family.name!r}")
    _FAMILIES[family.name] = family


def unregister(name: str) -> None:
    """Remove a registered feature family (for tests that register their own)."""
    _FAMILIES.pop(name, None)


for _family in (EPS_NORM_FAMILY, DENOISING_ERROR_FAMILY, MSMA_FAMILY, DIFFPATH6D_FAMILY, DIFFPATH1D_FAMILY):
    register(_family)


def feature_family_names() -> tuple[str, ...]:
    """The registered feature families, in registration order."""
    return tuple(_FAMILIES)


def family_names() -> tuple[str, ...]:
    """What reconstruct.py's --scores computes: the reconstruction family, then every feature family."""
    return (RECONSTRUCTION, *_FAMILIES)


def score_names() -> tuple[str, ...]:
    """Every score, in table order: the reconstruction scores, each feature family's, the ensemble."""
    return (*RECONSTRUCTION_SCORES, *_FAMILIES, ENSEMBLE)


def accepted(names: Iterable[str]) -> str:
    return ", ".join(names)


def check_score_name(name: str, what: str = "score") -> str:
    """``name`` if it is a score (``score_names()``); UserError listing them otherwise."""
    if name not in score_names():
        raise UserError(f"unknown {what} {name!r}; accepted: {accepted(score_names())}")
    return name


def get_family(score: str) -> ScoreFamily:
    """The feature family that makes ``score`` (and bears its name); UserError listing the accepted names
    otherwise."""
    if score == RECONSTRUCTION:
        raise UserError(f"{RECONSTRUCTION!r} is computed by the reconstruction engine, not as a feature family; "
                        f"feature families: {accepted(_FAMILIES)}")
    try:
        return _FAMILIES[score]
    except KeyError:
        raise UserError(f"unknown score family {score!r}; accepted: "
                        f"{accepted([*family_names(), *ALIASES, ALL_KEYWORD])}") from None


def parse_families(text: str) -> list[str]:
    """Family names from a comma list (``"eps_norm,diffpath"``), ``"all"`` or an alias, in ``family_names()``
    order, without repeats. May include ``reconstruction``."""
    chosen: set[str] = set()
    items = [item.strip() for item in text.split(",") if item.strip()]
    names = family_names()
    if not items:
        raise UserError(f"no score family given; accepted: {accepted([*names, *ALIASES, ALL_KEYWORD])}")
    for item in items:
        if item == ALL_KEYWORD:
            chosen.update(names)
        elif item in ALIASES:
            chosen.update(ALIASES[item])
        elif item in names:
            chosen.add(item)
        else:
            raise UserError(f"unknown score family {item!r}; accepted: "
                            f"{accepted([*names, *ALIASES, ALL_KEYWORD])}")
    return [name for name in names if name in chosen]


def without_reconstruction(names: Iterable[str]) -> list[str]:
    """``names`` without ``reconstruction`` (which the reconstruction engine computes)."""
    return [name for name in names if name != RECONSTRUCTION]


def make_settings(families: Sequence[str], options: ScoreOptions, context: ScoreContext) -> dict[str, Any]:
    """{family: its settings} for ``families``, from the user's options and the model's context."""
    return {name: get_family(name).make_settings(options, context) for name in families}


def _groups(families: Sequence[str], settings: Mapping[str, Any]) -> list[tuple[CallGroup, Any, list[str]]]:
    """The call groups that ``families`` need, each once per distinct settings, with the members it computes, in
    the order first needed."""
    groups: list[tuple[CallGroup, Any, list[str]]] = []
    for name in families:
        group = get_family(name).calls
        for known, known_settings, members in groups:
            if known is group and known_settings == settings[name]:
                members.append(name)
                break
        else:
            groups.append((group, settings[name], [name]))
    return groups


def nfe_of(families: Sequence[str], settings: Mapping[str, Any]) -> int:
    """Network evaluations per image to compute ``families`` together: each shared group of calls counted once."""
    return sum(group.nfe(group_settings) for group, group_settings, _ in _groups(families, settings))


def compute_features(families: Sequence[str], eps_fn: EpsFn, x0: torch.Tensor, keys: Sequence[str],
                     acp: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{family: (B, D) float64} for the B images ``x0``, running each shared group of network calls once.

    families: feature-family names; settings: {family: its settings} (``make_settings``). x0: (B, C, *spatial)
    float32 in model space; keys: the B noise keys; acp: the (1000,) alphas_cumprod.
    """
    out: dict[str, np.ndarray] = {}
    for group, group_settings, members in _groups(families, settings):
        features = group.run(eps_fn, x0, keys, acp, group_settings)
        for name in members:
            out[name] = features[name]
    return {name: out[name] for name in families}
