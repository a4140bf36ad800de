"""What ood_detection.py computes and writes, as a library function: score every image from its reconstruction
errors and report how well the OOD sets are detected (``evaluate_model``, configured by ``DetectionJob``).

Reads ``<output_dir>/<model_name>/ood/results_{val,in,<Name>}.csv`` (written by reconstruct.py; upstream's
files with their stray index column are accepted) and the feature files of every score family present
(``<family>/features_<set>.csv``). Every ``results_<Name>.csv`` other than val and in is an out set (``--out_sets``
may pick some). The reconstruction scores of an image (higher = more OOD; ``ddpm_ood.ood.zscore``) are, for each
start t, the reconstruction MSE and LPIPS z-scored against the validation images at that t (mean, sample std),
summed (``mse+perceptual``, the paper's) or alone (``mse``, ``perceptual``), averaged over t; each feature family's
and the ensemble's are ``ood.family_scores``'. Every score present goes to the table, in the registry's order
(``families.score_names``); the printed AUC lines are the chosen score's (default: the first present).

Metrics (OOD = positive class): AUROC; FPR@95 = the fraction of in-distribution inputs flagged as OOD at the
highest score threshold that still flags at least 95% of the OOD inputs (false-positive rate at 95%
true-positive rate); AUPR-In = average precision with in-distribution as positive (score negated); AUPR-Out =
average precision with OOD as positive. All are fractions in [0, 1].

Writes to ``<output_dir>/<model_name>/ood/`` the seven ``OUTPUT_FILES``: summary.csv, summary.json, auroc_per_t.csv,
roc_curves.png, auroc_vs_nfe.png, and, with reconstruction results, auroc_per_t.png and zscore_vs_t.png.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.families import score_names
from ddpm_ood.families.ensemble import PAPER_SCORE
from ddpm_ood.families.registry import check_score_name
from ddpm_ood.fileio import atomic_write_csv, atomic_write_text, check_output_dir, run_lock
from ddpm_ood.ood.family_scores import FamilyScores, all_family_scores
from ddpm_ood.ood.metrics import PER_T_COLUMNS, SUMMARY_COLUMNS, auroc_per_t, family_summary, summary_table
from ddpm_ood.ood.plots import plot_auroc_per_t, plot_auroc_vs_nfe, plot_roc_curves, plot_zscore_vs_t
from ddpm_ood.ood.zscore import (
    DEFAULT_SCORE,
    SCORE_NAMES,
    ValidationReference,
    mean_over_t,
    select_timesteps,
    z_scores,
)
from ddpm_ood.reconstruction.engine import evaluations_per_image
from ddpm_ood.results.schema import IN_NAME, VAL_NAME, ood_dir, out_set_names, read_results, results_path
from ddpm_ood.results.writer import read_settings
from ddpm_ood.seeding import DEFAULT_SEED

SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
PER_T_CSV = "auroc_per_t.csv"
ROC_PNG = "roc_curves.png"
PER_T_PNG = "auroc_per_t.png"
ZSCORE_PNG = "zscore_vs_t.png"
NFE_PNG = "auroc_vs_nfe.png"
OUTPUT_FILES = (SUMMARY_CSV, SUMMARY_JSON, PER_T_CSV, ROC_PNG, PER_T_PNG, ZSCORE_PNG, NFE_PNG)
PLOT_SAMPLE = 50  # images per set in zscore_vs_t.png, as upstream's diagnostic plot


@dataclass(frozen=True)
class DetectionJob:
    """Everything ood_detection.py does: the runs ``model_names`` under ``output_dir``, one after the other; start
    points kept are those with min_t < t < max_t after taking every
    ``t_skip``-th validation start point; ``out_sets`` None = every out set present; ``score`` picks the printed
    AUCs and the plots (all scores go to summary.csv; None: the first present in ``families.score_names()``
    order; a score named but absent is an error); ``seed`` draws the image sample of zscore_vs_t.png."""

    output_dir: str
    model_names: tuple[str, ...] = ()
    min_t: int = 0
    max_t: int = 1000
    t_skip: int = 1
    out_sets: list[str] | None = None
    score: str | None = None
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.min_t >= self.max_t:
            raise ParameterError(f"min_t={self.min_t} must be below max_t={self.max_t} (the window is min_t < t < "
                                 "max_t)", "min_t", "max_t")
        if self.score is not None:
            check_score_name(self.score)


def _choose_out_sets(directory: Path, requested: list[str] | None) -> list[str]:
    present = out_set_names(directory)
    if not present:
        raise UserError(f"{directory}: no out-set results (results_<Name>.csv besides val and in) found")
    if requested is None:
        return present
    unknown = [n for n in requested if n not in present]
    if unknown:
        raise ParameterError(f"out_sets: no results for {', '.join(unknown)} in {directory}; present: "
                             f"{', '.join(present)}", "out_sets")
    return list(dict.fromkeys(requested))


def run_detection(job: DetectionJob) -> dict[str, pd.DataFrame]:
    """``evaluate_model`` for every run of ``job``, in order: {model name: its summary table}."""
    summaries = {}
    for model_name in job.model_names:
        summaries[model_name] = evaluate_model(job, model_name)
        sys.stdout.flush()
    return summaries


def evaluate_model(cfg: DetectionJob, model_name: str) -> pd.DataFrame:
    """Score, evaluate, write and print for one run (``<cfg.output_dir>/<model_name>/ood/``); returns the
    summary table (``ood.detection.SUMMARY_COLUMNS``). Holds the run's ood_detection lock while it works."""
    directory = ood_dir(cfg.output_dir, model_name)
    if not directory.is_dir():
        raise UserError(f"{directory}: results directory not found (run reconstruct.py for this model first)")
    check_output_dir(directory, "--output_dir/--model_name")
    with run_lock(directory, "ood_detection"):
        return _evaluate_model(cfg, model_name, directory)


