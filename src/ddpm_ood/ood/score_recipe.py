"""What one score needs to score new inputs, read from a run's validation files: ``read_recipe(directory, score)``.

- a reconstruction score (``ood.zscore.SCORE_NAMES``): the validation results and their z-score reference;
- a feature family (``families.FEATURE_FAMILIES``): its validation features and the density fitted on them;
- ``ensemble``: every feature family the run has, one density fitted on their validation features side by side
  (``ood.family_scores``).

Every part must come from the same checkpoint, epoch, precision and EMA choice (else UserError): their scores
would not be comparable. ``val_scores`` are the validation images' own scores, for the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ddpm_ood.errors import UserError
from ddpm_ood.families import FEATURE_FAMILIES, FamilySettings
from ddpm_ood.families.density import FeatureDensity
from ddpm_ood.families.ensemble import EnsembleResult, ensemble_scores
from ddpm_ood.ood.family_scores import ENSEMBLE, families_present
from ddpm_ood.ood.zscore import SCORE_NAMES, ValidationReference, image_scores, select_timesteps
from ddpm_ood.results.schema import read_features, read_results
from ddpm_ood.results.writer import FeatureSettings, ReconSettings

SCORABLE = (*SCORE_NAMES, *FEATURE_FAMILIES, ENSEMBLE)
# The settings every part of a score must share (its numbers would not be comparable otherwise).
RUN_KEYS = ("checkpoint", "checkpoint_epoch", "use_ema", "precision", "noise_type", "autoencoder", "pretrained")


@dataclass(frozen=True)
class ScoreRecipe:
    """See the module doc. ``run_settings``: the settings of the run the parts share (checkpoint, precision, ...);
    ``recon``: the reconstruction settings and reference when the score needs reconstruction; ``families``: the
    feature families to compute for new inputs, with ``family_settings``; ``densities``: a family score's density;
    ``ensemble``: the ensemble's fit."""

    score: str
    run_settings: ReconSettings | FeatureSettings
    recon: tuple[ReconSettings, ValidationReference] | None
    families: tuple[str, ...]
    family_settings: FamilySettings | None
    densities: dict[str, FeatureDensity]
    ensemble: EnsembleResult | None
    val_scores: np.ndarray

    def image_scores(self, recon_rows: pd.DataFrame | None, feature_rows: dict[str, pd.DataFrame]) -> pd.DataFrame:
        """Scores of new inputs from their rows (``measured_rows`` / ``feature_rows`` frames): index filename,
        columns ``score`` (this recipe's), ``mse_score`` and ``perceptual_score`` (NaN without reconstruction)."""
        recon = image_scores(recon_rows, self.recon[1], source="inputs") if recon_rows is not None else None
        features = {f: rows.set_index(rows["filename"].astype(str)).drop(columns=["index", "filename", "type"])
                    for f, rows in feature_rows.items()}
        if self.score in SCORE_NAMES:
            index, score = recon.index, recon[self.score].to_numpy()
        elif self.score in self.densities:
            frame = features[self.score]
            index, score = frame.index, self.densities[self.score].score(frame.to_numpy())
        else:
            blocks = features
            index = blocks[self.ensemble.families[0]].index
            joined = np.concatenate([blocks[f].loc[index].to_numpy() for f in self.ensemble.families], axis=1)
            score = self.ensemble.density.score(joined)
        out = pd.DataFrame({"score": np.asarray(score, dtype=float)}, index=pd.Index(index, name="filename"))
        for column, name in (("mse_score", "mse"), ("perceptual_score", "perceptual")):
            out[column] = recon[name].reindex(out.index).to_numpy() if recon is not None else np.nan
        return out


def read_recipe(directory: Path, score: str, val_results: Path) -> ScoreRecipe:
    """The recipe of ``score`` for the run whose ood/ folder is ``directory`` (``val_results``: its
    results_val.csv); UserError naming the file and the command when a part is missing or the parts disagree."""
    if score not in SCORABLE:
        raise UserError(f"unknown score {score!r}; accepted: {', '.join(SCORABLE)}")
    recon = _reconstruction(val_results) if score in SCORE_NAMES else None
    families = [score] if score in FEATURE_FAMILIES else families_present(directory) if score == ENSEMBLE else []
    if score == ENSEMBLE and len(families) < 2:
        raise UserError(f"{directory}: the ensemble needs two or more score families; run reconstruct.py "
                        "--run_val=1 --scores=all first")
    settings = {f: FeatureSettings.read(directory / f / "features_val.json") for f in families}
    frames = {f: read_features(directory / f / "features_val.csv") for f in families}
    parts = ([recon[0]] if recon is not None else []) + list(settings.values())
    _check_same_run(parts, directory)
    densities, ensemble = {}, None
    if score in FEATURE_FAMILIES:
        densities[score] = FeatureDensity().fit(frames[score].to_numpy(), columns=list(frames[score].columns))
        val_scores = densities[score].score(frames[score].to_numpy())
    elif score == ENSEMBLE:
        images = sorted(set.intersection(*(set(b.index) for b in frames.values())))
        ensemble = ensemble_scores({f: [b.loc[images].to_numpy()] for f, b in frames.items()},
                                   {f: list(b.columns) for f, b in frames.items()})
        val_scores = ensemble.scores[0]
    else:
        val_scores = image_scores(read_results(val_results), recon[1], source=str(val_results))[score].to_numpy()
    return ScoreRecipe(score, parts[0], recon, tuple(families), _family_settings(settings), densities, ensemble,
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


def _family_settings(settings: dict[str, FeatureSettings]) -> FamilySettings | None:
    """One FamilySettings for every family to compute, from their validation sidecars."""
    if not settings:
        return None
    levels = next((s.levels for s in settings.values() if s.levels is not None), None)
    diffpath = next((s for s in settings.values() if s.diffpath_steps is not None), None)
    first = next(iter(settings.values()))
    kwargs = {"seed": first.seed, "noise_type": first.noise_type}
    if levels is not None:
        kwargs["levels"] = levels
    if diffpath is not None:
        kwargs.update(diffpath_steps=diffpath.diffpath_steps, diffpath_clip=diffpath.diffpath_clip)
    return FamilySettings(**kwargs)
