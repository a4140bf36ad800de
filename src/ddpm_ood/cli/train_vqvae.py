"""train_vqvae.py: train the VQ-VAE of latent diffusion on the images of a split CSV (upstream's flags, spellings and
defaults, list flags as upstream writes them: ``--vqvae_num_channels=[256,256,256,256]``,
``--vqvae_downsample_parameters=[[2,4,1,1],[2,4,1,1]]``).

Writes ``<output_dir>/<model_name>/vqvae_config.json`` (upstream's format) and checkpoints (``checkpoint.pth`` = lowest
validation L1, ``checkpoint_<epoch>.pth``, ``checkpoint_last.pth``) with the configuration, the discriminator and both
optimizers inside. Running the same command again resumes. Under ``torchrun`` it trains with DDP.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ddpm_ood.cli.options import (
    add_data_options,
    add_run_options,
    add_training_loop_options,
    boolish,
    checked_number,
    compute_options,
    field_default,
    int_list,
    nested_int_list,
    positive_float,
    positive_int,
    refuse_unsupported,
    scientific,
)
from ddpm_ood.config import DataConfig, VQVAEConfig
from ddpm_ood.errors import UserError
from ddpm_ood.results.run_dir import RunDir
from ddpm_ood.training.loop import TrainConfig
from ddpm_ood.training.stage import (
    VQVAE_BATCH_SIZE,
    VQVAE_LEARNING_RATE,
    VQVAE_SPATIAL_DIMS,
    VQVAETrainingJob,
    train_vqvae_stage,
)
from ddpm_ood.training.vqvae import VQVAELossConfig

_non_negative_float = checked_number(float, lambda v: v >= 0, "a number >= 0")
_fraction = checked_number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def _int_list(value: str) -> tuple[int, ...]:
    parsed = int_list(value)
    if not parsed:
        raise argparse.ArgumentTypeError(f"expected a list of integers like [128,128,256], got {value!r}")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    from ddpm_ood.config import VQVAEConfig

    d = VQVAEConfig()
    p = argparse.ArgumentParser(prog="train_vqvae.py", description=__doc__.split("\n\n")[0])
    add_run_options(p, field_default(VQVAETrainingJob, "compute"), seed=field_default(TrainConfig, "seed"))
    add_data_options(p, batch_size=VQVAE_BATCH_SIZE, cache_data=field_default(VQVAETrainingJob, "compute.cache_data"),
                     spatial_dimension=VQVAE_SPATIAL_DIMS)
    g = p.add_argument_group("VQ-VAE (MONAI core VQVAE arguments)")
    g.add_argument("--vqvae_in_channels", type=positive_int, default=d.in_channels,
                   help=f"image channels (1 with --is_grayscale=1; default {d.in_channels})")
    g.add_argument("--vqvae_out_channels", type=positive_int, default=d.out_channels,
                   help=f"reconstruction channels, = in channels (default {d.out_channels})")
    g.add_argument("--vqvae_num_res_layers", type=positive_int, default=d.num_res_layers,
                   help=f"residual layers per level (default {d.num_res_layers})")
    g.add_argument("--vqvae_downsample_parameters", type=nested_int_list, default=d.downsample_parameters,
                   help="[stride,kernel,dilation,padding] per level (default [[2,4,1,1]]*4)")
    g.add_argument("--vqvae_upsample_parameters", type=nested_int_list, default=d.upsample_parameters,
                   help="[stride,kernel,dilation,padding,output_padding] per level (default [[2,4,1,1,0]]*4)")
    g.add_argument("--vqvae_num_channels", type=_int_list, default=d.channels,
                   help=f"channels per level (default {list(d.channels)})")
    g.add_argument("--vqvae_num_res_channels", type=_int_list, default=d.num_res_channels,
                   help=f"residual channels per level (default {list(d.num_res_channels)})")
    g.add_argument("--vqvae_num_embeddings", type=positive_int, default=d.num_embeddings,
                   help=f"codebook size (default {d.num_embeddings})")
    g.add_argument("--vqvae_embedding_dim", type=positive_int, default=d.embedding_dim,
                   help=f"codebook vector length = latent channels (default {d.embedding_dim})")
    g.add_argument("--vqvae_decay", type=_fraction, default=d.decay, help=f"codebook EMA decay (default {d.decay})")
    g.add_argument("--vqvae_commitment_cost", type=_non_negative_float, default=d.commitment_cost,
                   help=f"commitment loss weight (default {d.commitment_cost})")
    g.add_argument("--vqvae_epsilon", type=positive_float, default=d.epsilon,
                   help=f"codebook EMA epsilon (default {d.epsilon})")
    g.add_argument("--vqvae_dropout", type=_fraction, default=d.dropout, help=f"dropout (default {d.dropout})")
    g.add_argument("--vqvae_ddp_sync", type=boolish, default=d.ddp_sync,
                   help="1/0: synchronise the codebook EMA across DDP ranks (default 1)")
    g.add_argument("--vqvae_learning_rate", type=positive_float, default=VQVAE_LEARNING_RATE,
                   help=f"Adam learning rate of the VQ-VAE (default {scientific(VQVAE_LEARNING_RATE)})")
    t = add_training_loop_options(p, validation="L1 reconstruction loss", evaluation="reconstruction figure")
    losses = VQVAELossConfig()
    t.add_argument("--adversarial_weight", type=_non_negative_float, default=losses.adversarial_weight,
                   help=f"weight of the patch-adversarial loss; 0 = no discriminator (default {losses.adversarial_weight})")
    t.add_argument("--adversarial_warmup", type=boolish, default=losses.adversarial_warmup,
                   help="1 = ramp the adversarial weight linearly from 0 over the first 50 epochs (default "
                   f"{int(losses.adversarial_warmup)})")
    t.add_argument("--perceptual_weight", type=_non_negative_float, default=losses.perceptual_weight,
                   help="weight of the LPIPS loss (2.5D for volumes; upstream's 0.001); 0 = none (default "
                   f"{losses.perceptual_weight})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refuse_unsupported(args)
    data = DataConfig(is_grayscale=args.is_grayscale, spatial_dims=args.spatial_dimension,
                      image_size=args.image_size, image_roi=args.image_roi, channel=args.channel)
    loop = TrainConfig(run_dir=str(RunDir(args.output_dir, args.model_name).path), n_epochs=args.n_epochs,
                       eval_freq=args.eval_freq, checkpoint_every=args.checkpoint_every, quick_test=args.quick_test,
                       lr=args.vqvae_learning_rate, batch_size=args.batch_size,
                       seed=args.seed, sample_steps=0, checkpoint_every_minutes=args.checkpoint_every_minutes)
    losses = VQVAELossConfig(adversarial_weight=args.adversarial_weight, adversarial_warmup=args.adversarial_warmup,
                             perceptual_weight=args.perceptual_weight)
    return train_vqvae_stage(VQVAETrainingJob(
        training_ids=args.training_ids, validation_ids=args.validation_ids, data=data, vqvae=_vqvae_config(args),
        losses=losses, loop=loop, compute=compute_options(args)))


def _vqvae_config(args: argparse.Namespace) -> VQVAEConfig:
    """The VQ-VAE the ``--vqvae_*`` flags describe; a bad combination names the flags."""
    try:
        return VQVAEConfig(
            spatial_dims=args.spatial_dimension, in_channels=args.vqvae_in_channels,
            out_channels=args.vqvae_out_channels, num_res_layers=args.vqvae_num_res_layers,
            downsample_parameters=args.vqvae_downsample_parameters, upsample_parameters=args.vqvae_upsample_parameters,
            channels=args.vqvae_num_channels, num_res_channels=args.vqvae_num_res_channels,
            num_embeddings=args.vqvae_num_embeddings, embedding_dim=args.vqvae_embedding_dim, decay=args.vqvae_decay,
            commitment_cost=args.vqvae_commitment_cost, epsilon=args.vqvae_epsilon, dropout=args.vqvae_dropout,
            ddp_sync=args.vqvae_ddp_sync)
    except UserError as exc:
        raise UserError(f"VQ-VAE flags: {exc}") from None
