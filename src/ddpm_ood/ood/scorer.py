"""Scoring new inputs with a trained model: the ``OODScorer`` API behind score.py.

With a reconstruction score (the default ``ood.zscore.DEFAULT_SCORE``, ``"mse+perceptual"``: per t, z-scored MSE
plus z-scored LPIPS against the validation results, averaged over t; higher = more OOD), an input is reconstructed
from every start t exactly as reconstruct.py reconstructs a results set (same checkpoint and EMA choice, seed, noise
protocol, PLMS grid, start points and ``recon_steps``, all read from ``results_val.json``, the settings that produced
``results_val.csv``) and measured with the same metric set. With a feature family, only that family's features are
computed (no reconstruction), with the settings stored in its ``features_val.json``; the ensemble computes what its
members need (``ood.score_recipe``). So an image's score equals what reconstruct.py + ood_detection.py give for
the same file.

Threshold: ``calibrate_threshold`` takes the ``val_keep`` quantile (numpy's linear interpolation) of the validation
images' own scores (against the same ``ValidationReference``). An input is flagged (``is_ood``) when its score is
strictly above it, so about ``1 - val_keep`` of in-distribution inputs are flagged (the expected false-positive
rate); on the validation images themselves the flagged count is within one image of ``(1 - val_keep) * n_val``.

Noise keys (``seeding.row_seed``): a file is keyed by its stem (``seeding.noise_key``, as reconstruct.py
does), so a file listed in a split CSV scores exactly as in ``results_<set>.csv``, wherever the data sits. An
in-memory image is keyed by ``ARRAY_KEY_PREFIX + sha256`` of its prepared float32 (C, *spatial) bytes (shape
included): the same image always gets the same noise, wherever it sits in the batch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import pandas as pd
from tqdm import tqdm

from ddpm_ood.devices import resolve_device, resolve_precision
from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.ood.score_recipe import ScoreRecipe, read_recipe
from ddpm_ood.ood.zscore import DEFAULT_SCORE, ValidationReference
from ddpm_ood.reconstruction.metrics import ReconstructionMetrics
from ddpm_ood.reconstruction.pipeline import ReconstructionPlan, SetBatch, feature_rows, measured_rows
from ddpm_ood.results.schema import VAL_NAME, ood_dir, results_path
from ddpm_ood.results.writer import FeatureSettings, ReconSettings
from ddpm_ood.runs import RunModel, TrainedRun, load_run_model, open_pretrained_run, open_run

if TYPE_CHECKING:
    import torch

    from ddpm_ood.config import RunConfig

DEFAULT_VAL_KEEP = 0.95
# Output columns, in order; "error" is empty for a scored input, the one-line reason otherwise (scores NaN).
OUTPUT_COLUMNS = ["path", "score", "is_ood", "mse_score", "perceptual_score", "error"]
# Score columns of the output: the chosen score, and the MSE-only and LPIPS-only reconstruction scores (NaN when the
# chosen score needs no reconstruction).
SCORE_COLUMNS = ("score", "mse_score", "perceptual_score")
# Noise key of an in-memory image: this prefix + the sha256 hex digest of its prepared bytes (no file stem has "/").
ARRAY_KEY_PREFIX = "/ddpm-ood-array/sha256/"

ImageInput = Union[str, os.PathLike, np.ndarray, "torch.Tensor"]


# ---------------------------------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """The decision threshold and what it means on the validation set.

    threshold: the ``val_keep`` quantile of the validation scores; an input is OOD when its score > threshold.
    val_keep: fraction of in-distribution inputs meant to be kept, in (0, 1]. n_val: validation images.
    val_flagged: validation images scoring above the threshold.
    """

    threshold: float
    val_keep: float
    n_val: int
    val_flagged: int

    @property
    def expected_fpr(self) -> float:
        """1 - val_keep: the fraction of in-distribution inputs expected to be flagged."""
        return 1.0 - self.val_keep

    @property
    def val_fpr(self) -> float:
        """The fraction of validation images above the threshold (the empirical false-positive rate)."""
        return self.val_flagged / self.n_val

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "val_keep": self.val_keep,
            "expected_false_positive_rate": self.expected_fpr,
            "validation_false_positive_rate": self.val_fpr,
            "n_validation": self.n_val,
            "n_validation_flagged": self.val_flagged,
        }


def check_val_keep(val_keep: float) -> float:
    """``val_keep`` as a float in (0, 1]; anything else is a ParameterError naming val_keep."""
    v = float(val_keep)
    if not 0.0 < v <= 1.0:
        raise ParameterError(f"val_keep must be in (0, 1] (the fraction of validation images kept), got {val_keep}",
                             "val_keep")
    return v


def calibrate_threshold(val_scores: Sequence[float] | np.ndarray, val_keep: float = DEFAULT_VAL_KEEP) -> Calibration:
    """Threshold = the ``val_keep`` quantile (linear interpolation) of the validation images' scores.

    ``val_scores``: one finite score per validation image, higher = more OOD. With n scores, the number strictly
    above the threshold is within one of ``(1 - val_keep) * n`` (for distinct scores). ``val_keep = 1`` puts the
    threshold at the highest validation score (no validation image flagged).
    """
    val_keep = check_val_keep(val_keep)
    scores = np.asarray(val_scores, dtype=float).ravel()
    if scores.size == 0:
        raise UserError("no validation scores to calibrate the threshold on")
    if not np.isfinite(scores).all():
        raise UserError("validation scores contain NaN or infinite values; cannot calibrate the threshold")
    threshold = float(np.quantile(scores, val_keep))
    return Calibration(threshold, val_keep, int(scores.size), int((scores > threshold).sum()))


def _check_model_matches(settings: ReconSettings, run: RunConfig, val_path: Path, ckpt_file: Path) -> None:
    """Scores are only comparable with validation results made with the checkpoint's noise type and autoencoder (a
    checkpoint retrained in place with the other ``--simplex_noise`` or another VQ-VAE keeps its path); UserError
    otherwise."""
    if settings.noise_type != run.schedule.noise_type:
        raise UserError(
            f"{val_path.with_suffix('.json')}: validation results made with {settings.noise_type} noise, but "
            f"{ckpt_file} was trained with {run.schedule.noise_type} noise; rerun reconstruct.py with --run_val=1"
        )
    vqvae = None if run.latent is None else run.latent.weights_sha256
    if settings.autoencoder != vqvae:
        def name(h: str | None) -> str:
            return "pixel space" if h is None else f"the VQ-VAE with weights sha256 {h[:12]}"

        raise UserError(
            f"{val_path.with_suffix('.json')}: validation results made in {name(settings.autoencoder)}, but "
            f"{ckpt_file} works in {name(vqvae)}; rerun reconstruct.py with --run_val=1"
        )


def _scoring_precision(settings: ReconSettings, device: torch.device, val_path: Path, *, precision: str | None,
                       amp: bool | None) -> str:
    """The validation results' precision, refused where this device cannot run it or the caller asked for another
    (scores of inputs reconstructed at another precision are not comparable with the validation scores)."""
    wanted = settings.precision
    if precision is not None or amp is not None:
        asked = resolve_precision(device, precision=precision, amp=bool(amp))
        if asked != wanted:
            raise UserError(f"{val_path.name} was reconstructed in {wanted} but {asked} was asked for; scores would "
                            f"not be comparable: drop --precision/--amp, or rerun reconstruct.py --run_val=1 "
                            f"--precision={asked}")
    try:
        return resolve_precision(device, precision=wanted)
    except UserError as exc:
        raise UserError(f"{val_path.name} was reconstructed in {wanted}, which this device cannot run ({exc}); "
                        "rerun reconstruct.py --run_val=1 here") from None


def _open_scored_pretrained(settings: ReconSettings | FeatureSettings, val_path: Path,
                            pretrained: str | os.PathLike | None, pretrained_flags: str | None) -> TrainedRun:
    """The published model that made the validation results: at ``pretrained`` or where the sidecar recorded it,
    with the recorded flags unless others are given; refused unless its identity (format, weights hash, flags,
    respacing, ...) is the recorded one."""
    recorded = settings.pretrained
    flags = pretrained_flags
    if flags is None and recorded["format"] != "diffusers":
        flags = {**recorded["flags"], "codebase": recorded["format"]}
    path = pretrained if pretrained is not None else settings.checkpoint
    run = open_pretrained_run(path, flags, resize=bool(recorded.get("resize")))
    if run.identity != recorded:
        changed = sorted(k for k in set(run.identity) | set(recorded) if run.identity.get(k) != recorded.get(k))
        raise UserError(f"{path}: not the model {val_path.name} was made with (differs in {', '.join(changed)}); "
                        "give that model with --pretrained, or rerun reconstruct.py --run_val=1 with this one")
    return run


def _open_scored_run(settings: ReconSettings, val_path: Path,
                     vqvae_checkpoint: str | os.PathLike | None, pretrained: str | os.PathLike | None = None,
                     pretrained_flags: str | None = None) -> TrainedRun:
    """The run that made the validation results, opened as reconstruct.py opens it; refused when the checkpoint
    has changed since (another epoch, noise type or autoencoder) or is an upstream one (no stored configuration).
    A published model's (``settings.pretrained``) is reopened and checked by ``_open_scored_pretrained``."""
    if settings.pretrained is not None:
        return _open_scored_pretrained(settings, val_path, pretrained, pretrained_flags)
    if pretrained is not None or pretrained_flags is not None:
        given = "pretrained" if pretrained is not None else "pretrained_flags"
        raise ParameterError(f"{given}: {val_path.name} was made with the checkpoint {settings.checkpoint}, not a "
                             "published model; drop it", given)
    run = open_run(settings.checkpoint, vqvae_checkpoint=vqvae_checkpoint)
    if run.epoch != settings.checkpoint_epoch:
        raise UserError(
            f"{run.path}: is now epoch {run.epoch} but {val_path.name} was made with epoch "
            f"{settings.checkpoint_epoch}; rerun reconstruct.py with --run_val=1 so scores stay comparable"
        )
    if run.upstream:
        raise UserError(
            f"{run.path}: has no stored configuration (an upstream checkpoint); score.py needs a checkpoint "
            "written by ddpm-ood's train_ddpm.py"
        )
    _check_model_matches(settings, run.config, val_path, run.path)
    return run


