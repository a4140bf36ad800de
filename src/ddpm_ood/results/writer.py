"""Resumable results files: rows are appended in completed batches, the final CSV is written once, atomically.

While a set is being reconstructed its rows go to ``results_<name>.csv.partial`` (our schema plus the image's
``index`` in the set), and the settings that produced them to ``results_<name>.csv.partial.json``. A run that stops
part-way resumes from the complete images in the partial file, provided the settings are the same. The settings of a
finished file are kept beside it in ``results_<name>.json`` (score.py reads them). The final
``results_<name>.csv`` is always written from the partial file, sorted by (index, t), so an interrupted run ends with
the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from ddpm_ood.errors import UserError, one_line
from ddpm_ood.fileio import atomic_write_csv, atomic_write_text, check_output_dir
from ddpm_ood.results.provenance import describe_changes
from ddpm_ood.results.schema import FEATURE_KEY_COLUMNS, RESULT_COLUMNS, RUN_DIR_FLAGS
from ddpm_ood.upstream.legacy import upgrade_sidecar

PARTIAL_COLUMNS = ["index", *RESULT_COLUMNS]


class ResumableResults:
    """One results file. ``settings`` (JSON-able) must match for a resume or a skip.

    ``n_timesteps``: rows per complete image. ``columns``: the final file's columns; with a ``t`` column (results
    files) rows are keyed by (index, t), without one (feature files, ``FEATURE_KEY_COLUMNS`` + features) by index."""

    def __init__(self, path: str | os.PathLike, settings: dict, n_timesteps: int,
                 columns: Sequence[str] = tuple(RESULT_COLUMNS)) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.partial_columns = ["index", *self.columns]
        self.key = ["index", "t"] if "t" in self.columns else ["index"]
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.settings_path = self.path.with_suffix(".json")
        self.partial_settings_path = self.partial.with_name(self.partial.name + ".json")
        self.settings = json.loads(json.dumps(settings))
        self.n_timesteps = n_timesteps

    @staticmethod
    def _read_json(path: Path) -> dict | None:
        try:
            return read_settings(path)
        except (OSError, json.JSONDecodeError):
            return None

    def is_complete(self) -> bool:
        """True when the final CSV exists and was produced with the same settings. A final CSV made with other
        settings (another precision, checkpoint, seed, ...) is recomputed, and this says which settings differ."""
        if not self.path.is_file():
            return False
        saved = self._read_json(self.settings_path)
        if saved == self.settings:
            return True
        changed = describe_changes(saved, self.settings)
        print(f"recomputing {self.path.name}: it was made with other settings ({changed})")
        return False

    def start(self) -> set[int]:
        """Prepare for (re)computation; return the indices of images already complete in the partial file.

        A partial file from other settings is discarded loudly (its rows would not be comparable).
        """
        saved = self._read_json(self.partial_settings_path)
        done: set[int] = set()
        if self.partial.is_file() and saved == self.settings:
            rows = self._read_partial()
            counts = rows.groupby("index").size()
            done = set(int(i) for i in counts.index[counts == self.n_timesteps])
            rows = rows[rows["index"].isin(done)]
            # Rewrite without any torn last line or incomplete image before appending again.
            atomic_write_csv(rows[self.partial_columns], self.partial)
            if done:
                print(f"resuming {self.path.name}: {len(done)} images already done")
        else:
            if self.partial.is_file():
                print(f"discarding {self.partial.name}: it was made with other settings "
                      f"({describe_changes(saved, self.settings)})")
            pd.DataFrame(columns=self.partial_columns).to_csv(self.partial, index=False)
        atomic_write_text(self.partial_settings_path, json.dumps(self.settings, indent=2, sort_keys=True))
        return done

    def _read_partial(self) -> pd.DataFrame:
        try:
            rows = pd.read_csv(self.partial, on_bad_lines="skip")
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            return pd.DataFrame(columns=self.partial_columns)
        if list(rows.columns) != self.partial_columns:
            raise UserError(f"{self.partial}: unexpected columns {list(rows.columns)}; delete it to start over")
        rows = rows.dropna()
        for column in self.key:
            rows[column] = rows[column].astype(int)
        return rows.drop_duplicates(self.key)

    def append(self, rows: pd.DataFrame | Sequence[dict]) -> None:
        """Append one completed batch of rows (``index`` and ``columns``), flushed to disk."""
        if len(rows) == 0:
            return
        frame = rows[self.partial_columns] if isinstance(rows, pd.DataFrame) else pd.DataFrame(
            list(rows), columns=self.partial_columns)
        try:
            with open(self.partial, "a") as f:
                frame.to_csv(f, header=False, index=False)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            # A torn last batch is harmless: start() keeps only complete images of the partial file.
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.partial)) from exc

    def finish(self) -> pd.DataFrame:
        """Write the final CSV (sorted by image index then t, no index column) and remove the partial file."""
        rows = self._read_partial().sort_values(self.key, kind="stable")
        final = rows[self.columns].reset_index(drop=True)
        # The old sidecar goes first: a fault between the two writes must not leave new rows beside old settings
        # (a missing sidecar means "recompute").
        self.settings_path.unlink(missing_ok=True)
        atomic_write_csv(final, self.path)
        atomic_write_text(self.settings_path, json.dumps(self.settings, indent=2, sort_keys=True))
        self.partial.unlink(missing_ok=True)
        self.partial_settings_path.unlink(missing_ok=True)
        return final


# Settings of a results file that a feature file does not have (the reconstruction's grid and noise protocol).
RECONSTRUCTION_ONLY_KEYS = ("num_inference_steps", "inference_skip_factor", "recon_steps", "start_timesteps",
                            "recon_noise")


def feature_writers(paths: dict[str, Path], set_settings: dict,
                    families: dict[str, dict]) -> dict[str, ResumableResults]:
    """One resumable feature file per family (``paths``: {family: its file}, folders made and checked here): its
    sidecar holds the set's settings (``reconstruction_settings`` less ``RECONSTRUCTION_ONLY_KEYS``) and what the
    family adds (``families[family]``: ``ScoreFamily.feature_sidecar``); its columns: ``FEATURE_KEY_COLUMNS``, then
    the family's features."""
    common = {k: v for k, v in set_settings.items() if k not in RECONSTRUCTION_ONLY_KEYS}
    writers = {family: ResumableResults(path, {**common, **families[family]}, 1,
                                        columns=[*FEATURE_KEY_COLUMNS, *families[family]["features"]])
               for family, path in paths.items()}
    for writer in writers.values():
        check_output_dir(writer.path.parent, RUN_DIR_FLAGS)
    return writers


