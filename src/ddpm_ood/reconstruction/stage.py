"""The reconstruct.py stage: checkpoint -> model, sets -> resumable results files, optionally sharded by torchrun.

A stop signal (SIGTERM, SIGUSR1: ``preemption``) on any rank ends the stage after the current batch: its rows are
appended (flushed) like every batch's, every rank agrees to stop there, and ``Preempted`` is raised; the same command
continues with the images not done yet (a torchrun restart too) and ends with the rows of an uninterrupted run."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ddpm_ood.compute import ComputeOptions
from ddpm_ood.data.datasets import ImageDataset, dataset_from_csv
from ddpm_ood.devices import describe_device
from ddpm_ood.diffusion.noise import describe_noise
from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.distributed import (
    DistContext,
    any_rank,
    barrier,
    broadcast_object,
    cleanup_distributed,
    gather_objects,
)
from ddpm_ood.errors import ParameterError
from ddpm_ood.families import (
    RECONSTRUCTION,
    ScoreContext,
    ScoreOptions,
    get_family,
    make_settings,
    without_reconstruction,
)
from ddpm_ood.fileio import check_output_dir, run_lock
from ddpm_ood.preemption import (
    Preempted,
    loader_worker_init,
    stop_on_signals,
    stop_requested,
)
from ddpm_ood.reconstruction.metrics import ReconstructionMetrics
from ddpm_ood.reconstruction.pipeline import SetBatch, feature_rows, measured_rows, set_batches
from ddpm_ood.reconstruction.plan import ReconstructionPlan
from ddpm_ood.results.schema import IN_NAME, RUN_DIR_FLAGS, VAL_NAME, out_set_name
from ddpm_ood.results.writer import ResumableResults, feature_writers, reconstruction_settings
from ddpm_ood.runs import RunModel, RunSource, TrainedRun, check_image_shape, load_run_model, with_image_shape
from ddpm_ood.seeding import NOISE_KEY_RULE


class PlannedSet(NamedTuple):
    """One set to reconstruct: its results name ("val", "in" or an out-set name), split CSV, row type ("val", "in",
    "out") and how many of its first images (None: all)."""

    name: str
    csv: str
    row_type: str
    first_n: int | None


@dataclass(frozen=True)
class SetSelection:
    """The sets reconstruct.py runs: the validation set of ``validation_ids``, the in set of ``in_ids``, the out sets
    of ``out_ids`` (each switched by ``run_val`` / ``run_in`` / ``run_out``); ``first_n_val`` / ``first_n``: only
    the first n images of the validation set / of the in and out sets."""

    validation_ids: str | None = None
    in_ids: str | None = None
    out_ids: tuple[str, ...] = ()
    run_val: bool = True
    run_in: bool = True
    run_out: bool = True
    first_n_val: int | None = None
    first_n: int | None = None

    def planned(self) -> list[PlannedSet]:
        """Every set to run, in order (val, in, the out sets); duplicate names are a ParameterError."""
        sets: list[PlannedSet] = []
        if self.run_val:
            if not self.validation_ids:
                raise ParameterError("run_val=1 needs validation_ids", "run_val", "validation_ids")
            sets.append(PlannedSet(VAL_NAME, self.validation_ids, "val", self.first_n_val))
        if self.run_in:
            if not self.in_ids:
                raise ParameterError("run_in=1 needs in_ids", "run_in", "in_ids")
            sets.append(PlannedSet(IN_NAME, self.in_ids, "in", self.first_n))
        if self.run_out:
            if not self.out_ids:
                raise ParameterError("run_out=1 needs out_ids", "run_out", "out_ids")
            seen: dict[str, str] = {}
            for csv in self.out_ids:
                name = out_set_name(csv)
                if name in (VAL_NAME, IN_NAME) or name in seen:
                    other = seen.get(name, f"the {name} set")
                    raise ParameterError(f"out_ids: {csv} and {other} would both write results_{name}.csv; rename "
                                         "one CSV", "out_ids")
                seen[name] = csv
                sets.append(PlannedSet(name, csv, "out", self.first_n))
        if not sets:
            raise ParameterError("nothing to do: run_val, run_in and run_out are all 0", "run_val", "run_in",
                                 "run_out")
        return sets


@dataclass(frozen=True)
class ReconstructionJob:
    """Everything reconstruct.py does, as one frozen value; its flags take their defaults from these fields'.
    ``run``: the model (a run's checkpoint or a published model) and the run folder the files go to; ``sets``: which
    sets; ``plan``: how each image is reconstructed (start points fixed once the model is open); ``scores``: the
    score families to compute (``families.family_names()``: "reconstruction" writes results_<set>.csv, a feature
    family <ood>/<family>/features_<set>.csv) with ``score_options`` (levels, noise, ... of the feature families);
    ``compute``: device, precision, batches, workers (reconstruct.py's workers default to upstream's 8 capped at
    this machine's cores, ``devices.default_num_workers``, not this field's)."""

    run: RunSource
    sets: SetSelection = SetSelection()
    plan: ReconstructionPlan = ReconstructionPlan()
    scores: tuple[str, ...] = (RECONSTRUCTION,)
    score_options: ScoreOptions = ScoreOptions()
    compute: ComputeOptions = ComputeOptions(batch_size=256, num_workers=0)

    def __post_init__(self) -> None:
        if not self.scores:
            raise ParameterError("scores: give at least one score family", "scores")
        for name in self.scores:
            if name != RECONSTRUCTION:
                get_family(name)  # an unknown name lists the accepted ones


@dataclass(frozen=True)
class _Pass:
    """What every set of one reconstruct.py call shares once the model is open: the torchrun context, the model,
    the plan with its start points fixed, the precision resolved, the batches and workers."""

    ctx: DistContext
    model: RunModel
    plan: ReconstructionPlan
    precision: str
    compute: ComputeOptions


def run_reconstruction(job: ReconstructionJob) -> list[Path]:
    """Reconstruct every planned set; return the results files written (or already complete). A stop signal
    (SIGTERM, SIGUSR1) raises ``Preempted`` after the rows of the current batch are flushed."""
    with stop_on_signals():
        return _run_reconstruction(job)


def _run_reconstruction(job: ReconstructionJob) -> list[Path]:
    sets = job.sets.planned()
    run = job.run.open()  # the checkpoint first: a typo'd --model_name must not leave an empty folder behind
    run_dir = job.run.run_dir
    # Every set's dataset opened before any work (and before the output folder is made), so a bad CSV fails with
    # nothing written; an upstream checkpoint's configuration completed from the first set's images.
    datasets = {s.name: dataset_from_csv(s.csv, run.data, first_n=s.first_n, cache=job.compute.cache_data)
                for s in sets}
    run = with_image_shape(run, datasets[sets[0].name].image_shape, sets[0].csv)
    if run.upstream:
        noise = run.config.schedule.noise_type
        said = "" if noise == "gaussian" else f"; noise {describe_noise(noise)}"
        print(f"{run.path}: no stored config (upstream checkpoint); using the model flags given{said}")
    for s in sets:
        check_image_shape(run.config, datasets[s.name].image_shape, s.csv)
    results_dir = check_output_dir(run_dir.ood, RUN_DIR_FLAGS)
    plan = job.plan.on_schedule(run.config.schedule.num_train_timesteps)
    families = without_reconstruction(job.scores)
    family_settings = make_settings(families, job.score_options, score_context(run, plan.seed))  # fails before work
    try:
        ctx, precision = job.compute.launch(results_dir, RUN_DIR_FLAGS)
        if ctx.is_main:
            print(f"device: {describe_device(ctx.device)}; precision: {precision}")
            if ctx.restart_count:
                print(f"torchrun restart {ctx.restart_count} (TORCHELASTIC_RESTART_COUNT): continuing with the images "
                      "not done yet")
        with run_lock(results_dir, "reconstruct", enabled=ctx.is_main):
            model = load_run_model(run, ctx.device, precision=precision, use_ema=job.run.use_ema,
                                   max_batch=job.compute.max_batch)
            stage = _Pass(ctx, model, plan, precision, job.compute)
            metrics = ReconstructionMetrics(ctx.device) if RECONSTRUCTION in job.scores else None
            written = []
            noise_type, latent = run.config.schedule.noise_type, run.config.latent
            records = {f: get_family(f).feature_sidecar(family_settings[f], noise_type) for f in families}
            for planned in sets:
                settings = reconstruction_settings(
                    checkpoint=run.path, checkpoint_epoch=run.epoch, csv=planned.csv, first_n=planned.first_n,
                    seed=plan.seed, num_inference_steps=plan.num_inference_steps,
                    inference_skip_factor=plan.inference_skip_factor, recon_steps=plan.recon_steps,
                    start_timesteps=plan.starts, use_ema=job.run.use_ema, precision=precision,
                    noise_key=NOISE_KEY_RULE, autoencoder=None if latent is None else latent.weights_sha256,
                    noise_type=noise_type, recon_noise=plan.noise, pretrained=run.identity)
                if metrics is not None:
                    writer = ResumableResults(run_dir.results(planned.name), settings, len(plan.starts))
                    _run_set(stage, {RECONSTRUCTION: writer}, datasets[planned.name], planned,
                             _as_family_rows(RECONSTRUCTION, partial(measured_rows, model, metrics, plan)))
                    written.append(writer.path)
                if families:
                    writers = feature_writers({f: run_dir.features(f, planned.name) for f in families}, settings,
                                              records)
                    _run_set(stage, writers, datasets[planned.name], planned,
                             partial(feature_rows, model, families, family_settings))
                    written.extend(w.path for w in writers.values())
            return written
    finally:
        cleanup_distributed()


def _as_family_rows(family: str, rows_of: Callable[[Iterator[SetBatch], str], Iterator[pd.DataFrame]]):
    """``rows_of`` (one frame per batch) as ``_run_set`` takes it: one {family: frame} per batch."""
    def by_family(batches: Iterator[SetBatch], row_type: str) -> Iterator[dict[str, pd.DataFrame]]:
        return ({family: rows} for rows in rows_of(batches, row_type))

    return by_family


def score_context(run: TrainedRun, seed: int) -> ScoreContext:
    """What the feature families are given besides the user's options: the seed, the model's noise type and
    alphas_cumprod, and its data range (``TrainedRun.data_range``: [0, b_scale] for our pixel models, a published
    model's [-1, 1], none for latents) with the model-space units per unit of [0, 1] image intensity (the range's
    width; latents: 1, so their scales are in latent units)."""
    schedule = run.config.schedule
    data_range = run.data_range
    return ScoreContext(seed=seed, noise_type=schedule.noise_type, acp=alphas_cumprod(schedule),
                        data_range=data_range,
                        data_scale=1.0 if data_range is None else float(data_range[1] - data_range[0]))


def _run_set(stage: _Pass, writers: dict[str, ResumableResults], dataset: ImageDataset, planned: PlannedSet,
             rows_of: Callable[[Iterator[SetBatch], str], Iterator[dict[str, pd.DataFrame]]]) -> None:
    """One set into one or more files written together (``writers``, by family): the images some file still lacks,
    sharded over the ranks; ``rows_of(batches, row_type)`` yields each batch's rows by family, gathered and
    appended by the main rank after every batch (to the files that lack those images)."""
    ctx = stage.ctx
    if all(w.is_complete() for w in writers.values()):
        if ctx.is_main:
            for w in writers.values():
                print(f"{w.path}: already complete, skipped")
        return
    done = {family: (w.start() if ctx.is_main else set()) for family, w in writers.items()}
    done = {family: set(broadcast_object(sorted(d), ctx)) for family, d in done.items()}
    todo = [i for i in range(len(dataset)) if any(i not in d for d in done.values())]
    per_round = stage.compute.batch_size * ctx.world_size
    n_batches = max((len(todo) + per_round - 1) // per_round, 1)
    with_noise = RECONSTRUCTION in writers  # the engine's start noise is drawn ahead; the families draw their own
    batches = set_batches(_loader(stage, Subset(dataset, todo[ctx.rank :: ctx.world_size])), stage.plan,
                          ctx.device, stage.model, with_noise)
    batch_rows = rows_of(batches, planned.row_type)
    bar = tqdm(total=len(todo), desc=f"{'reconstruct' if with_noise else 'features'} {planned.name}", unit="img",
               disable=not ctx.is_main)
    # Every rank runs n_batches rounds (some with no images) so the per-batch gathers stay in step.
    for _ in range(n_batches):
        started = time.perf_counter()
        rows = next(batch_rows, None) or {f: pd.DataFrame(columns=w.partial_columns) for f, w in writers.items()}
        if ctx.distributed:
            gathered = gather_objects(rows, ctx)
            rows = {f: pd.concat([part[f] for part in gathered if len(part[f])] or [rows[f]], ignore_index=True)
                    for f in writers}
        if ctx.is_main:
            for family, writer in writers.items():
                writer.append(rows[family][~rows[family]["index"].isin(done[family])])
            n_images = max(frame["index"].nunique() for frame in rows.values())
            bar.update(n_images)
            bar.set_postfix(img_per_s=f"{n_images / max(time.perf_counter() - started, 1e-9):.2f}")
        # Every rank looks at the stop flag after each batch, and they agree: all stop after the same batch, the
        # main rank's appends on disk first.
        if any_rank([stop_requested() is not None], ctx)[0]:
            bar.close()
            barrier(ctx)
            partials = ", ".join(str(w.partial) for w in writers.values())
            raise Preempted(f"{stop_requested() or 'a stop signal on another rank'}: stopped in set {planned.name} "
                            f"after {bar.n} of {len(todo)} images; their rows are in {partials}; run the same command "
                            "to continue")
    bar.close()
    barrier(ctx)
    if ctx.is_main:
        for writer in writers.values():
            final = writer.finish()
            print(f"wrote {writer.path} ({final['filename'].size} rows)")
    barrier(ctx)


def _loader(stage: _Pass, images: Subset) -> DataLoader:
    workers = stage.compute.num_workers
    return DataLoader(images, batch_size=stage.compute.batch_size, shuffle=False, num_workers=workers,
                      pin_memory=stage.ctx.device.type == "cuda",
                      worker_init_fn=loader_worker_init() if workers > 0 else None)