# ------------------------------------------------------------------------------------------------------- inputs
def _has_image_suffix(name: str) -> bool:
    from ddpm_ood.fileio import IMAGE_SUFFIXES

    return name.lower().endswith(IMAGE_SUFFIXES)


def collect_inputs(spec: str) -> list[str]:
    """The image paths named by score.py's ``--inputs``.

    - a folder: its ``.png .jpg .jpeg .npy .nii .nii.gz`` files (not recursive; hidden files and other types
      ignored), sorted by name; none is a UserError;
    - a ``.csv`` file: the paths of a split CSV (either format of ``data.splits``), missing files kept (they get
      an error row);
    - otherwise one image path, or several separated by commas (kept as given: a missing file or an unsupported
      type gets an error row).
    """
    from ddpm_ood.data.splits import read_split_csv
    from ddpm_ood.fileio import IMAGE_SUFFIXES

    spec = str(spec).strip()
    if not spec:
        raise UserError("--inputs is empty; give a folder, a split CSV or image files")
    p = Path(spec)
    if p.is_dir():
        files = sorted(
            str(f) for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and _has_image_suffix(f.name)
        )
        if not files:
            raise UserError(f"--inputs: folder {p} has no image files ({' '.join(IMAGE_SUFFIXES)})")
        return files
    if spec.lower().endswith(".csv"):
        return read_split_csv(spec, check_exists=False)
    if p.is_file():
        return [spec]
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    if len(parts) > 1:
        return parts
    raise UserError(f"--inputs: {spec} is not a folder, a split CSV or an image file")


