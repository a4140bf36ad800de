"""Scores of the feature families and of their ensemble, from a run's feature files (reconstruct.py --scores).

A feature family's score is the negative log-likelihood of an image's features under a ``FeatureDensity`` fitted on
the VALIDATION features only (``features_val.csv``): higher = more OOD. No test or OOD row ever reaches a fit.

The ensemble (``ENSEMBLE``) is fixed before any OOD data is seen: one ``FeatureDensity`` over the concatenated,
standardised features of every feature family the run has (two or more; ``families.ensemble``), fitted on their
validation features. Only images present in every family's file of a set take part. The reconstruction score is
reported beside it, not inside it: it costs more network evaluations than all four feature families together
(37 against 20 per image on the quickstart, 350 at the paper's settings), and its validation set is usually the
smaller one; the ensemble is the combination of the cheap families.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ddpm_ood.errors import UserError
from ddpm_ood.families import FEATURE_FAMILIES, get_family
from ddpm_ood.families.density import FeatureDensity
from ddpm_ood.families.ensemble import ensemble_scores
from ddpm_ood.results.schema import IN_NAME, VAL_NAME, feature_set_names, read_features
from ddpm_ood.results.writer import read_settings

ENSEMBLE = "ensemble"
# Sidecar keys that may differ between the sets of one family (which images); every other setting must agree.
PER_SET_KEYS = ("csv", "first_n")


@dataclass(frozen=True)
class FamilyScores:
    """One score family's image scores: ``sets`` {set name: Series indexed by filename}, "val" and "in" included;
    ``nfe`` network evaluations per image; ``model`` the fitted density in one line."""

    family: str
    nfe: int
    model: str
    sets: dict[str, pd.Series]


def families_present(directory: Path) -> list[str]:
    """The feature families with any feature file under a run's ood/ folder, in ``FEATURE_FAMILIES`` order."""
    return [f for f in FEATURE_FAMILIES if feature_set_names(directory / f)]


def read_family(directory: Path, family: str, out_sets: list[str] | None) -> tuple[dict[str, pd.DataFrame], int]:
    """({set name: features indexed by filename}, nfe) of one family: val, in and the out sets present (or those
    asked for, where present). UserError naming the file and the command that makes it when val or in is missing,
    and when the sets were made with different settings (their scores would not be comparable)."""
    folder = directory / family
    names = feature_set_names(folder)
    for needed in (VAL_NAME, IN_NAME):
        if needed not in names:
            raise UserError(f"{folder / f'features_{needed}.csv'}: not found; the {family} score needs the "
                            f"{'validation' if needed == VAL_NAME else 'in-distribution test'} features: run "
                            f"reconstruct.py --run_{needed}=1 --scores={family} with the flags that made "
                            f"{', '.join(f'features_{n}.csv' for n in names)}")
    outs = [n for n in names if n not in (VAL_NAME, IN_NAME) and (out_sets is None or n in out_sets)]
    settings = {n: _settings(folder / f"features_{n}.json") for n in (VAL_NAME, IN_NAME, *outs)}
    for name, s in settings.items():
        if s != settings[VAL_NAME]:
            changed = sorted(k for k in set(s) | set(settings[VAL_NAME]) if s.get(k) != settings[VAL_NAME].get(k))
            raise UserError(f"{folder / f'features_{name}.json'}: made with other settings than features_val.json "
                            f"({', '.join(changed)}); rerun reconstruct.py --scores={family} for every set alike")
    frames = {n: read_features(folder / f"features_{n}.csv") for n in (VAL_NAME, IN_NAME, *outs)}
    return frames, int(settings[VAL_NAME].get("nfe", 0))


def _settings(path: Path) -> dict:
    try:
        saved = read_settings(path)
    except (OSError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: missing or unreadable settings; rerun reconstruct.py for this set")
    return {k: v for k, v in saved.items() if k not in PER_SET_KEYS}


def density_scores(family: str, frames: Mapping[str, pd.DataFrame], nfe: int) -> FamilyScores:
    """Fit the family's density on ``frames["val"]`` alone and score every set."""
    val = frames[VAL_NAME]
    density = FeatureDensity().fit(val.to_numpy(), columns=list(val.columns))
    sets = {name: pd.Series(density.score(f.to_numpy()), index=f.index, name=family) for name, f in frames.items()}
    return FamilyScores(family, nfe, density.summary(), sets)


def ensemble(frames: Mapping[str, Mapping[str, pd.DataFrame]], nfe: int) -> FamilyScores:
    """The ensemble score (module doc) of the families in ``frames`` ({family: {set: features}}); ``nfe``: its
    network evaluations per image (``ensemble_nfe``). Sets missing
    from some family are left out; only images in every family's file of a set are scored."""
    families = list(frames)
    sets = [s for s in frames[families[0]] if all(s in frames[f] for f in families)]
    images = {s: sorted(set.intersection(*(set(frames[f][s].index) for f in families))) for s in sets}
    if not images[VAL_NAME]:
        raise UserError("the ensemble's families share no validation image; reconstruct them from the same CSVs")
    blocks = {f: [frames[f][s].loc[images[s]].to_numpy() for s in sets] for f in families}
    columns = {f: list(frames[f][VAL_NAME].columns) for f in families}
    result = ensemble_scores(blocks, columns)
    scored = {s: pd.Series(v, index=images[s], name=ENSEMBLE) for s, v in zip(sets, result.scores, strict=True)}
    return FamilyScores(ENSEMBLE, nfe, result.density.summary(), scored)


def ensemble_nfe(scores: list[FamilyScores]) -> int:
    """Network evaluations per image of the ensemble: the families of one call group (eps_norm and
    denoising_error; the two DiffPath statistics) share their calls, counted once."""
    return sum({get_family(s.family).group.name: s.nfe for s in scores}.values())


def all_family_scores(directory: Path, out_sets: list[str] | None) -> list[FamilyScores]:
    """Every feature family's scores and, when the run has two or more, the ensemble's."""
    out: list[FamilyScores] = []
    frames: dict[str, dict[str, pd.DataFrame]] = {}
    for family in families_present(directory):
        frames[family], nfe = read_family(directory, family, out_sets)
        out.append(density_scores(family, frames[family], nfe))
    if len(frames) >= 2:
        out.append(ensemble(frames, ensemble_nfe(out)))
    return out
