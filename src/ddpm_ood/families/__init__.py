"""Score families besides the reconstruction score (docs/development.md, Words): each turns a model and an input into
a feature vector per image; ``density`` fits a density to validation features (the family's score is its negative
log-likelihood, higher = more OOD) and ``ensemble`` combines scores by one rule fixed in advance.

Modules: ``base`` (the interface: ``ScoreFamily``, ``ScoreOptions``, ``ScoreContext``), one module per family
(``noise_levels``: eps_norm and denoising_error; ``msma``; ``diffpath``: diffpath6d and diffpath1d), ``registry``
(the one score registry: names, parsing, shared computation), ``density``, ``ensemble``.
"""

from ddpm_ood.families.base import ScoreContext, ScoreFamily, ScoreOptions
from ddpm_ood.families.registry import (
    ENSEMBLE,
    RECONSTRUCTION,
    RECONSTRUCTION_SCORES,
    compute_features,
    family_names,
    feature_family_names,
    get_family,
    make_settings,
    nfe_of,
    parse_families,
    register,
    score_names,
    unregister,
    without_reconstruction,
)

__all__ = [
    "ENSEMBLE",
    "RECONSTRUCTION",
    "RECONSTRUCTION_SCORES",
    "ScoreContext",
    "ScoreFamily",
    "ScoreOptions",
    "compute_features",
    "family_names",
    "feature_family_names",
    "get_family",
    "make_settings",
    "nfe_of",
    "parse_families",
    "register",
    "score_names",
    "unregister",
    "without_reconstruction",
]
