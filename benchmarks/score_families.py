"""Score families on the quickstart's trained model: AUROC against network evaluations per image, and what the
cheap families cost next to the paper's reconstruction, in ONE run.

1. AUROC vs nfe. For L in ``--levels`` (noise levels ``families.even_levels(L)``; eps_norm and denoising_error
   share the L network calls, so each L is computed once for both) and K in ``--diffpath_steps`` (DiffPath's DDIM
   inversion steps; diffpath6d and diffpath1d share them), the features of every family are computed on
   ``--n_val`` in-distribution VALIDATION images and on the test sets: Fashion-MNIST test (in), MNIST test, and
   the first Fashion-MNIST test images flipped upside down (vflip) and mirrored (hflip). A ``FeatureDensity`` is
   fitted on the validation features only, per family and setting; its negative log-likelihood scores the test
   sets, and the AUROC of in vs each out set is reported with the family's nfe (``families.nfe_of``). The
   ``ensemble`` rows (``families.ensemble``: one density over all four families' columns, also fitted on
   validation only) use L = K. Nothing is tuned on an OOD set: every number comes from validation-fitted
   densities with the library's fixed rules. The settings are those reconstruct.py uses: noise seed 2, the
   checkpoint's noise type, DiffPath's x0 clip to the data range (``diffpath_clip_range``), noise keyed by file
   stem (a flipped image has the same noise as its unflipped original, as in reconstruct.py).

2. Cost side by side. On the same images (the first in-distribution test images), the same precision and batch
   size, one model in one process: seconds per image of (a) the 10-evaluation families (eps_norm+denoising_error
   at L = 10, diffpath6d+diffpath1d at K = 10, and the four together, the quickstart's 20-evaluation set: encode
   then ``families.compute_features``, as reconstruct.py's feature pass) and (b) the paper's reconstruction score
   at skip factor 16 on the 100-step grid, whole PLMS path from every start t (``--recon_steps`` not given: 349
   evaluations per image, ``engine.evaluations_per_image``), through ``pipeline.measure_batch`` (encode, batched
   engine, decode, MSE and LPIPS). One warm-up batch for each, then ``--cost_batches`` timed batches, the
   methods interleaved batch by batch so that a change of load on a shared machine hits both alike. Reported:
   ``cost_ratio_<family>`` = seconds per image of the family / of the reconstruction (target < 0.1).

Printed: ``key: value`` lines (the device and CPU kind first), the AUROC table as tab-separated lines (header
``family L_or_K nfe auroc_MNIST auroc_vflip auroc_hflip mean feature_ms_per_image``), then the cost lines; the
last line is ``cost_ratio_max``. Progress goes to stderr. With 200 in-distribution and 100-200 OOD images an AUROC
carries a standard error of about 0.02-0.03; read differences below that as noise.

``--smoke``: a random-weight tiny checkpoint (8/16 channels, 1x8x8) and seeded random images, a few per set, every
family and setting still computed (a test runs it; its numbers mean nothing).

Usage (repository root, venv active, after ``bash scripts/quickstart.sh`` or with --checkpoint/--splits_dir)::

    python benchmarks/score_families.py                 # ~15-25 min on 2 shared cores
    python benchmarks/score_families.py --smoke         # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ddpm_ood.devices import cpu_has_native_bf16, describe_device, resolve_precision
from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.errors import UserError
from ddpm_ood.families import FamilySettings, compute_features, get_family, nfe_of
from ddpm_ood.families.base import even_levels
from ddpm_ood.families.density import FeatureDensity
from ddpm_ood.families.diffpath import DIFFPATH1D, DIFFPATH6D, diffpath_clip_range, diffpath_timesteps
from ddpm_ood.families.ensemble import ensemble_scores
from ddpm_ood.families.noise_levels import DENOISING_ERROR, EPS_NORM
from ddpm_ood.ood.metrics import detection_metrics
from ddpm_ood.reconstruction.engine import evaluations_per_image

DEFAULT_CHECKPOINT = Path("runs/quickstart/output/fashionmnist_tiny_fast/checkpoint.pth")  # after the quickstart
DEFAULT_SPLITS = Path("runs/quickstart/data/data_splits")
NOISE_GROUP = (EPS_NORM, DENOISING_ERROR)
DIFFPATH_GROUP = (DIFFPATH6D, DIFFPATH1D)
ALL_FAMILIES = (*NOISE_GROUP, *DIFFPATH_GROUP)
ENSEMBLE = "ensemble"
OUT_SETS = ("MNIST", "vflip", "hflip")
TABLE_HEADER = ["family", "L_or_K", "nfe", *[f"auroc_{s}" for s in OUT_SETS], "mean", "feature_ms_per_image"]
# set name -> split CSV (the flipped CSVs need not exist: the loader flips FashionMNIST_test.csv's images)
CSVS = {"val": "FashionMNIST_val.csv", "in": "FashionMNIST_test.csv", "MNIST": "MNIST_test.csv",
        "vflip": "FashionMNIST_vflip_test.csv", "hflip": "FashionMNIST_hflip_test.csv"}
# --smoke: a few images per set, and one thread (tiny networks run several times faster with one on a shared CPU)
SMOKE = {"n_val": 20, "n_in": 8, "n_mnist": 8, "n_flip": 6, "batch_size": 4, "threads": 1}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_counts(text: str) -> list[int]:
    """'5,10,20' -> [5, 10, 20] (positive integers, no repeats)."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise UserError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 1 for v in values) or len(set(values)) != len(values):
        raise UserError(f"{text!r}: give distinct positive integers")
    return values


