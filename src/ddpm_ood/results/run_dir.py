"""A run's folder, ``<output_dir>/<model_name>``: the one place its file names are written.

Training writes the checkpoints at its top; reconstruct.py writes under ``ood/`` one results file per set
(``results_<set>.csv``) and, per feature score, one feature file per set (``<score>/features_<set>.csv``), each with
its settings sidecar (the same name with ``.json``); ood_detection.py and score.py read them back from here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ddpm_ood.checkpoint import BEST_CHECKPOINT
from ddpm_ood.errors import UserError
from ddpm_ood.results.provenance import MODEL_KEYS, require_same
from ddpm_ood.results.schema import (
    FEATURES_PATTERN,
    IN_NAME,
    RESULTS_PATTERN,
    VAL_NAME,
    read_features,
    read_results,
)
from ddpm_ood.results.writer import FeatureSettings, ReconSettings


@dataclass(frozen=True)
class RunDir:
    """The folder of the run ``model_name`` under ``output_dir``. Set names: "val", "in" or an out-set name
    (``schema.out_set_name``); a score: a feature family's name (``families.feature_family_names``)."""

    output_dir: str | os.PathLike
    model_name: str

    @property
    def path(self) -> Path:
        return Path(self.output_dir) / self.model_name

    @property
    def checkpoint(self) -> Path:
        """The best checkpoint, the one every later stage uses unless told otherwise."""
        return self.path / BEST_CHECKPOINT

    @property
    def ood(self) -> Path:
        """The folder of the results, feature files and detection outputs."""
        return self.path / "ood"

    def results(self, set_name: str) -> Path:
        return self.ood / f"results_{set_name}.csv"

    def features(self, score: str, set_name: str) -> Path:
        return self.ood / score / f"features_{set_name}.csv"

    def out_sets(self) -> list[str]:
        """The out sets with a results file (every ``results_<set>.csv`` but val and in), sorted."""
        names = (RESULTS_PATTERN.match(p.name) for p in sorted(self.ood.glob("results_*.csv")))
        return [m.group("name") for m in names if m and m.group("name") not in (VAL_NAME, IN_NAME)]

    def feature_sets(self, score: str) -> list[str]:
        """The sets with a feature file of ``score`` (val and in included), sorted."""
        names = (FEATURES_PATTERN.match(path.name) for path in sorted((self.ood / score).glob("features_*.csv")))
        return [m.group("name") for m in names if m]


@dataclass(frozen=True)
class ValidationFiles:
    """A run's validation files that one score needs, read and checked to come from the same model: the
    reconstruction results (``results``, one row per image and start t) with their settings, and each feature
    family's features (indexed by filename) with its settings. ``first``: the file whose sidecar says how the run
    was made (``settings``), for messages."""

    results: pd.DataFrame | None
    results_settings: ReconSettings | None
    features: dict[str, pd.DataFrame]
    feature_settings: dict[str, FeatureSettings]
    first: Path
    settings: ReconSettings | FeatureSettings


def read_validation(run_dir: RunDir, with_results: bool, families: Sequence[str]) -> ValidationFiles:
    """The validation results (``with_results``) and the validation features of ``families``; UserError naming the
    file and the command that makes it when one is missing or unreadable, or when they were made with different
    models (``provenance.MODEL_KEYS``)."""
    results_path = run_dir.results(VAL_NAME)
    if with_results and not results_path.is_file():
        raise UserError(f"{results_path}: not found; run reconstruct.py with --run_val=1 first "
                        "(scores and the threshold are calibrated on the validation results)")
    results_settings = ReconSettings.read(sidecar(results_path)) if with_results else None
    feature_settings = {score: FeatureSettings.read(sidecar(run_dir.features(score, VAL_NAME))) for score in families}
    results = read_results(results_path) if with_results else None
    features = {score: read_features(run_dir.features(score, VAL_NAME)) for score in families}
    # Every file's model settings (provenance.MODEL_KEYS) against the first file's.
    settings_by_path = ({results_path: results_settings} if with_results else {}) | {
        run_dir.features(score, VAL_NAME): feature_settings[score] for score in families}
    first = next(iter(settings_by_path))
    for path in list(settings_by_path)[1:]:
        require_same(settings_by_path[first].to_dict(), settings_by_path[path].to_dict(), keys=MODEL_KEYS,
                     reference_name=sidecar(first).name, other_name=str(sidecar(path)),
                     fix="rerun reconstruct.py --run_val=1 for every score family alike")
    if results is not None:
        ts = sorted(set(results["t"].astype(int)))
        if ts != sorted(results_settings.start_timesteps):
            raise UserError(f"{results_path}: has start t={ts} but {sidecar(results_path).name} says "
                            f"{list(results_settings.start_timesteps)}; rerun reconstruct.py with --run_val=1")
    return ValidationFiles(results, results_settings, features, feature_settings, first, settings_by_path[first])


def sidecar(path: str | os.PathLike) -> Path:
    """The settings sidecar of a results or feature file: the same name with ``.json``."""
    return Path(path).with_suffix(".json")
