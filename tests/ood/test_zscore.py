"""The OOD score against an independent per-image computation written out here with numpy loops."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ddpm_ood.errors import UserError
from ddpm_ood.ood.zscore import (
    DEFAULT_SCORE,
    SCORE_NAMES,
    ValidationReference,
    image_scores,
    select_timesteps,
    z_scores,
)

T_VALUES = [1, 11, 21, 31, 41]


def make_results(prefix: str, kind: str, n_images: int, t_values=T_VALUES, shift: float = 0.0, seed: int = 0):
    """Synthetic long-format results: one row per (image, t); metric values shift with ``shift``."""
    rng = np.random.default_rng(seed)
    rows = [
        {"filename": f"{prefix}_{i}", "type": kind, "t": t,
         "perceptual_difference": rng.normal(0.2 + shift + t / 1000, 0.03),
         "mse": rng.normal(0.02 + shift / 10 + t / 10000, 0.004)}
        for i in range(n_images) for t in t_values
    ]
    return pd.DataFrame(rows)


def independent_scores(val: pd.DataFrame, test: pd.DataFrame, t_values) -> dict[str, dict[str, float]]:
    """filename -> {score name: value}, computed image by image from first-occurrence rows."""
    first = {}
    for row in val.itertuples():
        first.setdefault((row.filename, row.t), row)
    stats = {}
    for t in t_values:
        for m in ("mse", "perceptual_difference"):
            v = np.array([getattr(r, m) for (f, tt), r in first.items() if tt == t])
            stats[t, m] = (v.mean(), v.std(ddof=1))
    test_first = {}
    for row in test.itertuples():
        test_first.setdefault((row.filename, row.t), row)
    out = {}
    for fn in sorted({f for f, _ in test_first}):
        z = {m: np.array([(getattr(test_first[fn, t], m) - stats[t, m][0]) / stats[t, m][1] for t in t_values])
             for m in ("mse", "perceptual_difference")}
        out[fn] = {"mse": z["mse"].mean(), "perceptual": z["perceptual_difference"].mean(),
                   "mse+perceptual": (z["mse"] + z["perceptual_difference"]).mean()}
    return out


def test_score_names_default_is_the_papers():
    assert SCORE_NAMES[0] == DEFAULT_SCORE == "mse+perceptual"
    assert set(SCORE_NAMES) == {"mse+perceptual", "mse", "perceptual"}


def test_image_scores_match_independent_computation():
    val = make_results("v", "val", 9, seed=1)
    test = make_results("x", "out", 6, shift=0.05, seed=2)
    ref = ValidationReference.fit(val, T_VALUES)
    got = image_scores(test, ref)
    want = independent_scores(val, test, T_VALUES)
    assert list(got.columns) == list(SCORE_NAMES)
    assert sorted(got.index) == sorted(want)
    for fn, scores in want.items():
        for name in SCORE_NAMES:
            assert got.loc[fn, name] == pytest.approx(scores[name], rel=1e-10, abs=1e-12)
    # The shifted set scores higher (more OOD) than validation does on average.
    assert (got["mse+perceptual"] > 0).all()


def test_validation_z_scores_have_mean_0_and_sample_std_1():
    val = make_results("v", "val", 7, seed=3)
    z = z_scores(val, ValidationReference.fit(val, T_VALUES))
    per_t = z.groupby("t")[["mse", "perceptual"]]
    np.testing.assert_allclose(per_t.mean().to_numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(per_t.std(ddof=1).to_numpy(), 1, rtol=1e-12)
    # The sum of two unit-variance z-scores is not itself standardised: it is the sum, by definition.
    np.testing.assert_allclose(z["mse+perceptual"], z["mse"] + z["perceptual"])


def test_duplicates_keep_first_and_row_order_does_not_matter():
    val = make_results("v", "val", 8, seed=4)
    test = make_results("x", "in", 5, seed=5)
    dup_val = val.iloc[:10].assign(mse=99.0, perceptual_difference=99.0)
    dup_test = test.iloc[:7].assign(mse=-5.0)
    val_d = pd.concat([val, dup_val], ignore_index=True)
    # Originals shuffled among themselves but kept ahead of their duplicates, so "first" is the original.
    test_d = pd.concat([test.sample(frac=1, random_state=1), dup_test], ignore_index=True)
    got = image_scores(test_d, ValidationReference.fit(val_d, T_VALUES))
    want = independent_scores(val, test, T_VALUES)
    for fn, scores in want.items():
        for name in SCORE_NAMES:
            assert got.loc[fn, name] == pytest.approx(scores[name], rel=1e-10)


def test_select_timesteps_window_is_strict():
    ts = list(range(0, 1001, 10))
    kept = select_timesteps(ts, min_t=10, max_t=990)
    assert kept[0] == 20 and kept[-1] == 980 and len(kept) == 97
    assert select_timesteps(ts) == [t for t in ts if 0 < t < 1000]  # defaults drop t=0 and t=1000 (upstream)


def test_select_timesteps_skip_every_kth_ascending_from_the_first():
    ts = list(range(1, 1000, 10))  # 1, 11, ..., 991: the README's 100 start points
    shuffled = list(np.random.default_rng(0).permutation(ts)) + ts[:5]  # order and repeats do not matter
    for k, count in [(1, 100), (2, 50), (3, 34), (4, 25), (5, 20), (8, 13), (16, 7), (32, 4), (64, 2)]:
        kept = select_timesteps(shuffled, t_skip=k)
        assert kept == ts[::k]
        assert len(kept) == count
    # The skip is over all validation start points, the t window after it.
    assert select_timesteps(ts, min_t=1, t_skip=2) == ts[2::2]


@pytest.mark.parametrize("kwargs", [{"min_t": 501, "max_t": 511}, {"t_skip": 0}])
def test_select_timesteps_refuses_empty_or_bad(kwargs):
    with pytest.raises(UserError):
        select_timesteps(range(1, 1000, 10), **kwargs)


def test_window_restricts_the_score_to_the_kept_t():
    val = make_results("v", "val", 9, seed=6)
    test = make_results("x", "in", 4, seed=7)
    kept = select_timesteps(val["t"], min_t=1, max_t=41)
    assert kept == [11, 21, 31]
    got = image_scores(test, ValidationReference.fit(val, kept))
    want = independent_scores(val, test, kept)
    for fn, scores in want.items():
        assert got.loc[fn, DEFAULT_SCORE] == pytest.approx(scores[DEFAULT_SCORE], rel=1e-10)


def test_zero_std_names_t_and_metric():
    val = make_results("v", "val", 5, seed=8)
    val.loc[val["t"] == 21, "mse"] = 0.5
    with pytest.raises(UserError, match=r"results_val.csv.*std of mse at t=21"):
        ValidationReference.fit(val, T_VALUES, source="results_val.csv")


def test_single_validation_image_is_an_error_not_nan():
    val = make_results("v", "val", 1, seed=9)
    with pytest.raises(UserError, match=r"std of .* at t=1 is nan"):
        ValidationReference.fit(val, T_VALUES)


def test_image_missing_a_kept_t_names_file_and_set():
    val = make_results("v", "val", 5, seed=10)
    test = make_results("x", "out", 3, seed=11)
    test = test[~((test["filename"] == "x_1") & (test["t"] == 31))]
    ref = ValidationReference.fit(val, T_VALUES)
    with pytest.raises(UserError, match=r"results_MNIST.csv: image x_1 lacks start t=31"):
        image_scores(test, ref, source="results_MNIST.csv")
    # Without t=31 in the kept set the same rows are fine.
    ref2 = ValidationReference.fit(val, [1, 11, 21, 41])
    assert len(image_scores(test, ref2)) == 3


def test_t_that_validation_lacks_is_an_error():
    val = make_results("v", "val", 5, seed=12)
    test = make_results("x", "out", 3, t_values=T_VALUES + [51], seed=13)
    ref = ValidationReference.fit(val, T_VALUES)
    with pytest.raises(UserError, match=r"results_SVHN.csv: start t=51 not in the validation"):
        z_scores(test, ref, source="results_SVHN.csv")


def test_fit_refuses_t_absent_from_validation():
    val = make_results("v", "val", 5, seed=14)
    with pytest.raises(UserError, match="t=51"):
        ValidationReference.fit(val, T_VALUES + [51])


def test_reference_records_counts_and_t():
    val = make_results("v", "val", 6, seed=15)
    ref = ValidationReference.fit(val, [21, 1])
    assert ref.t_values == (1, 21)
    assert ref.val_t_values == tuple(T_VALUES)
    assert ref.n_val == 6
    assert list(ref.mean.index) == [1, 21]
