"""Option groups shared by the entry scripts, defined once. Flag names and spellings follow upstream."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from ddpm_ood.config import PREDICTION_TYPES, SCHEDULE_ALIASES

_TRUE = {"1", "true", "yes", "y", "on"}


def field_default(job: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``job`` (``part.field`` for a field of a nested part, read from
    the part's default instance: ``compute.batch_size``): every flag that feeds a job field takes its default from
    there, so the default is written once (tests/cli/test_flag_defaults.py checks every parser)."""
    head, _, rest = name.partition(".")
    for f in dataclasses.fields(job):
        if f.name == head:
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise TypeError(f"{job.__name__}.{head} has no default")
            for part in rest.split(".") if rest else ():
                value = getattr(value, part)
            return value
    raise TypeError(f"{job.__name__} has no field {head!r}")


def compute_options(args: argparse.Namespace) -> Any:
    """The stage's ``compute.ComputeOptions`` from the flags of the same names that its parser has (the others keep
    their defaults)."""
    from ddpm_ood.compute import ComputeOptions

    return ComputeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ComputeOptions)
                             if hasattr(args, f.name)})


def scientific(value: float) -> str:
    """``2.5e-05`` -> ``"2.5e-5"``, ``0.0003`` -> ``"3e-4"``: a learning rate as help texts write it."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
_FALSE = {"0", "false", "no", "n", "off"}


def boolish(value: str) -> bool:
    """Parse 1/0/true/false/yes/no (any case); anything else is a parse error (upstream's type=bool is not)."""
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0/true/false/yes/no, got {value!r}")


def optional_int(value: str) -> int | None:
    """An int, or None for "None"/"" (upstream passes image_size as a string and casts it)."""
    if value is None or str(value).strip() in ("", "None", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or None, got {value!r}") from None


def nested_int_list(value: str) -> tuple[tuple[int, ...], ...]:
    """Upstream's list-of-lists flags: "[[2,4,1,1],[2,4,1,1]]" -> ((2, 4, 1, 1), (2, 4, 1, 1)); one flat list
    "[2,4,1,1]" means one level."""
    import ast

    try:
        parsed = ast.literal_eval(str(value).strip())
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"expected a list of integer lists like [[2,4,1,1],[2,4,1,1]], got {value!r}"
                                         ) from None
    if isinstance(parsed, (list, tuple)) and parsed and all(isinstance(v, int) for v in parsed):
        parsed = [parsed]
    ok = isinstance(parsed, (list, tuple)) and parsed and all(
        isinstance(level, (list, tuple)) and level and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in level) for level in parsed)
    if not ok:
        raise argparse.ArgumentTypeError(f"expected a list of integer lists like [[2,4,1,1],[2,4,1,1]], got {value!r}")
    return tuple(tuple(level) for level in parsed)


def optional_path(value: str) -> str | None:
    """A path, or None for "None"/"" (upstream's default is the literal None)."""
    v = str(value).strip()
    return None if v in ("", "None", "none") else v


def int_list(value: str) -> tuple[int, ...] | None:
    """"160,160,128" or "[160, 160, 128]" -> (160, 160, 128); "None" -> None. -1 keeps that dimension."""
    v = str(value).strip()
    if v in ("", "None", "none"):
        return None
    try:
        return tuple(int(x) for x in v.strip("[]()").split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def checked_number(convert: Callable[[str], float], ok: Callable[[float], bool], expected: str):
    """An argparse type: ``convert(value)`` that must satisfy ``ok``; otherwise a parse error saying ``expected``."""

    def parse(value: str):
        try:
            v = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return v

    return parse


positive_int = checked_number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked_number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked_number(float, lambda v: 0 < v < math.inf, "a positive number")
non_negative_float = checked_number(float, lambda v: 0 <= v < math.inf, "a number >= 0")


def add_run_options(parser: argparse.ArgumentParser, compute: Any, seed: int) -> None:
    """--seed, --output_dir, --model_name, --device, --amp/--precision, --dist_timeout; defaults: ``seed`` and the
    stage's default ``compute.ComputeOptions`` (its job's ``compute`` field)."""
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=seed, help=f"seeds every random draw (default {seed}, as upstream)")
    g.add_argument("--output_dir", type=str, required=True, help="root of all runs")
    g.add_argument("--model_name", type=str, required=True, help="run name: files go to <output_dir>/<model_name>/")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=compute.device,
                   help="auto = cuda if available, else cpu")
    add_precision_options(g, amp_default=compute.amp)
    timeout = compute.dist_timeout
    g.add_argument("--dist_timeout", type=positive_float, default=timeout,
                   help="under torchrun: seconds any rank waits for the others (start-up, every collective) before "
                   "it fails, so that a hang becomes a failure torchrun restarts (--max_restarts); longer than "
                   f"anything rank 0 does alone (default {timeout:g})")


