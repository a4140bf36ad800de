"""Score families besides the reconstruction score (DESIGN.md 3): each turns a model and an input into a feature
vector per image; ``density`` fits a density to validation features (the family's score is its negative
log-likelihood, higher = more OOD) and ``ensemble`` combines families by one rule fixed in advance.

Modules: ``base`` (settings, the family record), ``noise_levels`` (eps_norm, denoising_error), ``diffpath``
(diffpath6d, diffpath1d), ``registry`` (names, parsing, shared computation), ``density``, ``ensemble``.
"""

from ddpm_ood.families.base import FamilySettings, ScoreFamily
from ddpm_ood.families.registry import (
    ALL_SCORES,
    FAMILIES,
    FEATURE_FAMILIES,
    RECONSTRUCTION,
    compute_features,
    feature_families,
    get_family,
    nfe_of,
    parse_families,
)

__all__ = [
    "ALL_SCORES",
    "FAMILIES",
    "FEATURE_FAMILIES",
    "RECONSTRUCTION",
    "FamilySettings",
    "ScoreFamily",
    "compute_features",
    "feature_families",
    "get_family",
    "nfe_of",
    "parse_families",
]