def read_settings(path: str | os.PathLike) -> dict | None:
    """The settings sidecar at ``path`` (None if absent), older sidecars upgraded (``upstream.legacy``); JSON errors
    propagate."""
    path = Path(path)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return upgrade_sidecar(saved) if isinstance(saved, dict) else saved


# The settings that make results comparable (the scorer refuses validation results whose sidecar lacks one).
SETTINGS_KEYS = (
    "checkpoint",
    "checkpoint_epoch",
    "seed",
    "num_inference_steps",
    "inference_skip_factor",
    "recon_steps",
    "start_timesteps",
    "use_ema",
    "precision",
    "noise_key",
)


def reconstruction_settings(*, checkpoint: str | os.PathLike, checkpoint_epoch: int | None, csv: str,
                            first_n: int | None, seed: int, num_inference_steps: int, inference_skip_factor: int,
                            recon_steps: int | None, start_timesteps: Sequence[int], use_ema: bool, precision: str,
                            noise_key: str, autoencoder: str | None = None,
                            noise_type: str = "gaussian", recon_noise: str = "per_image",
                            pretrained: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sidecar content of one results file (``results_<set>.json``): every setting its numbers depend on.
    ``noise_type``: the checkpoint's (``ScheduleConfig.noise_type``), recorded unless Gaussian (key absent, as in
    sidecars written before noise types existed), so a file made with the other type is recomputed.
    ``recon_noise``: the start-noise protocol (``seeding.NOISE_PROTOCOLS``), recorded unless per_image (the
    paper's, and that of sidecars written before the protocol was a setting).
    ``autoencoder``: the weights hash of a latent model's VQ-VAE (key absent in pixel space, as in older sidecars).
    ``pretrained``: a published model's identity (``runs.TrainedRun.identity``; key absent for our checkpoints)."""
    settings = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_epoch": checkpoint_epoch,
        "csv": str(csv),
        "first_n": first_n,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "inference_skip_factor": inference_skip_factor,
        "recon_steps": recon_steps,
        "start_timesteps": list(start_timesteps),
        "use_ema": use_ema,
        "precision": precision,
        "noise_key": noise_key,
    }
    if noise_type != "gaussian":
        settings["noise_type"] = noise_type
    if recon_noise != "per_image":
        settings["recon_noise"] = recon_noise
    if autoencoder is not None:
        settings["autoencoder"] = autoencoder
    if pretrained is not None:
        settings["pretrained"] = pretrained
    return settings


def require_noise_key_rule(path: Path, record: Mapping[str, Any], rerun: str) -> None:
    """UserError naming ``path`` and the ``rerun`` command unless the sidecar ``record`` keys its noise by this
    version's rule (``seeding.NOISE_KEY_RULE``): other keys draw other noise, so the numbers would not compare."""
    from ddpm_ood.seeding import NOISE_KEY_RULE

    if record["noise_key"] != NOISE_KEY_RULE:
        raise UserError(f"{path}: noise keyed by {record['noise_key']!r}, this version keys it by "
                        f"{NOISE_KEY_RULE!r}; {rerun}")


