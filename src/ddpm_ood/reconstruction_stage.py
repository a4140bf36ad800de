"""The reconstruct.py stage: checkpoint -> model, sets -> resumable results files, optionally sharded by torchrun."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig
from ddpm_ood.errors import UserError
from ddpm_ood.results import IN_NAME, VAL_NAME, ood_dir, out_set_name, results_path
from ddpm_ood.start_timesteps import start_timesteps

if TYPE_CHECKING:
    import torch

    from ddpm_ood.metrics import ReconstructionMetrics
    from ddpm_ood.reconstruction import EpsFn

ENGINES = ("batched", "reference")


@dataclass(frozen=True)
class ModelFlags:
    """Model/schedule/data flags given explicitly on the command line (None = not given).

    With a ddpm-ood checkpoint they must agree with its stored config; with an upstream checkpoint (no config) they
    define the model, upstream's defaults filling the rest.
    """

    model_type: str | None = None
    is_grayscale: bool | None = None
    spatial_dims: int | None = None
    image_size: int | None = None
    image_roi: tuple[int, ...] | None = None
    beta_schedule: str | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    prediction_type: str | None = None
    b_scale: float | None = None
    snr_shift: float | None = None


@dataclass(frozen=True)
class ReconstructionJob:
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
    cache_data: bool = False
    seed: int = 2
    num_inference_steps: int = 100
    inference_skip_factor: int = 1
    recon_steps: int | None = None
    engine: str = "batched"
    max_batch: int | None = None
    amp: bool = False
    precision: str | None = None
    device: str = "auto"
    flags: ModelFlags = ModelFlags()


def checkpoint_path(job: ReconstructionJob) -> Path:
    from ddpm_ood.checkpoint import BEST_CHECKPOINT

    run_dir = Path(job.output_dir) / job.model_name
    if job.eval_checkpoint in (None, "", "None"):
        return run_dir / BEST_CHECKPOINT
    given = Path(job.eval_checkpoint)
    return given if given.is_absolute() or given.exists() else run_dir / given


def resolve_run_config(ckpt: dict, flags: ModelFlags, source: Path) -> RunConfig | None:
    """The checkpoint's config, checked against explicit flags; None for an upstream checkpoint (no config)."""
    from ddpm_ood.checkpoint import run_config_of
    from ddpm_ood.noise_schedule import canonical_schedule_name

    run = run_config_of(ckpt)
    if run is None:
        return None
    stored = {
        "model_type": run.model.preset,
        "is_grayscale": run.data.is_grayscale,
        "spatial_dims": run.data.spatial_dims,
        "image_size": run.data.image_size,
        "image_roi": run.data.image_roi,
        "beta_schedule": run.schedule.beta_schedule,
        "beta_start": run.schedule.beta_start,
        "beta_end": run.schedule.beta_end,
        "prediction_type": run.schedule.prediction_type,
        "b_scale": run.schedule.b_scale,
        "snr_shift": run.schedule.snr_shift,
    }
    for name, given in dataclasses.asdict(flags).items():
        if given is None:
            continue
        if name == "beta_schedule":
            given = canonical_schedule_name(given)
        if name == "image_roi":
            given = tuple(given)
        want = stored[name]
        same = abs(given - want) <= 1e-12 * max(1.0, abs(want)) if isinstance(want, float) else given == want
        if not same:
            flag = "--spatial_dimension" if name == "spatial_dims" else f"--{name}"
            raise UserError(f"{flag}={given} contradicts {source} which was trained with {want}; drop the flag")
    return run


def run_config_from_flags(flags: ModelFlags, image_shape: Sequence[int]) -> RunConfig:
    """For upstream checkpoints: the model defined by the flags (upstream defaults otherwise)."""
    from ddpm_ood.networks import model_config_from_preset

    data = data_config_for_upstream(flags)
    schedule = ScheduleConfig(
        beta_schedule=flags.beta_schedule or "linear_beta",
        beta_start=flags.beta_start,
        beta_end=flags.beta_end,
        prediction_type=flags.prediction_type or "epsilon",
        b_scale=flags.b_scale if flags.b_scale is not None else 1.0,
        snr_shift=flags.snr_shift if flags.snr_shift is not None else 1.0,
    )
    model = model_config_from_preset(flags.model_type or "small", data.spatial_dims, data.channels)
    return RunConfig(model=model, schedule=schedule, data=data, image_shape=tuple(image_shape))


