"""Score families on the quickstart's trained model: AUROC against network evaluations per image for every
registered feature family and the settings that matter, and what the cheap families cost next to the paper's
reconstruction, in ONE run.

1. AUROC table. Features are computed on ``--n_val`` in-distribution VALIDATION images and on the test sets:
   Fashion-MNIST test (in), MNIST test, and the first Fashion-MNIST test images flipped upside down (vflip) and
   mirrored (hflip). Each family's score is fitted on the validation features only (``ScoreFamily.fit``, a
   ``FeatureDensity`` for every built-in family) and scores the test sets; the AUROC of in vs each out set is
   reported with the family's nfe (``families.nfe_of``, network evaluations per image). The settings come from the
   library: ``families.make_settings(families, ScoreOptions(...), score_context(run, seed))``, the very call
   reconstruct.py makes (noise seed ``--seed`` 2, the checkpoint's noise type, DiffPath's x0 clip to the model's
   data range, MSMA's scales placed on the model's schedule), noise keyed by file stem (a flipped image gets the
   noise of its unflipped original, as in reconstruct.py). Each distinct (call group, settings) is computed once and
   reused by every row that needs it. Nothing is tuned on an OOD set. The rows, by ``part`` (``--parts``):

   - ``noise``: every registered feature family (``feature_family_names()``: eps_norm, denoising_error, msma,
     diffpath6d, diffpath1d) at the default ``ScoreOptions`` (L = 10 levels, M = 1 draw, K = 10 steps, clip on),
     with ``score_noise`` shared and per_image side by side. A family that draws no noise (msma, DiffPath) has the
     same settings under both and gets one row.
   - ``draws``: eps_norm and denoising_error with shared noise averaged over M = ``--draws`` draws (1,2,4; nfe
     L x M): does M = 2 or 4 buy anything over M = 1?
   - ``clip``: diffpath6d and diffpath1d at K = 10 with DiffPath's x0 clip on and off (``--diffpath_clip``; a
     latent model has no range, so both settings are "off" and one row is printed).
   - ``sweep``: eps_norm and denoising_error at L in ``--levels`` (``even_levels(L)``, shared noise, M = 1; the two
     share the L calls) and diffpath6d and diffpath1d at K in ``--diffpath_steps`` (clip on; one inversion for
     both). msma is not swept: its scales (1 down to 0.01) fix its levels.
   - ``ensemble``: ``families.ensemble.Ensemble`` (the mean of each member's score z-scored against that member's
     own validation scores) over the members ``ensemble_members(feature_families, with_reconstruction=False)``:
     eps_norm, denoising_error, msma and diffpath6d (diffpath1d is a column of diffpath6d). The library adds the
     paper's reconstruction score (mse+perceptual) as a member when a run computed it; this benchmark does not
     compute it, so its ensemble is over the feature families only. Rows: the defaults with shared and with
     per_image noise, and L = K = v for each v in both ``--levels`` and ``--diffpath_steps`` (shared noise).

   A row's ``setting`` is read from its settings (``L=10 noise=shared M=1``, ``K=10 clip=on``, msma's
   ``scales=10 levels=8``; the ensemble's joins its members' with `` + ``); the same family and setting in two
   parts is the same computation and gives the same numbers. ``feature_ms_per_image`` is the wall time of the
   row's call group(s) over all sets, per image (the ensemble's: the sum over its members' groups).

2. Cost side by side. On the same images (the first in-distribution test images), the same precision and batch
   size, one model in one process: seconds per image of (a) the cheap families at the default options with
   L = ``--cost_levels`` and K = ``--cost_steps`` (10, 10): eps_norm+denoising_error (L evaluations), msma (its
   levels), diffpath6d+diffpath1d (K), and all registered feature families together (the quickstart's set: encode
   then ``families.compute_features``, as reconstruct.py's feature pass) and (b) the paper's reconstruction score
   at skip factor 16 on the 100-step grid, whole PLMS path from every start t (``--recon_steps`` not given: 349
   evaluations per image, ``engine.evaluations_per_image``), through ``pipeline.measure_batch`` (encode, batched
   engine, decode, MSE and LPIPS). One warm-up batch for each, then ``--cost_batches`` timed batches, the
   methods interleaved batch by batch so that a change of load on a shared machine hits both alike. Reported:
   ``cost_ratio_<method>`` = seconds per image of the method / of the reconstruction (target < 0.1).

Printed: ``key: value`` lines (the device and CPU kind first), the AUROC table as tab-separated lines (header
``part family setting nfe auroc_MNIST auroc_vflip auroc_hflip mean feature_ms_per_image``), then the cost lines;
the last line is ``cost_ratio_max``. Progress and each fitted score's summary go to stderr. With 200
in-distribution and 100-200 OOD images an AUROC carries a standard error of about 0.02-0.03; read differences below
that as noise. ``--precision`` sets every network call's precision (fp32 default); to compare precisions run the
script once per precision on the same machine (a second pass would double every network call).

``--smoke``: a random-weight tiny checkpoint (8/16 channels, 1x8x8) and seeded random images, a few per set, every
part and setting still computed (a test runs it; its numbers mean nothing).

Usage (repository root, venv active, after ``bash scripts/quickstart.sh`` or with --checkpoint/--splits_dir)::

    python benchmarks/score_families.py                          # every part and the cost comparison
    python benchmarks/score_families.py --parts=noise,draws --skip_cost
    python benchmarks/score_families.py --smoke                  # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_ood.devices import cpu_has_native_bf16, describe_device, resolve_precision
from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.errors import UserError
from ddpm_ood.families import (
    ENSEMBLE,
    ScoreContext,
    ScoreOptions,
    compute_features,
    feature_family_names,
    get_family,
    make_settings,
    nfe_of,
)
from ddpm_ood.families.base import even_levels
from ddpm_ood.families.diffpath import DIFFPATH1D, DIFFPATH6D, DiffPathSettings, diffpath_timesteps
from ddpm_ood.families.ensemble import Ensemble, ensemble_members
from ddpm_ood.families.msma import MSMA, MSMASettings
from ddpm_ood.families.noise_levels import DENOISING_ERROR, EPS_NORM, NoiseLevelSettings
from ddpm_ood.ood.metrics import detection_metrics
from ddpm_ood.reconstruction.engine import evaluations_per_image
from ddpm_ood.reconstruction.plan import ReconstructionPlan
from ddpm_ood.seeding import DEFAULT_SEED

DEFAULT_CHECKPOINT = Path("runs/quickstart/output/fashionmnist_tiny_fast/checkpoint.pth")  # after the quickstart
DEFAULT_SPLITS = Path("runs/quickstart/data/data_splits")
NOISE_GROUP = (EPS_NORM, DENOISING_ERROR)
DIFFPATH_GROUP = (DIFFPATH6D, DIFFPATH1D)
NOISE_PROTOCOLS = ("shared", "per_image")
PARTS = ("noise", "draws", "clip", "sweep", "ensemble")
OUT_SETS = ("MNIST", "vflip", "hflip")
SET_NAMES = ("val", "in", *OUT_SETS)
TABLE_HEADER = ["part", "family", "setting", "nfe", *[f"auroc_{s}" for s in OUT_SETS], "mean",
                "feature_ms_per_image"]
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


def parse_parts(text: str) -> list[str]:
    """'noise,draws' or 'all' -> the chosen parts of the AUROC table, in ``PARTS`` order."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if items == ["all"]:
        return list(PARTS)
    unknown = [item for item in items if item not in PARTS]
    if not items or unknown:
        raise UserError(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; accepted: "
                        f"{', '.join(PARTS)} or all")
    return [part for part in PARTS if part in items]


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


