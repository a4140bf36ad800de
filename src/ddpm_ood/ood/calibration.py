"""Everything the scorer fits on a run's VALIDATION files, and only on them: its whole recipe (``read_recipe``) and
its decision threshold (``calibrate_threshold``). A family's score is fitted by ``ScoreFamily.fit_on`` and the
ensemble by ``families.ensemble.fit_ensemble``, for ood_detection.py (``ood.detection``) and score.py alike, so an
image scores the same through either; no test or OOD row ever reaches a fit.

A feature family's score is the negative log-likelihood of an image's features under a density fitted on the
validation features (``ScoreFamily.fit``): higher = more OOD. The ensemble (``families.ensemble``) is the mean over its
members (every feature family computed, each counted once, and the paper's reconstruction score when present) of
each member's score z-scored against its own validation scores.

The recipe of one score for new inputs (``read_recipe``):
- a reconstruction score (``families.RECONSTRUCTION_SCORES``): the validation results and their z-score reference;
- a feature family: its validation features, its settings and its fitted score;
- ``ensemble``: its members, each fitted as above, and the ensemble fitted on their validation scores.
Every part must come from the same model (``results.run_dir.read_validation``, ``results.provenance``);
``val_scores`` are the validation images' own scores, for the threshold.

Threshold: the ``val_keep`` quantile (numpy's linear interpolation) of the validation images' own scores. An input
is flagged when its score is strictly above it, so about ``1 - val_keep`` of in-distribution inputs are flagged (the
expected false-positive rate); on the validation images themselves the flagged count is within one image of
``(1 - val_keep) * n_val``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.families import ENSEMBLE, RECONSTRUCTION_SCORES, feature_family_names, get_family
from ddpm_ood.families.base import FittedScore
from ddpm_ood.families.ensemble import Ensemble, ensemble_members, fit_ensemble
from ddpm_ood.families.registry import check_score_name
from ddpm_ood.ood.zscore import ValidationReference, image_scores, select_timesteps
from ddpm_ood.results.run_dir import RunDir, read_validation, sidecar
from ddpm_ood.results.schema import VAL_NAME
from ddpm_ood.results.writer import FeatureSettings, ReconSettings

DEFAULT_VAL_KEEP = 0.95


def families_present(run_dir: RunDir) -> list[str]:
    """The feature families with any feature file in the run folder, in the registry's order."""
    return [score for score in feature_family_names() if run_dir.feature_sets(score)]


# ---------------------------------------------------------------------------------------------------- threshold
@dataclass(frozen=True)
class Calibration:
    """The decision threshold and what it means on the validation set.

    threshold: the ``val_keep`` quantile of the validation scores; an input is OOD when its score > threshold.
    val_keep: fraction of in-distribution inputs meant to be kept, in (0, 1]. n_val: validation images.
    val_flagged: validation images scoring above the threshold.
    """

    threshold: float
    val_keep: float
    n_val: int
    val_flagged: int

    @property
    def expected_fpr(self) -> float:
        """1 - val_keep: the fraction of in-distribution inputs expected to be flagged."""
        return 1.0 - self.val_keep

    @property
    def val_fpr(self) -> float:
        """The fraction of validation images above the threshold (the empirical false-positive rate)."""
        return self.val_flagged / self.n_val

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "val_keep": self.val_keep,
            "expected_false_positive_rate": self.expected_fpr,
            "validation_false_positive_rate": self.val_fpr,
            "n_validation": self.n_val,
            "n_validation_flagged": self.val_flagged,
        }


def check_val_keep(val_keep: float) -> float:
    """``val_keep`` as a float in (0, 1]; anything else is a ParameterError naming val_keep."""
    v = float(val_keep)
    if not 0.0 < v <= 1.0:
        raise ParameterError(f"val_keep must be in (0, 1] (the fraction of validation images kept), got {val_keep}",
                             "val_keep")
    return v


def calibrate_threshold(val_scores: Sequence[float] | np.ndarray, val_keep: float = DEFAULT_VAL_KEEP) -> Calibration:
    """Threshold = the ``val_keep`` quantile (linear interpolation) of the validation images' scores.

    ``val_scores``: one finite score per validation image, higher = more OOD. With n scores, the number strictly
    above the threshold is within one of ``(1 - val_keep) * n`` (for distinct scores). ``val_keep = 1`` puts the
    threshold at the highest validation score (no validation image flagged).
    """
    val_keep = check_val_keep(val_keep)
    scores = np.asarray(val_scores, dtype=float).ravel()
    if scores.size == 0:
        raise UserError("no validation scores to calibrate the threshold on")
    if not np.isfinite(scores).all():
        raise UserError("validation scores contain NaN or infinite values; cannot calibrate the threshold")
    threshold = float(np.quantile(scores, val_keep))
    return Calibration(threshold, val_keep, int(scores.size), int((scores > threshold).sum()))


