"""Scoring new inputs with a trained model: the ``OODScorer`` API behind score.py.

With a reconstruction score (the default ``ood.zscore.DEFAULT_SCORE``, ``"mse+perceptual"``: per t, z-scored MSE
plus z-scored LPIPS against the validation results, averaged over t; higher = more OOD), an input is reconstructed
from every start t exactly as reconstruct.py reconstructs a results set (same checkpoint and EMA choice, seed, noise
protocol, PLMS grid, start points and ``recon_steps``, all read from ``results_val.json``, the settings that produced
``results_val.csv``) and measured with the same metric set. With a feature family, only that family's features are
computed (no reconstruction), with the settings stored in its ``features_val.json``; the ensemble computes what its
members need (``ood.calibration.read_recipe``). So an image's score equals what reconstruct.py + ood_detection.py give for
the same file.

Threshold: ``ood.calibration.calibrate_threshold``, the ``val_keep`` quantile of the validation images' own scores;
an input is flagged (``is_ood``) when its score is strictly above it.

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
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import pandas as pd
from tqdm import tqdm

from ddpm_ood.devices import resolve_device, resolve_precision
from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.ood.calibration import (
    DEFAULT_VAL_KEEP,
    Calibration,
    ScoreRecipe,
    calibrate_threshold,
    check_val_keep,
    read_recipe,
)
from ddpm_ood.ood.zscore import DEFAULT_SCORE, ValidationReference
from ddpm_ood.reconstruction.metrics import ReconstructionMetrics
from ddpm_ood.reconstruction.pipeline import SetBatch, feature_rows, measured_rows
from ddpm_ood.reconstruction.plan import ReconstructionPlan
from ddpm_ood.results.provenance import require_same
from ddpm_ood.results.run_dir import RunDir
from ddpm_ood.results.writer import FeatureSettings, ReconSettings
from ddpm_ood.runs import RunModel, TrainedRun, load_run_model, open_pretrained_run, open_run

if TYPE_CHECKING:
    import torch

    from ddpm_ood.config import RunConfig

# Output columns, in order; "error" is empty for a scored input, the one-line reason otherwise (scores NaN).
OUTPUT_COLUMNS = ["path", "score", "is_ood", "mse_score", "perceptual_score", "error"]
# Score columns of the output: the chosen score, and the MSE-only and LPIPS-only reconstruction scores (NaN when the
# chosen score needs no reconstruction).
SCORE_COLUMNS = ("score", "mse_score", "perceptual_score")
# Noise key of an in-memory image: this prefix + the sha256 hex digest of its prepared bytes (no file stem has "/").
ARRAY_KEY_PREFIX = "/ddpm-ood-array/sha256/"

ImageInput = Union[str, os.PathLike, np.ndarray, "torch.Tensor"]


# ------------------------------------------------------------------------------------------- the recorded model
def _scoring_precision(settings: ReconSettings | FeatureSettings, device: torch.device, val_sidecar: str, *,
                       precision: str | None, amp: bool | None) -> str:
    """The validation results' precision, refused where this device cannot run it or the caller asked for another
    (scores of inputs reconstructed at another precision are not comparable with the validation scores)."""
    wanted = settings.precision
    if precision is not None or amp is not None:
        asked = resolve_precision(device, precision=precision, amp=bool(amp))
        if asked != wanted:
            raise UserError(f"{val_sidecar}: the validation files were reconstructed in {wanted} but {asked} was "
                            "asked for; scores would not be comparable: drop --precision/--amp, or rerun "
                            f"reconstruct.py --run_val=1 --precision={asked}")
    try:
        return resolve_precision(device, precision=wanted)
    except UserError as exc:
        raise UserError(f"{val_sidecar}: the validation files were reconstructed in {wanted}, which this device "
                        f"cannot run ({exc}); rerun reconstruct.py --run_val=1 here") from None


def open_recorded_run(recipe: ScoreRecipe, vqvae_checkpoint: str | os.PathLike | None = None,
                      pretrained: str | os.PathLike | None = None, pretrained_flags: str | None = None) -> TrainedRun:
    """The model that made the recipe's validation files, opened as reconstruct.py opens it: the checkpoint they
    name (refused when it has changed since: another epoch, noise type or autoencoder; or is an upstream one, which
    stores no configuration), or the published model, at ``pretrained`` or where they recorded it, with the recorded
    flags unless others are given (refused unless its identity is the recorded one)."""
    settings, val_sidecar = recipe.run_settings, recipe.val_sidecar
    recorded = settings.pretrained
    if recorded is None and (pretrained is not None or pretrained_flags is not None):
        given = "pretrained" if pretrained is not None else "pretrained_flags"
        raise ParameterError(f"{given}: {val_sidecar} was made with the checkpoint {settings.checkpoint}, not a "
                             "published model; drop it", given)
    if recorded is not None:
        flags = pretrained_flags
        if flags is None and recorded["format"] != "diffusers":
            flags = {**recorded["flags"], "codebase": recorded["format"]}
        path = pretrained if pretrained is not None else settings.checkpoint
        run = open_pretrained_run(path, flags, resize=bool(recorded.get("resize")))
        require_same(recorded, run.identity, reference_name=val_sidecar, other_name=str(path),
                     fix="give that model with --pretrained, or rerun reconstruct.py --run_val=1 with this one")
        return run
    run = open_run(settings.checkpoint, vqvae_checkpoint=vqvae_checkpoint)
    if run.upstream:
        raise UserError(f"{run.path}: has no stored configuration (an upstream checkpoint); score.py needs a "
                        "checkpoint written by ddpm-ood's train_ddpm.py")
    latent = run.config.latent
    now = {"checkpoint_epoch": run.epoch, "noise_type": run.config.schedule.noise_type,
           "autoencoder": None if latent is None else latent.weights_sha256}
    require_same({k: getattr(settings, k) for k in now}, now, reference_name=val_sidecar, other_name=str(run.path),
                 fix="rerun reconstruct.py with --run_val=1 so scores stay comparable")
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
        if recipe.reference is not None and metrics is None:
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
        return self.recipe.reference

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
        recipe = read_recipe(RunDir(output_dir, model_name), score)
        calibration = calibrate_threshold(recipe.val_scores, val_keep)
        run = open_recorded_run(recipe, vqvae_checkpoint, pretrained, pretrained_flags)
        dev = resolve_device(device)
        settings = recipe.run_settings
        precision = _scoring_precision(settings, dev, recipe.val_sidecar, precision=precision, amp=amp)
        model = load_run_model(run, dev, precision=precision, use_ema=settings.use_ema, max_batch=max_batch)
        metrics = ReconstructionMetrics(dev) if recipe.reference is not None else None
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
                if self.recipe.reference is not None:
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

    @cached_property
    def plan(self) -> ReconstructionPlan:
        """How inputs are reconstructed: exactly as the validation results were (their sidecar's settings); built
        once, on first use."""
        s = self.recipe.results_settings
        return ReconstructionPlan.at(s.start_timesteps, s.num_inference_steps, s.seed,
                                     inference_skip_factor=s.inference_skip_factor, recon_steps=s.recon_steps,
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
