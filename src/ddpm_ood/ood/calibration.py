"""Everything fitted on a run's VALIDATION files, and only on them: each feature family's score (``fit_family``), the
ensemble (``fit_ensemble``), the scorer's whole recipe (``read_recipe``) and its decision threshold
(``calibrate_threshold``). ood_detection.py (``ood.detection``) and score.py (``ood.scorer``) both fit here, so an
image scores the same through either; no test or OOD row ever reaches a fit.

A feature family's score is the negative log-likelihood of an image's features under a density fitted on the
validation features (``ScoreFamily.fit``): higher = more OOD. The ensemble (``families.ensemble``) is the mean over its
members (every feature family computed, each counted once, and the paper's reconstruction score when present) of
each member's score z-scored against its own validation scores.

The recipe of one score for new inputs (``read_recipe``):
- a reconstruction score (``families.RECONSTRUCTION_SCORES``): the validation results and their z-score reference;
- a feature family: its validation features, its settings and its fitted score;
- ``ensemble``: its members, each fitted as above, and the ensemble fitted on their validation scores.
Every part must come from the same checkpoint, epoch, precision and EMA choice (``results.provenance``);
``val_scores`` are the validation images' own scores, for the threshold.

Threshold: the ``val_keep`` quantile (numpy's linear interpolation) of the validation images' own scores. An input
is flagged when its score is strictly above it, so about ``1 - val_keep`` of in-distribution inputs are flagged (the
expected false-positive rate); on the validation images themselves the flagged count is within one image of
``(1 - val_keep) * n_val``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.families import ENSEMBLE, RECONSTRUCTION_SCORES, feature_family_names, get_family
from ddpm_ood.families.base import FittedScore
from ddpm_ood.families.ensemble import Ensemble, ensemble_members
from ddpm_ood.families.registry import check_score_name
from ddpm_ood.ood.zscore import ValidationReference, image_scores, select_timesteps
from ddpm_ood.results.provenance import require_same
from ddpm_ood.results.run_dir import RunDir, sidecar
from ddpm_ood.results.schema import VAL_NAME, read_features, read_results
from ddpm_ood.results.writer import FeatureSettings, ReconSettings

DEFAULT_VAL_KEEP = 0.95
# The settings every part of a score must share (its numbers would not be comparable otherwise).
RUN_KEYS = ("checkpoint", "checkpoint_epoch", "use_ema", "precision", "noise_type", "autoencoder", "pretrained")


# ------------------------------------------------------------------------------------------------- fitted scores
def families_present(run_dir: RunDir) -> list[str]:
    """The feature families with any feature file in the run folder, in the registry's order."""
    return [f for f in feature_family_names() if run_dir.feature_sets(f)]


def fit_family(family: str, val: pd.DataFrame) -> FittedScore:
    """The family's score fitted on its validation features (rows = images, columns = features)."""
    return get_family(family).fit(val.to_numpy(), list(val.columns))


def fit_ensemble(members: Mapping[str, Mapping[str, pd.Series]]) -> tuple[Ensemble, dict[str, pd.Series]]:
    """The ensemble (module doc) fitted on its members' validation scores, and its scores of every set:
    ``members`` {member: {set: image scores by filename}}, "val" in every member, in member order. Sets missing from
    some member are left out; only images in every member's file of a set are scored."""
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
    ``recon``: the reconstruction settings and reference when the score needs reconstruction; ``families``: the
    feature families to compute for new inputs, with ``family_settings`` ({family: its settings}) and ``fitted``
    ({family: its fitted score}); ``ensemble``: the fitted ensemble; ``val_file``: the validation file whose
    sidecar says how the run was made (for messages)."""

    score: str
    run_settings: ReconSettings | FeatureSettings
    recon: tuple[ReconSettings, ValidationReference] | None
    families: tuple[str, ...]
    family_settings: dict[str, Any]
    fitted: dict[str, FittedScore]
    ensemble: Ensemble | None
    val_scores: np.ndarray
    val_file: str

    def image_scores(self, recon_rows: pd.DataFrame | None, feature_rows: dict[str, pd.DataFrame]) -> pd.DataFrame:
        """Scores of new inputs from their rows (``measured_rows`` / ``feature_rows`` frames): index filename,
        columns ``score`` (this recipe's), ``mse_score`` and ``perceptual_score`` (NaN without reconstruction)."""
        recon = image_scores(recon_rows, self.recon[1], source="inputs") if recon_rows is not None else None
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


def read_recipe(run_dir: RunDir, score: str) -> ScoreRecipe:
    """The recipe of ``score`` from the run folder's validation files; UserError naming the file and the command
    when a part is missing or the parts were made differently."""
    check_score_name(score)
    val_results = run_dir.results(VAL_NAME)
    if score == ENSEMBLE:
        members = ensemble_members(families_present(run_dir), val_results.is_file())
        if len(members) < 2:
            raise UserError(f"{run_dir.ood}: the ensemble needs two or more scores; run reconstruct.py --run_val=1 "
                            "--scores=all first")
    else:
        members = [score]
    recon = _reconstruction(val_results) if any(m in RECONSTRUCTION_SCORES for m in members) else None
    families = [m for m in members if m in feature_family_names()]
    parts = {val_results: recon[0]} if recon is not None else {}
    parts.update({run_dir.features(f, VAL_NAME): FeatureSettings.read(sidecar(run_dir.features(f, VAL_NAME)))
                  for f in families})
    (first, reference), *others = parts.items()
    for path, part in others:
        require_same(reference.to_dict(), part.to_dict(), keys=RUN_KEYS, reference_name=sidecar(first).name,
                     other_name=str(sidecar(path)), fix="rerun reconstruct.py --run_val=1 for every score family alike")
    frames = {f: read_features(run_dir.features(f, VAL_NAME)) for f in families}
    fitted = {f: fit_family(f, frames[f]) for f in families}
    val_members = {f: pd.Series(fitted[f].score(frames[f].to_numpy()), index=frames[f].index) for f in families}
    if recon is not None:
        recon_scores = image_scores(read_results(val_results), recon[1], source=str(val_results))
        val_members.update({name: recon_scores[name] for name in RECONSTRUCTION_SCORES})
    ensemble = None
    if score == ENSEMBLE:
        ensemble, scored = fit_ensemble({m: {VAL_NAME: val_members[m]} for m in members})
        val_scores = scored[VAL_NAME].to_numpy()
    else:
        val_scores = val_members[score].to_numpy()
    family_settings = {f: get_family(f).settings_from(parts[run_dir.features(f, VAL_NAME)].settings)
                       for f in families}
    return ScoreRecipe(score, reference, recon, tuple(families), family_settings, fitted, ensemble,
                       np.asarray(val_scores, dtype=float), first.name)


def _reconstruction(val_path) -> tuple[ReconSettings, ValidationReference]:
    if not val_path.is_file():
        raise UserError(f"{val_path}: not found; run reconstruct.py with --run_val=1 first "
                        "(scores and the threshold are calibrated on the validation results)")
    settings = ReconSettings.read(sidecar(val_path))
    val = read_results(val_path)
    val_ts = sorted(set(val["t"].astype(int)))
    if val_ts != sorted(settings.start_timesteps):
        raise UserError(f"{val_path}: has start t={val_ts} but {sidecar(val_path).name} says "
                        f"{list(settings.start_timesteps)}; rerun reconstruct.py with --run_val=1")
    return settings, ValidationReference.fit(val, select_timesteps(val_ts), source=str(val_path))