def cpu_kind() -> tuple[str, bool, str]:
    """(torch's CPU capability, native bf16?, a file-name label such as ``avx512_bf16`` or ``avx2``)."""
    capability = torch.backends.cpu.get_cpu_capability()
    native = cpu_has_native_bf16()
    return capability, native, capability.lower() + ("_bf16" if native else "")


# ---- model and images ---------------------------------------------------------------------------------------------

def save_smoke_checkpoint(path: Path) -> None:
    """A random-weight tiny checkpoint for 1x8x8 grayscale images, as tests/tiny_run.py's save_tiny_checkpoint."""
    from ddpm_ood.checkpoint import save_checkpoint
    from ddpm_ood.config import DataConfig, ModelConfig, RunConfig, ScheduleConfig
    from ddpm_ood.diffusion.unet import build_unet, randomize_zero_init_convs

    torch.manual_seed(0)
    model_config = ModelConfig("test", 2, 1, (8, 16, 16), (False, False, True), 1, 16, 8)
    run = RunConfig(model_config, ScheduleConfig("scaled_linear_beta", 0.0015, 0.0195), DataConfig(is_grayscale=True),
                    (1, 8, 8))
    model = randomize_zero_init_convs(build_unet(model_config))
    save_checkpoint(path, {"epoch": 1, "model_state_dict": model.state_dict(), "config": run.to_dict()})


