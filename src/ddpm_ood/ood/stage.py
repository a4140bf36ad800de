"""The stages of ood_detection.py and score.py, as library functions: score every image of a run's sets and report
how well the OOD sets are detected (``DetectionJob`` -> ``run_detection``); score new inputs against a run and write
the scores and the threshold (``ScoringJob`` -> ``run_scoring``).

Reads ``<output_dir>/<model_name>/ood/results_{val,in,<Name>}.csv`` (written by reconstruct.py; upstream's
files with their stray index column are accepted) and the feature files of every score family present
(``<family>/features_<set>.csv``). Every ``results_<Name>.csv`` other than val and in is an out set (``--out_sets``
may pick some). The reconstruction scores of an image (higher = more OOD; ``ddpm_ood.ood.zscore``) are, for each
start t, the reconstruction MSE and LPIPS z-scored against the validation images at that t (mean, sample std),
summed (``mse+perceptual``, the paper's) or alone (``mse``, ``perceptual``), averaged over t; each feature family's
and the ensemble's are ``ood.detection``'s. Every score present goes to the table, in the registry's order
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

from ddpm_ood.compute import ComputeOptions
from ddpm_ood.devices import describe_device
from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.families import score_names
from ddpm_ood.families.ensemble import PAPER_SCORE
from ddpm_ood.families.registry import check_score_name
from ddpm_ood.fileio import atomic_write_csv, atomic_write_text, check_output_dir, run_lock
from ddpm_ood.ood.calibration import DEFAULT_VAL_KEEP
from ddpm_ood.ood.detection import (
    FamilyScores,
    ReconstructionScores,
    all_family_scores,
    reconstruction_scores,
)
from ddpm_ood.ood.metrics import PER_T_COLUMNS, SUMMARY_COLUMNS, auroc_per_t
from ddpm_ood.ood.plots import plot_auroc_per_t, plot_auroc_vs_nfe, plot_roc_curves, plot_zscore_vs_t
from ddpm_ood.ood.scorer import OODScorer, collect_inputs
from ddpm_ood.ood.zscore import DEFAULT_SCORE, SCORE_NAMES
from ddpm_ood.results.run_dir import RunDir
from ddpm_ood.results.schema import IN_NAME, RUN_DIR_FLAGS, VAL_NAME
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


def run_detection(job: DetectionJob) -> dict[str, pd.DataFrame]:
    """``evaluate_model`` for every run of ``job``, in order: {model name: its summary table}."""
    summaries = {}
    for model_name in job.model_names:
        summaries[model_name] = evaluate_model(job, model_name)
        sys.stdout.flush()
    return summaries


def evaluate_model(cfg: DetectionJob, model_name: str) -> pd.DataFrame:
    """Score, evaluate, write and print for one run (``<cfg.output_dir>/<model_name>/ood/``); returns the
    summary table (``ood.metrics.SUMMARY_COLUMNS``). Holds the run's ood_detection lock while it works."""
    run_dir = RunDir(cfg.output_dir, model_name)
    if not run_dir.ood.is_dir():
        raise UserError(f"{run_dir.ood}: results directory not found (run reconstruct.py for this model first)")
    check_output_dir(run_dir.ood, RUN_DIR_FLAGS)
    with run_lock(run_dir.ood, "ood_detection"):
        return _evaluate_model(cfg, run_dir)


def _evaluate_model(cfg: DetectionJob, run_dir: RunDir) -> pd.DataFrame:
    val_path, model_name, directory = run_dir.results(VAL_NAME), run_dir.model_name, run_dir.ood
    window = (cfg.min_t, cfg.max_t, cfg.t_skip)
    recon = reconstruction_scores(run_dir, cfg.out_sets, window) if val_path.is_file() else None
    paper = None if recon is None else {VAL_NAME: recon.val_scores[PAPER_SCORE], IN_NAME: recon.in_scores[PAPER_SCORE],
                                        **{k: v[PAPER_SCORE] for k, v in recon.out_scores.items()}}
    families = all_family_scores(run_dir, cfg.out_sets, paper, recon.nfe if recon is not None else 0)
    if recon is None and not families:
        raise UserError(f"{val_path}: not found, nor any score-family features; run reconstruct.py with "
                        "--run_val=1 --run_in=1 --run_out=1 first")
    parts = ([recon.summary] if recon is not None else []) + [f.summary() for f in families]
    summary = pd.concat(parts, ignore_index=True)[SUMMARY_COLUMNS]
    present = list(dict.fromkeys(summary["score"]))
    if cfg.score is not None and cfg.score not in present:
        raise UserError(f"score {cfg.score}: not computed for {model_name}; present: {', '.join(present)}")
    score = cfg.score if cfg.score is not None else next(s for s in score_names() if s in present)
    chosen = summary[summary["score"] == score]
    for row in chosen.itertuples():
        print(f"AUC for {model_name} vs {row.out_set}: {100 * row.auroc:.1f}")
    print(f"Average AUC: {100 * chosen['auroc'].mean():.1f}")
    _write_outputs(cfg, score, run_dir, summary, recon, families)
    ts = recon.ref.t_values if recon is not None else ()
    window = f"{len(ts)} start t ({ts[0]}..{ts[-1]}), " if ts else ""
    print(f"\n{model_name}: {window}OOD = positive class, fractions in [0, 1]; nfe = network evaluations per image")
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"wrote {', '.join(OUTPUT_FILES)} to {directory}")
    return summary