def data_config_for_upstream(flags: ModelFlags) -> DataConfig:
    return DataConfig(
        is_grayscale=bool(flags.is_grayscale),
        spatial_dims=flags.spatial_dims or 2,
        image_size=flags.image_size,
        image_roi=flags.image_roi,
    )


def planned_sets(job: ReconstructionJob) -> list[tuple[str, str, str, int | None]]:
    """(results name, csv path, row type, first_n) for every set to run; duplicate names are an error."""
    sets: list[tuple[str, str, str, int | None]] = []
    if job.run_val:
        if not job.validation_ids:
            raise UserError("--run_val=1 needs --validation_ids")
        sets.append((VAL_NAME, job.validation_ids, "val", job.first_n_val))
    if job.run_in:
        if not job.in_ids:
            raise UserError("--run_in=1 needs --in_ids")
        sets.append((IN_NAME, job.in_ids, "in", job.first_n))
    if job.run_out:
        if not job.out_ids:
            raise UserError("--run_out=1 needs --out_ids")
        seen: dict[str, str] = {}
        for csv in job.out_ids:
            name = out_set_name(csv)
            if name in (VAL_NAME, IN_NAME) or name in seen:
                other = seen.get(name, f"the {name} set")
                raise UserError(f"--out_ids: {csv} and {other} would both write results_{name}.csv; rename one CSV")
            seen[name] = csv
            sets.append((name, csv, "out", job.first_n))
    if not sets:
        raise UserError("nothing to do: --run_val, --run_in and --run_out are all 0")
    return sets


def load_eps_fn(
    ckpt: dict,
    run: RunConfig,
    source: str | Path,
    device: torch.device,
    *,
    use_ema: bool = True,
    max_batch: int | None = None,
    precision: str = "fp32",
) -> EpsFn:
    """The checkpoint's UNet (EMA weights if present and ``use_ema``) on ``device`` in eval mode, as an EpsFn.

    Shared by reconstruct.py and score.py so both run the same network the same way. ``source`` names the
    checkpoint in error messages; ``precision`` (resolved, ``devices.PRECISIONS``) is the forward pass's.
    """
    from ddpm_ood.checkpoint import inference_state_dict, load_unet_state
    from ddpm_ood.devices import autocast_context
    from ddpm_ood.networks import build_unet
    from ddpm_ood.reconstruction import model_eps_fn

    model = build_unet(run.model)
    load_unet_state(model, inference_state_dict(ckpt, use_ema=use_ema), str(source))
    model.to(device).eval()
    return model_eps_fn(model, run.schedule, max_batch=max_batch,
                        autocast=lambda: autocast_context(device, precision))


def measure_batch(
    eps_fn: EpsFn,
    schedule: ScheduleConfig,
    metrics: ReconstructionMetrics,
    images: torch.Tensor,
    keys: Sequence[str],
    start_ts: Sequence[int],
    num_inference_steps: int,
    seed: int,
    *,
    recon_steps: int | None = None,
    engine: str = "batched",
) -> dict[str, torch.Tensor]:
    """Reconstruct a batch from every start t and measure it: ``{metric name: (S, B) float32 CPU}``.

    images: (B, C, *spatial) in [0, 1] on the model's device; keys[b]: the noise key of image b (for a file
    ``reconstruction.noise_key(path)``); S = len(start_ts), row s for start_ts[s]. Metric names: ``METRIC_COLUMNS``.
    """
    from ddpm_ood.reconstruction import reconstruct_batched, reconstruct_reference

    if engine == "reference":
        recons = reconstruct_reference(eps_fn, schedule, images, keys, start_ts, num_inference_steps, seed)
    else:
        recons = reconstruct_batched(
            eps_fn, schedule, images, keys, start_ts, num_inference_steps, seed, recon_steps
        )
    originals = images.unsqueeze(0).expand_as(recons).reshape((-1,) + images.shape[1:])
    values = metrics(originals, recons.reshape((-1,) + images.shape[1:]))
    return {name: v.reshape(len(start_ts), images.shape[0]).cpu() for name, v in values.items()}


