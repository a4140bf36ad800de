"""score.py's stage as a library function: score new inputs with a trained run and write the scores and the
threshold (``ScoringJob`` -> ``run_scoring``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ddpm_ood.devices import describe_device
from ddpm_ood.errors import ParameterError
from ddpm_ood.fileio import atomic_write_csv, atomic_write_text, check_output_dir
from ddpm_ood.ood.scorer import DEFAULT_VAL_KEEP, OODScorer, collect_inputs
from ddpm_ood.ood.zscore import DEFAULT_SCORE
from ddpm_ood.results.schema import VAL_NAME, results_path


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
    batch_size: int = 64
    device: str = "auto"
    vqvae_checkpoint: str | None = None
    amp: bool | None = None
    precision: str | None = None
    max_batch: int | None = None
    pretrained: str | None = None  # a published model's location now (default: recorded in results_val.json)
    pretrained_flags: str | None = None


def run_scoring(job: ScoringJob) -> pd.DataFrame:
    """Score the inputs of ``job``, write both files atomically, and return the scores."""
    out_csv = Path(job.out_csv)
    if out_csv.is_dir():
        raise ParameterError(f"out_csv: {out_csv} is a folder; give a file name such as {out_csv / 'scores.csv'}",
                             "out_csv")
    check_output_dir(out_csv.parent, "--out_csv")  # created if missing, as every stage's output folder
    inputs = collect_inputs(job.inputs)
    scorer = OODScorer.from_run(
        job.output_dir, job.model_name, device=job.device, score=job.score, val_keep=job.val_keep, batch_size=job.batch_size,
        amp=job.amp, precision=job.precision, max_batch=job.max_batch, vqvae_checkpoint=job.vqvae_checkpoint,
        pretrained=job.pretrained, pretrained_flags=job.pretrained_flags,
    )
    cal = scorer.calibration
    val_path = results_path(job.output_dir, job.model_name, VAL_NAME)
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
