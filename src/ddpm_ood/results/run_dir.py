"""A run's folder, ``<output_dir>/<model_name>``: the one place its file names are written.

Training writes the checkpoints at its top; reconstruct.py writes under ``ood/`` one results file per set
(``results_<set>.csv``) and, per feature score, one feature file per set (``<score>/features_<set>.csv``), each with
its settings sidecar (the same name with ``.json``); ood_detection.py and score.py read them back from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ddpm_ood.checkpoint import BEST_CHECKPOINT
from ddpm_ood.results.schema import FEATURES_PATTERN, IN_NAME, RESULTS_PATTERN, VAL_NAME


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
        names = (FEATURES_PATTERN.match(p.name) for p in sorted((self.ood / score).glob("features_*.csv")))
        return [m.group("name") for m in names if m]


def sidecar(path: str | os.PathLike) -> Path:
    """The settings sidecar of a results or feature file: the same name with ``.json``."""
    return Path(path).with_suffix(".json")
