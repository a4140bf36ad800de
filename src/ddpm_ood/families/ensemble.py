"""The ensemble of scores: one rule, fixed before any OOD data is seen.

Members: every feature family computed for the run whose features are not part of another's (``diffpath1d`` is one
column of ``diffpath6d``: ``ScoreFamily.in_ensemble``), and the reconstruction family's paper score
(``mse+perceptual``) when it was computed. Each member's score (a family's negative log-likelihood, the paper's
mean z-score) is z-scored against that member's own validation scores (mean, sample standard deviation), and the
ensemble score is the mean of these z-scores over the members. Higher = more OOD. No weights, no OOD data: the rule
and everything it fits depend on validation rows only, so the score of a test image cannot change with the other
images scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ddpm_ood.errors import UserError
from ddpm_ood.families.registry import ENSEMBLE, RECONSTRUCTION_SCORES, get_family
from ddpm_ood.results.schema import VAL_NAME

PAPER_SCORE = next(iter(RECONSTRUCTION_SCORES))  # the reconstruction family's member: the paper's score


def ensemble_members(scores: Iterable[str], with_reconstruction: bool) -> list[str]:
    """The scores the ensemble averages (module docstring), in table order: the paper's score when
    ``with_reconstruction``, then those of the feature-family ``scores`` meant for the ensemble."""
    return ([PAPER_SCORE] if with_reconstruction else []) + [score for score in scores if get_family(score).in_ensemble]


@dataclass(frozen=True)
class Ensemble:
    """The fitted ensemble: each member's validation mean and sample standard deviation."""

    members: tuple[str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]

    @classmethod
    def fit(cls, val_scores: Mapping[str, np.ndarray]) -> Ensemble:
        """From {member: its (N_m,) validation scores}, in member order; UserError for fewer than two members or
        a member whose validation scores are constant or not finite."""
        if len(val_scores) < 2:
            raise UserError(f"the ensemble needs two or more scores, got {', '.join(val_scores) or 'none'}")
        means, stds = [], []
        for name, scores in val_scores.items():
            s = np.asarray(scores, dtype=np.float64)
            if s.size < 2 or not np.isfinite(s).all():
                raise UserError(f"ensemble member {name}: needs two or more finite validation scores")
            std = float(s.std(ddof=1))
            if not std > 0:
                raise UserError(f"ensemble member {name}: its validation scores are constant")
            means.append(float(s.mean()))
            stds.append(std)
        return cls(tuple(val_scores), tuple(means), tuple(stds))

    def score(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """(N,) ensemble scores from {member: (N,) scores of the same N images, in the same order}."""
        missing = [m for m in self.members if m not in scores]
        if missing:
            raise UserError(f"the ensemble needs the {', '.join(missing)} score(s) of these images")
        z = [(np.asarray(scores[m], dtype=np.float64) - mean) / std
             for m, mean, std in zip(self.members, self.means, self.stds, strict=True)]
        return np.mean(z, axis=0)

    def summary(self) -> str:
        return f"mean of {len(self.members)} validation z-scores: {', '.join(self.members)}"


def fit_ensemble(members: Mapping[str, Mapping[str, pd.Series]]) -> tuple[Ensemble, dict[str, pd.Series]]:
    """The ensemble fitted on its members' validation scores, and its scores of every set: ``members`` {member:
    {set: image scores by filename}}, "val" in every member, in member order. Sets missing from some member are left
    out; only images in every member's file of a set are scored. The one fit of the ensemble, for ood_detection.py
    and score.py alike."""
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
