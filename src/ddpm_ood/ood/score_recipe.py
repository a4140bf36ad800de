"""What one score needs to score new inputs, read from a run's validation files: ``read_recipe(directory, score)``.

- a reconstruction score (``families.RECONSTRUCTION_SCORES``): the validation results and their z-score reference;
- a feature family (``families.feature_family_names()``): its validation features, its settings and its score
  fitted on them (``ood.family_scores.fit_family``, the one fit ood_detection.py uses too);
- ``ensemble``: its members (``families.ensemble.ensemble_members``), each fitted as above, and the ensemble fitted
  on their validation scores (``ood.family_scores.ensemble``'s rule).

Every part must come from the same checkpoint, epoch, precision and EMA choice (else UserError): their scores
would not be comparable. ``val_scores`` are the validation images' own scores, for the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ddpm_ood.errors import UserError
from ddpm_ood.families import ENSEMBLE, RECONSTRUCTION_SCORES, feature_family_names, get_family
from ddpm_ood.families.base import FittedScore
from ddpm_ood.families.ensemble import Ensemble, ensemble_members
from ddpm_ood.families.registry import check_score_name
from ddpm_ood.ood.family_scores import families_present, fit_ensemble, fit_family
from ddpm_ood.ood.zscore import ValidationReference, image_scores, select_timesteps
from ddpm_ood.results.schema import VAL_NAME, read_features, read_results
from ddpm_ood.results.writer import FeatureSettings, ReconSettings

# The settings every part of a score must share (its numbers would not be comparable otherwise).
RUN_KEYS = ("checkpoint", "checkpoint_epoch", "use_ema", "precision", "noise_type", "autoencoder", "pretrained")


@dataclass(frozen=True)
class ScoreRecipe:
    """See the module doc. ``run_settings``: the settings of the run the parts share (checkpoint, precision, ...);
    ``recon``: the reconstruction settings and reference when the score needs reconstruction; ``families``: the
    feature families to compute for new inputs, with ``family_settings`` ({family: its settings}) and ``fitted``
    ({family: its fitted score}); ``ensemble``: the fitted ensemble."""

    score: str
    run_settings: ReconSettings | FeatureSettings
    recon: tuple[ReconSettings, ValidationReference] | None
    families: tuple[str, ...]
    family_settings: dict[str, Any]
    fitted: dict[str, FittedScore]
    ensemble: Ensemble | None
    val_scores: np.ndarray

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


def read_recipe(directory: Path, score: str, val_results: Path) -> ScoreRecipe:
    """The recipe of ``score`` for the run whose ood/ folder is ``directory`` (``val_results``: its
    results_val.csv); UserError naming the file and the command when a part is missing or the parts disagree."""
    check_score_name(score)
    if score == ENSEMBLE:
        members = ensemble_members(families_present(directory), val_results.is_file())
        if len(members) < 2:
            raise UserError(f"{directory}: the ensemble needs two or more scores; run reconstruct.py --run_val=1 "
                            "--scores=all first")
    else:
        members = [score]
    recon = _reconstruction(val_results) if any(m in RECONSTRUCTION_SCORES for m in members) else None
    families = [m for m in members if m in feature_family_names()]
    stored = {f: FeatureSettings.read(directory / f / "features_val.json") for f in families}
    frames = {f: read_features(directory / f / "features_val.csv") for f in families}
    parts = ([recon[0]] if recon is not None else []) + list(stored.values())
    _check_same_run(parts, directory)
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
    family_settings = {f: get_family(f).settings_from(stored[f].settings) for f in families}
    return ScoreRecipe(score, parts[0], recon, tuple(families), family_settings, fitted, ensemble,
                       np.asarray(val_scores, dtype=float))


def _reconstruction(val_path: Path) -> tuple[ReconSettings, ValidationReference]:
    if not val_path.is_file():
        raise UserError(f"{val_path}: not found; run reconstruct.py with --run_val=1 first "
                        "(scores and the threshold are calibrated on the validation results)")
    settings = ReconSettings.read(val_path.with_suffix(".json"))
    val = read_results(val_path)
    val_ts = sorted(set(val["t"].astype(int)))
    if val_ts != sorted(settings.start_timesteps):
        raise UserError(f"{val_path}: has start t={val_ts} but {val_path.with_suffix('.json').name} says "
                        f"{list(settings.start_timesteps)}; rerun reconstruct.py with --run_val=1")
    return settings, ValidationReference.fit(val, select_timesteps(val_ts), source=str(val_path))


def _check_same_run(parts: list[ReconSettings | FeatureSettings], directory: Path) -> None:
    first = parts[0]
    for other in parts[1:]:
        changed = [k for k in RUN_KEYS if getattr(other, k) != getattr(first, k)]
        if changed:
            raise UserError(f"{directory}: the score's parts were made with different {', '.join(changed)}; rerun "
                            "reconstruct.py --run_val=1 for every score family alike")
