"""Every flag that feeds a job field has that field's default (issue 31: defaults written once, in the dataclasses).

Each parser's flags are listed below: the job field a flag feeds (with how the CLI turns the flag's value into the
field's, where it does), or why the flag feeds none. A new flag must be listed; a default written on one side only
(a hard-coded ``default=`` or a changed field) fails ``test_every_flag_default_is_its_fields``, as
``test_a_default_changed_on_one_side_only_is_found`` shows."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest

from ddpm_ood.cli import get_datasets, ood_detection, reconstruct, score, train_ddpm, train_vqvae
from ddpm_ood.config import DataConfig, ScheduleConfig, VQVAEConfig
from ddpm_ood.data.stage import PreparationJob
from ddpm_ood.devices import default_num_workers
from ddpm_ood.families import parse_families
from ddpm_ood.ood.stage import DetectionJob, ScoringJob
from ddpm_ood.reconstruction.stage import ReconstructionJob
from ddpm_ood.run_flags import RunFlags
from ddpm_ood.runs import RunSource
from ddpm_ood.training.loop import TrainConfig
from ddpm_ood.training.stage import (
    VQVAE_BATCH_SIZE,
    VQVAE_LEARNING_RATE,
    VQVAE_SPATIAL_DIMS,
    DDPMTrainingJob,
    VQVAETrainingJob,
)
from ddpm_ood.training.vqvae import VQVAELossConfig
from ddpm_ood.upstream.flags import noise_type_for_flags


def _default(cls: type, name: str) -> Any:
    """The field's default (``part.field``: a field of a nested part's default instance), read without the CLI's
    helper (the test must not trust what it checks)."""
    head, *rest = name.split(".")
    (f,) = [f for f in dataclasses.fields(cls) if f.name == head]
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    for part in rest:
        value = getattr(value, part)
    return value


def _workers(n: int) -> int:
    return default_num_workers(n, processes_sharing=int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


# dest -> (job class, field) or (job class, field, flag value -> field value); a bare value: a library constant.
Source = tuple | Any
RUN = {"seed": (ReconstructionJob, "plan.seed"), "device": (ReconstructionJob, "compute.device"),
       "amp": (ReconstructionJob, "compute.amp"), "precision": (ReconstructionJob, "compute.precision"),
       "dist_timeout": (ReconstructionJob, "compute.dist_timeout")}
# reconstruct.py: the model, schedule and image flags are "given or not" (RunFlags: None = the checkpoint's value).
RUN_FLAGS = {dest: (RunFlags, dest) for dest in (
    "model_type", "is_grayscale", "image_size", "image_roi", "channel", "beta_schedule", "beta_start", "beta_end",
    "prediction_type", "b_scale", "snr_shift", "simplex_noise")} | {"spatial_dimension": (RunFlags, "spatial_dims")}
RECONSTRUCT: dict[str, Source] = RUN | RUN_FLAGS | {
    dest: (RunSource, dest) for dest in (
        "vqvae_checkpoint", "latent_pad", "eval_checkpoint", "use_ema", "pretrained", "pretrained_flags", "resize")
} | {
    dest: (ReconstructionJob, f"sets.{dest}") for dest in (
        "validation_ids", "in_ids", "run_val", "run_in", "run_out", "first_n_val", "first_n")
} | {
    dest: (ReconstructionJob, f"plan.{dest}") for dest in (
        "num_inference_steps", "inference_skip_factor", "recon_steps", "engine")
} | {
    dest: (ReconstructionJob, f"compute.{dest}") for dest in ("batch_size", "cache_data", "max_batch")
} | {
    "recon_noise": (ReconstructionJob, "plan.noise"),
    "out_ids": (ReconstructionJob, "sets.out_ids", lambda v: tuple(s for s in (v or "").split(",") if s.strip())),
    "scores": (ReconstructionJob, "scores", lambda v: tuple(parse_families(v))),
}
# the feature families' flags feed ReconstructionJob.score_options, a ScoreOptions: checked field by field
SCORE_OPTIONS = ("score_levels", "score_noise", "score_noise_draws", "diffpath_steps", "diffpath_clip")
for _name in SCORE_OPTIONS:
    RECONSTRUCT[_name] = ("score_options", _name)

DETECTION: dict[str, Source] = {dest: (DetectionJob, dest) for dest in (
    "seed", "max_t", "min_t", "t_skip", "out_sets", "score")}
SCORING: dict[str, Source] = {dest: (ScoringJob, dest) for dest in (
    "score", "val_keep", "vqvae_checkpoint", "pretrained", "pretrained_flags")} | {
    dest: (ScoringJob, f"compute.{dest}") for dest in ("batch_size", "device", "amp", "precision", "max_batch")}


def _training(job: type) -> dict[str, Source]:
    return {
        "seed": (TrainConfig, "seed"), "device": (job, "compute.device"), "amp": (job, "compute.amp"),
        "precision": (job, "compute.precision"), "dist_timeout": (job, "compute.dist_timeout"),
        "cache_data": (job, "compute.cache_data"),
        "num_workers": (job, "compute.num_workers", None),  # upstream's, capped at the cores: checked below
        "image_size": (DataConfig, "image_size"), "image_roi": (DataConfig, "image_roi"),
        "is_grayscale": (DataConfig, "is_grayscale"), "channel": (DataConfig, "channel"),
        **{dest: (TrainConfig, dest) for dest in (
            "n_epochs", "eval_freq", "checkpoint_every", "checkpoint_every_minutes", "quick_test")},
    }


TRAIN_DDPM: dict[str, Source] = _training(DDPMTrainingJob) | {
    "spatial_dimension": (DataConfig, "spatial_dims"), "batch_size": (TrainConfig, "batch_size"),
    "vqvae_checkpoint": (DDPMTrainingJob, "vqvae_checkpoint"), "latent_pad": (DDPMTrainingJob, "latent_pad"),
    "ddpm_checkpoint_epoch": (TrainConfig, "resume_epoch"), "lr": (TrainConfig, "lr"),
    "ema_decay": (TrainConfig, "ema_decay"), "sample_steps": (TrainConfig, "sample_steps"),
    "beta_schedule": (ScheduleConfig, "beta_schedule"), "prediction_type": (ScheduleConfig, "prediction_type"),
    "b_scale": (ScheduleConfig, "b_scale"), "snr_shift": (ScheduleConfig, "snr_shift"),
    # None = the schedule's own first/last beta, which is the field's default
    "beta_start": (ScheduleConfig, "beta_start", lambda v: ScheduleConfig(beta_start=v).beta_start),
    "beta_end": (ScheduleConfig, "beta_end", lambda v: ScheduleConfig(beta_end=v).beta_end),
    "simplex_noise": (ScheduleConfig, "noise_type", lambda v: noise_type_for_flags(v, upstream_checkpoint=False)),
}
_VQVAE_FIELDS = {"in_channels": "in_channels", "out_channels": "out_channels", "num_res_layers": "num_res_layers",
                 "downsample_parameters": "downsample_parameters", "upsample_parameters": "upsample_parameters",
                 "num_channels": "channels", "num_res_channels": "num_res_channels", "num_embeddings": "num_embeddings",
                 "embedding_dim": "embedding_dim", "decay": "decay", "commitment_cost": "commitment_cost",
                 "epsilon": "epsilon", "dropout": "dropout", "ddp_sync": "ddp_sync"}
TRAIN_VQVAE: dict[str, Source] = _training(VQVAETrainingJob) | {
    "spatial_dimension": VQVAE_SPATIAL_DIMS, "batch_size": VQVAE_BATCH_SIZE, "vqvae_learning_rate": VQVAE_LEARNING_RATE,
    **{f"vqvae_{flag}": (VQVAEConfig, name) for flag, name in _VQVAE_FIELDS.items()},
    **{dest: (VQVAELossConfig, dest) for dest in ("adversarial_weight", "adversarial_warmup", "perceptual_weight")},
}
PREPARATION: dict[str, Source] = {"download": (PreparationJob, "allow_download"),
                                  "download_timeout": (PreparationJob, "timeout_s")}

# Flags that feed no job field's default, and why.
REQUIRED = {"output_dir", "model_name", "training_ids", "validation_ids", "inputs", "out_csv", "data_root"}
NOT_FIELDS = {
    "help": "argparse's",
    "augmentation": "upstream's no-op, refused unless 0",
    "drop_last": "upstream's, accepted and ignored by reconstruct.py",
    "model_type": "train_ddpm.py: a UNet preset name, made a ModelConfig by model_config_from_preset",
    "datasets": "get_datasets.py: PreparationJob.names has no default (the CLI's is the computer-vision group)",
    "download_celeba": "get_datasets.py: drops CelebA from the names; no field",
    "num_workers": "reconstruct.py: upstream's 8 (ComputeOptions') capped at the cores; ReconstructionJob's "
                   "compute.num_workers (0) is the library's",
}

PARSERS: dict[str, tuple[Callable[[], argparse.ArgumentParser], dict[str, Source]]] = {
    "reconstruct": (reconstruct.build_parser, RECONSTRUCT),
    "ood_detection": (ood_detection.build_parser, DETECTION),
    "score": (score.build_parser, SCORING),
    "train_ddpm": (train_ddpm.build_parser, TRAIN_DDPM),
    "train_vqvae": (train_vqvae.build_parser, TRAIN_VQVAE),
    "get_datasets": (get_datasets.build_parser, PREPARATION),
}


def _expected(dest: str, source: Source, flag_default: Any) -> tuple[Any, Any]:
    """(what the flag's default becomes in the job, the field's default)."""
    if not isinstance(source, tuple):
        return flag_default, source
    if source[0] == "score_options":
        options = _default(ReconstructionJob, "score_options")
        got = reconstruct._levels(flag_default) if dest == "score_levels" else flag_default
        return got, getattr(options, source[1])
    cls, name, *convert = source
    if dest == "num_workers":
        return flag_default, _workers(_default(cls, name))
    return (convert[0](flag_default) if convert else flag_default), _default(cls, name)


def mismatches(parser: argparse.ArgumentParser, table: dict[str, Source]) -> list[str]:
    """The flags of ``parser`` whose default differs from their field's, and those the table does not list."""
    found = []
    for action in parser._actions:
        dest = action.dest
        if dest not in table:
            if dest not in REQUIRED and dest not in NOT_FIELDS:
                found.append(f"--{dest}: not listed (which job field does it feed?)")
            continue
        got, want = _expected(dest, table[dest], action.default)
        if got != want or type(got) is not type(want):
            found.append(f"--{dest}: flag default {action.default!r} gives {got!r}, the field's is {want!r}")
    return found


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_flag_default_is_its_fields(name):
    build, table = PARSERS[name]
    assert mismatches(build(), table) == []


