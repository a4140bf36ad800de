"""reconstruct.py: noise each image to every start t, denoise with PLMS, write results_{val,in,<Out>}.csv.

A latent DDPM encodes with its VQ-VAE (the one recorded in its checkpoint, or ``--vqvae_checkpoint`` with the same
weights), noises and denoises the latent, decodes, and measures MSE and LPIPS against the input image."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ddpm_ood.cli.options import (
    add_data_options,
    add_max_batch_option,
    add_model_options,
    add_pretrained_options,
    add_run_options,
    add_schedule_options,
    boolish,
    compute_options,
    field_default,
    optional_int,
    positive_int,
    refuse_unsupported,
)
from ddpm_ood.errors import UserError
from ddpm_ood.families import RECONSTRUCTION, ScoreOptions, family_names, parse_families
from ddpm_ood.families.base import even_levels
from ddpm_ood.reconstruction.plan import ENGINES, ReconstructionPlan
from ddpm_ood.reconstruction.stage import ReconstructionJob, SetSelection, run_reconstruction
from ddpm_ood.results.run_dir import RunDir
from ddpm_ood.run_flags import RunFlags
from ddpm_ood.runs import RunSource
from ddpm_ood.seeding import NOISE_PROTOCOLS

# reconstruct.py flags that feed ReconstructionJob.plan
PLAN_FLAGS = ("num_inference_steps", "inference_skip_factor", "recon_steps", "engine")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Model, schedule and image flags default to the configuration stored in the checkpoint; given "
        "explicitly they must agree with it. Upstream checkpoints (no stored config) need them.",
    )
    compute = field_default(ReconstructionJob, "compute")
    add_run_options(p, compute, seed=field_default(ReconstructionJob, "plan.seed"))
    add_data_options(p, batch_size=compute.batch_size, cache_data=compute.cache_data)
    add_schedule_options(p, from_checkpoint=True)
    add_model_options(p, from_checkpoint=True)
    g = p.add_argument_group("reconstruction")

    def default(name: str):
        part = "run" if name in ("eval_checkpoint", "use_ema") else "plan" if name in PLAN_FLAGS else "sets"
        return field_default(RunSource if part == "run" else ReconstructionJob, name if part == "run" else
                             f"{part}.{name}")

    g.add_argument("--validation_ids", type=str, default=default("validation_ids"),
                   help="split CSV of the validation set")
    g.add_argument("--in_ids", type=str, default=default("in_ids"), help="split CSV of the in-distribution test set")
    g.add_argument("--out_ids", type=str, default=",".join(default("out_ids")) or None,
                   help="comma-separated split CSVs of the out sets; X_vflip_test.csv / X_hflip_test.csv mean the "
                   "flipped images of X_test.csv")
    for name, what in (("val", "the validation set"), ("in", "the in set"), ("out", "the out sets")):
        g.add_argument(f"--run_{name}", type=boolish, default=default(f"run_{name}"),
                       help=f"reconstruct {what} (default {int(default(f'run_{name}'))})")
    g.add_argument("--first_n_val", type=optional_int, default=default("first_n_val"),
                   help="only the first n validation images")
    g.add_argument("--first_n", type=optional_int, default=default("first_n"),
                   help="only the first n images of in and out sets")
    g.add_argument("--eval_checkpoint", type=str, default=default("eval_checkpoint"),
                   help="checkpoint file (default <output_dir>/<model_name>/checkpoint.pth, the best)")
    g.add_argument("--use_ema", type=boolish, default=default("use_ema"),
                   help="use the EMA weights when the checkpoint has them")
    g.add_argument("--drop_last", type=boolish, default=False,
                   help="accepted for compatibility; reconstruction never drops images from scoring")
    g.add_argument("--num_inference_steps", type=positive_int, default=default("num_inference_steps"),
                   help="PLMS grid size: t = 1, 1+r, ..., r = 1000 // N (default "
                   f"{default('num_inference_steps')})")
    g.add_argument("--inference_skip_factor", type=positive_int, default=default("inference_skip_factor"),
                   help="start points = every k-th grid point from t=1: ceil(N/k) of them (default "
                   f"{default('inference_skip_factor')})")
    g.add_argument("--recon_steps", type=optional_int, default=default("recon_steps"),
                   help="denoise from each start t in at most N PLMS steps (default: the full path, as the paper)")
    g.add_argument("--engine", choices=ENGINES, default=default("engine"),
                   help="batched: all start points of a batch share network calls (fast, default); reference: one "
                   "start point after another (the oracle; same numbers)")
    add_max_batch_option(g, compute)
    add_pretrained_options(p.add_argument_group("published models (docs/pretrained-models.md)"), RunSource)
    _add_score_options(p.add_argument_group("score families (docs/score-families.md)"))
    # Not given = the checkpoint's value (None); argparse resolves abbreviations (--chan=2), so a flag is "given"
    # exactly when it is not None.
    p.set_defaults(is_grayscale=None, spatial_dimension=None, channel=None)
    for action in p._actions:  # their help names upstream's defaults, which only upstream checkpoints take
        if action.dest in ("is_grayscale", "spatial_dimension", "channel"):
            action.help = f"{action.help}; here: default from the checkpoint (upstream checkpoints: upstream's)"
    return p


def _add_score_options(f: argparse._ArgumentGroup) -> None:
    """--scores and the feature families' options (defaults: ``ReconstructionJob.score_options``'s)."""
    options = field_default(ReconstructionJob, "score_options")
    f.add_argument("--scores", type=str, default=",".join(field_default(ReconstructionJob, "scores")),
                   help=f"comma list of score families to compute: {', '.join(family_names())}, diffpath "
                   f"(diffpath6d and diffpath1d) or all (default {RECONSTRUCTION}, the paper's)")
    f.add_argument("--score_levels", type=str, default=str(len(options.score_levels)),
                   help="eps_norm / denoising_error noise levels: a count L (t spread evenly: 10 -> 50, 150, ..., "
                   f"950) or a comma list of t (default {len(options.score_levels)})")
    f.add_argument("--score_noise", choices=NOISE_PROTOCOLS, default=options.score_noise,
                   help="noise of eps_norm / denoising_error: shared = one draw per level for every image, seeded by "
                   "(seed, t); per_image = one draw per image and level, as ddpm-ood before 2026-12 "
                   f"(default {options.score_noise})")
    f.add_argument("--score_noise_draws", type=positive_int, default=options.score_noise_draws,
                   help="M shared draws per level, features averaged over them (cost M x L; default "
                   f"{options.score_noise_draws})")
    f.add_argument("--diffpath_steps", type=positive_int, default=options.diffpath_steps,
                   help=f"DiffPath's DDIM inversion steps K (t = 0, 1000/K, ...; default {options.diffpath_steps})")
    f.add_argument("--diffpath_clip", type=boolish, default=options.diffpath_clip,
                   help="clip DiffPath's x0 predictions to the model's data range, as its authors do (default "
                   f"{int(options.diffpath_clip)}; latent models have no range and never clip)")
    f.add_argument("--recon_noise", choices=NOISE_PROTOCOLS, default=field_default(ReconstructionJob, "plan.noise"),
                   help="start noise of the reconstruction score: per_image = every image its own draw (the "
                   "paper's, default); shared = one draw per start t for every image, seeded by (seed, t)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refuse_unsupported(args)
    run = RunSource(RunDir(args.output_dir, args.model_name), eval_checkpoint=args.eval_checkpoint,
                    use_ema=args.use_ema, flags=_run_flags(args), vqvae_checkpoint=args.vqvae_checkpoint,
                    latent_pad=args.latent_pad, pretrained=args.pretrained, pretrained_flags=args.pretrained_flags,
                    resize=args.resize)
    sets = SetSelection(validation_ids=args.validation_ids, in_ids=args.in_ids,
                        out_ids=tuple(s for s in (args.out_ids or "").split(",") if s.strip()), run_val=args.run_val,
                        run_in=args.run_in, run_out=args.run_out, first_n_val=args.first_n_val, first_n=args.first_n)
    plan = ReconstructionPlan(num_inference_steps=args.num_inference_steps,
                              inference_skip_factor=args.inference_skip_factor, recon_steps=args.recon_steps,
                              engine=args.engine, seed=args.seed, noise=args.recon_noise)
    options = ScoreOptions(score_levels=_levels(args.score_levels), score_noise=args.score_noise,
                           score_noise_draws=args.score_noise_draws, diffpath_steps=args.diffpath_steps,
                           diffpath_clip=args.diffpath_clip)
    compute = compute_options(args)
    run_reconstruction(ReconstructionJob(run, sets, plan, tuple(parse_families(args.scores)), options, compute))
    return 0


def _levels(value: str) -> tuple[int, ...]:
    """``--score_levels``: a count (spread evenly) or a comma list of t; anything else is a UserError."""
    parts = [v.strip() for v in value.strip("[]() ").split(",") if v.strip()]
    if not parts or not all(v.lstrip("-").isdigit() for v in parts):
        raise UserError(f"--score_levels: expected a count or comma-separated integers t, got {value!r}")
    return even_levels(int(parts[0])) if len(parts) == 1 else tuple(int(v) for v in parts)


def _run_flags(args: argparse.Namespace) -> RunFlags:
    """The model, schedule and data flags given explicitly (None = not given: the checkpoint's value)."""
    return RunFlags(
        model_type=args.model_type, is_grayscale=args.is_grayscale, spatial_dims=args.spatial_dimension,
        image_size=args.image_size, image_roi=args.image_roi, channel=args.channel,
        beta_schedule=args.beta_schedule, beta_start=args.beta_start, beta_end=args.beta_end,
        prediction_type=args.prediction_type, b_scale=args.b_scale, snr_shift=args.snr_shift,
        simplex_noise=args.simplex_noise,
    )