def result_rows(
    indices: Sequence[int],
    filenames: Sequence[str],
    row_type: str,
    start_ts: Sequence[int],
    values: dict[str, torch.Tensor],
) -> list[dict]:
    """Results rows (``index`` + the results CSV columns) of a measured batch, image-major then t ascending
    as given. ``values`` is ``measure_batch``'s output; column b belongs to indices[b] / filenames[b]."""
    mse, lpips = values["mse"], values["perceptual_difference"]
    rows = []
    for j, i in enumerate(indices):
        for s, t in enumerate(start_ts):
            rows.append(
                {
                    "index": int(i),
                    "filename": filenames[j],
                    "type": row_type,
                    "t": int(t),
                    "perceptual_difference": float(lpips[s, j]),
                    "mse": float(mse[s, j]),
                }
            )
    return rows


def run_reconstruction(job: ReconstructionJob) -> list[Path]:
    """Reconstruct every planned set; return the results files written (or already complete)."""
    from ddpm_ood.checkpoint import load_checkpoint
    from ddpm_ood.data.datasets import dataset_from_csv
    from ddpm_ood.devices import describe_device, resolve_precision
    from ddpm_ood.distributed import cleanup_distributed, init_distributed
    from ddpm_ood.io import check_output_dir, run_lock

    if job.engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {job.engine!r}")
    if job.engine == "reference" and job.recon_steps is not None:
        raise UserError("--recon_steps needs the batched engine (the reference loop walks the full grid)")
    sets = planned_sets(job)
    ckpt_file = checkpoint_path(job)
    ckpt = load_checkpoint(ckpt_file)  # first: a typo'd --model_name must not leave an empty folder behind
    results_dir = check_output_dir(ood_dir(job.output_dir, job.model_name), "--output_dir/--model_name")
    run = resolve_run_config(ckpt, job.flags, ckpt_file)
    data_config = run.data if run is not None else data_config_for_upstream(job.flags)

    # Open every dataset before any work, so a bad CSV fails with nothing written.
    datasets = {}
    for name, csv, _, first_n in sets:
        ds = dataset_from_csv(csv, data_config, first_n=first_n, cache=job.cache_data)
        datasets[name] = ds
    if run is None:
        run = run_config_from_flags(job.flags, datasets[sets[0][0]].image_shape)
        print(f"{ckpt_file}: no stored config (upstream checkpoint); using the model flags given")
    for name, csv, _, _ in sets:
        shape = tuple(datasets[name].image_shape)
        if shape != tuple(run.image_shape):
            raise UserError(
                f"{csv}: images load as {shape} but the model was trained on {tuple(run.image_shape)} "
                f"(check --is_grayscale / --image_size)"
            )

    start_ts = start_timesteps(job.num_inference_steps, job.inference_skip_factor, run.schedule.num_train_timesteps)
    ctx = init_distributed(job.device)
    try:
        precision = resolve_precision(ctx.device, precision=job.precision, amp=job.amp)
        if ctx.is_main:
            print(f"device: {describe_device(ctx.device)}; precision: {precision}")
        with run_lock(results_dir, "reconstruct", enabled=ctx.is_main):
            return _reconstruct_sets(job, ctx, sets, datasets, ckpt, ckpt_file, run, start_ts, precision)
    finally:
        cleanup_distributed()


