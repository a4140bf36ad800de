"""The ensemble of score families: one rule, fixed before any OOD data is seen.

Definition: given the features of several families for the same images, in aligned row order, the ensemble score
of an image is the negative log-likelihood under ONE ``FeatureDensity`` fitted on the validation rows of all the
families' columns side by side. The blocks are concatenated in the fixed order of ``ENSEMBLE_ORDER`` (eps_norm,
denoising_error, diffpath6d, diffpath1d, reconstruction), whatever order they are given in; every column is
standardised with its validation mean and standard deviation (so no family dominates by its units), and the
density's model (mixture size and covariance) is chosen by cross-validation on the validation rows alone
(``families.density``). ``reconstruction``, when given, is the reconstruction engine's per-image feature block,
e.g. the per-t [z_mse, z_lpips] columns. Higher = more OOD.

No weights are tuned and no OOD set is consulted: the rule and everything it fits depend on the validation rows
only, so the score of a test image cannot change with the other images scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ddpm_ood.errors import UserError
from ddpm_ood.families.density import FeatureDensity
from ddpm_ood.families.registry import FEATURE_FAMILIES, RECONSTRUCTION

ENSEMBLE_ORDER: tuple[str, ...] = (*FEATURE_FAMILIES, RECONSTRUCTION)


@dataclass(frozen=True)
class EnsembleResult:
    """The ensemble's scores, one (N_i,) array per set in the order given (the validation set first), the fitted
    density (``density.describe()`` records its model) and the concatenated column names."""

    scores: tuple[np.ndarray, ...]
    density: FeatureDensity
    columns: list[str]
    families: list[str]


def ensemble_scores(blocks: Mapping[str, Sequence[np.ndarray]],
                    columns: Mapping[str, Sequence[str]] | None = None) -> EnsembleResult:
    """Fit the ensemble density on validation and score every set (module docstring).

    blocks: {family: (val (N, D_f), set_1 (N_1, D_f), ...)}, every family with the same number of sets and, set by
    set, the same images in the same rows; set 0 is the validation set, the only one fitted on. columns: optional
    {family: D_f column names} for messages and ``EnsembleResult.columns`` (default ``<family>_<j>``).
    """
    if not blocks:
        raise UserError("the ensemble needs at least one score family")
    unknown = [name for name in blocks if name not in ENSEMBLE_ORDER]
    if unknown:
        raise UserError(f"unknown score family {unknown[0]!r} for the ensemble; accepted: {', '.join(ENSEMBLE_ORDER)}")
    families = [name for name in ENSEMBLE_ORDER if name in blocks]
    sets = [[np.asarray(a, dtype=np.float64) for a in blocks[name]] for name in families]
    n_sets = len(sets[0])
    if n_sets == 0 or any(len(s) != n_sets for s in sets):
        raise UserError(f"every family must give the same number of feature sets (validation first), got "
                        f"{ {name: len(s) for name, s in zip(families, sets, strict=True)} }")
    for i in range(n_sets):
        shapes = {name: s[i].shape for name, s in zip(families, sets, strict=True)}
        if any(len(shape) != 2 for shape in shapes.values()) or len({shape[0] for shape in shapes.values()}) != 1:
            raise UserError(f"feature set {i}: every family must give a (rows, columns) array over the same images, "
                            f"got shapes {shapes}")
    names: list[str] = []
    for name, s in zip(families, sets, strict=True):
        given = list(columns[name]) if columns and name in columns else [f"{name}_{j}" for j in range(s[0].shape[1])]
        if len(given) != s[0].shape[1]:
            raise UserError(f"{name}: {len(given)} column names for {s[0].shape[1]} columns")
        names += [c if c.startswith(name) else f"{name}:{c}" for c in given]
    stacked = [np.concatenate([s[i] for s in sets], axis=1) for i in range(n_sets)]
    density = FeatureDensity().fit(stacked[0], columns=names)
    return EnsembleResult(tuple(density.score(x) for x in stacked), density, names, families)