def smoke_sets(args: argparse.Namespace, shape: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Seeded random images per set; the flipped sets are the first in-images flipped, with their keys."""
    g = torch.Generator().manual_seed(0)
    sizes = {"val": args.n_val, "in": max(args.n_in, args.n_flip), "MNIST": args.n_mnist}
    sets = {}
    for name, n in sizes.items():
        images = torch.rand((n, *shape), generator=g)
        if name == "MNIST":
            images = images.square()  # another distribution than val/in
        sets[name] = (images, [f"smoke_{name}_{i}" for i in range(n)])
    images, keys = sets["in"]
    sets["vflip"] = (torch.flip(images[: args.n_flip], dims=(2,)), keys[: args.n_flip])
    sets["hflip"] = (torch.flip(images[: args.n_flip], dims=(3,)), keys[: args.n_flip])
    sets["in"] = (images[: args.n_in], keys[: args.n_in])
    return sets


def load_set(csv: Path, data, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n images of a split CSV (flipped for ``*_vflip_test.csv``/``*_hflip_test.csv``) and their noise
    keys (file stems, as reconstruct.py)."""
    from ddpm_ood.data.datasets import dataset_from_csv
    from ddpm_ood.seeding import noise_key

    ds = dataset_from_csv(str(csv), data, first_n=n)
    return torch.stack([ds[i]["image"] for i in range(len(ds))]), [noise_key(p) for p in ds.paths]


def real_sets(args: argparse.Namespace, data) -> dict[str, tuple[torch.Tensor, list[str]]]:
    sizes = {"val": args.n_val, "in": args.n_in, "MNIST": args.n_mnist, "vflip": args.n_flip, "hflip": args.n_flip}
    return {name: load_set(args.splits_dir / CSVS[name], data, n) for name, n in sizes.items()}


# ---- part 1: AUROC against nfe ------------------------------------------------------------------------------------

def batched_features(model, families: Sequence[str], settings: FamilySettings, images: torch.Tensor,
                     keys: Sequence[str], batch_size: int, acp: torch.Tensor) -> dict[str, np.ndarray]:
    """{family: (N, D)} for all images, ``batch_size`` at a time: encode, then the families' shared calls once
    (reconstruct.py's feature pass)."""
    parts: dict[str, list[np.ndarray]] = {f: [] for f in families}
    for first in range(0, len(images), batch_size):
        with torch.inference_mode():
            x0 = model.autoencoder.encode(images[first : first + batch_size])
        out = compute_features(families, model.eps_fn, x0, keys[first : first + batch_size], acp, settings)
        for family in families:
            parts[family].append(out[family])
    return {family: np.concatenate(parts[family]) for family in families}


def settings_for(base: FamilySettings, group: str, value: int) -> FamilySettings:
    """``base`` with L = value noise levels (group "L") or K = value DiffPath steps (group "K")."""
    if group == "L":
        return dataclasses.replace(base, levels=even_levels(value))
    return dataclasses.replace(base, diffpath_steps=value)


def sweep_features(model, sets, base: FamilySettings, args: argparse.Namespace, acp: torch.Tensor) -> dict:
    """{("L", L) or ("K", K): {"features": {set: {family: (N, D)}}, "ms_per_image": float}}."""
    jobs = [("L", v, NOISE_GROUP) for v in args.levels] + [("K", v, DIFFPATH_GROUP) for v in args.diffpath_steps]
    n_images = sum(len(images) for images, _ in sets.values())
    out = {}
    for group, value, families in jobs:
        settings = settings_for(base, group, value)
        started = time.perf_counter()
        features = {}
        for name, (images, keys) in sets.items():
            features[name] = batched_features(model, families, settings, images, keys, args.batch_size, acp)
        seconds = time.perf_counter() - started
        out[(group, value)] = {"features": features, "ms_per_image": 1e3 * seconds / n_images, "settings": settings}
        log(f"features {group}={value} ({', '.join(families)}; nfe {nfe_of(families, settings)}): {n_images} images "
            f"in {seconds:.1f} s")
    return out


def aurocs(in_scores: np.ndarray, out_scores: dict[str, np.ndarray]) -> list[float]:
    return [detection_metrics(in_scores, out_scores[s])["auroc"] for s in OUT_SETS]


def auroc_table(sweep: dict, args: argparse.Namespace) -> list[dict]:
    """One row per (family, setting) and per ensemble L = K: densities fitted on the validation rows only."""
    rows = []
    for (group, value), entry in sweep.items():
        feats, settings = entry["features"], entry["settings"]
        for family in (NOISE_GROUP if group == "L" else DIFFPATH_GROUP):
            density = FeatureDensity().fit(feats["val"][family], columns=get_family(family).feature_names(settings))
            scores = {name: density.score(feats[name][family]) for name in ("in", *OUT_SETS)}
            rows.append({"family": family, "L_or_K": f"{group}={value}", "nfe": nfe_of([family], settings),
                         "aurocs": aurocs(scores["in"], scores), "ms": entry["ms_per_image"],
                         "density": density.summary()})
    for value in [v for v in args.levels if v in args.diffpath_steps]:
        noise, path = sweep[("L", value)], sweep[("K", value)]
        settings = dataclasses.replace(noise["settings"], diffpath_steps=value)
        names = ("val", "in", *OUT_SETS)
        blocks = {f: [(noise if f in NOISE_GROUP else path)["features"][name][f] for name in names]
                  for f in ALL_FAMILIES}
        columns = {f: get_family(f).feature_names(settings) for f in ALL_FAMILIES}
        result = ensemble_scores(blocks, columns)
        scores = dict(zip(names, result.scores, strict=True))
        rows.append({"family": ENSEMBLE, "L_or_K": f"L=K={value}", "nfe": nfe_of(ALL_FAMILIES, settings),
                     "aurocs": aurocs(scores["in"], scores), "ms": noise["ms_per_image"] + path["ms_per_image"],
                     "density": result.density.summary()})
    return rows


# ---- part 2: cost side by side ------------------------------------------------------------------------------------

def time_costs(model, images: torch.Tensor, keys: list[str], base: FamilySettings,
               args: argparse.Namespace, acp: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
    """({method: seconds per image}, {method: nfe}) over ``args.cost_batches`` timed batches after a warm-up batch,
    the methods interleaved batch by batch on the same images."""
    from ddpm_ood.reconstruction.metrics import ReconstructionMetrics
    from ddpm_ood.reconstruction.pipeline import measure_batch

    metrics = ReconstructionMetrics(torch.device("cpu"))
    start_ts = start_timesteps(args.num_inference_steps, args.skip_factor)
    cheap = dataclasses.replace(base, levels=even_levels(args.cost_levels), diffpath_steps=args.cost_steps)
    family_sets = {f"noise_levels_L{args.cost_levels}": NOISE_GROUP, f"diffpath_K{args.cost_steps}": DIFFPATH_GROUP,
                   f"all_families_L{args.cost_levels}_K{args.cost_steps}": ALL_FAMILIES}
    recon = f"reconstruction_skip{args.skip_factor}"

    def features(families):
        def once(x: torch.Tensor, k: list[str]) -> None:
            with torch.inference_mode():
                x0 = model.autoencoder.encode(x)
            compute_features(families, model.eps_fn, x0, k, acp, cheap)
        return once

    def reconstruction(x: torch.Tensor, k: list[str]) -> None:
        measure_batch(model, metrics, x, k, start_ts, args.num_inference_steps, base.seed, recon_steps=None)

    methods = {name: features(fams) for name, fams in family_sets.items()} | {recon: reconstruction}
    nfe = {name: nfe_of(fams, cheap) for name, fams in family_sets.items()}
    nfe[recon] = evaluations_per_image(start_ts, args.num_inference_steps, None)
    b = args.batch_size
    batches = [(images[i * b : (i + 1) * b], keys[i * b : (i + 1) * b]) for i in range(1 + args.cost_batches)]
    seconds = dict.fromkeys(methods, 0.0)
    for i, (x, k) in enumerate(batches):
        for name, once in methods.items():
            started = time.perf_counter()
            once(x, k)
            elapsed = time.perf_counter() - started
            if i > 0:  # batch 0 is the warm-up
                seconds[name] += elapsed
            log(f"cost {'warm-up' if i == 0 else f'batch {i}'}: {name} {elapsed:.2f} s for {len(x)} images")
    timed = b * args.cost_batches
    return {name: s / timed for name, s in seconds.items()}, nfe


# ---- the run ------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"a trained pixel or latent DDPM checkpoint (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--splits_dir", type=Path, default=DEFAULT_SPLITS,
                   help="folder with FashionMNIST_val.csv, FashionMNIST_test.csv and MNIST_test.csv "
                        f"(default {DEFAULT_SPLITS})")
    p.add_argument("--levels", type=parse_counts, default=[5, 10, 20],
                   help="numbers of noise levels L for eps_norm/denoising_error (even_levels(L); default 5,10,20)")
    p.add_argument("--diffpath_steps", type=parse_counts, default=[5, 10, 20],
                   help="DiffPath inversion steps K (improved-diffusion's ddim spacing of 1000; default 5,10,20)")
    p.add_argument("--n_val", type=int, default=1000, help="validation images the densities are fitted on (1000)")
    p.add_argument("--n_in", type=int, default=200, help="Fashion-MNIST test images, in-distribution (200)")
    p.add_argument("--n_mnist", type=int, default=200, help="MNIST test images (200)")
    p.add_argument("--n_flip", type=int, default=100, help="flipped Fashion-MNIST test images per flip (100)")
    p.add_argument("--batch_size", type=int, default=50,
                   help="images per batch, features and cost alike (default 50, the quickstart's)")
    p.add_argument("--cost_batches", type=int, default=2, help="timed batches per method after one warm-up (2)")
    p.add_argument("--cost_levels", type=int, default=10, help="L of the cost comparison (10)")
    p.add_argument("--cost_steps", type=int, default=10, help="K of the cost comparison (10)")
    p.add_argument("--skip_factor", type=int, default=16, help="reconstruction --inference_skip_factor (16)")
    p.add_argument("--num_inference_steps", type=int, default=100, help="reconstruction PLMS grid (100)")
    p.add_argument("--seed", type=int, default=2, help="noise seed (reconstruct.py's default 2)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="forward-pass precision of every network call (default fp32)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--skip_cost", action="store_true", help="only the AUROC table")
    p.add_argument("--smoke", action="store_true",
                   help="random-weight tiny checkpoint (1x8x8) and random images, a few per set, one thread: "
                        "seconds; the numbers mean nothing (for tests)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if min(args.n_val, args.n_in, args.n_mnist, args.n_flip, args.batch_size, args.cost_batches) < 1:
        raise UserError("--n_val, --n_in, --n_mnist, --n_flip, --batch_size and --cost_batches must be >= 1")
    for k in (*args.diffpath_steps, args.cost_steps):
        diffpath_timesteps(k)  # refuses a K with no integer stride of 1000, before any work
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.smoke:
                args.checkpoint = Path(tmp) / "smoke.pth"
                save_smoke_checkpoint(args.checkpoint)
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    from ddpm_ood.runs import load_run_model, open_run

    device = torch.device("cpu")
    capability, native, label = cpu_kind()
    precision = resolve_precision(device, precision=args.precision)
    print(f"device: {describe_device(device)}")
    print(f"cpu_capability: {capability}")
    print(f"native_bf16: {'yes' if native else 'no'}")
    print(f"cpu_kind: {label}")
    print(f"precision: {precision}")
    print(f"torch: {torch.__version__}")
    if not args.checkpoint.is_file():
        raise UserError(f"{args.checkpoint}: no checkpoint; run `bash scripts/quickstart.sh` or give --checkpoint")
    run = open_run(args.checkpoint)
    model = load_run_model(run, device, precision=precision)
    acp = alphas_cumprod(run.config.schedule).to(device)
    base = FamilySettings(seed=args.seed, noise_type=run.config.schedule.noise_type,
                          diffpath_clip=diffpath_clip_range(run.config.schedule.b_scale, run.config.latent is not None))
    sets = smoke_sets(args, tuple(run.config.image_shape)) if args.smoke else real_sets(args, run.config.data)
    print(f"checkpoint: {'smoke (random weights, 1x8x8)' if args.smoke else args.checkpoint} "
          f"(epoch {run.epoch}, model {'x'.join(map(str, run.config.model_shape))})")
    print("images: " + ", ".join(f"{name} {len(images)}" for name, (images, _) in sets.items())
          + f" ({'random' if args.smoke else args.splits_dir})")
    print(f"settings: seed {base.seed}, noise {base.noise_type}, diffpath_clip {base.diffpath_clip}, "
          f"batch_size {args.batch_size}, threads {torch.get_num_threads()}")
    print("densities: FeatureDensity fitted on the validation features only (ensemble: one density over all four "
          "families' columns, L = K)")

    started = time.perf_counter()
    rows = auroc_table(sweep_features(model, sets, base, args, acp), args)
    print(f"auroc_seconds: {time.perf_counter() - started:.1f}")
    print("\t".join(TABLE_HEADER))
    for r in rows:
        print("\t".join([r["family"], r["L_or_K"], str(r["nfe"]), *[f"{a:.4f}" for a in r["aurocs"]],
                         f"{np.mean(r['aurocs']):.4f}", f"{r['ms']:.1f}"]))
    for r in rows:
        log(f"density {r['family']} {r['L_or_K']}: {r['density']}")
    sys.stdout.flush()
    if args.skip_cost:
        return 0

    n_cost = args.batch_size * (1 + args.cost_batches)
    if args.smoke:
        images = torch.rand((n_cost, *run.config.image_shape), generator=torch.Generator().manual_seed(1))
        keys, source = [f"smoke_cost_{i}" for i in range(n_cost)], "random"
    else:
        images, keys = load_set(args.splits_dir / CSVS["in"], run.config.data, n_cost)
        source = str(args.splits_dir / CSVS["in"])
    if len(images) < n_cost:
        raise UserError(f"the cost comparison needs {n_cost} in-distribution images, {source} has {len(images)}")
    print(f"cost_images: {args.cost_batches} timed batches of {args.batch_size} after 1 warm-up batch, the first "
          f"{n_cost} in-distribution test images ({source}); precision {precision}")
    per_image, nfe = time_costs(model, images, keys, base, args, acp)
    recon = f"reconstruction_skip{args.skip_factor}"
    for name, seconds in per_image.items():
        print(f"cost_s_per_image_{name}: {seconds:.6f}  [nfe {nfe[name]}, {1e3 * seconds / nfe[name]:.2f} ms per "
              "evaluation]")
    ratios = {name: per_image[name] / per_image[recon] for name in per_image if name != recon}
    for name, ratio in ratios.items():
        print(f"cost_ratio_{name}: {ratio:.4f}  [nfe ratio {nfe[name] / nfe[recon]:.4f}; target < 0.1: "
              f"{'met' if ratio < 0.1 else 'NOT met'}]")
    print(f"cost_ratio_max: {max(ratios.values()):.4f}")
    return 0


if __name__ == "__main__":
    from ddpm_ood.cli.runner import run_cli

    sys.exit(run_cli(main))
