"""The OOD score, defined once: reconstruction errors z-scored against validation, averaged over start t.

Input: long-format results (``ddpm_ood.results.schema`` schema), one row per (image, start t) with the metrics
``mse`` and ``perceptual_difference``. For each metric m and each kept start t (on the 1000-step schedule)::

    z_m(image, t) = (m(image, t) - mean_t) / std_t

where mean_t and std_t are the mean and SAMPLE standard deviation (ddof=1) of m over the validation images at
that t. Per-t scores (``SCORE_METRICS``):

- ``"mse+perceptual"`` = z_mse + z_perceptual (the paper's score, the default),
- ``"mse"`` = z_mse (upstream HEAD's hard-coded score),
- ``"perceptual"`` = z_perceptual.

The image score is the mean of the per-t score over the kept t. Higher = more OOD; validation images score
about 0 on average. Duplicate (filename, t) rows are dropped, keeping the first (upstream did the same; DDP
padding writes duplicates).

Typical use::

    t = select_timesteps(val["t"], min_t=0, max_t=1000, t_skip=1)
    ref = ValidationReference.fit(val, t, source="results_val.csv")
    scores = image_scores(test, ref, source="results_in.csv")   # index filename, columns SCORE_NAMES
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.families.registry import RECONSTRUCTION_SCORES
from ddpm_ood.results.schema import METRIC_COLUMNS

# Score name -> the metric columns whose z-scores are summed per t (the registry's). Default (the paper's) first.
SCORE_METRICS: dict[str, tuple[str, ...]] = RECONSTRUCTION_SCORES
SCORE_NAMES: tuple[str, ...] = tuple(SCORE_METRICS)
DEFAULT_SCORE: str = SCORE_NAMES[0]
KEY_COLUMNS = ("filename", "t")


def _fmt_ts(ts: Iterable[int], limit: int = 8) -> str:
    ts = [int(t) for t in ts]
    shown = ",".join(str(t) for t in ts[:limit])
    return shown + (f",... ({len(ts)} values)" if len(ts) > limit else "")


def drop_duplicate_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the first row of every (filename, t) pair, as upstream did (DDP padding repeats images)."""
    return df.drop_duplicates(subset=list(KEY_COLUMNS), keep="first").reset_index(drop=True)


def select_timesteps(val_t_values: Iterable[int], min_t: int = 0, max_t: int = 1000, t_skip: int = 1) -> list[int]:
    """The start t to score with, ascending.

    Every ``t_skip``-th of the distinct validation start points (ascending, starting with the first; this is
    what reconstruction with ``--inference_skip_factor=t_skip`` would have produced), then only those with
    ``min_t < t < max_t`` (both strict, as upstream). Raises UserError if none is left.
    """
    if t_skip < 1:
        raise ParameterError(f"t_skip must be >= 1, got {t_skip}", "t_skip")
    available = sorted({int(t) for t in val_t_values})
    kept = [t for t in available[::t_skip] if min_t < t < max_t]
    if not kept:
        raise ParameterError(
            f"no start t left: validation has t={_fmt_ts(available)}, and t_skip={t_skip} with "
            f"min_t={min_t} < t < max_t={max_t} keeps none", "t_skip", "min_t", "max_t"
        )
    return kept