def test_the_family_scripts_share_get_datasets_download_defaults():
    for group in ("MedNIST", "Decathlon", "MedMNIST3D"):
        assert mismatches(get_datasets.family_parser("x.py", group, "w"), PREPARATION) == []


def test_a_default_changed_on_one_side_only_is_found():
    # a hard-coded default on the CLI side
    parser = reconstruct.build_parser()
    parser.set_defaults(cache_data=False, seed=3)
    assert sorted(m.split(":")[0] for m in mismatches(parser, RECONSTRUCT)) == ["--cache_data", "--seed"]

    # a field default changed while the parser kept the old value
    @dataclasses.dataclass(frozen=True)
    class Changed(ScoringJob):
        val_keep: float = 0.9

    table = {dest: (Changed, *source[1:]) for dest, source in SCORING.items()}
    assert [m.split(":")[0] for m in mismatches(score.build_parser(), table)] == ["--val_keep"]

    # a flag nobody listed
    parser = ood_detection.build_parser()
    parser.add_argument("--new_flag", default=1)
    assert [m.split(":")[0] for m in mismatches(parser, DETECTION)] == ["--new_flag"]


def test_the_cli_defaults_that_the_dataclasses_now_say():
    """Where they disagreed before issue 31, the CLI's value (what users got) became the field's."""
    assert _default(ReconstructionJob, "compute.cache_data") is True