def optional_settings(settings_type: type, record: Mapping[str, Any]) -> dict[str, Any]:
    """What a sidecar ``record`` gives for the fields of ``settings_type`` that have a default: a setting that an
    older sidecar lacks takes the field's default, written once, on the field."""
    return {field.name: record[field.name] for field in fields(settings_type)
            if field.name in record and (field.default is not MISSING or field.default_factory is not MISSING)}


@dataclass(frozen=True)
class ReconSettings:
    """The reconstruction settings that produced ``results_val.csv`` (its sidecar ``results_val.json``)."""

    checkpoint: str
    checkpoint_epoch: int | None
    seed: int
    num_inference_steps: int
    inference_skip_factor: int
    recon_steps: int | None
    start_timesteps: tuple[int, ...]
    use_ema: bool
    precision: str
    noise_key: str
    noise_type: str = "gaussian"  # absent from a sidecar = Gaussian (``reconstruction_settings``)
    autoencoder: str | None = None  # a latent model's VQ-VAE weights hash; absent = pixel space
    recon_noise: str = "per_image"  # the start-noise protocol; absent = per_image
    pretrained: dict[str, Any] | None = None  # a published model's identity; absent = our checkpoint

    @classmethod
    def read(cls, path: str | os.PathLike) -> ReconSettings:
        """Read a sidecar written by :class:`ResumableResults`; a missing or malformed file is a UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"{path}: not found, so the settings behind the validation results are unknown; "
                "rerun reconstruct.py with --run_val=1"
            )
        try:
            record = read_settings(path)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot be read as JSON ({one_line(exc)})") from None
        if isinstance(record, dict) and "precision" not in record and "amp" in record:
            raise UserError(f"{path}: made with amp=1, which does not say whether it was fp16 (CUDA) or bf16 "
                            "(CPU); rerun reconstruct.py with --run_val=1")
        missing = [key for key in SETTINGS_KEYS if not isinstance(record, dict) or key not in record]
        if missing:
            raise UserError(f"{path}: missing setting(s) {', '.join(missing)}; rerun reconstruct.py with --run_val=1")
        require_noise_key_rule(path, record, "rerun reconstruct.py with --run_val=1")
        return cls(
            checkpoint=str(record["checkpoint"]),
            checkpoint_epoch=record["checkpoint_epoch"],
            seed=int(record["seed"]),
            num_inference_steps=int(record["num_inference_steps"]),
            inference_skip_factor=int(record["inference_skip_factor"]),
            recon_steps=None if record["recon_steps"] is None else int(record["recon_steps"]),
            start_timesteps=tuple(int(t) for t in record["start_timesteps"]),
            use_ema=bool(record["use_ema"]),
            precision=str(record["precision"]),
            noise_key=str(record["noise_key"]),
            **optional_settings(cls, record),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["start_timesteps"] = list(self.start_timesteps)
        return d


@dataclass(frozen=True)
class FeatureSettings:
    """The settings that produced a feature family's ``features_val.csv`` (its sidecar ``features_val.json``):
    the run (as ``ReconSettings``), the family's network evaluations per image and its own settings as stored
    (``ScoreFamily.settings_record``; ``ScoreFamily.settings_from`` reads them back)."""

    family: str
    checkpoint: str
    checkpoint_epoch: int | None
    seed: int
    use_ema: bool
    precision: str
    noise_key: str
    noise_type: str
    nfe: int
    settings: dict[str, Any]
    autoencoder: str | None = None
    pretrained: dict[str, Any] | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> FeatureSettings:
        """Read a feature sidecar; a missing or malformed file is a UserError naming it and the command to rerun."""
        path = Path(path)
        rerun = f"rerun reconstruct.py --run_val=1 --scores={path.parent.name}"
        try:
            record = read_settings(path)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot be read as JSON ({one_line(exc)}); {rerun}") from None
        keys = ("family", "checkpoint", "checkpoint_epoch", "seed", "use_ema", "precision", "noise_key", "noise_type",
                "nfe", "settings")
        missing = [key for key in keys if not isinstance(record, dict) or key not in record]
        if missing:
            raise UserError(f"{path}: {'not found' if record is None else 'missing setting(s) ' + ', '.join(missing)}"
                            f"; {rerun}")
        require_noise_key_rule(path, record, rerun)
        return cls(family=str(record["family"]), checkpoint=str(record["checkpoint"]),
                   checkpoint_epoch=record["checkpoint_epoch"], seed=int(record["seed"]),
                   use_ema=bool(record["use_ema"]), precision=str(record["precision"]),
                   noise_key=str(record["noise_key"]), noise_type=str(record["noise_type"]), nfe=int(record["nfe"]),
                   settings=dict(record["settings"]), **optional_settings(cls, record))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