def add_precision_options(group: argparse._ActionsContainer, *, amp_default: bool | None) -> None:
    """--amp and --precision (the rule is ``devices.resolve_precision``)."""
    from ddpm_ood.devices import PRECISIONS

    default = "default 0 = fp32" if amp_default is False else "default: as the validation results were made"
    group.add_argument("--amp", type=boolish, default=amp_default,
                       help="1 = the fastest precision this device computes natively: fp16 on CUDA, bf16 on a CPU "
                       f"with AVX512-BF16/AMX, else fp32 (said in one line); {default}")
    group.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="numeric precision of the network, overriding --amp: fp32 (IEEE, TF32 off on CUDA), "
                       "tf32 (CUDA), bf16, fp16 (CUDA); recorded in checkpoints and results sidecars")


def add_data_options(parser: argparse.ArgumentParser, *, batch_size: int, cache_data: bool,
                     spatial_dimension: int | None = None) -> None:
    """Data flags; ``batch_size``, ``cache_data``: the defaults of the job fields they feed; ``spatial_dimension``:
    the script's default where it is not DataConfig's (upstream's train_vqvae.py: 3). The image flags' defaults are
    DataConfig's; ``num_workers`` is upstream's default (``ComputeOptions``'), capped at the cores this process has (an
    explicit --num_workers is obeyed)."""
    import os

    from ddpm_ood.compute import ComputeOptions
    from ddpm_ood.config import DataConfig
    from ddpm_ood.devices import default_num_workers

    num_workers = ComputeOptions.num_workers
    if spatial_dimension is None:
        spatial_dimension = field_default(DataConfig, "spatial_dims")
    workers = default_num_workers(num_workers, processes_sharing=int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    channel = field_default(DataConfig, "channel")
    g = parser.add_argument_group("data")
    g.add_argument("--spatial_dimension", type=int, choices=(2, 3), default=spatial_dimension,
                   help=f"2D images or 3D volumes (default {spatial_dimension})")
    g.add_argument("--image_size", type=optional_int, default=field_default(DataConfig, "image_size"),
                   help="resize every image to this size per spatial dim (MONAI 'area'); default: keep")
    g.add_argument("--image_roi", type=int_list, default=field_default(DataConfig, "image_roi"),
                   help="centre-crop to this ROI before resizing, e.g. 160,160,128 (-1 keeps a dim)")
    g.add_argument("--is_grayscale", type=boolish, default=field_default(DataConfig, "is_grayscale"),
                   help="1 = single-channel images (keeps channel 0), 0 = 3-channel RGB")
    g.add_argument("--channel", type=non_negative_int, default=channel,
                   help="with --is_grayscale=1: the channel kept of multi-channel NIfTI volumes (BraTS: 0 FLAIR, "
                   f"1 T1w, 2 t1gd, 3 T2w); single-channel images are used as they are (default {channel}, as "
                   "upstream)")
    g.add_argument("--batch_size", type=positive_int, default=batch_size, help=f"default {batch_size}")
    g.add_argument("--num_workers", type=non_negative_int, default=workers,
                   help=f"data-loading worker processes (default: upstream's {num_workers}, capped at this "
                   f"machine's cores minus one: {workers} here)")
    g.add_argument("--cache_data", type=boolish, default=cache_data, help="keep decoded images in memory")
    g.add_argument("--augmentation", type=boolish, default=False,
                   help="accepted for compatibility; only 0 is supported (upstream's flag was a no-op)")


def add_schedule_options(parser: argparse.ArgumentParser, *, from_checkpoint: bool) -> None:
    """Noise-schedule flags. With ``from_checkpoint`` every default is None: the checkpoint's config decides,
    and a flag given explicitly must agree with it."""
    from ddpm_ood.config import ScheduleConfig

    def default(name: str) -> Any:
        return None if from_checkpoint else field_default(ScheduleConfig, name)

    d = ScheduleConfig()
    g = parser.add_argument_group("noise schedule")
    note = " (default: from the checkpoint)" if from_checkpoint else ""
    g.add_argument("--beta_schedule", choices=tuple(SCHEDULE_ALIASES), metavar="NAME",
                   default=default("beta_schedule"),
                   help=f"one of {', '.join(SCHEDULE_ALIASES)}{note or f' (default {d.beta_schedule})'}")
    g.add_argument("--beta_start", type=float, default=None,
                   help=f"first beta of linear/scaled_linear/sigmoid schedules{note or ' (default 1e-4)'}")
    g.add_argument("--beta_end", type=float, default=None,
                   help=f"last beta of linear/scaled_linear/sigmoid schedules{note or ' (default 2e-2)'}")
    g.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=default("prediction_type"),
                   help=f"what the network predicts{note or f' (default {d.prediction_type})'}")
    g.add_argument("--b_scale", type=float, default=default("b_scale"),
                   help=f"multiply images by this before noising{note or f' (default {d.b_scale:g})'}")
    g.add_argument("--snr_shift", type=float, default=default("snr_shift"),
                   help=f"scale the signal-to-noise ratio of every t{note or f' (default {d.snr_shift:g})'}")
    g.add_argument("--simplex_noise", type=boolish, default=None if from_checkpoint else False,
                   help="1 = AnoDDPM's simplex noise (6 octaves, persistence 0.8, frequency 64, unit variance; "
                   "for checkpoints of upstream ddpm-ood its unscaled sum, as it trained) instead of Gaussian noise, "
                   "in training and reconstruction; recorded in the checkpoint"
                   f"{note or ' (default 0)'}")