def _reconstruct_sets(job: ReconstructionJob, ctx, sets: list[tuple[str, str, str, int | None]], datasets: dict,
                      ckpt: dict, ckpt_file: Path, run: RunConfig, start_ts: list[int], precision: str) -> list[Path]:
    """Every planned set in turn (the caller holds the run lock); returns the results files."""
    from ddpm_ood.metrics import ReconstructionMetrics
    from ddpm_ood.reconstruction import NOISE_KEY_RULE
    from ddpm_ood.results_writer import ResumableResults

    eps_fn = load_eps_fn(
        ckpt, run, ckpt_file, ctx.device, use_ema=job.use_ema, max_batch=job.max_batch, precision=precision
    )
    metrics = ReconstructionMetrics(ctx.device)
    written = []
    for name, csv, row_type, first_n in sets:
        settings = {
            "checkpoint": str(Path(ckpt_file).resolve()),
            "checkpoint_epoch": ckpt.get("epoch"),
            "csv": str(csv),
            "first_n": first_n,
            "seed": job.seed,
            "num_inference_steps": job.num_inference_steps,
            "inference_skip_factor": job.inference_skip_factor,
            "recon_steps": job.recon_steps,
            "start_timesteps": start_ts,
            "use_ema": job.use_ema,
            "precision": precision,
            "noise_key": NOISE_KEY_RULE,
        }
        writer = ResumableResults(results_path(job.output_dir, job.model_name, name), settings, len(start_ts))
        written.append(writer.path)
        _reconstruct_set(job, ctx, writer, datasets[name], row_type, run, start_ts, eps_fn, metrics, name)
    return written


def _reconstruct_set(job, ctx, writer, dataset, row_type, run, start_ts, eps_fn, metrics, name) -> None:
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from ddpm_ood.data.datasets import image_stem
    from ddpm_ood.distributed import barrier
    from ddpm_ood.reconstruction import noise_key

    if writer.is_complete():
        if ctx.is_main:
            print(f"{writer.path}: already complete, skipped")
        return
    done = writer.start() if ctx.is_main else set()
    done = _broadcast(done, ctx)
    todo = [i for i in range(len(dataset)) if i not in done]
    mine = todo[ctx.rank :: ctx.world_size]
    n_batches = max((len(todo) + job.batch_size * ctx.world_size - 1) // (job.batch_size * ctx.world_size), 1)
    loader = iter(
        DataLoader(Subset(dataset, mine), batch_size=job.batch_size, shuffle=False, num_workers=job.num_workers)
    )
    bar = tqdm(total=len(todo), desc=f"reconstruct {name}", unit="img", disable=not ctx.is_main)
    # Every rank runs n_batches rounds (some with no images) so the per-batch gathers stay in step.
    for _ in range(n_batches):
        batch = next(loader, None)
        rows: list[dict] = []
        started = time.perf_counter()
        if batch is not None:
            idx = [int(i) for i in batch["index"]]
            keys = [noise_key(p) for p in batch["path"]]
            values = measure_batch(
                eps_fn, run.schedule, metrics, batch["image"].to(ctx.device), keys, start_ts,
                job.num_inference_steps, job.seed, recon_steps=job.recon_steps, engine=job.engine,
            )
            rows = result_rows(idx, [image_stem(p) for p in batch["path"]], row_type, start_ts, values)
        rows = _gather_rows(rows, ctx)
        if ctx.is_main:
            writer.append(rows)
            n_images = len({r["index"] for r in rows})
            bar.update(n_images)
            elapsed = time.perf_counter() - started
            bar.set_postfix(img_per_s=f"{n_images / max(elapsed, 1e-9):.2f}")
    bar.close()
    barrier(ctx)
    if ctx.is_main:
        final = writer.finish()
        print(f"wrote {writer.path} ({final['filename'].size} rows)")
    barrier(ctx)


def _broadcast(done: set[int], ctx) -> set[int]:
    if not ctx.distributed:
        return done
    import torch.distributed as dist

    box = [sorted(done)]
    dist.broadcast_object_list(box, src=0)
    return set(box[0])


def _gather_rows(rows: list[dict], ctx) -> list[dict]:
    if not ctx.distributed:
        return rows
    import torch.distributed as dist

    gathered: list[list[dict] | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, rows)
    return [r for part in gathered for r in (part or [])]
