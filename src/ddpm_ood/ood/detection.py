"""Every score of every set of a run, for ood_detection.py's table: the paper's reconstruction scores from the
results files (``reconstruction_scores``) and each feature family's and the ensemble's from the feature files
(``all_family_scores``), fitted on the validation files alone (``ScoreFamily.fit_on``,
``families.ensemble.fit_ensemble``).

The reconstruction scores of an image (higher = more OOD; ``ood.zscore``) are, for each start t, the reconstruction
MSE and LPIPS z-scored against the validation images at that t (mean, sample std), summed (``mse+perceptual``, the
paper's) or alone (``mse``, ``perceptual``), averaged over t. Every ``results_<Name>.csv`` other than val and in is an
out set (``out_sets`` may pick some); upstream's results files with their stray index column are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.families import ENSEMBLE, get_family
from ddpm_ood.families.ensemble import ensemble_members, fit_ensemble
from ddpm_ood.ood.calibration import families_present
from ddpm_ood.ood.metrics import summary_table
from ddpm_ood.ood.zscore import ValidationReference, mean_over_t, select_timesteps, z_scores
from ddpm_ood.reconstruction.engine import evaluations_per_image
from ddpm_ood.results.provenance import require_same
from ddpm_ood.results.run_dir import RunDir, sidecar
from ddpm_ood.results.schema import IN_NAME, VAL_NAME, read_features, read_results
from ddpm_ood.results.writer import read_settings

# Sidecar keys that may differ between the sets of one family (which images); every other setting must agree.
PER_SET_KEYS = ("csv", "first_n")


# ------------------------------------------------------------------------------------------- reconstruction scores
@dataclass(frozen=True)
class ReconstructionScores:
    """The paper's family from a run's results files: z-scores per (image, t) (``in_z``, ``out_z``), image scores
    (``val_scores``, ``in_scores``, ``out_scores``: one column per ``SCORE_NAMES``), its summary rows and its
    network evaluations per image."""

    ref: ValidationReference
    val_scores: pd.DataFrame
    in_z: pd.DataFrame
    out_z: dict[str, pd.DataFrame]
    in_scores: pd.DataFrame
    out_scores: dict[str, pd.DataFrame]
    summary: pd.DataFrame
    nfe: int
    precision: str | None


def choose_out_sets(run_dir: RunDir, requested: list[str] | None) -> list[str]:
    """The out sets to evaluate: those requested (each must have results), else every one present."""
    present = run_dir.out_sets()
    if not present:
        raise UserError(f"{run_dir.ood}: no out-set results (results_<Name>.csv besides val and in) found")
    if requested is None:
        return present
    unknown = [n for n in requested if n not in present]
    if unknown:
        raise ParameterError(f"out_sets: no results for {', '.join(unknown)} in {run_dir.ood}; present: "
                             f"{', '.join(present)}", "out_sets")
    return list(dict.fromkeys(requested))


def reconstruction_scores(run_dir: RunDir, out_sets: list[str] | None, window: tuple[int, int, int]
                          ) -> ReconstructionScores:
    """The reconstruction scores of val, in and the out sets; ``window``: (min_t, max_t, t_skip), the start points
    kept (``zscore.select_timesteps``)."""
    val_path, in_path = run_dir.results(VAL_NAME), run_dir.results(IN_NAME)
    val = read_results(val_path)
    ref = ValidationReference.fit(val, select_timesteps(val["t"], *window), source=str(val_path))
    val_scores = mean_over_t(z_scores(val, ref, source=str(val_path)))
    in_z = z_scores(read_results(in_path), ref, source=str(in_path))
    in_scores = mean_over_t(in_z)
    names = choose_out_sets(run_dir, out_sets)
    precision = _common_precision(run_dir, [VAL_NAME, IN_NAME, *names])
    out_z, out_scores = {}, {}
    for name in names:
        path = run_dir.results(name)
        out_z[name] = z_scores(read_results(path), ref, source=str(path))
        out_scores[name] = mean_over_t(out_z[name])
        print(f"n_val={ref.n_val} n_in={len(in_scores)} n_out={len(out_scores[name])}")
    nfe = _reconstruction_nfe(val_path)
    return ReconstructionScores(ref, val_scores, in_z, out_z, in_scores, out_scores,
                                summary_table(in_scores, out_scores, nfe=nfe), nfe, precision)


def _common_precision(run_dir: RunDir, names: list[str]) -> str | None:
    """The precision every results file was reconstructed in (from its sidecar; None when no sidecar says, as for
    upstream results). Files made at different precisions are refused: their z-scores would mix two numerics."""
    found: dict[str, str] = {}
    for name in names:
        try:
            settings = read_settings(sidecar(run_dir.results(name))) or {}
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(settings, dict) and settings.get("precision"):
            found[name] = str(settings["precision"])
    first = next(iter(found), None)
    for name, precision in found.items():
        require_same({"precision": found[first]}, {"precision": precision},
                     reference_name=sidecar(run_dir.results(first)).name,
                     other_name=str(sidecar(run_dir.results(name))),
                     fix="rerun reconstruct.py for the odd ones out with the same --precision/--amp")
    return found.get(first)


def _reconstruction_nfe(val_path) -> int:
    """Network evaluations per image of the reconstruction score, from the validation results' settings (0 when
    they are unknown, as for upstream's results)."""
    try:
        s = read_settings(sidecar(val_path)) or {}
    except (OSError, json.JSONDecodeError):
        return 0
    if not all(k in s for k in ("start_timesteps", "num_inference_steps")):
        return 0
    return evaluations_per_image(s["start_timesteps"], s["num_inference_steps"], s.get("recon_steps"))