def add_model_options(parser: argparse.ArgumentParser, *, from_checkpoint: bool) -> None:
    from ddpm_ood.diffusion.unet import MODEL_PRESETS

    g = parser.add_argument_group("model")
    g.add_argument("--model_type", choices=tuple(MODEL_PRESETS), default=None if from_checkpoint else "small",
                   help="UNet preset" + (" (default: from the checkpoint)" if from_checkpoint else " (default small)"))
    if from_checkpoint:
        g.add_argument("--vqvae_checkpoint", type=optional_path, default=None,
                       help="latent diffusion: the VQ-VAE checkpoint (default: the one recorded in the DDPM checkpoint; "
                       "a VQ-VAE with other weights is refused)")
    else:
        g.add_argument("--vqvae_checkpoint", type=optional_path, default=None,
                       help="latent diffusion: train in the latent space of this VQ-VAE checkpoint (train_vqvae.py's "
                       "checkpoint.pth, or upstream's with vqvae_config.json beside it); recorded in the checkpoint")
    g.add_argument("--latent_pad", type=int_list, default=None,
                   help="zero-pad latents so the UNet can halve them, F.pad order (last dim first, before/after "
                   "pairs), e.g. [0,1,0,1]; default: " + ("from the checkpoint" if from_checkpoint else
                                                           "chosen automatically") + ". Undone before decoding")