@dataclass(frozen=True, eq=False)
class ValidationReference:
    """Per-t validation statistics that define the z-scores.

    t_values: the kept start t, ascending. mean / std: DataFrames indexed by those t with columns
    ``METRIC_COLUMNS``; std is the sample std (ddof=1), finite and > 0 everywhere. val_t_values: every start t
    present in the validation results (a test set with a t outside these is an error). n_val: distinct
    validation images.
    """

    t_values: tuple[int, ...]
    mean: pd.DataFrame
    std: pd.DataFrame
    val_t_values: tuple[int, ...]
    n_val: int

    @classmethod
    def fit(
        cls, results: pd.DataFrame, t_values: Sequence[int], source: str = "validation results"
    ) -> ValidationReference:
        """Mean and sample std of each metric at each t in ``t_values`` over the (deduplicated) validation rows.

        ``source`` names the validation file in error messages. A t absent from validation, or a std that is 0
        or NaN (e.g. a single validation image), raises UserError naming the t and metric.
        """
        results = drop_duplicate_rows(results)
        t_values = tuple(sorted({int(t) for t in t_values}))
        present = set(results["t"].astype(int))
        if not present.issuperset(t_values):
            raise UserError(f"{source}: no validation rows for start t={_fmt_ts(sorted(set(t_values) - present))}")
        sub = results[results["t"].isin(t_values)]
        grouped = sub.groupby("t")[list(METRIC_COLUMNS)]
        mean = grouped.mean().reindex(list(t_values))
        std = grouped.std(ddof=1).reindex(list(t_values))
        counts = grouped.size().reindex(list(t_values))
        for metric in METRIC_COLUMNS:
            for t in t_values:
                if not np.isfinite(std.at[t, metric]) or std.at[t, metric] <= 0:
                    raise UserError(
                        f"{source}: validation std of {metric} at t={t} is {float(std.at[t, metric])} over "
                        f"{int(counts[t])} image(s); "
                        "z-scores need at least 2 validation images whose values differ"
                    )
        return cls(
            t_values=t_values,
            mean=mean,
            std=std,
            val_t_values=tuple(sorted(present)),
            n_val=int(results["filename"].nunique()),
        )


def z_scores(results: pd.DataFrame, ref: ValidationReference, source: str = "results") -> pd.DataFrame:
    """Per-(image, t) scores: columns ``filename``, ``t``, then one column per name in ``SCORE_NAMES``.

    ``"mse"`` and ``"perceptual"`` are the z-scores of the two metrics, ``"mse+perceptual"`` their sum.
    Duplicate (filename, t) rows are dropped (keep first); rows whose t is in validation but not kept are
    dropped. Rows sorted by (filename, t). Errors (UserError, ``source`` names the file): a t that validation
    does not have; an image lacking some kept t.
    """
    results = drop_duplicate_rows(results)
    unknown = sorted(set(results["t"].astype(int)) - set(ref.val_t_values))
    if unknown:
        raise UserError(
            f"{source}: start t={_fmt_ts(unknown)} not in the validation results "
            f"(validation has t={_fmt_ts(ref.val_t_values)})"
        )
    kept = results[results["t"].isin(ref.t_values)]
    counts = kept.groupby("filename").size().reindex(results["filename"].unique(), fill_value=0)
    incomplete = counts.index[counts.to_numpy() < len(ref.t_values)]
    if len(incomplete):
        name = incomplete[0]
        lacking = sorted(set(ref.t_values) - set(kept.loc[kept["filename"] == name, "t"]))
        raise UserError(
            f"{source}: image {name} lacks start t={_fmt_ts(lacking)} ({len(incomplete)} image(s) incomplete); "
            "reconstruct every set with the same start points, or narrow --min_t/--max_t/--t_skip"
        )
    metric_cols = list(METRIC_COLUMNS)
    t = kept["t"].to_numpy()
    z = (kept[metric_cols].to_numpy(dtype=float) - ref.mean.loc[t, metric_cols].to_numpy()) / ref.std.loc[
        t, metric_cols
    ].to_numpy()
    z = pd.DataFrame(z, columns=metric_cols)
    out = pd.DataFrame({"filename": kept["filename"].to_numpy(), "t": t})
    for name, metrics in SCORE_METRICS.items():
        out[name] = z[list(metrics)].sum(axis=1).to_numpy()
    return out.sort_values(list(KEY_COLUMNS)).reset_index(drop=True)


def mean_over_t(z: pd.DataFrame) -> pd.DataFrame:
    """Image scores from ``z_scores`` output: index ``filename``, one column per score name, mean over t."""
    return z.groupby("filename")[list(SCORE_NAMES)].mean()


def image_scores(results: pd.DataFrame, ref: ValidationReference, source: str = "results") -> pd.DataFrame:
    """One score per image of ``results``: index ``filename`` (sorted), columns ``SCORE_NAMES``; higher = more
    OOD."""
    return mean_over_t(z_scores(results, ref, source=source))
