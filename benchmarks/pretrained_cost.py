"""What every score costs on a published model: a diffusers UNet2DModel of google/ddpm-cifar10-32's architecture
(35.7M parameters, 3x32x32, random weights: cost does not depend on them) opened with ``--pretrained``'s seam
(``runs.open_pretrained_run``), side by side with our ``small`` preset on the same images, same precision, one
process.

Per model and score: network evaluations per image (nfe) and images per second, of
- eps_norm + denoising_error at L levels (shared calls), diffpath6d + diffpath1d at K steps (shared calls): encode
  then ``families.compute_features``, as reconstruct.py's feature pass;
- the paper's reconstruction score at ``--skip_factor`` on the 100-step grid, each trajectory shortened to
  ``--recon_steps`` PLMS steps (the whole path, 349 nfe at skip 16, takes minutes per image on a CPU), through
  ``pipeline.measure_batch`` (encode, batched engine, decode, MSE and LPIPS).
One warm-up batch, then ``--batches`` timed batches; seconds are wall clock.

Usage (repository root, venv active)::

    python benchmarks/pretrained_cost.py --threads 2            # a few minutes on 2 cores
    python benchmarks/pretrained_cost.py --smoke                # tiny models, seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ddpm_ood.devices import describe_device
from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.families import ScoreContext, ScoreOptions, compute_features, make_settings, nfe_of
from ddpm_ood.families.base import even_levels
from ddpm_ood.reconstruction.engine import evaluations_per_image
from ddpm_ood.reconstruction.pipeline import measure_batch
from ddpm_ood.reconstruction.plan import ReconstructionPlan
from ddpm_ood.runs import RunModel, load_run_model, open_pretrained_run

GROUPS = {"eps_norm+denoising_error": ("eps_norm", "denoising_error"), "msma": ("msma",),
          "diffpath6d+diffpath1d": ("diffpath6d", "diffpath1d")}


def cifar10_ddpm_folder(folder: Path, smoke: bool) -> Path:
    """A random-weight UNet2DModel with google/ddpm-cifar10-32's config (or a tiny one) and its scheduler."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    if smoke:
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                           block_out_channels=(8, 16), norm_num_groups=8, attention_head_dim=8,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    else:
        unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                           block_out_channels=(128, 256, 256, 256), attention_head_dim=None, dropout=0.1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    unet.save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder)
    return folder


def small_model(shape: tuple[int, ...], smoke: bool) -> tuple[RunModel, torch.nn.Module]:
    """Our ``small`` preset (or the tests' tiny UNet) for images of ``shape``, random weights, pixel space."""
    from ddpm_ood.autoencoder.base import IdentityAutoencoder
    from ddpm_ood.config import ModelConfig, ScheduleConfig
    from ddpm_ood.diffusion.eps import model_eps_fn
    from ddpm_ood.diffusion.unet import build_unet, model_config_from_preset, randomize_zero_init_convs

    config = (ModelConfig("test", 2, shape[0], (8, 16, 16), (False, False, True), 1, 16, 8) if smoke
              else model_config_from_preset("small", 2, shape[0]))
    torch.manual_seed(0)
    net = randomize_zero_init_convs(build_unet(config)).eval()
    schedule = ScheduleConfig()
    return RunModel(model_eps_fn(net, schedule), schedule, IdentityAutoencoder(), shape), net


def time_calls(fn, batches: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(batches):
        fn()
    return (time.perf_counter() - started) / batches


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_size", type=int, default=8, help="images per batch (8)")
    p.add_argument("--batches", type=int, default=1, help="timed batches after one warm-up (1)")
    p.add_argument("--levels", type=int, default=10, help="L of eps_norm / denoising_error (10)")
    p.add_argument("--diffpath_steps", type=int, default=10, help="K of DiffPath (10)")
    p.add_argument("--skip_factor", type=int, default=16, help="reconstruction --inference_skip_factor (16)")
    p.add_argument("--recon_steps", type=int, default=10, help="reconstruction --recon_steps (10)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2)")
    p.add_argument("--smoke", action="store_true", help="tiny models and images: seconds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    from ddpm_ood.reconstruction.metrics import ReconstructionMetrics

    with tempfile.TemporaryDirectory() as tmp:
        run = open_pretrained_run(cifar10_ddpm_folder(Path(tmp) / "ddpm", args.smoke))
        small, small_net = small_model(run.config.image_shape, args.smoke)
        models = {"diffusers ddpm-cifar10-32 arch": load_run_model(run, device), "ours small": small}
        nets = {"diffusers ddpm-cifar10-32 arch": run.pretrained.network, "ours small": small_net}
        print(f"device: {describe_device(device)}; threads: {args.threads}; precision: fp32")
        images = torch.rand(args.batch_size, *run.config.image_shape)
        keys = [f"img{i}" for i in range(args.batch_size)]
        options = ScoreOptions(score_levels=even_levels(args.levels), diffpath_steps=args.diffpath_steps)
        starts = start_timesteps(100, args.skip_factor)
        metrics = ReconstructionMetrics(device)
        print("model\tparams_M\tscore\tnfe\timages_per_s")
        for name, model in models.items():
            net = nets[name]
            n_params = sum(q.numel() for q in net.parameters()) / 1e6
            acp = alphas_cumprod(model.schedule)
            context = ScoreContext(acp=acp, data_range=run.data_range if model is not small else (0.0, 1.0),
                                   data_scale=2.0 if model is not small else 1.0)
            for label, families in GROUPS.items():
                settings = make_settings(list(families), options, context)
                def features(families=families, model=model, acp=acp, settings=settings):
                    with torch.inference_mode():
                        compute_features(list(families), model.eps_fn, model.autoencoder.encode(images), keys, acp,
                                         settings)
                seconds = time_calls(features, args.batches)
                print(f"{name}\t{n_params:.1f}\t{label}\t{nfe_of(list(families), settings)}\t"
                      f"{args.batch_size / seconds:.2f}")
            def recon(model=model):
                with torch.inference_mode():
                    measure_batch(model, metrics, images, keys,
                                  ReconstructionPlan.at(starts, 100, 2, recon_steps=args.recon_steps))
            seconds = time_calls(recon, args.batches)
            nfe = evaluations_per_image(starts, 100, args.recon_steps)
            print(f"{name}\t{n_params:.1f}\treconstruction(skip {args.skip_factor}, recon_steps {args.recon_steps})"
                  f"\t{nfe}\t{args.batch_size / seconds:.2f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
