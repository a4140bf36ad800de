"""Detection metrics for in-distribution vs out-of-distribution scores (higher score = more OOD).

OOD is the positive class (label 1), in-distribution the negative (label 0). All values are fractions in
[0, 1], computed with scikit-learn:

- AUROC: area under the ROC curve (``roc_auc_score``); 1.0 = perfectly separated, 0.5 = chance.
- FPR@95: the fraction of in-distribution inputs flagged as OOD (score >= threshold) at the highest threshold
  that still flags at least 95% of the OOD inputs, i.e. the false-positive rate at 95% true-positive rate
  (read off ``roc_curve``); 0.0 is best.
- AUPR-In: average precision (``average_precision_score``) with in-distribution as the positive class and the
  negated score; AUPR-Out: average precision with OOD as the positive class and the score itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ddpm_ood.ood.zscore import SCORE_NAMES

TPR_LEVEL = 0.95
METRIC_NAMES = ("auroc", "fpr95", "aupr_in", "aupr_out")
# nfe: network evaluations per image of the score (0 = unknown, e.g. upstream's results).
SUMMARY_COLUMNS = ["out_set", "score", *METRIC_NAMES, "n_in", "n_out", "nfe"]
PER_T_COLUMNS = ["out_set", "t", "metric", "auroc"]


def labels_and_scores(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate (in, out): labels 0 for in-distribution, 1 for OOD; scores as float arrays, shape (N,)."""
    in_scores = np.asarray(in_scores, dtype=float).ravel()
    out_scores = np.asarray(out_scores, dtype=float).ravel()
    if in_scores.size == 0 or out_scores.size == 0:
        raise ValueError("detection metrics need at least one in-distribution and one OOD score")
    labels = np.concatenate([np.zeros(in_scores.size, dtype=int), np.ones(out_scores.size, dtype=int)])
    return labels, np.concatenate([in_scores, out_scores])


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr_level: float = TPR_LEVEL) -> float:
    """False-positive rate at the highest threshold whose true-positive rate is >= ``tpr_level``."""
    labels, scores = labels_and_scores(in_scores, out_scores)
    # drop_intermediate=False keeps one point per distinct threshold, so the first one reaching the level is there.
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    # tpr is non-decreasing as the threshold falls and ends at 1, so argmax finds the first (highest) threshold.
    return float(fpr[int(np.argmax(tpr >= tpr_level))])


def detection_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    """``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` for 1-D score arrays (higher = more OOD)."""
    labels, scores = labels_and_scores(in_scores, out_scores)
    # average_precision_score sums floats and can land an ulp above 1 (1.0000000000000002); keep [0, 1].
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "fpr95": fpr_at_tpr(in_scores, out_scores),
        "aupr_in": float(np.clip(average_precision_score(1 - labels, -scores), 0.0, 1.0)),
        "aupr_out": float(np.clip(average_precision_score(labels, scores), 0.0, 1.0)),
    }


def summary_table(
    in_image_scores: pd.DataFrame,
    out_image_scores: Mapping[str, pd.DataFrame],
    score_names: Sequence[str] = SCORE_NAMES,
    nfe: int = 0,
) -> pd.DataFrame:
    """One row per (out set, score name), columns ``SUMMARY_COLUMNS`` (``nfe``: the scores' network evaluations
    per image).

    Inputs are ``ood.zscore.image_scores`` frames (one row per image, one column per score name); out sets in
    the mapping's order, scores in ``score_names`` order. n_in / n_out count images.
    """
    rows = []
    for out_set, out_df in out_image_scores.items():
        for score in score_names:
            m = detection_metrics(in_image_scores[score].to_numpy(), out_df[score].to_numpy())
            rows.append({"out_set": out_set, "score": score, **m,
                         "n_in": len(in_image_scores), "n_out": len(out_df), "nfe": int(nfe)})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def auroc_per_t(
    in_z: pd.DataFrame,
    out_z: Mapping[str, pd.DataFrame],
    metrics: Sequence[str] = SCORE_NAMES,
) -> pd.DataFrame:
    """AUROC of the per-t score alone, for every out set, start t and metric; columns ``PER_T_COLUMNS``.

    Inputs are ``ood.zscore.z_scores`` frames (rows (filename, t), one column per score name). The t are those
    of the in set (ascending); every set is expected to cover them (``z_scores`` checks that).
    """
    rows = []
    in_by_t = dict(tuple(in_z.groupby("t")))
    for out_set, oz in out_z.items():
        out_by_t = dict(tuple(oz.groupby("t")))
        for t in sorted(in_by_t):
            for metric in metrics:
                labels, scores = labels_and_scores(in_by_t[t][metric].to_numpy(), out_by_t[t][metric].to_numpy())
                rows.append({"out_set": out_set, "t": int(t), "metric": metric,
                             "auroc": float(roc_auc_score(labels, scores))})
    return pd.DataFrame(rows, columns=PER_T_COLUMNS)
