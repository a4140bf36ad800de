"""train_ddpm.py: train a DDPM on the images of a split CSV (upstream flags and defaults, ``--flag=value``).

With ``--vqvae_checkpoint`` the DDPM is trained in the latent space of a frozen VQ-VAE (train_vqvae.py), which the
checkpoint records. Run again with the same command to resume from the newest checkpoint in ``<output_dir>/<model_name>/``
(``checkpoint_last.pth``, or ``checkpoint_mid_epoch.pth`` written at a stop signal or every
``--checkpoint_every_minutes``); SIGTERM/SIGUSR1 stop it cleanly (exit status 75, docs/cluster.md).
Under ``torchrun --nproc_per_node=N train_ddpm.py ...`` it trains with DDP (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ddpm_ood.cli.options import (
    add_data_options,
    add_model_options,
    add_run_options,
    add_schedule_options,
    add_training_loop_options,
    checked_number,
    compute_options,
    field_default,
    non_negative_int,
    optional_int,
    positive_float,
    refuse_unsupported,
    scientific,
)
from ddpm_ood.config import DataConfig, ScheduleConfig
from ddpm_ood.diffusion.unet import model_config_from_preset
from ddpm_ood.results.run_dir import RunDir
from ddpm_ood.training.loop import TrainConfig
from ddpm_ood.training.stage import DDPMTrainingJob, train_ddpm_stage
from ddpm_ood.upstream.flags import noise_type_for_flags

_decay = checked_number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1) (0 = off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_ddpm.py",
        description="Train a denoising diffusion model on the images listed in a split CSV. Running the same "
        "command again resumes from <output_dir>/<model_name>/checkpoint_last.pth.",
    )
    add_run_options(parser, field_default(DDPMTrainingJob, "compute"), seed=field_default(TrainConfig, "seed"))
    add_data_options(parser, batch_size=field_default(TrainConfig, "batch_size"),
                     cache_data=field_default(DDPMTrainingJob, "compute.cache_data"))
    add_schedule_options(parser, from_checkpoint=False)
    add_model_options(parser, from_checkpoint=False)
    g = add_training_loop_options(parser, validation="loss", evaluation="sample grid")
    d = {name: field_default(TrainConfig, name) for name in ("resume_epoch", "lr", "ema_decay", "sample_steps")}
    g.add_argument("--ddpm_checkpoint_epoch", type=optional_int, default=d["resume_epoch"],
                   help="resume from checkpoint_<N>.pth instead of checkpoint_last.pth (must exist)")
    g.add_argument("--lr", type=positive_float, default=d["lr"],
                   help=f"Adam learning rate (default {scientific(d['lr'])})")
    g.add_argument("--ema_decay", type=_decay, default=d["ema_decay"],
                   help="EMA of the weights with this decay, e.g. 0.999, used for validation, samples and "
                        "reconstruction; 0 = off (default)")
    g.add_argument("--sample_steps", type=non_negative_int, default=d["sample_steps"],
                   help="DDIM steps of the sample grid logged to TensorBoard at each evaluation; 0 = no grid "
                        f"(default {d['sample_steps']})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refuse_unsupported(args)
    data = DataConfig(is_grayscale=args.is_grayscale, spatial_dims=args.spatial_dimension,
                      image_size=args.image_size, image_roi=args.image_roi, channel=args.channel)
    schedule = ScheduleConfig(beta_schedule=args.beta_schedule, beta_start=args.beta_start, beta_end=args.beta_end,
                              prediction_type=args.prediction_type, b_scale=args.b_scale, snr_shift=args.snr_shift,
                              noise_type=noise_type_for_flags(args.simplex_noise, upstream_checkpoint=False))
    loop = TrainConfig(run_dir=str(RunDir(args.output_dir, args.model_name).path), n_epochs=args.n_epochs,
                       eval_freq=args.eval_freq, checkpoint_every=args.checkpoint_every,
                       resume_epoch=args.ddpm_checkpoint_epoch, quick_test=args.quick_test, lr=args.lr,
                       ema_decay=args.ema_decay, batch_size=args.batch_size,
                       seed=args.seed, sample_steps=args.sample_steps,
                       checkpoint_every_minutes=args.checkpoint_every_minutes)
    return train_ddpm_stage(DDPMTrainingJob(
        training_ids=args.training_ids, validation_ids=args.validation_ids, data=data, schedule=schedule,
        model=model_config_from_preset(args.model_type, data.spatial_dims, data.channels), loop=loop,
        vqvae_checkpoint=args.vqvae_checkpoint, latent_pad=args.latent_pad, compute=compute_options(args)))