def _write_outputs(cfg: DetectionJob, score: str, run_dir: RunDir, summary: pd.DataFrame,
                   recon: ReconstructionScores | None, families: list[FamilyScores]) -> None:
    """summary.csv/json, auroc_per_t.csv and the plots (the per-t ones need reconstruction results)."""
    model_name, directory = run_dir.model_name, run_dir.ood
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


# --------------------------------------------------------------------------------------------------- score.py
@dataclass(frozen=True)
class ScoringJob:
    """Everything score.py does: score ``inputs`` (a folder, a split CSV or image paths separated by commas) with
    the run ``<output_dir>/<model_name>``; write ``out_csv`` (``OODScorer.score``'s columns) and ``<out_csv>.json``
    (the threshold, its expected false-positive rate and the settings of the validation files). ``score``: any of
    ``families.score_names()`` (default the paper's)."""

    output_dir: str
    model_name: str
    inputs: str
    out_csv: str
    score: str = DEFAULT_SCORE
    val_keep: float = DEFAULT_VAL_KEEP
    vqvae_checkpoint: str | None = None
    pretrained: str | None = None  # a published model's location now (default: recorded in results_val.json)
    pretrained_flags: str | None = None
    # amp None: not asked (the validation files' precision is used; asking for another is refused)
    compute: ComputeOptions = ComputeOptions(batch_size=64, amp=None)


def run_scoring(job: ScoringJob) -> pd.DataFrame:
    """Score the inputs of ``job``, write both files atomically, and return the scores."""
    out_csv = Path(job.out_csv)
    if out_csv.is_dir():
        raise ParameterError(f"out_csv: {out_csv} is a folder; give a file name such as {out_csv / 'scores.csv'}",
                             "out_csv")
    check_output_dir(out_csv.parent, "--out_csv")  # created if missing, as every stage's output folder
    inputs = collect_inputs(job.inputs)
    compute = job.compute
    scorer = OODScorer.from_run(
        job.output_dir, job.model_name, device=compute.device, score=job.score, val_keep=job.val_keep,
        batch_size=compute.batch_size, amp=compute.amp, precision=compute.precision, max_batch=compute.max_batch,
        vqvae_checkpoint=job.vqvae_checkpoint, pretrained=job.pretrained, pretrained_flags=job.pretrained_flags,
    )
    cal = scorer.calibration
    val_path = RunDir(job.output_dir, job.model_name).results(VAL_NAME)
    print(f"device: {describe_device(scorer.device)}; precision: {scorer.settings.precision} (as the validation "
          "files)")
    print(f"threshold {cal.threshold:.6g}: the {cal.val_keep:.1%} quantile of the {job.score} score over "
          f"{cal.n_val} validation images; expected false-positive rate {cal.expected_fpr:.1%} "
          f"(validation images above it: {cal.val_fpr:.1%})")
    result = scorer.score(inputs, progress=True)
    n_failed = int((result["error"] != "").sum())
    n_flagged = int(result["is_ood"].fillna(False).sum())
    atomic_write_csv(result, out_csv)
    summary = {
        **cal.to_dict(), "score": job.score, "validation_results": str(val_path.resolve()),
        "reconstruction": scorer.settings.to_dict(), "precision": scorer.settings.precision, "inputs": job.inputs,
        "n_inputs": len(result), "n_scored": len(result) - n_failed, "n_flagged": n_flagged, "n_failed": n_failed,
    }
    atomic_write_text(Path(f"{out_csv}.json"), json.dumps(summary, indent=2))
    print(f"{n_flagged} of {len(result) - n_failed} scored inputs flagged as OOD, {n_failed} failed; wrote {out_csv}")
    return result
