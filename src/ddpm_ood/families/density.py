"""A density fitted on in-distribution validation features only; its negative log-likelihood is the score.

``FeatureDensity().fit(X_val)`` with X_val (N, D) the validation images' features of one family (or of several,
concatenated: ``ensemble``); ``.score(X)`` (M,) = -log p(standardised X), higher = more OOD. Nothing but the
validation rows reaches ``fit``, and ``score`` is row by row, so the score of a row never depends on other rows
(beyond the last-bit rounding of batched linear algebra).

Definition:

1. Standardise every column with the validation mean and (population) standard deviation. A constant column
   (standard deviation 0) carries no information and cannot be standardised: it is refused with a UserError naming
   the column (index and name), rather than dropped silently. Non-finite values are refused too.
2. D >= 2: a scikit-learn ``GaussianMixture`` with n_components in {1, 2, 4, 8, 16} and covariance_type in
   {diag, full}, the pair with the highest 5-fold cross-validated mean held-out log-likelihood (``KFold(5,
   shuffle=True, random_state=0)``; every held-out row counts once). Counts above N / 5 (fewer than five rows per
   component) are skipped, and so is a pair whose fit fails on any fold. Ties go to the earlier, simpler pair in
   the order (1, diag), (1, full), (2, diag), ... The chosen pair is refitted on all rows. ``random_state=0``,
   ``max_iter=200`` (DiffPath's), ``reg_covar=1e-4`` (sklearn's default is 1e-6): on standardised columns it adds
   0.01 % of a column's variance to every covariance diagonal, which keeps full covariances of strongly correlated
   columns (eps norms at neighbouring levels, DiffPath's 6 sums) and of small components invertible without
   changing a well-conditioned fit.
3. D == 1: a Gaussian kernel density (``sklearn.neighbors.KernelDensity``) with Scott's bandwidth,
   n^(-1/5) on the standardised values (standard deviation 1). DiffPath-1D uses a fixed bandwidth of 5 on raw
   values, which depends on its features' scale; Scott's rule does not.

Deterministic: the same validation rows give the same scores bit for bit (fixed seeds, no data-dependent
randomness; fitting and scoring run with one BLAS / OpenMP thread (``threadpoolctl``, a scikit-learn dependency),
so the summation order, hence the bits, do not depend on the machine's thread count, and small fits do not
oversubscribe shared cores). The log-likelihood is that of the standardised features: it differs from the raw features' by the
constant sum(log std), which changes no ranking.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from ddpm_ood.errors import UserError, one_line

COMPONENT_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16)
COVARIANCE_TYPES: tuple[str, ...] = ("diag", "full")
CV_FOLDS = 5
ROWS_PER_COMPONENT = 5  # a count is tried only if it leaves at least this many validation rows per component
REG_COVAR = 1e-4
MAX_ITER = 200
RANDOM_STATE = 0


def _mixture(n_components: int, covariance_type: str):
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=n_components, covariance_type=covariance_type, reg_covar=REG_COVAR,
                           max_iter=MAX_ITER, random_state=RANDOM_STATE)


class FeatureDensity:
    """Standardise on validation, then a cross-validated Gaussian mixture (D >= 2) or Scott's KDE (D == 1)."""

    def __init__(self) -> None:
        self.columns: list[str] = []
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None
        self.model_ = None
        self._description: dict = {}

    def _check(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise UserError(f"{what} features must be a (rows, columns) array, got shape {x.shape}")
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise UserError(f"{what} features: {int(bad.sum())} of {len(x)} rows have non-finite values "
                            f"(first at row {int(np.argmax(bad))})")
        return x

    def fit(self, x_val: np.ndarray, columns: Sequence[str] | None = None) -> FeatureDensity:
        """Fit on the (N, D) validation features; ``columns`` names the D columns for messages."""
        x = self._check(x_val, "validation")
        n, d = x.shape
        self.columns = list(columns) if columns is not None else [f"column {j}" for j in range(d)]
        if len(self.columns) != d:
            raise ValueError(f"{len(self.columns)} column names for {d} columns")
        if n < CV_FOLDS:
            raise UserError(f"a feature density needs at least {CV_FOLDS} validation rows, got {n}")
        mean, std = x.mean(axis=0), x.std(axis=0)
        constant = np.flatnonzero(std <= np.finfo(np.float64).eps * np.abs(mean))
        if constant.size:
            names = ", ".join(f"{j} ({self.columns[j]})" for j in constant)
            raise UserError(f"validation features are constant in column(s) {names}: a constant feature cannot be "
                            "standardised and separates nothing; leave it out")
        self.mean_, self.std_ = mean, std
        z = (x - mean) / std
        with threadpool_limits(limits=1):
            if d == 1:
                self._fit_kde(z)
            else:
                self._fit_mixture(z)
        self._description.update(n_val=n, dim=d, columns=list(self.columns))
        return self

    def _fit_kde(self, z: np.ndarray) -> None:
        from sklearn.neighbors import KernelDensity

        self.model_ = KernelDensity(kernel="gaussian", bandwidth="scott").fit(z)
        self._description = {"kind": "kde", "kernel": "gaussian", "bandwidth_rule": "scott",
                              "bandwidth": float(self.model_.bandwidth_)}

    def _fit_mixture(self, z: np.ndarray) -> None:
        from sklearn.model_selection import KFold

        n = len(z)
        folds = list(KFold(CV_FOLDS, shuffle=True, random_state=RANDOM_STATE).split(z))
        cv: dict[str, float | str] = {}
        best: tuple[float, int, str] | None = None
        for k in COMPONENT_COUNTS:
            if k > n / ROWS_PER_COMPONENT:
                continue
            for cov in COVARIANCE_TYPES:
                label = f"{k} {cov}"
                try:
                    total = 0.0
                    for train, held_out in folds:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # non-convergence within max_iter: judged by its CV
                            total += float(_mixture(k, cov).fit(z[train]).score_samples(z[held_out]).sum())
                except (ValueError, np.linalg.LinAlgError) as exc:  # e.g. an ill-defined covariance
                    cv[label] = f"failed: {one_line(exc)}"
                    continue
                mean_loglik = total / n
                cv[label] = mean_loglik
                if np.isfinite(mean_loglik) and (best is None or mean_loglik > best[0]):
                    best = (mean_loglik, k, cov)
        if best is None:
            raise UserError(f"no Gaussian mixture could be fitted to the {n} validation rows: {cv}")
        _, k, cov = best
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model_ = _mixture(k, cov).fit(z)
        self._description = {"kind": "gmm", "n_components": k, "covariance_type": cov, "reg_covar": REG_COVAR,
                             "converged": bool(self.model_.converged_), "cv_mean_loglik": cv}

    def score(self, x: np.ndarray) -> np.ndarray:
        """(M,) float64 negative log-likelihood of each row of the (M, D) features (higher = more OOD)."""
        if self.model_ is None:
            raise RuntimeError("FeatureDensity.score called before fit")
        x = self._check(x, "scored")
        if x.shape[1] != len(self.mean_):
            raise UserError(f"scored features have {x.shape[1]} columns, the density was fitted on {len(self.mean_)}")
        with threadpool_limits(limits=1):
            return -self.model_.score_samples((x - self.mean_) / self.std_)

    def describe(self) -> dict:
        """The fitted model: kind ("gmm" or "kde"), n_components and covariance_type (gmm) with every candidate's
        cross-validated mean log-likelihood, or the bandwidth (kde); n_val, dim and the column names."""
        return dict(self._description)

    def summary(self) -> str:
        """One line for logs: the chosen model and the data it was fitted on."""
        d = self._description
        if d.get("kind") == "gmm":
            model = f"Gaussian mixture, {d['n_components']} component(s), {d['covariance_type']} covariance"
        elif d.get("kind") == "kde":
            model = f"Gaussian KDE, Scott bandwidth {d['bandwidth']:.4g} (standardised units)"
        else:
            return "unfitted feature density"
        return f"{model}, fitted on {d['n_val']} validation rows x {d['dim']} standardised features"
