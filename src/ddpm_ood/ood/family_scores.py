"""Scores of the feature families and of the ensemble, from a run's feature files (reconstruct.py --scores).

A feature family's score is the negative log-likelihood of an image's features under a density fitted on the
VALIDATION features only (``features_val.csv``; ``ScoreFamily.fit``, ``fit_family``): higher = more OOD. No test or
OOD row ever reaches a fit.

The ensemble (``families.ensemble``) is fixed before any OOD data is seen: the mean over its members (every feature
family computed, each counted once, and the paper's reconstruction score when present) of each member's score
z-scored against its own validation scores. Only images present in every member's file of a set take part.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ddpm_ood.errors import UserError
from ddpm_ood.families import ENSEMBLE, feature_family_names, get_family
from ddpm_ood.families.base import FittedScore
from ddpm_ood.families.ensemble import Ensemble, ensemble_members
from ddpm_ood.results.schema import IN_NAME, VAL_NAME, feature_set_names, read_features
from ddpm_ood.results.writer import read_settings

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
    """The feature families with any feature file under a run's ood/ folder, in the registry's order."""
    return [f for f in feature_family_names() if feature_set_names(directory / f)]


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
            changed = _changed_keys(s, settings[VAL_NAME])
            raise UserError(f"{folder / f'features_{name}.json'}: made with other settings than features_val.json "
                            f"({', '.join(changed)}); rerun reconstruct.py --scores={family} for every set alike")
    frames = {n: read_features(folder / f"features_{n}.csv") for n in (VAL_NAME, IN_NAME, *outs)}
    return frames, int(settings[VAL_NAME].get("nfe", 0))


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ, nested dicts (a family's own settings) by their inner keys: settings.levels."""
    changed = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            changed += _changed_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            changed.append(prefix + k)
    return changed


def _settings(path: Path) -> dict:
    try:
        saved = read_settings(path)
    except (OSError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: missing or unreadable settings; rerun reconstruct.py for this set")
    return {k: v for k, v in saved.items() if k not in PER_SET_KEYS}


def fit_family(family: str, val: pd.DataFrame) -> FittedScore:
    """The family's score fitted on its validation features (rows = images, columns = features): the one place a
    family's score is fitted, for ood_detection.py and score.py alike."""
    return get_family(family).fit(val.to_numpy(), list(val.columns))


def density_scores(family: str, frames: Mapping[str, pd.DataFrame], nfe: int) -> FamilyScores:
    """Fit the family's score on ``frames["val"]`` alone and score every set."""
    fitted = fit_family(family, frames[VAL_NAME])
    sets = {name: pd.Series(fitted.score(f.to_numpy()), index=f.index, name=family) for name, f in frames.items()}
    return FamilyScores(family, nfe, fitted.summary(), sets)


def fit_ensemble(members: Mapping[str, Mapping[str, pd.Series]]) -> tuple[Ensemble, dict[str, pd.Series]]:
    """The ensemble (module doc) fitted on its members' validation scores, and its scores of every set:
    ``members`` {member: {set: image scores by filename}}, "val" in every member, in member order. Sets missing from
    some member are left out; only images in every member's file of a set are scored. The one fit of the ensemble,
    for ood_detection.py and score.py alike."""
    fitted = Ensemble.fit({m: sets[VAL_NAME].to_numpy() for m, sets in members.items()})
    names = list(members)
    sets = [s for s in members[names[0]] if all(s in members[m] for m in names)]
    scored = {}
    for s in sets:
        images = sorted(set.intersection(*(set(members[m][s].index) for m in names)))
        if s == VAL_NAME and not images:
            raise UserError("the ensemble's members share no validation image; compute them from the same CSVs")
        values = fitted.score({m: members[m][s].loc[images].to_numpy() for m in names})
        scored[s] = pd.Series(values, index=pd.Index(images, name="filename"), name=ENSEMBLE)
    return fitted, scored


def ensemble(members: Mapping[str, Mapping[str, pd.Series]], nfe: int) -> FamilyScores:
    """The ensemble's ``FamilyScores`` (``fit_ensemble``); ``nfe``: its network evaluations per image."""
    fitted, scored = fit_ensemble(members)
    return FamilyScores(ENSEMBLE, nfe, fitted.summary(), scored)


def ensemble_nfe(feature_scores: list[FamilyScores], recon_nfe: int = 0) -> int:
    """Network evaluations per image of the ensemble: its reconstruction member's plus its feature members', the
    families of one call group (eps_norm and denoising_error) counted once."""
    return recon_nfe + sum({get_family(s.family).calls.name: s.nfe for s in feature_scores}.values())


def all_family_scores(directory: Path, out_sets: list[str] | None,
                      paper_score: Mapping[str, pd.Series] | None = None, recon_nfe: int = 0) -> list[FamilyScores]:
    """Every feature family's scores and, when it has two or more members, the ensemble's. ``paper_score``: the
    reconstruction family's paper score by set ("val" included) when the run has it, the ensemble's member."""
    out: list[FamilyScores] = []
    for family in families_present(directory):
        frames, nfe = read_family(directory, family, out_sets)
        out.append(density_scores(family, frames, nfe))
    members = ensemble_members([f.family for f in out], paper_score is not None)
    if len(members) >= 2:
        by_family = {f.family: f for f in out}
        scores = {m: by_family[m].sets if m in by_family else paper_score for m in members}
        nfe = ensemble_nfe([by_family[m] for m in members if m in by_family],
                           recon_nfe if paper_score is not None else 0)
        out.append(ensemble(scores, nfe))
    return out
