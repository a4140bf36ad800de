"""Detection metrics against brute-force definitions written out here (pair counting, threshold sweeps)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ddpm_ood.ood.metrics import (
    PER_T_COLUMNS,
    SUMMARY_COLUMNS,
    auroc_per_t,
    detection_metrics,
    fpr_at_tpr,
    summary_table,
)


def brute_auroc(s_in, s_out) -> float:
    """P(out score > in score) + 0.5 P(tie), over all (in, out) pairs."""
    d = np.subtract.outer(np.asarray(s_out), np.asarray(s_in))
    return float(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size)


def brute_fpr95(s_in, s_out) -> float:
    """Lowest fraction of in flagged (score >= thr) over every threshold that flags >= 95% of out."""
    s_in, s_out = np.asarray(s_in), np.asarray(s_out)
    best = 1.0
    for thr in np.unique(np.concatenate([s_in, s_out])):
        tp = int((s_out >= thr).sum())
        if 100 * tp >= 95 * len(s_out):  # integer arithmetic: exactly ">= 95%"
            best = min(best, float((s_in >= thr).mean()))
    return best


def brute_average_precision(pos, neg) -> float:
    """sum_k (R_k - R_{k-1}) P_k over distinct thresholds in descending order (positives = ``pos``)."""
    pos, neg = np.asarray(pos), np.asarray(neg)
    ap, prev_r = 0.0, 0.0
    for thr in np.unique(np.concatenate([pos, neg]))[::-1]:
        tp, fp = int((pos >= thr).sum()), int((neg >= thr).sum())
        r = tp / len(pos)
        ap += (r - prev_r) * tp / (tp + fp)
        prev_r = r
    return ap


def check_against_brute_force(s_in, s_out):
    m = detection_metrics(s_in, s_out)
    assert m["auroc"] == pytest.approx(brute_auroc(s_in, s_out), abs=1e-12)
    assert m["fpr95"] == pytest.approx(brute_fpr95(s_in, s_out), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(brute_average_precision(s_out, s_in), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(brute_average_precision(-np.asarray(s_in), -np.asarray(s_out)), abs=1e-12)
    assert all(0.0 <= v <= 1.0 for v in m.values())


@pytest.mark.parametrize("n_in,n_out,shift,seed", [(40, 40, 1.0, 0), (37, 20, 0.3, 1), (25, 101, 2.0, 2)])
def test_metrics_match_brute_force_continuous(n_in, n_out, shift, seed):
    rng = np.random.default_rng(seed)
    check_against_brute_force(rng.normal(0, 1, n_in), rng.normal(shift, 1, n_out))


def test_metrics_match_brute_force_with_ties():
    rng = np.random.default_rng(3)
    # Scores on a coarse grid: many ties within and across the two sets.
    check_against_brute_force(np.round(rng.normal(0, 1, 60)), np.round(rng.normal(0.8, 1, 45)))


def test_separated_scores_are_perfect():
    m = detection_metrics(np.linspace(-3, -1, 30), np.linspace(1, 4, 17))
    assert m["auroc"] == 1.0 and m["fpr95"] == 0.0
    assert m["aupr_in"] == pytest.approx(1.0) and m["aupr_out"] == pytest.approx(1.0)


def test_identical_scores_are_chance():
    s = np.random.default_rng(4).normal(size=50)
    m = detection_metrics(s, s.copy())
    assert m["auroc"] == 0.5
    assert m["fpr95"] >= 0.95  # to flag 95% of OOD the same share of in-dist must be flagged


def test_reversed_scores_are_worst():
    m = detection_metrics(np.linspace(1, 4, 20), np.linspace(-3, -1, 20))
    assert m["auroc"] == 0.0
    assert m["fpr95"] == 1.0


def test_fpr95_threshold_case():
    # 20 OOD scores 1..20, in scores 0.5..19.5: the highest threshold flagging 19 OOD inputs is 2,
    # which flags the in-dist values 2.5..19.5 = 18 of 20.
    s_out = np.arange(1, 21, dtype=float)
    s_in = s_out - 0.5
    assert fpr_at_tpr(s_in, s_out) == pytest.approx(18 / 20)
    assert brute_fpr95(s_in, s_out) == pytest.approx(18 / 20)


def test_summary_table_rows_and_values():
    rng = np.random.default_rng(5)
    names = ["mse+perceptual", "mse"]
    ins = pd.DataFrame(rng.normal(size=(12, 2)), columns=names)
    outs = {"B": pd.DataFrame(rng.normal(1, 1, size=(9, 2)), columns=names),
            "A": pd.DataFrame(rng.normal(2, 1, size=(7, 2)), columns=names)}
    table = summary_table(ins, outs, names)
    assert list(table.columns) == SUMMARY_COLUMNS
    assert list(zip(table["out_set"], table["score"], strict=True)) == [(o, s) for o in ("B", "A") for s in names]
    for row in table.itertuples():
        assert row.n_in == 12 and row.n_out == len(outs[row.out_set])
        assert row.auroc == pytest.approx(brute_auroc(ins[row.score], outs[row.out_set][row.score]))
        assert row.fpr95 == pytest.approx(brute_fpr95(ins[row.score], outs[row.out_set][row.score]))


def test_auroc_per_t_matches_brute_force():
    rng = np.random.default_rng(6)
    ts = [1, 11, 21]
    metrics = ["mse+perceptual", "mse", "perceptual"]

    def frame(prefix, n, shift):
        rows = [{"filename": f"{prefix}{i}", "t": t, **{m: rng.normal(shift * t / 10, 1) for m in metrics}}
                for i in range(n) for t in ts]
        return pd.DataFrame(rows)

    in_z, out_z = frame("i", 15, 0.0), {"X": frame("o", 11, 1.0), "Y": frame("p", 8, 0.2)}
    got = auroc_per_t(in_z, out_z, metrics)
    assert list(got.columns) == PER_T_COLUMNS
    assert len(got) == 2 * len(ts) * len(metrics)
    for row in got.itertuples():
        a = in_z.loc[in_z["t"] == row.t, row.metric]
        b = out_z[row.out_set].loc[out_z[row.out_set]["t"] == row.t, row.metric]
        assert row.auroc == pytest.approx(brute_auroc(a, b), abs=1e-12)