# ----------------------------------------------------------------------------------------------- family scores
@dataclass(frozen=True)
class FamilyScores:
    """One score family's image scores: ``sets`` {set name: Series indexed by filename}, "val" and "in" included;
    ``nfe`` network evaluations per image; ``model`` the fitted density in one line."""

    family: str
    nfe: int
    model: str
    sets: dict[str, pd.Series]

    def summary(self) -> pd.DataFrame:
        """``metrics.summary_table``'s rows for this family: one per out set it scored."""
        frame = pd.DataFrame({self.family: self.sets[IN_NAME]})
        outs = {name: pd.DataFrame({self.family: s}) for name, s in self.sets.items() if name not in (VAL_NAME, IN_NAME)}
        return summary_table(frame, outs, score_names=(self.family,), nfe=self.nfe)


def read_family(run_dir: RunDir, family: str, out_sets: list[str] | None) -> tuple[dict[str, pd.DataFrame], int]:
    """({set name: features indexed by filename}, nfe) of one family: val, in and the out sets present (or those
    asked for, where present). UserError naming the file and the command that makes it when val or in is missing,
    and when the sets were made with different settings (their scores would not be comparable)."""
    names = run_dir.feature_sets(family)
    for needed in (VAL_NAME, IN_NAME):
        if needed not in names:
            raise UserError(f"{run_dir.features(family, needed)}: not found; the {family} score needs the "
                            f"{'validation' if needed == VAL_NAME else 'in-distribution test'} features: run "
                            f"reconstruct.py --run_{needed}=1 --scores={family} with the flags that made "
                            f"{', '.join(f'features_{n}.csv' for n in names)}")
    outs = [n for n in names if n not in (VAL_NAME, IN_NAME) and (out_sets is None or n in out_sets)]
    settings = {n: _settings(sidecar(run_dir.features(family, n))) for n in (VAL_NAME, IN_NAME, *outs)}
    for name, s in settings.items():
        require_same(settings[VAL_NAME], s, reference_name="features_val.json",
                     other_name=str(sidecar(run_dir.features(family, name))),
                     fix=f"rerun reconstruct.py --scores={family} for every set alike")
    frames = {n: read_features(run_dir.features(family, n)) for n in (VAL_NAME, IN_NAME, *outs)}
    return frames, int(settings[VAL_NAME].get("nfe", 0))


def _settings(path) -> dict:
    try:
        saved = read_settings(path)
    except (OSError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: missing or unreadable settings; rerun reconstruct.py for this set")
    return {k: v for k, v in saved.items() if k not in PER_SET_KEYS}


def density_scores(family: str, frames: Mapping[str, pd.DataFrame], nfe: int) -> FamilyScores:
    """Fit the family's score on ``frames["val"]`` alone and score every set."""
    fitted = get_family(family).fit_on(frames[VAL_NAME])
    sets = {name: pd.Series(fitted.score(f.to_numpy()), index=f.index, name=family) for name, f in frames.items()}
    return FamilyScores(family, nfe, fitted.summary(), sets)


def ensemble(members: Mapping[str, Mapping[str, pd.Series]], nfe: int) -> FamilyScores:
    """The ensemble's ``FamilyScores`` (``families.ensemble.fit_ensemble``); ``nfe``: its network evaluations per image."""
    fitted, scored = fit_ensemble(members)
    return FamilyScores(ENSEMBLE, nfe, fitted.summary(), scored)


def ensemble_nfe(feature_scores: list[FamilyScores], recon_nfe: int = 0) -> int:
    """Network evaluations per image of the ensemble: its reconstruction member's plus its feature members', the
    families of one call group (eps_norm and denoising_error) counted once."""
    return recon_nfe + sum({get_family(s.family).calls.name: s.nfe for s in feature_scores}.values())


def all_family_scores(run_dir: RunDir, out_sets: list[str] | None,
                      paper_score: Mapping[str, pd.Series] | None = None, recon_nfe: int = 0) -> list[FamilyScores]:
    """Every feature family's scores and, when it has two or more members, the ensemble's. ``paper_score``: the
    reconstruction family's paper score by set ("val" included) when the run has it, the ensemble's member."""
    out: list[FamilyScores] = []
    for family in families_present(run_dir):
        frames, nfe = read_family(run_dir, family, out_sets)
        out.append(density_scores(family, frames, nfe))
    members = ensemble_members([f.family for f in out], paper_score is not None)
    if len(members) >= 2:
        by_family = {f.family: f for f in out}
        scores = {m: by_family[m].sets if m in by_family else paper_score for m in members}
        nfe = ensemble_nfe([by_family[m] for m in members if m in by_family],
                           recon_nfe if paper_score is not None else 0)
        out.append(ensemble(scores, nfe))
    return out
