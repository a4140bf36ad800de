"""train_ddpm.py: train a DDPM on the images of a split CSV (upstream flags and defaults, ``--flag=value``).

With ``--vqvae_checkpoint`` the DDPM is trained in the latent space of a frozen VQ-VAE (train_vqvae.py), which the
checkpoint records. Run again with the same command to resume from ``<output_dir>/<model_name>/checkpoint_last.pth``.
Under ``torchrun --nproc_per_node=N train_ddpm.py ...`` it trains with DDP (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from ddpm_ood.cli.options import (
    add_data_options,
    add_model_options,
    add_run_options,
    add_schedule_options,
    add_training_loop_options,
    checked_number,
    non_negative_int,
    optional_int,
    positive_float,
    refuse_unsupported,
)

_decay = checked_number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1) (0 = off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_ddpm.py",
        description="Train a denoising diffusion model on the images listed in a split CSV. Running the same "
        "command again resumes from <output_dir>/<model_name>/checkpoint_last.pth.",
    )
    add_run_options(parser)
    add_data_options(parser, batch_size=512)
    add_schedule_options(parser, from_checkpoint=False)
    add_model_options(parser, from_checkpoint=False)
    g = add_training_loop_options(parser, validation="loss", evaluation="sample grid")
    g.add_argument("--ddpm_checkpoint_epoch", type=optional_int, default=None,
                   help="resume from checkpoint_<N>.pth instead of checkpoint_last.pth (must exist)")
    g.add_argument("--lr", type=positive_float, default=2.5e-5, help="Adam learning rate (default 2.5e-5)")
    g.add_argument("--ema_decay", type=_decay, default=0.0,
                   help="EMA of the weights with this decay, e.g. 0.999, used for validation, samples and "
                        "reconstruction; 0 = off (default)")
    g.add_argument("--sample_steps", type=non_negative_int, default=50,
                   help="DDIM steps of the sample grid logged to TensorBoard at each evaluation; 0 = no grid "
                        "(default 50)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ddpm_ood.cli.runner import run_training_stage
    from ddpm_ood.config import DataConfig, ScheduleConfig
    from ddpm_ood.diffusion.noise import noise_type_for_flags
    from ddpm_ood.diffusion.unet import model_config_from_preset
    from ddpm_ood.errors import UserError
    from ddpm_ood.training.loop import TrainConfig

    args = build_parser().parse_args(argv)
    refuse_unsupported(args)
    if args.latent_pad is not None and args.vqvae_checkpoint is None:
        raise UserError("--latent_pad only applies to latent diffusion: give --vqvae_checkpoint too")
    data = DataConfig(is_grayscale=args.is_grayscale, spatial_dims=args.spatial_dimension,
                      image_size=args.image_size, image_roi=args.image_roi, channel=args.channel)
    schedule = ScheduleConfig(beta_schedule=args.beta_schedule, beta_start=args.beta_start, beta_end=args.beta_end,
                              prediction_type=args.prediction_type, b_scale=args.b_scale, snr_shift=args.snr_shift,
                              noise_type=noise_type_for_flags(args.simplex_noise, upstream_checkpoint=False))
    model = model_config_from_preset(args.model_type, data.spatial_dims, data.channels)
    run_dir = Path(args.output_dir) / args.model_name
    cfg = TrainConfig(run_dir=str(run_dir), n_epochs=args.n_epochs, eval_freq=args.eval_freq,
                      checkpoint_every=args.checkpoint_every, resume_epoch=args.ddpm_checkpoint_epoch,
                      quick_test=args.quick_test, lr=args.lr, ema_decay=args.ema_decay, batch_size=args.batch_size,
                      num_workers=args.num_workers, seed=args.seed, sample_steps=args.sample_steps)
    return run_training_stage(cfg, device=args.device, precision=args.precision, amp=args.amp, lock_name="train_ddpm",
                              body=lambda cfg, ctx: _train(args, cfg, ctx, data, schedule, model, run_dir))


def _train(args: argparse.Namespace, cfg, ctx, data, schedule, model, run_dir: Path) -> int:
    """Resume point, datasets, checks, then ``training.ddpm.train``; the caller holds the run lock."""
    from ddpm_ood.autoencoder.vqvae import load_vqvae, with_latent
    from ddpm_ood.checkpoint import run_config_of
    from ddpm_ood.config import RunConfig
    from ddpm_ood.data.datasets import dataset_from_csv
    from ddpm_ood.diffusion.noise import describe_noise, noise_type_for_flags
    from ddpm_ood.diffusion.unet import check_image_fits_unet
    from ddpm_ood.errors import UserError
    from ddpm_ood.training.ddpm import train
    from ddpm_ood.training.loop import already_complete, check_resume_config, find_resume_point, log

    vqvae = None
    if args.vqvae_checkpoint is not None:
        vqvae = load_vqvae(args.vqvae_checkpoint)  # first: a wrong file fails before anything else
    resume = find_resume_point(run_dir, cfg.resume_epoch)
    saved = run_config_of(resume.ckpt, resume.path) if resume is not None else None
    latent_pad = args.latent_pad
    if latent_pad is None and saved is not None and saved.latent is not None:
        latent_pad = saved.latent.latent_pad  # a resumed latent run keeps its padding unless the flag says otherwise
    if resume is not None and args.simplex_noise:
        # --simplex_noise=1 names two noises: ours, and upstream's unscaled one, which a run started from an
        # upstream checkpoint keeps (recorded in our checkpoints from then on).
        if saved is None:
            schedule = dataclasses.replace(schedule, noise_type=noise_type_for_flags(True, upstream_checkpoint=True))
            log(ctx, f"note: {resume.path} was trained by upstream ddpm-ood: resuming with its noise, "
                     f"{describe_noise(schedule.noise_type)}")
        elif saved.schedule.noise_type != "gaussian":
            schedule = dataclasses.replace(schedule, noise_type=saved.schedule.noise_type)
    if resume is not None:
        # Settings first, before any data is read (a finished run with contradicting flags is refused too); the
        # image shape is compared once the data are read.
        if saved is not None and saved.latent is None and vqvae is not None:
            raise UserError(f"{resume.path}: flags contradict the checkpoint's configuration (a pixel-space DDPM; "
                            f"--vqvae_checkpoint={vqvae.path}); drop the flag or train under another --model_name")
        given = RunConfig(model, schedule, data, image_shape=saved.image_shape if saved is not None else ())
        if vqvae is not None and saved is not None:
            given = with_latent(given, vqvae, latent_pad, str(resume.path))
        check_resume_config(resume, given, compare_image_shape=False)
        if already_complete(resume, cfg.n_epochs, ctx):
            return 0
    train_set = dataset_from_csv(args.training_ids, data, cache=args.cache_data)
    image_shape = tuple(train_set.image_shape)
    run_config = RunConfig(model=model, schedule=schedule, data=data, image_shape=image_shape)
    source = args.training_ids
    if vqvae is not None:
        run_config = with_latent(run_config, vqvae, latent_pad, args.training_ids)
        source = f"{args.training_ids} (latents of {vqvae.path})"
    check_image_fits_unet(run_config.model_shape, run_config.model, source)
    val_set = dataset_from_csv(args.validation_ids, data, cache=args.cache_data)
    if tuple(val_set.image_shape) != image_shape:
        raise UserError(f"{args.validation_ids}: validation images have shape {tuple(val_set.image_shape)} "
                        f"but training images ({args.training_ids}) have {image_shape}")
    if resume is not None:
        check_resume_config(resume, run_config, compare_image_shape=True)
    summary = train(run_config, cfg, train_set, val_set, ctx, resume=resume)
    if ctx.is_main:
        print(f"trained {summary.epochs_completed}/{cfg.n_epochs} epochs; best validation loss "
              f"{summary.best_loss:.5f}; checkpoints in {run_dir}")
    return 0