def add_training_loop_options(parser: argparse.ArgumentParser, *, validation: str,
                              evaluation: str) -> argparse._ArgumentGroup:
    """The flags of ``training.loop.fit`` every training script shares (upstream's names and defaults); returns the
    "training" group for the script's own flags. ``validation``: what the validation images' loss is;
    ``evaluation``: what each evaluation logs besides it."""
    g = parser.add_argument_group("training")
    g.add_argument("--training_ids", type=str, required=True, help="split CSV of the training images")
    g.add_argument("--validation_ids", type=str, required=True,
                   help=f"split CSV of the validation images (their {validation} picks checkpoint.pth)")
    from ddpm_ood.training.loop import TrainConfig

    d = {name: field_default(TrainConfig, name)
         for name in ("n_epochs", "eval_freq", "checkpoint_every", "checkpoint_every_minutes", "quick_test")}
    g.add_argument("--n_epochs", type=positive_int, default=d["n_epochs"],
                   help=f"total number of epochs (default {d['n_epochs']})")
    g.add_argument("--eval_freq", type=positive_int, default=d["eval_freq"],
                   help=f"validate (loss, {evaluation}, best checkpoint) every N epochs and at the last (default "
                   f"{d['eval_freq']})")
    g.add_argument("--checkpoint_every", type=non_negative_int, default=d["checkpoint_every"],
                   help=f"also keep checkpoint_<epoch>.pth every N epochs; 0 = never (default {d['checkpoint_every']})")
    g.add_argument("--checkpoint_every_minutes", type=non_negative_float, default=d["checkpoint_every_minutes"],
                   help="inside an epoch, write checkpoint_mid_epoch.pth when this many minutes have passed since the "
                   "last checkpoint, so that a killed run loses at most that much; a stop signal (SIGTERM, SIGUSR1) "
                   f"always writes one; 0 = only at stop signals (default {d['checkpoint_every_minutes']:g})")
    g.add_argument("--quick_test", type=boolish, default=d["quick_test"],
                   help="1 = one training batch and one validation batch per epoch (smoke test)")
    return g


def add_max_batch_option(group: argparse._ActionsContainer, compute: Any) -> None:
    """--max_batch, shared by reconstruct.py and score.py (default: the stage's ``compute.max_batch``, None = sized
    automatically)."""
    group.add_argument("--max_batch", type=optional_int, default=compute.max_batch,
                       help="most samples per network call (memory budget; numbers move by float rounding only; "
                       "default: on a "
                       "CPU no limit - the batched engine calls the network with about (all network calls of a "
                       "batch) / (the longest trajectory's) samples at a time; on CUDA sized from the free GPU memory)")


def add_pretrained_options(group: argparse._ActionsContainer, job: type, *, scoring: bool = False) -> None:
    """--pretrained and --pretrained_flags (docs/pretrained-models.md); reconstruct.py also --resize. Defaults:
    the fields of ``job``."""
    if scoring:
        group.add_argument("--pretrained", type=optional_path, default=field_default(job, "pretrained"),
                           help="a published model the validation results were made with, where it is now "
                           "(default: the path recorded in results_val.json; it must be the same model)")
        group.add_argument("--pretrained_flags", type=str, default=field_default(job, "pretrained_flags"),
                           help="openai models: their flags (default: the ones recorded in results_val.json)")
        return
    group.add_argument("--pretrained", type=optional_path, default=field_default(job, "pretrained"),
                       help="score with a published diffusion model instead of the run's checkpoint: a diffusers "
                       "folder (UNet2DModel + scheduler_config.json, or a pipeline folder) or an improved-/guided-"
                       "diffusion .pt state dict (with --pretrained_flags); results go to <output_dir>/<model_name>/")
    group.add_argument("--pretrained_flags", type=str, default=field_default(job, "pretrained_flags"),
                       help="openai .pt models: the model and diffusion flags their README prints, as one string "
                       "(\"--image_size 32 --num_channels 128 ...\") or a JSON file")
    group.add_argument("--resize", type=boolish, default=field_default(job, "resize"),
                       help="with --pretrained: resize every set's images to the model's size (default 0: images of "
                       "another size are refused; resizing only one side inflates AUROC)")


def refuse_unsupported(args: argparse.Namespace) -> None:
    """Flags that upstream has but ddpm-ood does not implement: refused loudly instead of ignored."""
    from ddpm_ood.errors import UserError

    if getattr(args, "augmentation", False):
        raise UserError("--augmentation=1 is not supported (upstream's flag was a no-op); use --augmentation=0")