def _common_precision(directory: Path, names: list[str]) -> str | None:
    """The precision every results file was reconstructed in (from its ``results_<name>.json``; None when no
    sidecar says, as for upstream results). Files made at different precisions are refused: their z-scores would
    mix two numerics."""
    found: dict[str, str] = {}
    for name in names:
        sidecar = directory / f"results_{name}.json"
        try:
            settings = read_settings(sidecar) or {}
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(settings, dict) and settings.get("precision"):
            found[name] = str(settings["precision"])
    if len(set(found.values())) > 1:
        listing = ", ".join(f"{name}: {p}" for name, p in found.items())
        raise UserError(f"{directory}: results were reconstructed at different precisions ({listing}); rerun "
                        "reconstruct.py for the odd ones out with the same --precision/--amp")
    return next(iter(found.values()), None)


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


def _reconstruction_scores(cfg: DetectionJob, model_name: str, directory: Path) -> ReconstructionScores:
    val_path = results_path(cfg.output_dir, model_name, VAL_NAME)
    in_path = results_path(cfg.output_dir, model_name, IN_NAME)
    val = read_results(val_path)
    t_values = select_timesteps(val["t"], cfg.min_t, cfg.max_t, cfg.t_skip)
    ref = ValidationReference.fit(val, t_values, source=str(val_path))
    val_scores = mean_over_t(z_scores(val, ref, source=str(val_path)))
    in_z = z_scores(read_results(in_path), ref, source=str(in_path))
    in_scores = mean_over_t(in_z)
    out_sets = _choose_out_sets(directory, cfg.out_sets)
    precision = _common_precision(directory, [VAL_NAME, IN_NAME, *out_sets])
    out_z, out_scores = {}, {}
    for name in out_sets:
        path = results_path(cfg.output_dir, model_name, name)
        out_z[name] = z_scores(read_results(path), ref, source=str(path))
        out_scores[name] = mean_over_t(out_z[name])
        print(f"n_val={ref.n_val} n_in={len(in_scores)} n_out={len(out_scores[name])}")
    nfe = _reconstruction_nfe(val_path)
    return ReconstructionScores(ref, val_scores, in_z, out_z, in_scores, out_scores, summary_table(in_scores, out_scores, nfe=nfe),
                                nfe, precision)


def _reconstruction_nfe(val_path: Path) -> int:
    """Network evaluations per image of the reconstruction score, from the validation results' settings (0 when
    they are unknown, as for upstream's results)."""
    try:
        s = read_settings(val_path.with_suffix(".json")) or {}
    except (OSError, json.JSONDecodeError):
        return 0
    if not all(k in s for k in ("start_timesteps", "num_inference_steps")):
        return 0
    return evaluations_per_image(s["start_timesteps"], s["num_inference_steps"], s.get("recon_steps"))