def array_key(image: torch.Tensor) -> str:
    """Noise key of a prepared in-memory image (C, *spatial): ``ARRAY_KEY_PREFIX`` + sha256 of shape and
    float32 bytes. The same image always gets the same key, hence the same noise."""
    import torch

    x = image.detach().to("cpu", torch.float32).contiguous().numpy()
    digest = hashlib.sha256(repr(tuple(x.shape)).encode() + x.tobytes()).hexdigest()
    return ARRAY_KEY_PREFIX + digest


# ------------------------------------------------------------------------------------------------------- scorer
class OODScorer:
    """Score new images against a trained model's validation results; higher score = more OOD.

    Build one with ``OODScorer.from_run``; it needs ``<output_dir>/<model_name>/ood/results_val.csv`` (and its
    ``results_val.json``) written by ``reconstruct.py --run_val=1``, and the checkpoint named there. Example::

        from ddpm_ood import OODScorer
        scorer = OODScorer.from_run("runs", "mnist", device="auto")  # reads runs/mnist/ood/results_val.csv
        result = scorer.score(["digit_0.png", "digit_1.png"])  # paths, numpy arrays or a (B, C, H, W) tensor
        print(f"inputs scoring above {scorer.threshold:.3f} are flagged as OOD")
        print(result[["path", "score", "is_ood"]])

    ``score`` returns a DataFrame with one row per input, in order, columns ``OUTPUT_COLUMNS``:
    ``path`` (the file path as given, or ``images[i]`` for an in-memory image), ``score`` (the default
    ``mse+perceptual`` score), ``is_ood`` (score > ``threshold``; <NA> when the input failed), ``mse_score``,
    ``perceptual_score`` (the MSE-only and LPIPS-only scores) and ``error`` ("" when scored, else the reason;
    the scores are then NaN).

    Attributes: ``threshold`` (float), ``calibration`` (``Calibration``), ``reference`` (the
    ``ValidationReference``), ``settings`` (``ReconSettings`` read from ``results_val.json``), ``run``
    (the checkpoint's ``RunConfig``), ``device``.
    """

    def __init__(
        self,
        run: RunConfig,
        model: RunModel,
        recipe: ScoreRecipe,
        calibration: Calibration,
        device: torch.device,
        batch_size: int = 64,
        metrics: ReconstructionMetrics | None = None,
    ) -> None:
        if batch_size < 1:
            raise ParameterError(f"batch_size must be >= 1, got {batch_size}", "batch_size")
        if recipe.recon is not None and metrics is None:
            raise ValueError("a score that needs reconstruction needs its ReconstructionMetrics")
        self.run = run
        self.model = model
        self.recipe = recipe
        self.metrics = metrics
        self.calibration = calibration
        self.device = device
        self.batch_size = int(batch_size)

    @property
    def threshold(self) -> float:
        """Scores strictly above this are OOD: the ``val_keep`` quantile of the validation scores."""
        return self.calibration.threshold

    @property
    def score_name(self) -> str:
        return self.recipe.score

    @property
    def settings(self) -> ReconSettings | FeatureSettings:
        """The settings of the validation files the score was calibrated on (the reconstruction results' when it
        needs reconstruction, else its first feature family's)."""
        return self.recipe.run_settings

    @property
    def reference(self) -> ValidationReference | None:
        """The reconstruction z-score reference (None for a feature-family score)."""
        return None if self.recipe.recon is None else self.recipe.recon[1]

    @classmethod
    def from_run(
        cls,
        output_dir: str | os.PathLike,
        model_name: str,
        device: str = "auto",
        *,
        score: str = DEFAULT_SCORE,
        val_keep: float = DEFAULT_VAL_KEEP,
        batch_size: int = 64,
        amp: bool | None = None,
        precision: str | None = None,
        max_batch: int | None = None,
        vqvae_checkpoint: str | os.PathLike | None = None,
        pretrained: str | os.PathLike | None = None,
        pretrained_flags: str | None = None,
    ) -> OODScorer:
        """Load the run ``<output_dir>/<model_name>``: the validation files ``score`` needs, their settings, the
        checkpoint.

        score: ``families.score_names()`` (default the paper's ``mse+perceptual``; a feature family or
        ``ensemble`` needs ``reconstruct.py --run_val=1 --scores=...`` first). device: "auto" (CUDA if available),
        "cpu" or "cuda". val_keep: in (0, 1], see ``calibrate_threshold``. batch_size: images scored together.
        Precision is always the one the validation files were made with (scores would not be comparable
        otherwise): ``precision`` or ``amp``, if given, must resolve to it on this device, else UserError.
        max_batch: most samples per network call (memory budget; no effect on the numbers). vqvae_checkpoint: a
        latent model's VQ-VAE, if it has moved since training (its weights must hash to the recorded ones).
        pretrained, pretrained_flags: a published model's location now and, for openai models, its flags (default:
        those recorded with the validation results; the model must be the recorded one). Bad or missing files
        raise UserError.
        """
        val_keep = check_val_keep(val_keep)
        val_path = results_path(output_dir, model_name, VAL_NAME)
        recipe = read_recipe(ood_dir(output_dir, model_name), score, val_path)
        calibration = calibrate_threshold(recipe.val_scores, val_keep)
        settings = recipe.run_settings
        run = _open_scored_run(settings, val_path, vqvae_checkpoint, pretrained, pretrained_flags)
        dev = resolve_device(device)
        model = load_run_model(run, dev, precision=_scoring_precision(settings, dev, val_path, precision=precision,
                                                                         amp=amp),
                               use_ema=settings.use_ema, max_batch=max_batch)
        metrics = ReconstructionMetrics(dev) if recipe.recon is not None else None
        return cls(run.config, model, recipe, calibration, dev, batch_size, metrics)

    # -------------------------------------------------------------------------------------------------------
    def score(
        self,
        images: torch.Tensor | np.ndarray | Sequence[ImageInput],
        *,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Score images; one output row per input, in order (columns ``OUTPUT_COLUMNS``, see the class doc).

        images:
          - a torch tensor or numpy array (B, C, *spatial), float in [0, 1], already prepared as the training
            images were (the checkpoint's channels, size and min-max scaling; ``run.image_shape`` per image),
            used as is; a wrong shape or range is a UserError;
          - a sequence whose items are image paths (str / PathLike: loaded with ``data.datasets.load_image`` and
            the checkpoint's DataConfig, exactly as reconstruct.py loads them), raw numpy arrays ((H, W),
            (1, H, W) or (3, H, W) ...: prepared by the same loading chain: channels, crop, resize, min-max to
            [0, 1]) or prepared torch tensors (C, *spatial) in [0, 1].
        An item that cannot be brought to the model's shape gets a row with NaN scores and the reason in
        ``error``; if no item at all can be scored, UserError. progress: show a tqdm bar.
        """
        items = self._as_items(images)
        errors: dict[int, str] = {}
        recon_rows: list[pd.DataFrame] = []
        feature_frames: dict[str, list[pd.DataFrame]] = {f: [] for f in self.recipe.families}
        with tempfile.TemporaryDirectory(prefix="ddpm-ood-score-") as tmp:
            bar = tqdm(total=len(items), desc="score", unit="img", disable=not progress)
            for batch in self._prepared_batches(items, errors, tmp, bar):
                if self.recipe.recon is not None:
                    recon_rows.extend(measured_rows(self.model, self.metrics, self.plan, [batch], "in"))
                if self.recipe.families:
                    for frames in feature_rows(self.model, self.recipe.families, self.recipe.family_settings, [batch],
                                               "in"):
                        for family, frame in frames.items():
                            feature_frames[family].append(frame)
            bar.close()
        if len(errors) == len(items):
            first = min(errors)
            raise UserError(f"none of the {len(items)} input(s) could be scored; {errors[first]}")
        recon = pd.concat(recon_rows, ignore_index=True) if recon_rows else None
        features = {f: pd.concat(frames, ignore_index=True) for f, frames in feature_frames.items()}
        return self._frame(items, self.recipe.image_scores(recon, features), errors)

    @property
    def plan(self) -> ReconstructionPlan:
        """How inputs are reconstructed: exactly as the validation results were (their sidecar's settings)."""
        s = self.recipe.recon[0]
        return ReconstructionPlan(s.start_timesteps, s.num_inference_steps, s.seed, s.recon_steps,
                                  noise=s.recon_noise)

    def _prepared_batches(self, items: list[Any], errors: dict[int, str], tmp: str, bar: Any) -> Iterator[SetBatch]:
        """``batch_size`` items at a time, prepared (``_prepare``), as ``SetBatch``es; an item that cannot be
        prepared goes to ``errors`` instead. The results filename of an input is its position: unique even when two
        inputs share a file stem."""
        for start in range(0, len(items), self.batch_size):
            indices, tensors, keys = [], [], []
            for i in range(start, min(start + self.batch_size, len(items))):
                try:
                    x, key = self._prepare(i, items[i], tmp)
                except UserError as exc:
                    errors[i] = str(exc)
                    continue
                indices.append(i)
                tensors.append(x)
                keys.append(key)
            if indices:
                yield indices, [str(i) for i in indices], self._stack(tensors), keys, None
            bar.update(min(start + self.batch_size, len(items)) - start)

    def _as_items(self, images: Any) -> list[Any]:
        import torch

        if isinstance(images, (str, os.PathLike)):
            raise TypeError("score() takes a sequence of paths (or a tensor); wrap a single path in a list")
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if isinstance(images, torch.Tensor):
            self._check_prepared(images, "images", batch=True)
            return list(images)
        items = list(images)
        if not items:
            raise UserError("no inputs to score")
        return items

    def _check_prepared(self, x: torch.Tensor, name: str, batch: bool) -> None:
        want = tuple(self.run.image_shape)
        shape = tuple(x.shape[1:] if batch else x.shape)
        if (batch and x.ndim != len(want) + 1) or shape != want:
            layout = "(B, " + ", ".join(map(str, want)) + ")" if batch else str(want)
            raise UserError(f"{name}: shape {tuple(x.shape)}, but the model takes prepared images {layout}")
        if batch and x.shape[0] == 0:
            raise UserError(f"{name}: no images (batch of 0)")
        if not x.is_floating_point():
            raise UserError(f"{name}: dtype {x.dtype}; prepared images are float in [0, 1]")
        if not bool(x.isfinite().all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
            raise UserError(f"{name}: values must be finite and in [0, 1] (prepared images)")

    def _prepare(self, i: int, item: Any, tmp: str) -> tuple[torch.Tensor, str]:
        """(C, *spatial) float32 in [0, 1] with the model's shape, and its noise key; UserError if impossible."""
        import torch

        from ddpm_ood.data.datasets import load_image
        from ddpm_ood.seeding import noise_key

        if isinstance(item, torch.Tensor):
            name = f"images[{i}]"
            self._check_prepared(item, name, batch=False)
            x = item.detach().float()
            return x, array_key(x)
        if isinstance(item, np.ndarray):
            # Write it as a .npy so it goes through exactly the loading chain of files (channels, crop, resize,
            # min-max); the temporary path is replaced by images[i] in messages.
            path = os.path.join(tmp, f"images_{i}.npy")
            try:
                np.save(path, item, allow_pickle=False)
                x = load_image(path, self.run.data)
            except ValueError as exc:  # object arrays cannot be saved without pickling
                raise UserError(f"images[{i}]: not a numeric array ({exc})") from None
            except UserError as exc:
                raise UserError(str(exc).replace(path, f"images[{i}]")) from None
            finally:
                if os.path.exists(path):
                    os.remove(path)
            self._check_loaded_shape(x, f"images[{i}]")
            return x, array_key(x)
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            try:
                x = load_image(path, self.run.data)
            except (OSError, ValueError, RuntimeError) as exc:  # anything a reader raised past load_image's checks
                raise UserError(f"{path}: cannot be loaded ({exc.__class__.__name__}: {exc})") from None
            self._check_loaded_shape(x, path)
            return x, noise_key(path)  # the key reconstruct.py uses
        raise UserError(f"images[{i}]: unsupported input type {type(item).__name__} (path, numpy array or tensor)")

    def _check_loaded_shape(self, x: torch.Tensor, name: str) -> None:
        want = tuple(self.run.image_shape)
        if tuple(x.shape) != want:
            raise UserError(
                f"{name}: loads as shape {tuple(x.shape)} but the model was trained on {want} "
                "(wrong image size or channels for this model)"
            )

    def _stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.stack([t.to(torch.float32) for t in tensors]).to(self.device)

    def _frame(self, items: list[Any], scores: pd.DataFrame, errors: dict[int, str]) -> pd.DataFrame:
        labels = [
            os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"images[{i}]"
            for i, item in enumerate(items)
        ]
        keys = [str(i) for i in range(len(items))]
        out = pd.DataFrame({"path": labels})
        for column in SCORE_COLUMNS:
            out[column] = scores[column].reindex(keys).to_numpy(dtype=float)
        flagged = pd.array(out["score"] > self.threshold, dtype="boolean")
        flagged[out["score"].isna().to_numpy()] = pd.NA
        out["is_ood"] = flagged
        out["error"] = [errors.get(i, "") for i in range(len(items))]
        return out[OUTPUT_COLUMNS]