# ---- part 1: the AUROC table -------------------------------------------------------------------------------------

def describe(settings: Any) -> str:
    """A row's setting, read from a family's settings: ``L=10 noise=shared M=1``, ``K=10 clip=on``,
    ``scales=10 levels=8``; any other family's settings as ``field=value`` pairs."""
    if isinstance(settings, NoiseLevelSettings):
        return f"L={len(settings.levels)} noise={settings.noise} M={settings.draws}"
    if isinstance(settings, DiffPathSettings):
        return f"K={settings.steps} clip={'off' if settings.clip is None else 'on'}"
    if isinstance(settings, MSMASettings):
        return f"scales={len(settings.sigmas)} levels={len(settings.levels)}"
    return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items())


def batched_features(model, families: Sequence[str], settings: Mapping[str, Any], images: torch.Tensor,
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


class FeatureStore:
    """Features and validation-fitted scores of every set, computed once per (call group, settings) and reused by
    every row that asks for them."""

    def __init__(self, model, sets: Mapping[str, tuple[torch.Tensor, list[str]]], batch_size: int,
                 acp: torch.Tensor) -> None:
        self.model, self.sets, self.batch_size, self.acp = model, sets, batch_size, acp
        self.n_images = sum(len(images) for images, _ in sets.values())
        self._features: dict[tuple[str, Any], dict[str, np.ndarray]] = {}
        self._scores: dict[tuple[str, Any], tuple[dict[str, np.ndarray], str]] = {}
        self.ms_per_image: dict[tuple[str, Any], float] = {}  # (call group name, settings) -> ms per image

    def features(self, family: str, settings: Any) -> dict[str, np.ndarray]:
        """{set: (N, D)} of ``family`` under ``settings``; the first call computes every member of its call group."""
        if (family, settings) not in self._features:
            group = get_family(family).calls
            members = [f for f in feature_family_names() if get_family(f).calls is group]
            by_family = dict.fromkeys(members, settings)
            started = time.perf_counter()
            per_set = {name: batched_features(self.model, members, by_family, images, keys, self.batch_size,
                                              self.acp)
                       for name, (images, keys) in self.sets.items()}
            seconds = time.perf_counter() - started
            self.ms_per_image[(group.name, settings)] = 1e3 * seconds / self.n_images
            for member in members:
                self._features[(member, settings)] = {name: per_set[name][member] for name in per_set}
            log(f"features {'+'.join(members)} {describe(settings)} (nfe {group.nfe(settings)}): {self.n_images} "
                f"images in {seconds:.1f} s")
        return self._features[(family, settings)]

    def ms(self, family: str, settings: Any) -> float:
        return self.ms_per_image[(get_family(family).calls.name, settings)]

    def scores(self, family: str, settings: Any) -> tuple[dict[str, np.ndarray], str]:
        """({set: (N,) scores}, summary) of ``family``'s score fitted on the validation features only."""
        if (family, settings) not in self._scores:
            feats = self.features(family, settings)
            record = get_family(family)
            fitted = record.fit(feats["val"], record.columns(settings))
            self._scores[(family, settings)] = ({name: fitted.score(x) for name, x in feats.items()},
                                                fitted.summary())
        return self._scores[(family, settings)]


def aurocs(scores: Mapping[str, np.ndarray]) -> list[float]:
    return [detection_metrics(scores["in"], scores[s])["auroc"] for s in OUT_SETS]


def family_row(store: FeatureStore, part: str, family: str, settings: Any) -> dict:
    scores, summary = store.scores(family, settings)
    return {"part": part, "family": family, "setting": describe(settings), "nfe": nfe_of([family], {family: settings}),
            "aurocs": aurocs(scores), "ms": store.ms(family, settings), "summary": summary}


def ensemble_row(store: FeatureStore, part: str, settings: Mapping[str, Any]) -> dict:
    """The ensemble of the members ``settings`` names (``ensemble_members``), fitted on validation scores only."""
    members = list(settings)
    member_scores = {m: store.scores(m, settings[m])[0] for m in members}
    fitted = Ensemble.fit({m: member_scores[m]["val"] for m in members})
    scores = {name: fitted.score({m: member_scores[m][name] for m in members}) for name in SET_NAMES}
    groups = {(get_family(m).calls.name, settings[m]) for m in members}
    setting = " + ".join(dict.fromkeys(describe(settings[m]) for m in members))
    return {"part": part, "family": ENSEMBLE, "setting": setting, "nfe": nfe_of(members, settings),
            "aurocs": aurocs(scores), "ms": sum(store.ms_per_image[g] for g in groups), "summary": fitted.summary()}


def table_jobs(args: argparse.Namespace, context: ScoreContext) -> list[tuple[str, str, Any]]:
    """(part, family or ENSEMBLE, settings or {member: settings}) of every row, in table order, without repeats
    within a part (a family whose settings do not change with an option gets one row)."""
    families = feature_family_names()
    members = ensemble_members(families, with_reconstruction=False)

    def settings(names: Sequence[str], **options) -> dict[str, Any]:
        return make_settings(names, ScoreOptions(**options), context)

    jobs: list[tuple[str, str, Any]] = []
    if "noise" in args.parts:
        for family in families:
            for noise in NOISE_PROTOCOLS:
                jobs.append(("noise", family, settings([family], score_noise=noise)[family]))
    if "draws" in args.parts:
        for family in NOISE_GROUP:
            for m in args.draws:
                jobs.append(("draws", family, settings([family], score_noise_draws=m)[family]))
    if "clip" in args.parts:
        for family in DIFFPATH_GROUP:
            for clip in (True, False):
                jobs.append(("clip", family, settings([family], diffpath_clip=clip)[family]))
    if "sweep" in args.parts:
        for value in args.levels:
            jobs.extend(("sweep", f, s) for f, s in settings(NOISE_GROUP, score_levels=even_levels(value)).items())
        for value in args.diffpath_steps:
            jobs.extend(("sweep", f, s) for f, s in settings(DIFFPATH_GROUP, diffpath_steps=value).items())
    if "ensemble" in args.parts:
        for noise in NOISE_PROTOCOLS:
            jobs.append(("ensemble", ENSEMBLE, settings(members, score_noise=noise)))
        for value in [v for v in args.levels if v in args.diffpath_steps]:
            jobs.append(("ensemble", ENSEMBLE, settings(members, score_levels=even_levels(value), diffpath_steps=value)))
    unique, seen = [], set()
    for part, family, s in jobs:
        key = (part, family, tuple(s.items()) if isinstance(s, dict) else s)
        if key not in seen:
            seen.add(key)
            unique.append((part, family, s))
    return unique


def auroc_table(store: FeatureStore, jobs: Sequence[tuple[str, str, Any]]) -> list[dict]:
    """One row per job: AUROC of in vs each out set, scores fitted on the validation rows only."""
    return [ensemble_row(store, part, s) if family == ENSEMBLE else family_row(store, part, family, s)
            for part, family, s in jobs]


# ---- part 2: cost side by side ------------------------------------------------------------------------------------

def time_costs(model, images: torch.Tensor, keys: list[str], context: ScoreContext,
               args: argparse.Namespace, acp: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
    """({method: seconds per image}, {method: nfe}) over ``args.cost_batches`` timed batches after a warm-up batch,
    the methods interleaved batch by batch on the same images."""
    from ddpm_ood.reconstruction.metrics import ReconstructionMetrics
    from ddpm_ood.reconstruction.pipeline import measure_batch

    metrics = ReconstructionMetrics(torch.device("cpu"))
    start_ts = start_timesteps(args.num_inference_steps, args.skip_factor)
    families = feature_family_names()
    cheap = make_settings(families, ScoreOptions(score_levels=even_levels(args.cost_levels),
                                                 diffpath_steps=args.cost_steps), context)
    family_sets = {f"noise_levels_L{args.cost_levels}": NOISE_GROUP, MSMA: (MSMA,),
                   f"diffpath_K{args.cost_steps}": DIFFPATH_GROUP,
                   f"all_families_L{args.cost_levels}_K{args.cost_steps}": families}
    recon = f"reconstruction_skip{args.skip_factor}"

    def features(names):
        def once(x: torch.Tensor, k: list[str]) -> None:
            with torch.inference_mode():
                x0 = model.autoencoder.encode(x)
            compute_features(names, model.eps_fn, x0, k, acp, cheap)
        return once

    def reconstruction(x: torch.Tensor, k: list[str]) -> None:
        measure_batch(model, metrics, x, k,
                      ReconstructionPlan.at(start_ts, args.num_inference_steps, context.seed, recon_steps=None))

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
    p.add_argument("--draws", type=parse_counts, default=[1, 2, 4],
                   help="shared noise draws M for eps_norm/denoising_error in the draws part (L = 10; default 1,2,4)")
    p.add_argument("--parts", type=parse_parts, default=list(PARTS),
                   help=f"rows of the AUROC table, a comma list of {', '.join(PARTS)} or all (default all)")
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
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"noise seed (reconstruct.py's default {DEFAULT_SEED})")
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
        DiffPathSettings(steps=k)  # and a K below 2
    even_levels(args.cost_levels)
    for value in args.levels:
        even_levels(value)
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
    from ddpm_ood.reconstruction.stage import score_context
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
    context = score_context(run, args.seed)  # as reconstruct.py: seed, noise type, acp, data range and scale
    acp = context.acp.to(device)
    jobs = table_jobs(args, context)
    sets = smoke_sets(args, tuple(run.config.image_shape)) if args.smoke else real_sets(args, run.config.data)
    print(f"checkpoint: {'smoke (random weights, 1x8x8)' if args.smoke else args.checkpoint} "
          f"(epoch {run.epoch}, model {'x'.join(map(str, run.config.model_shape))})")
    print("images: " + ", ".join(f"{name} {len(images)}" for name, (images, _) in sets.items())
          + f" ({'random' if args.smoke else args.splits_dir})")
    print(f"settings: seed {context.seed}, noise_type {context.noise_type}, data_range {context.data_range}, "
          f"data_scale {context.data_scale}, batch_size {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"parts: {','.join(args.parts)} (levels {','.join(map(str, args.levels))}; diffpath_steps "
          f"{','.join(map(str, args.diffpath_steps))}; draws {','.join(map(str, args.draws))})")
    print("scores: each family's fitted on the validation features only; ensemble: mean of the validation z-scores "
          f"of {', '.join(ensemble_members(feature_family_names(), with_reconstruction=False))} (feature families "
          "only: the reconstruction score is not computed here)")

    started = time.perf_counter()
    rows = auroc_table(FeatureStore(model, sets, args.batch_size, acp), jobs)
    print(f"auroc_seconds: {time.perf_counter() - started:.1f}")
    print("\t".join(TABLE_HEADER))
    for r in rows:
        print("\t".join([r["part"], r["family"], r["setting"], str(r["nfe"]), *[f"{a:.4f}" for a in r["aurocs"]],
                         f"{np.mean(r['aurocs']):.4f}", f"{r['ms']:.1f}"]))
    for r in rows:
        log(f"score {r['part']} {r['family']} {r['setting']}: {r['summary']}")
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
    per_image, nfe = time_costs(model, images, keys, context, args, acp)
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