def _evaluate_model(cfg: DetectionJob, model_name: str, directory: Path) -> pd.DataFrame:
    val_path = results_path(cfg.output_dir, model_name, VAL_NAME)
    recon = _reconstruction_scores(cfg, model_name, directory) if val_path.is_file() else None
    paper = None if recon is None else {VAL_NAME: recon.val_scores[PAPER_SCORE], IN_NAME: recon.in_scores[PAPER_SCORE],
                                        **{k: v[PAPER_SCORE] for k, v in recon.out_scores.items()}}
    families = all_family_scores(directory, cfg.out_sets, paper, recon.nfe if recon is not None else 0)
    if recon is None and not families:
        raise UserError(f"{val_path}: not found, nor any score-family features; run reconstruct.py with "
                        "--run_val=1 --run_in=1 --run_out=1 first")
    parts = ([recon.summary] if recon is not None else []) + [family_summary(f) for f in families]
    summary = pd.concat(parts, ignore_index=True)[SUMMARY_COLUMNS]
    present = list(dict.fromkeys(summary["score"]))
    if cfg.score is not None and cfg.score not in present:
        raise UserError(f"score {cfg.score}: not computed for {model_name}; present: {', '.join(present)}")
    score = cfg.score if cfg.score is not None else next(s for s in score_names() if s in present)
    chosen = summary[summary["score"] == score]
    for row in chosen.itertuples():
        print(f"AUC for {model_name} vs {row.out_set}: {100 * row.auroc:.1f}")
    print(f"Average AUC: {100 * chosen['auroc'].mean():.1f}")
    _write_outputs(cfg, score, model_name, directory, summary, recon, families)
    ts = recon.ref.t_values if recon is not None else ()
    window = f"{len(ts)} start t ({ts[0]}..{ts[-1]}), " if ts else ""
    print(f"\n{model_name}: {window}OOD = positive class, fractions in [0, 1]; nfe = network evaluations per image")
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"wrote {', '.join(OUTPUT_FILES)} to {directory}")
    return summary


def _write_outputs(cfg: DetectionJob, score: str, model_name: str, directory: Path, summary: pd.DataFrame,
                   recon: ReconstructionScores | None, families: list[FamilyScores]) -> None:
    """summary.csv/json, auroc_per_t.csv and the plots (the per-t ones need reconstruction results)."""
    atomic_write_csv(summary, directory / SUMMARY_CSV)
    per_t = auroc_per_t(recon.in_z, recon.out_z) if recon is not None else pd.DataFrame(columns=PER_T_COLUMNS)
    atomic_write_csv(per_t, directory / PER_T_CSV)
    info = {
        "model_name": model_name,
        "t_values": list(recon.ref.t_values) if recon is not None else [],
        "n_val": recon.ref.n_val if recon is not None else None,
        "precision": recon.precision if recon is not None else None,
        "settings": {"min_t": cfg.min_t, "max_t": cfg.max_t, "t_skip": cfg.t_skip, "score": score,
                     "out_sets": list(dict.fromkeys(summary["out_set"])), "seed": cfg.seed},
        "densities": {f.family: f.model for f in families},
        "summary": summary.to_dict(orient="records"),
    }
    atomic_write_text(directory / SUMMARY_JSON, json.dumps(info, indent=2) + "\n")
    title = f"{model_name} ({score})"
    in_scores, out_scores = _chosen_scores(score, recon, families)
    plot_roc_curves(in_scores, out_scores, directory / ROC_PNG, title=title)
    plot_auroc_vs_nfe(summary, directory / NFE_PNG, title=model_name)
    if recon is not None:
        per_t_metric = score if score in SCORE_NAMES else DEFAULT_SCORE
        plot_auroc_per_t(per_t, directory / PER_T_PNG, metric=per_t_metric, title=f"{model_name} ({per_t_metric})")
        plot_zscore_vs_t(recon.in_z, recon.out_z, directory / ZSCORE_PNG, score=per_t_metric, n_per_set=PLOT_SAMPLE,
                         seed=cfg.seed, title=f"{model_name} ({per_t_metric})")


def _chosen_scores(score: str, recon: ReconstructionScores | None,
                   families: list[FamilyScores]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(in scores, {out set: scores}) of the score named ``score``."""
    if recon is not None and score in SCORE_NAMES:
        return recon.in_scores[score].to_numpy(), {k: v[score].to_numpy() for k, v in recon.out_scores.items()}
    chosen = next(f for f in families if f.family == score)
    outs = {k: v.to_numpy() for k, v in chosen.sets.items() if k not in (VAL_NAME, IN_NAME)}
    return chosen.sets[IN_NAME].to_numpy(), outs