# ------------------------------------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class ScoreRecipe:
    """See the module doc. ``run_settings``: the settings of the run the parts share (checkpoint, precision, ...);
    ``results_settings`` and ``reference``: the reconstruction settings and z-score reference when the score needs
    reconstruction (else None); ``families``: the feature families to compute for new inputs, with
    ``family_settings`` ({family: its settings}) and ``fitted`` ({family: its fitted score}); ``ensemble``: the
    fitted ensemble; ``val_sidecar``: the sidecar of the validation file that says how the run was made (for
    messages)."""

    score: str
    run_settings: ReconSettings | FeatureSettings
    results_settings: ReconSettings | None
    reference: ValidationReference | None
    families: tuple[str, ...]
    family_settings: dict[str, Any]
    fitted: dict[str, FittedScore]
    ensemble: Ensemble | None
    val_scores: np.ndarray
    val_sidecar: str

    def image_scores(self, recon_rows: pd.DataFrame | None, feature_rows: dict[str, pd.DataFrame]) -> pd.DataFrame:
        """Scores of new inputs from their rows (``measured_rows`` / ``feature_rows`` frames): index filename,
        columns ``score`` (this recipe's), ``mse_score`` and ``perceptual_score`` (NaN without reconstruction)."""
        recon = image_scores(recon_rows, self.reference, source="inputs") if recon_rows is not None else None
        member_scores: dict[str, pd.Series] = {}
        if recon is not None:
            member_scores.update({name: recon[name] for name in RECONSTRUCTION_SCORES})
        for family, rows in feature_rows.items():
            frame = rows.set_index(rows["filename"].astype(str)).drop(columns=["index", "filename", "type"])
            member_scores[family] = pd.Series(self.fitted[family].score(frame.to_numpy()), index=frame.index)
        if self.score == ENSEMBLE:
            index = member_scores[self.ensemble.members[0]].index
            score = self.ensemble.score({m: member_scores[m].loc[index].to_numpy() for m in self.ensemble.members})
        else:
            index, score = member_scores[self.score].index, member_scores[self.score].to_numpy()
        out = pd.DataFrame({"score": np.asarray(score, dtype=float)}, index=pd.Index(index, name="filename"))
        for column, name in (("mse_score", "mse"), ("perceptual_score", "perceptual")):
            out[column] = recon[name].reindex(out.index).to_numpy() if recon is not None else np.nan
        return out


def read_recipe(run_dir: RunDir, name: str) -> ScoreRecipe:
    """The recipe of the score ``name`` from the run folder's validation files; UserError naming the file and the
    command when a part is missing or the parts were made differently."""
    check_score_name(name)
    members = [name]
    if name == ENSEMBLE:
        members = ensemble_members(families_present(run_dir), run_dir.results(VAL_NAME).is_file())
        if len(members) < 2:
            raise UserError(f"{run_dir.ood}: the ensemble needs two or more scores; run reconstruct.py --run_val=1 "
                            "--scores=all first")
    files = read_validation(run_dir, any(m in RECONSTRUCTION_SCORES for m in members),
                            [m for m in members if m in feature_family_names()])
    val_members: dict[str, pd.Series] = {}
    reference = None
    if files.results is not None:
        source = str(files.first)
        reference = ValidationReference.fit(files.results, select_timesteps(files.results["t"]), source=source)
        val_members.update(image_scores(files.results, reference, source=source)[list(RECONSTRUCTION_SCORES)].items())
    families = {score: get_family(score) for score in files.features}
    family_settings = {score: family.settings_from(files.feature_settings[score].settings)
                       for score, family in families.items()}
    fitted = {score: family.fit_on(files.features[score]) for score, family in families.items()}
    val_members.update({score: pd.Series(fitted[score].score(features.to_numpy()), index=features.index)
                        for score, features in files.features.items()})
    ensemble = None
    if name == ENSEMBLE:
        ensemble, scored = fit_ensemble({m: {VAL_NAME: val_members[m]} for m in members})
        val_scores = scored[VAL_NAME].to_numpy()
    else:
        val_scores = val_members[name].to_numpy()
    return ScoreRecipe(name, files.settings, files.results_settings, reference, tuple(families), family_settings,
                       fitted, ensemble, np.asarray(val_scores, dtype=float), str(sidecar(files.first)))
