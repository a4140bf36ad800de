"""The reconstruct.py stage: checkpoint -> model, sets -> resumable results files, optionally sharded by torchrun.

A stop signal (SIGTERM, SIGUSR1: ``preemption``) on any rank ends the stage after the current batch: its rows are
appended (flushed) like every batch's, every rank agrees to stop there, and ``Preempted`` is raised; the same command
continues with the images not done yet (a torchrun restart too) and ends with the rows of an uninterrupted run."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ddpm_ood.checkpoint import BEST_CHECKPOINT
from ddpm_ood.data.datasets import ImageDataset, dataset_from_csv
from ddpm_ood.devices import describe_device, resolve_precision
from ddpm_ood.diffusion.noise import describe_noise, row_noise_batch
from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.distributed import (
    DEFAULT_DIST_TIMEOUT_S,
    DistContext,
    any_rank,
    barrier,
    broadcast_object,
    check_shared_folder,
    cleanup_distributed,
    gather_objects,
    init_distributed,
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
from ddpm_ood.fileio import check_output_dir, image_stem, run_lock
from ddpm_ood.preemption import (
    Preempted,
    loader_worker_init,
    stop_on_signals,
    stop_requested,
    stop_signals_blocked,
)
from ddpm_ood.reconstruction.metrics import ReconstructionMetrics
from ddpm_ood.reconstruction.pipeline import (
    ENGINES,
    ReconstructionPlan,
    SetBatch,
    feature_rows,
    measured_rows,
)
from ddpm_ood.results.schema import (
    FEATURE_KEY_COLUMNS,
    IN_NAME,
    VAL_NAME,
    features_path,
    ood_dir,
    out_set_name,
    results_path,
)
from ddpm_ood.results.writer import ResumableResults, reconstruction_settings
from ddpm_ood.run_flags import RunFlags
from ddpm_ood.runs import (
    RunModel,
    TrainedRun,
    check_image_shape,
    load_run_model,
    open_pretrained_run,
    open_run,
    with_image_shape,
)
from ddpm_ood.seeding import DEFAULT_SEED, NOISE_KEY_RULE, noise_key
from ddpm_ood.upstream.flags import given_path


@dataclass(frozen=True)
class ReconstructionJob:
    """Everything reconstruct.py does, as one frozen value (the flags of the same names, whose defaults are these
    fields'; ``flags``: the model flags given explicitly, checked against the checkpoint's configuration or defining
    an upstream checkpoint's model). ``num_workers``: reconstruct.py's default is upstream's 8 capped at this
    machine's cores (``devices.default_num_workers``), not this field's."""

    output_dir: str
    model_name: str
    validation_ids: str | None = None
    in_ids: str | None = None
    out_ids: tuple[str, ...] = ()
    run_val: bool = True
    run_in: bool = True
    run_out: bool = True
    first_n_val: int | None = None
    first_n: int | None = None
    eval_checkpoint: str | None = None
    use_ema: bool = True
    batch_size: int = 256
    num_workers: int = 0
    cache_data: bool = True
    seed: int = DEFAULT_SEED
    num_inference_steps: int = 100
    inference_skip_factor: int = 1
    recon_steps: int | None = None
    engine: str = "batched"
    max_batch: int | None = None
    amp: bool = False
    precision: str | None = None
    device: str = "auto"
    flags: RunFlags = RunFlags()
    vqvae_checkpoint: str | None = None
    latent_pad: tuple[int, ...] | None = None
    # The score families to compute (families.family_names()): "reconstruction" writes results_<set>.csv, a feature
    # family <ood>/<family>/features_<set>.csv; score_options: what the feature families take (levels, noise, ...).
    scores: tuple[str, ...] = (RECONSTRUCTION,)
    score_options: ScoreOptions = ScoreOptions()
    recon_noise: str = "per_image"  # the reconstruction's start-noise protocol (seeding.NOISE_PROTOCOLS)
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S  # seconds any torchrun rank waits for the others
    # A published model (docs/pretrained-models.md) instead of a checkpoint of the run: a diffusers folder or an
    # openai .pt with its flags; ``resize``: resize every set's images to the model's size (never silently).
    pretrained: str | None = None
    pretrained_flags: str | None = None
    resize: bool = False

    def __post_init__(self) -> None:
        if not self.scores:
            raise ParameterError("scores: give at least one score family", "scores")
        for name in self.scores:
            if name != RECONSTRUCTION:
                get_family(name)  # an unknown name lists the accepted ones


def checkpoint_path(job: ReconstructionJob) -> Path:
    """The checkpoint to reconstruct with: ``--eval_checkpoint`` (absolute, relative to the working directory, or
    inside the run folder), else the run's best checkpoint."""
    run_dir = Path(job.output_dir) / job.model_name
    if given_path(job.eval_checkpoint) is None:
        return run_dir / BEST_CHECKPOINT
    given = Path(job.eval_checkpoint)
    return given if given.is_absolute() or given.exists() else run_dir / given


def planned_sets(job: ReconstructionJob) -> list[tuple[str, str, str, int | None]]:
    """(results name, csv path, row type, first_n) for every set to run; duplicate names are an error."""
    sets: list[tuple[str, str, str, int | None]] = []
    if job.run_val:
        if not job.validation_ids:
            raise ParameterError("run_val=1 needs validation_ids", "run_val", "validation_ids")
        sets.append((VAL_NAME, job.validation_ids, "val", job.first_n_val))
    if job.run_in:
        if not job.in_ids:
            raise ParameterError("run_in=1 needs in_ids", "run_in", "in_ids")
        sets.append((IN_NAME, job.in_ids, "in", job.first_n))
    if job.run_out:
        if not job.out_ids:
            raise ParameterError("run_out=1 needs out_ids", "run_out", "out_ids")
        seen: dict[str, str] = {}
        for csv in job.out_ids:
            name = out_set_name(csv)
            if name in (VAL_NAME, IN_NAME) or name in seen:
                other = seen.get(name, f"the {name} set")
                raise ParameterError(f"out_ids: {csv} and {other} would both write results_{name}.csv; rename one CSV",
                                     "out_ids")
            seen[name] = csv
            sets.append((name, csv, "out", job.first_n))
    if not sets:
        raise ParameterError("nothing to do: run_val, run_in and run_out are all 0", "run_val", "run_in", "run_out")
    return sets


def run_reconstruction(job: ReconstructionJob) -> list[Path]:
    """Reconstruct every planned set; return the results files written (or already complete). A stop signal
    (SIGTERM, SIGUSR1) raises ``Preempted`` after the rows of the current batch are flushed."""
    with stop_on_signals():
        return _run_reconstruction(job)


def _run_reconstruction(job: ReconstructionJob) -> list[Path]:
    if job.engine not in ENGINES:
        raise ParameterError(f"engine must be one of {', '.join(ENGINES)}, got {job.engine!r}", "engine")
    if job.engine == "reference" and job.recon_steps is not None:
        raise ParameterError("recon_steps needs the batched engine (the reference loop walks the full grid)",
                             "recon_steps")
    sets = planned_sets(job)
    # The checkpoint first: a typo'd --model_name must not leave an empty folder behind.
    run = _open_model(job)
    results_dir = check_output_dir(ood_dir(job.output_dir, job.model_name), "--output_dir/--model_name")
    # Every dataset opened before any work, so a bad CSV fails with nothing written.
    datasets = {name: dataset_from_csv(csv, run.data, first_n=first_n, cache=job.cache_data)
                for name, csv, _, first_n in sets}
    first_name, first_csv = sets[0][0], sets[0][1]
    run = with_image_shape(run, datasets[first_name].image_shape, first_csv)
    if run.upstream:
        noise = run.config.schedule.noise_type
        said = "" if noise == "gaussian" else f"; noise {describe_noise(noise)}"
        print(f"{run.path}: no stored config (upstream checkpoint); using the model flags given{said}")
    for name, csv, _, _ in sets:
        check_image_shape(run.config, datasets[name].image_shape, csv)
    plan = ReconstructionPlan(start_timesteps(job.num_inference_steps, job.inference_skip_factor,
                                              run.config.schedule.num_train_timesteps),
                              job.num_inference_steps, job.seed, job.recon_steps, job.engine, job.recon_noise)
    families = without_reconstruction(job.scores)
    family_settings = make_settings(families, job.score_options, score_context(run, job.seed))  # fails before work
    ctx = init_distributed(job.device, job.dist_timeout)
    try:
        check_shared_folder(results_dir, ctx, "--output_dir/--model_name")
        precision = resolve_precision(ctx.device, precision=job.precision, amp=job.amp)
        if ctx.is_main:
            print(f"device: {describe_device(ctx.device)}; precision: {precision}")
            if ctx.restart_count:
                print(f"torchrun restart {ctx.restart_count} (TORCHELASTIC_RESTART_COUNT): continuing with the images "
                      "not done yet")
        with run_lock(results_dir, "reconstruct", enabled=ctx.is_main):
            model = load_run_model(run, ctx.device, precision=precision, use_ema=job.use_ema, max_batch=job.max_batch)
            metrics = ReconstructionMetrics(ctx.device) if RECONSTRUCTION in job.scores else None
            written = []
            for name, csv, row_type, first_n in sets:
                settings = _settings(job, run, plan, csv, first_n, precision)
                if metrics is not None:
                    writer = ResumableResults(results_path(job.output_dir, job.model_name, name), settings,
                                              len(plan.start_ts))
                    _run_set(job, ctx, {RECONSTRUCTION: writer}, datasets[name], row_type, plan, model, name,
                             _as_family_rows(RECONSTRUCTION, partial(measured_rows, model, metrics, plan)))
                    written.append(writer.path)
                if families:
                    writers = _feature_writers(job, families, family_settings, name, settings,
                                               run.config.schedule.noise_type)
                    _run_set(job, ctx, writers, datasets[name], row_type, plan, model, name,
                             partial(feature_rows, model, families, family_settings))
                    written.extend(w.path for w in writers.values())
            return written
    finally:
        cleanup_distributed()


def _open_model(job: ReconstructionJob) -> TrainedRun:
    """The run's checkpoint, or the published model of ``--pretrained`` (the flags of the other source refused)."""
    if job.pretrained is None:
        if job.resize or job.pretrained_flags is not None:
            given = "resize" if job.resize else "pretrained_flags"
            raise ParameterError(f"{given} applies to pretrained models only (our checkpoints resize with "
                                 "image_size, as they were trained)", given, "pretrained", "image_size")
        return open_run(checkpoint_path(job), job.flags, vqvae_checkpoint=job.vqvae_checkpoint,
                        latent_pad=job.latent_pad)
    other = [name for name, value in (("eval_checkpoint", given_path(job.eval_checkpoint)),
                                      ("vqvae_checkpoint", job.vqvae_checkpoint), ("latent_pad", job.latent_pad))
             if value is not None]
    if other:
        raise ParameterError(f"{other[0]}: not with pretrained (a published pixel-space model)", other[0], "pretrained")
    run = open_pretrained_run(job.pretrained, job.pretrained_flags, resize=job.resize, flags=job.flags)
    model = run.pretrained
    print(f"{model.path}: {model.format} model, images {model.image_shape} in {list(model.data_range)}, "
          f"predicts {model.prediction_type}" + (f"; respaced {model.respacing}" if model.respacing else ""))
    return run


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


def _feature_writers(job: ReconstructionJob, families: list[str], fam: dict, name: str,
                     settings: dict, noise_type: str) -> dict[str, ResumableResults]:
    """One resumable feature file per family for set ``name``; its sidecar holds the set's settings (less the
    reconstruction grid and protocol), the family's network evaluations per image and its own settings as stored
    (``ScoreFamily.settings_record``)."""
    common = {k: v for k, v in settings.items() if k not in
              ("num_inference_steps", "inference_skip_factor", "recon_steps", "start_timesteps", "recon_noise")}
    writers = {}
    for family in families:
        record = get_family(family)
        columns = record.columns(fam[family])
        own = {"family": family, "features": columns, "nfe": record.nfe(fam[family]),
               "noise_type": noise_type, "settings": record.settings_record(fam[family])}
        path = features_path(job.output_dir, job.model_name, family, name)
        check_output_dir(path.parent, "--output_dir/--model_name")
        writers[family] = ResumableResults(path, {**common, **own}, 1, columns=[*FEATURE_KEY_COLUMNS, *columns])
    return writers


def _settings(job: ReconstructionJob, run: TrainedRun, plan: ReconstructionPlan, csv: str, first_n: int | None,
              precision: str) -> dict:
    """The sidecar of one results file: every setting its numbers depend on."""
    latent = run.config.latent
    return reconstruction_settings(
        checkpoint=run.path, checkpoint_epoch=run.epoch, csv=csv, first_n=first_n, seed=plan.seed,
        num_inference_steps=plan.num_inference_steps, inference_skip_factor=job.inference_skip_factor,
        recon_steps=plan.recon_steps, start_timesteps=plan.start_ts, use_ema=job.use_ema, precision=precision,
        noise_key=NOISE_KEY_RULE, autoencoder=None if latent is None else latent.weights_sha256,
        noise_type=run.config.schedule.noise_type, recon_noise=plan.noise, pretrained=run.identity,
    )



def _run_set(job: ReconstructionJob, ctx: DistContext, writers: dict[str, ResumableResults], dataset: ImageDataset,
             row_type: str, plan: ReconstructionPlan, model: RunModel, name: str,
             rows_of: Callable[[Iterator[SetBatch], str], Iterator[dict[str, pd.DataFrame]]]) -> None:
    """One set into one or more files written together (``writers``, by family): the images some file still lacks,
    sharded over the ranks; ``rows_of(batches, row_type)`` yields each batch's rows by family, gathered and
    appended by the main rank after every batch (to the files that lack those images)."""
    if all(w.is_complete() for w in writers.values()):
        if ctx.is_main:
            for w in writers.values():
                print(f"{w.path}: already complete, skipped")
        return
    done = {family: (w.start() if ctx.is_main else set()) for family, w in writers.items()}
    done = {family: set(broadcast_object(sorted(d), ctx)) for family, d in done.items()}
    todo = [i for i in range(len(dataset)) if any(i not in d for d in done.values())]
    mine = todo[ctx.rank :: ctx.world_size]
    n_batches = max((len(todo) + job.batch_size * ctx.world_size - 1) // (job.batch_size * ctx.world_size), 1)
    loader = DataLoader(Subset(dataset, mine), batch_size=job.batch_size, shuffle=False, num_workers=job.num_workers,
                        pin_memory=ctx.device.type == "cuda",
                        worker_init_fn=loader_worker_init() if job.num_workers > 0 else None)
    with_noise = RECONSTRUCTION in writers  # the engine's start noise is drawn ahead; the families draw their own
    batch_rows = rows_of(_batches_with_noise(loader, plan, ctx.device, model, with_noise), row_type)
    label = "reconstruct" if with_noise else "features"
    bar = tqdm(total=len(todo), desc=f"{label} {name}", unit="img", disable=not ctx.is_main)
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
        # Every rank looks at the stop flag after each batch, and they agree: all stop after the same batch.
        if any_rank([stop_requested() is not None], ctx)[0]:
            bar.close()
            barrier(ctx)  # the main rank's appends are on disk before any rank exits
            partials = ", ".join(str(w.partial) for w in writers.values())
            raise Preempted(f"{stop_requested() or 'a stop signal on another rank'}: stopped in set {name} after "
                            f"{bar.n} of {len(todo)} images; their rows are in {partials}; run the same command to "
                            "continue")
    bar.close()
    barrier(ctx)
    if ctx.is_main:
        for writer in writers.values():
            final = writer.finish()
            print(f"wrote {writer.path} ({final['filename'].size} rows)")
    barrier(ctx)


def _batches_with_noise(loader: DataLoader, plan: ReconstructionPlan, device: torch.device, model: RunModel,
                        with_noise: bool = True) -> Iterator[SetBatch]:
    """The loader's batches as ``SetBatch``es on ``device``, each with its start noise (S, B, *model_shape); the
    noise of the NEXT batch is drawn in a background thread while the caller runs this one through the network (the
    same ``diffusion.noise.row_noise_batch`` numbers, so nothing changes; in the main process, so no shared-memory
    traffic). Gaussian noise is drawn on the CPU and pinned on CUDA for a copy without a host wait; simplex noise is
    computed on ``device``. ``with_noise`` False: no start noise (None), for passes that draw their own."""
    noise_type = model.schedule.noise_type

    def draw(batch: dict) -> tuple[list[str], torch.Tensor | None]:
        keys = [noise_key(p) for p in batch["path"]]
        if not with_noise:
            return keys, None
        noise = row_noise_batch(noise_type, plan.seed, plan.noise_keys(keys), plan.start_ts, model.model_shape, device)
        return keys, noise.pin_memory() if noise.device.type == "cpu" and device.type == "cuda" else noise

    def as_set_batch(batch: dict, keys: list[str], noise: torch.Tensor | None) -> SetBatch:
        return ([int(i) for i in batch["index"]], [image_stem(p) for p in batch["path"]],
                batch["image"].to(device, non_blocking=True), keys, noise)

    with stop_signals_blocked():  # its workers start ignoring the stop signals (preemption.ignore_stop_signals)
        batches = iter(loader)
    with ThreadPoolExecutor(max_workers=1) as pool:
        current = next(batches, None)
        pending = pool.submit(draw, current) if current is not None else None
        while current is not None:
            following = next(batches, None)
            upcoming = pool.submit(draw, following) if following is not None else None
            yield as_set_batch(current, *pending.result())
            current, pending = following, upcoming
