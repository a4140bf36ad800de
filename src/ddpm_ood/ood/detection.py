"""What ood_detection.py computes and writes, as a library function: score every image from its reconstruction
errors and report how well the OOD sets are detected (``evaluate_model``, configured by ``DetectionJob``).

Reads ``<output_dir>/<model_name>/ood/results_{val,in,<Name>}.csv`` (written by reconstruct.py; upstream's
files with their stray index column are accepted). Every ``results_<Name>.csv`` other than val and in is an
out set (``--out_sets`` may pick some). The score of an image (higher = more OOD; ``ddpm_ood.ood.zscore``) is,
for each start t, the reconstruction MSE and LPIPS z-scored against the validation images at that t (mean,
sample std), summed (``mse+perceptual``, the paper's) or alone (``mse``, ``perceptual``), averaged over t.

Metrics (OOD = positive class): AUROC; FPR@95 = the fraction of in-distribution inputs flagged as OOD at the
highest score threshold that still flags at least 95% of the OOD inputs (false-positive rate at 95%
true-positive rate); AUPR-In = average precision with in-distribution as positive (score negated); AUPR-Out =
average precision with OOD as positive. All are fractions in [0, 1].

Writes to ``<output_dir>/<model_name>/ood/``: summary.csv, summary.json, auroc_per_t.csv, roc_curves.png,
auroc_per_t.png, zscore_vs_t.png.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ddpm_ood.errors import UserError
from ddpm_ood.fileio import atomic_write_csv, atomic_write_text, check_output_dir, run_lock
from ddpm_ood.ood.metrics import auroc_per_t, summary_table
from ddpm_ood.ood.plots import plot_auroc_per_t, plot_roc_curves, plot_zscore_vs_t
from ddpm_ood.ood.zscore import (
    DEFAULT_SCORE,
    SCORE_NAMES,
    ValidationReference,
    mean_over_t,
    select_timesteps,
    z_scores,
)
from ddpm_ood.results.schema import IN_NAME, VAL_NAME, ood_dir, out_set_names, read_results, results_path

SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
PER_T_CSV = "auroc_per_t.csv"
ROC_PNG = "roc_curves.png"
PER_T_PNG = "auroc_per_t.png"
ZSCORE_PNG = "zscore_vs_t.png"
OUTPUT_FILES = (SUMMARY_CSV, SUMMARY_JSON, PER_T_CSV, ROC_PNG, PER_T_PNG, ZSCORE_PNG)
PLOT_SAMPLE = 50  # images per set in zscore_vs_t.png, as upstream's diagnostic plot


@dataclass(frozen=True)
class DetectionJob:
    """Everything ood_detection.py does: the runs ``model_names`` under ``output_dir``, one after the other; start
    points kept are those with min_t < t < max_t after taking every
    ``t_skip``-th validation start point; ``out_sets`` None = every out set present; ``score`` picks the printed
    AUCs and the plots (all scores go to summary.csv); ``seed`` draws the image sample of zscore_vs_t.png."""

    output_dir: str
    model_names: tuple[str, ...] = ()
    min_t: int = 0
    max_t: int = 1000
    t_skip: int = 1
    out_sets: list[str] | None = None
    score: str = DEFAULT_SCORE
    seed: int = 2

    def __post_init__(self) -> None:
        if self.min_t >= self.max_t:
            raise UserError(f"--min_t={self.min_t} must be below --max_t={self.max_t} (the window is min_t < t < "
                            "max_t)")
        if self.score not in SCORE_NAMES:
            raise UserError(f"--score must be one of {', '.join(SCORE_NAMES)}, got {self.score!r}")


def _choose_out_sets(directory: Path, requested: list[str] | None) -> list[str]:
    present = out_set_names(directory)
    if not present:
        raise UserError(f"{directory}: no out-set results (results_<Name>.csv besides val and in) found")
    if requested is None:
        return present
    unknown = [n for n in requested if n not in present]
    if unknown:
        raise UserError(f"--out_sets: no results for {', '.join(unknown)} in {directory}; present: {', '.join(present)}")
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
    from ddpm_ood.results.writer import read_settings

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


def _evaluate_model(cfg: DetectionJob, model_name: str, directory: Path) -> pd.DataFrame:
    val_path = results_path(cfg.output_dir, model_name, VAL_NAME)
    in_path = results_path(cfg.output_dir, model_name, IN_NAME)
    val = read_results(val_path)
    t_values = select_timesteps(val["t"], cfg.min_t, cfg.max_t, cfg.t_skip)
    ref = ValidationReference.fit(val, t_values, source=str(val_path))
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

    summary = summary_table(in_scores, out_scores)
    per_t = auroc_per_t(in_z, out_z)
    chosen = summary[summary["score"] == cfg.score]
    for row in chosen.itertuples():
        print(f"AUC for {model_name} vs {row.out_set}: {100 * row.auroc:.1f}")
    print(f"Average AUC: {100 * chosen['auroc'].mean():.1f}")

    atomic_write_csv(summary, directory / SUMMARY_CSV)
    atomic_write_csv(per_t, directory / PER_T_CSV)
    info = {
        "model_name": model_name,
        "t_values": list(ref.t_values),
        "n_val": ref.n_val,
        "precision": precision,
        "settings": {"min_t": cfg.min_t, "max_t": cfg.max_t, "t_skip": cfg.t_skip, "score": cfg.score,
                     "out_sets": out_sets, "seed": cfg.seed},
        "summary": summary.to_dict(orient="records"),
    }
    atomic_write_text(directory / SUMMARY_JSON, json.dumps(info, indent=2) + "\n")
    title = f"{model_name} ({cfg.score})"
    plot_roc_curves(in_scores[cfg.score].to_numpy(), {k: v[cfg.score].to_numpy() for k, v in out_scores.items()},
                    directory / ROC_PNG, title=title)
    plot_auroc_per_t(per_t, directory / PER_T_PNG, metric=cfg.score, title=title)
    plot_zscore_vs_t(in_z, out_z, directory / ZSCORE_PNG, score=cfg.score, n_per_set=PLOT_SAMPLE,
                     seed=cfg.seed, title=title)

    print(f"\n{model_name}: {len(ref.t_values)} start t ({ref.t_values[0]}..{ref.t_values[-1]}), "
          f"OOD = positive class, fractions in [0, 1]")
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"wrote {', '.join(OUTPUT_FILES)} to {directory}")
    return summary
