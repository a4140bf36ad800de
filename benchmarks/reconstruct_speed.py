"""Side-by-side speed of the reconstruction engine: the plain reference loop vs the batched fast path.

Both paths run in ONE process on the same randomly initialised UNet of a preset (speed does not depend on training:
the same layers run on the same shapes whatever the weights), the same images and the same seeds:

- reference: ``reconstruct_reference``, one start point after another (MONAI PNDM, PLMS history reset), fp32, the
  plain ``model_eps_fn`` (the way upstream reconstruct.py runs on a CPU);
- fast: ``reconstruct_batched``, all (start t, image) trajectories of the batch advance together, with the best
  settings for the device (``BEST_SETTINGS``; each can be overridden by a flag).

Printed to stdout as ``key: value`` lines (progress goes to stderr):
- ``max_abs_diff_mse``: max |MSE score(reference) - MSE score(fast)| over all (image, t) rows, both in fp32 (must
  be < 1e-4: the two paths compute the same numbers), plus ``max_abs_diff_recon`` (pixels, [0, 1] scale);
- images/s of each path over whole images (every start point of every image), on the same images;
- ``single_image_latency_ratio``: reference seconds / fast seconds to score ONE new image (all start points);
- ``speedup_vs_reference``: fast images/s / reference images/s, the LAST line.

``--ablation`` adds, one by one, what pays on top of batching for the fast path (bf16/fp16 autocast,
channels_last, chunk size, inference_mode vs no_grad vs grad, LPIPS batched over all (image, t); torch.compile
with ``--ablation_compile``). The results on a 2-core CPU are in benchmarks/README.md.

Usage (repository root, venv active)::

    python benchmarks/reconstruct_speed.py --quick            # tiny preset, 28x28x1, skip factor 4, < 3 min
    python benchmarks/reconstruct_speed.py                    # small preset, one image, < 10 min
    python benchmarks/reconstruct_speed.py --quick --ablation
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ddpm_ood.autoencoder.base import IdentityAutoencoder
from ddpm_ood.config import ModelConfig, ScheduleConfig
from ddpm_ood.devices import (
    DEVICE_CHOICES,
    PRECISIONS,
    autocast_context,
    cpu_has_native_bf16,
    describe_device,
    fastest_native_precision,
    resolve_device,
)
from ddpm_ood.diffusion.eps import EpsFn, model_eps_fn
from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.diffusion.unet import (
    MODEL_PRESETS,
    build_unet,
    model_config_from_preset,
    randomize_zero_init_convs,
    wants_fused_attention,
)
from ddpm_ood.errors import UserError
from ddpm_ood.reconstruction.engine import balanced_tick_size, calls_per_start
from ddpm_ood.reconstruction.metrics import mse
from ddpm_ood.reconstruction.pipeline import reconstruct_images
from ddpm_ood.reconstruction.plan import ReconstructionPlan
from ddpm_ood.runs import RunModel

# The FashionMNIST recipe of the upstream README (scaled_linear 0.0015..0.0195); speed does not depend on it.
SCHEDULE = ScheduleConfig("scaled_linear_beta", 0.0015, 0.0195)
FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class FastSettings:
    """What the fast path runs with on top of batching. ``max_batch`` = samples per network call (None: all);
    ``balanced``: ticks of even size (``reconstruct_batched``), else every unfinished trajectory at each tick."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    max_batch: int | None = None
    balanced: bool = True

    def describe(self) -> str:
        return (
            f"precision={self.precision} channels_last={int(self.channels_last)} compile={int(self.compile)} "
            f"max_batch={self.max_batch} balanced={int(self.balanced)}"
        )

    @property
    def mixed(self) -> bool:
        """True when the network runs under autocast (bf16/fp16): its numbers then differ from fp32's."""
        return self.precision in ("bf16", "fp16")


def best_settings(device: torch.device) -> FastSettings:
    """The fast path's settings for what this machine computes natively (``devices.fastest_native_precision``:
    bf16 only on a CPU with AVX512-BF16/AMX, fp32 on an AVX2 CPU where bf16 is emulated, fp16 on CUDA), from the
    --ablation measurements in benchmarks/README.md; channels_last on CUDA is common practice, not measured here."""
    precision, _ = fastest_native_precision(device)
    return FastSettings(precision=precision, channels_last=device.type == "cuda", compile=False, max_batch=None)


@dataclass(frozen=True)
class BenchmarkSetup:
    """One benchmark: images (batch_size, *image_shape) in [0, 1], start points every ``skip_factor``-th grid point."""

    model_config: ModelConfig
    image_shape: tuple[int, ...]
    batch_size: int
    skip_factor: int = 4
    num_inference_steps: int = 100
    reference_images: int | None = None  # time the reference on the first N images of the batch (None: all)
    seed: int = 0
    device: str = "cpu"
    schedule: ScheduleConfig = SCHEDULE

    @property
    def start_ts(self) -> list[int]:
        return start_timesteps(self.num_inference_steps, self.skip_factor, self.schedule.num_train_timesteps)

    @property
    def n_reference(self) -> int:
        return self.batch_size if self.reference_images is None else min(self.reference_images, self.batch_size)


def log(message: str) -> None:
    """Progress on stderr, so stdout stays ``key: value`` lines."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_inputs(setup: BenchmarkSetup) -> tuple[torch.Tensor, list[str]]:
    """Seeded images (B, *image_shape) in [0, 1] on the device, and a made-up path per image (seeds its noise)."""
    generator = torch.Generator().manual_seed(setup.seed)
    images = torch.rand((setup.batch_size, *setup.image_shape), generator=generator)
    paths = [f"/benchmark/image_{i:05d}.png" for i in range(setup.batch_size)]
    return images.to(resolve_device(setup.device)), paths


def build_model(setup: BenchmarkSetup) -> torch.nn.Module:
    """The preset's UNet, randomly initialised from ``setup.seed``, eval mode, on the device.

    MONAI zero-initialises the last conv of every residual block and the output conv, so an untrained UNet returns
    exactly 0 for any input and both paths would agree trivially. Those convs get PyTorch's default random init
    instead: the network's output then depends on every layer, and the fp32 comparison means something.
    """
    device = resolve_device(setup.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as reconstruct.py: shapes repeat, autotune the convolutions
    torch.manual_seed(setup.seed)
    model = randomize_zero_init_convs(build_unet(setup.model_config, fused_attention=wants_fused_attention(device)))
    return model.eval().to(device)


def fast_eps_fn(model: torch.nn.Module, setup: BenchmarkSetup, settings: FastSettings) -> EpsFn:
    """``model_eps_fn`` for the fast path; channels_last / compile act on a copy so the reference model is untouched."""
    device = resolve_device(setup.device)
    net = model
    if settings.channels_last or settings.compile:
        net = copy.deepcopy(model)
    if settings.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if settings.compile:
        # dynamic=True: the number of active trajectories changes from tick to tick (one shape per start point).
        net = torch.compile(net, dynamic=True)
    eps_fn = model_eps_fn(
        net, setup.schedule, max_batch=settings.max_batch, autocast=lambda: autocast_context(device, settings.precision)
    )
    if not settings.channels_last or len(setup.image_shape) != 3:
        return eps_fn

    def channels_last_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps_fn(x.contiguous(memory_format=torch.channels_last), t).contiguous()

    return channels_last_eps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    """(wall seconds, result) of one call, synchronised on CUDA."""
    _sync(device)
    started = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - started, out


def _model(eps_fn: EpsFn, setup: BenchmarkSetup) -> RunModel:
    return RunModel(eps_fn, setup.schedule, IdentityAutoencoder(setup.schedule.b_scale), setup.image_shape)


def run_reference(eps_fn: EpsFn, setup: BenchmarkSetup, images: torch.Tensor, paths: Sequence[str]) -> torch.Tensor:
    """(S, B, *image_shape) reconstructions in [0, 1] by the plain loop (``reconstruct.py --engine=reference``)."""
    return reconstruct_images(_model(eps_fn, setup), images, paths,
                                     ReconstructionPlan.at(setup.start_ts, setup.num_inference_steps, setup.seed, engine="reference"))


def run_fast(
    eps_fn: EpsFn, setup: BenchmarkSetup, images: torch.Tensor, paths: Sequence[str], balanced: bool = True
) -> torch.Tensor:
    """(S, B, *image_shape) reconstructions in [0, 1] by the batched engine: the path reconstruct.py runs
    (``reconstruction.pipeline.reconstruct_images``), with the tick balancing exposed for the ablation."""
    return reconstruct_images(_model(eps_fn, setup), images, paths,
                                     ReconstructionPlan.at(setup.start_ts, setup.num_inference_steps, setup.seed),
                                     balanced=balanced)


def mse_scores(images: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """(S, B) MSE score of every (start t, image) row, the ``mse`` column of the results CSV."""
    originals = images.unsqueeze(0).expand_as(recons)
    flat = (-1, *images.shape[1:])
    return mse(originals.reshape(flat).float(), recons.reshape(flat).float()).reshape(recons.shape[:2])


def differences(images: torch.Tensor, reference: torch.Tensor, fast: torch.Tensor) -> dict[str, float]:
    """Max |reference - fast| of the MSE scores and of the reconstructions' pixels (same (S, B') rows)."""
    fast = fast[:, : reference.shape[1]]
    images = images[: reference.shape[1]]
    return {
        "mse": float((mse_scores(images, reference) - mse_scores(images, fast)).abs().max()),
        "recon": float((reference.float() - fast.float()).abs().max()),
    }


def warm_up(eps_fn: EpsFn, setup: BenchmarkSetup, images: torch.Tensor, n: int | None = None) -> None:
    """One network call of ``n`` samples (default: every (image, start t) of the batch, the fast path's largest), so
    one-time costs (oneDNN primitives, CUDA context, kernel selection; NOT torch.compile, timed separately) do not
    land in a timed run."""
    n = n or images.shape[0] * len(setup.start_ts)
    x = images[:1].expand(n, *images.shape[1:]).contiguous()
    eps_fn(x, torch.full((n,), setup.start_ts[-1], dtype=torch.long, device=images.device))


def run_benchmark(setup: BenchmarkSetup, settings: FastSettings) -> dict:
    """Time both paths on the same model, images and seeds; return every number the report prints.

    Keys: ``reference_s`` / ``fast_s`` (seconds for their image counts), ``*_images_per_s``, ``speedup_vs_reference``,
    ``single_image_*``, ``max_abs_diff_mse`` / ``max_abs_diff_recon`` (fp32 fast vs fp32 reference) and, when the
    fast path runs bf16/fp16, the same for the fp32 fast path (``fast_fp32_*``) and its own differences (``*_amp``).
    """
    device = resolve_device(setup.device)
    model = build_model(setup)
    images, paths = make_inputs(setup)
    n_ref = setup.n_reference
    ref_eps = model_eps_fn(model, setup.schedule)  # fp32, one network call per start point and grid step
    fp32_settings = dataclasses.replace(settings, precision="fp32")
    compile_s = 0.0
    fast_eps = fast_eps_fn(model, setup, settings)
    fast_fp32_eps = fast_eps if not settings.mixed else fast_eps_fn(model, setup, fp32_settings)

    def fast_run(eps_fn: EpsFn, imgs: torch.Tensor, pths: Sequence[str]) -> torch.Tensor:
        return run_fast(eps_fn, setup, imgs, pths, settings.balanced)

    if settings.compile:
        log("compiling the fast path (torch.compile) on one batch ...")
        compile_s, _ = timed(lambda: fast_run(fast_eps, images, paths), device)
    for n in {n_ref, 1}:
        warm_up(ref_eps, setup, images, n)
    for fn in {id(f): f for f in (fast_eps, fast_fp32_eps)}.values():
        warm_up(fn, setup, images)

    res: dict = {"compile_s": compile_s, "n_reference": n_ref}
    log(f"reference on {n_ref} image(s) x {len(setup.start_ts)} start points ...")
    res["reference_s"], ref = timed(lambda: run_reference(ref_eps, setup, images[:n_ref], paths[:n_ref]), device)
    log(f"fast path ({settings.describe()}) on {setup.batch_size} image(s) ...")
    res["fast_s"], fast = timed(lambda: fast_run(fast_eps, images, paths), device)
    if settings.mixed:
        log("fast path in fp32 ...")
        res["fast_fp32_s"], fast_fp32 = timed(lambda: fast_run(fast_fp32_eps, images, paths), device)
        diff_amp = differences(images, ref, fast)
        res["max_abs_diff_mse_amp"], res["max_abs_diff_recon_amp"] = diff_amp["mse"], diff_amp["recon"]
        res["fast_fp32_images_per_s"] = setup.batch_size / res["fast_fp32_s"]
        res["fast_fp32_speedup_vs_reference"] = res["fast_fp32_images_per_s"] / (n_ref / res["reference_s"])
    else:
        fast_fp32 = fast
    diff = differences(images, ref, fast_fp32)
    res["max_abs_diff_mse"], res["max_abs_diff_recon"] = diff["mse"], diff["recon"]

    if n_ref == 1:
        res["single_image_reference_s"] = res["reference_s"]
    else:
        log("single image, all start points: reference ...")
        res["single_image_reference_s"], _ = timed(lambda: run_reference(ref_eps, setup, images[:1], paths[:1]), device)
    if setup.batch_size == 1:
        res["single_image_fast_s"] = res["fast_s"]
    else:
        log("single image, all start points: fast ...")
        res["single_image_fast_s"], _ = timed(lambda: fast_run(fast_eps, images[:1], paths[:1]), device)

    res.update(network_floor(setup, settings, fast_eps, images, res))
    res["reference_images_per_s"] = n_ref / res["reference_s"]
    res["fast_images_per_s"] = setup.batch_size / res["fast_s"]
    res["single_image_latency_ratio"] = res["single_image_reference_s"] / res["single_image_fast_s"]
    res["speedup_vs_reference"] = res["fast_images_per_s"] / res["reference_images_per_s"]
    return res


def network_floor(
    setup: BenchmarkSetup, settings: FastSettings, fast_eps: EpsFn, images: torch.Tensor, res: dict
) -> dict[str, float]:
    """Seconds per network evaluation (one sample, one step) of each path, and the best the fast path could do.

    The floor is the fast path's own network call at the engine's tick size (best of 5, nothing else around it).
    Both paths make the same evaluations, so reference cost / floor bounds the speed-up: beating it takes fewer
    evaluations or a faster network, not a better engine.
    """
    calls = calls_per_start(setup.start_ts, setup.num_inference_steps, None, setup.schedule.num_train_timesteps)
    batch_calls = calls * setup.batch_size
    tick = balanced_tick_size(batch_calls) if settings.balanced else len(batch_calls)
    device = resolve_device(setup.device)
    warm_up(fast_eps, setup, images, tick)
    best = min(timed(lambda: warm_up(fast_eps, setup, images, tick), device)[0] for _ in range(5))
    return {
        "evaluations_per_image": sum(calls),
        "reference_ms_per_evaluation": 1000 * res["reference_s"] / (sum(calls) * setup.n_reference),
        "fast_ms_per_evaluation": 1000 * res["fast_s"] / sum(batch_calls),
        "floor_ms_per_evaluation": 1000 * best / tick,
        "floor_tick_size": tick,
    }


def format_report(setup: BenchmarkSetup, settings: FastSettings, res: dict) -> list[str]:
    """``key: value`` lines; ``speedup_vs_reference`` is the last one."""
    device = resolve_device(setup.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    check = "pass" if res["max_abs_diff_mse"] < FP32_TOLERANCE else "FAIL"
    lines = [
        f"device: {describe_device(device)}",
        f"torch: {torch.__version__}",
        f"load_average_1min: {load:.2f}",
        f"preset: {setup.model_config.preset}",
        f"image_shape: {'x'.join(str(s) for s in setup.image_shape)}",
        f"skip_factor: {setup.skip_factor}",
        f"num_inference_steps: {setup.num_inference_steps}",
        f"start_points: {len(setup.start_ts)}",
        f"batch_size: {setup.batch_size}",
        f"reference_images: {res['n_reference']}",
        "weights: random init (speed does not depend on training)",
        "reference_settings: fp32, plain model_eps_fn, one start point after another",
        f"fast_settings: {settings.describe()}",
    ]
    if settings.compile:
        lines.append(f"compile_s: {res['compile_s']:.1f}")
    lines += [
        f"max_abs_diff_recon: {res['max_abs_diff_recon']:.3e}",
        f"max_abs_diff_mse: {res['max_abs_diff_mse']:.3e}",
        f"fp32_check: {check} (max_abs_diff_mse < {FP32_TOLERANCE:g})",
    ]
    if settings.mixed:
        lines += [
            f"max_abs_diff_recon_amp: {res['max_abs_diff_recon_amp']:.3e}",
            f"max_abs_diff_mse_amp: {res['max_abs_diff_mse_amp']:.3e}",
        ]
    lines += [
        f"reference_s: {res['reference_s']:.2f}",
        f"fast_s: {res['fast_s']:.2f}",
        f"reference_images_per_s: {res['reference_images_per_s']:.3f}",
    ]
    if settings.mixed:
        lines += [
            f"fast_fp32_images_per_s: {res['fast_fp32_images_per_s']:.3f}",
            f"fast_fp32_speedup_vs_reference: {res['fast_fp32_speedup_vs_reference']:.2f}",
        ]
    lines += [
        f"fast_images_per_s: {res['fast_images_per_s']:.3f}",
        f"single_image_reference_s: {res['single_image_reference_s']:.2f}",
        f"single_image_fast_s: {res['single_image_fast_s']:.2f}",
        f"single_image_latency_ratio: {res['single_image_latency_ratio']:.2f}",
        f"evaluations_per_image: {res['evaluations_per_image']}",
        f"reference_ms_per_evaluation: {res['reference_ms_per_evaluation']:.3f}",
        f"fast_ms_per_evaluation: {res['fast_ms_per_evaluation']:.3f}",
        f"floor_ms_per_evaluation: {res['floor_ms_per_evaluation']:.3f} (one fast-path call of "
        f"{res['floor_tick_size']} samples)",
        f"speedup_bound_at_floor: {res['reference_ms_per_evaluation'] / res['floor_ms_per_evaluation']:.2f}",
        f"speedup_vs_reference: {res['speedup_vs_reference']:.2f}",
    ]
    return lines


# --- ablation: what pays on top of batching --------------------------------------------------------------------


def _images_per_s(
    setup: BenchmarkSetup, eps_fn: EpsFn, images: torch.Tensor, paths: Sequence[str], balanced: bool = True
) -> tuple:
    device = resolve_device(setup.device)
    warm_up(eps_fn, setup, images)
    seconds, out = timed(lambda: run_fast(eps_fn, setup, images, paths, balanced), device)
    return images.shape[0] / seconds, out


def run_ablation(setup: BenchmarkSetup, max_batches: Sequence[int] = (32, 64), with_compile: bool = False) -> list[str]:
    """Fast-path variants, each changed in ONE setting from fp32 / balanced / no chunking: ``name: images/s (x vs base), diff``.

    Plus forward-pass grad modes and LPIPS over all (image, t) rows in one batched call vs one call per start t.
    """
    device = resolve_device(setup.device)
    model = build_model(setup)
    images, paths = make_inputs(setup)
    base = FastSettings()
    low = "fp16" if device.type == "cuda" else "bf16"
    native = device.type == "cuda" or cpu_has_native_bf16()
    variants = [("fp32 (base)", base),
                (f"{low} ({'native' if native else 'emulated'})", dataclasses.replace(base, precision=low))]
    variants += [("unbalanced ticks", dataclasses.replace(base, balanced=False))]
    variants += [("channels_last", dataclasses.replace(base, channels_last=True))]
    variants += [(f"max_batch={m}", dataclasses.replace(base, max_batch=m)) for m in max_batches]
    if with_compile:
        variants += [("compile", dataclasses.replace(base, compile=True))]
    lines, base_rate, base_out = [], None, None
    for name, settings in variants:
        log(f"ablation: {name} ...")
        eps_fn = fast_eps_fn(model, setup, settings)
        extra = ""
        if settings.compile:
            compile_s, _ = timed(lambda eps_fn=eps_fn: run_fast(eps_fn, setup, images, paths), device)
            extra = f", first run incl. compile {compile_s:.1f} s"
        rate, out = _images_per_s(setup, eps_fn, images, paths, settings.balanced)
        if base_rate is None:
            base_rate, base_out = rate, out
        diff = differences(images, base_out, out)
        lines.append(
            f"ablation {name}: {rate:.3f} images/s ({rate / base_rate:.2f}x base), "
            f"max_abs_diff_mse vs base {diff['mse']:.1e}{extra}"
        )
    lines += _grad_mode_ablation(model, setup, images)
    lines += _lpips_ablation(setup, images, base_out)
    return lines


def _grad_mode_ablation(model: torch.nn.Module, setup: BenchmarkSetup, images: torch.Tensor) -> list[str]:
    """One forward pass of all (image, start t) samples under grad, no_grad and inference_mode."""
    device = resolve_device(setup.device)
    n = images.shape[0] * len(setup.start_ts)
    x = images[:1].expand(n, *images.shape[1:]).contiguous()
    t = torch.full((n,), setup.start_ts[-1], dtype=torch.long, device=device)
    modes = {"grad enabled": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    lines = []
    for name, mode in modes.items():
        with mode():
            model(x, timesteps=t)  # warm-up
            seconds, _ = timed(lambda: model(x, timesteps=t), device)
        lines.append(f"ablation forward {name}: {seconds * 1000:.0f} ms for {n} samples")
    return lines


def _lpips_ablation(setup: BenchmarkSetup, images: torch.Tensor, recons: torch.Tensor) -> list[str]:
    """LPIPS over every (start t, image) row: one batched call (metrics.py) vs one call per start t (upstream).

    LPIPS with lpips' random AlexNet trunk: the cost is the same as with the real weights (tests/benchmarks only).
    """
    from ddpm_ood.perceptual.lpips import build_lpips
    from ddpm_ood.reconstruction.metrics import ReconstructionMetrics

    device = resolve_device(setup.device)
    torch.manual_seed(setup.seed)
    metrics = ReconstructionMetrics(device, lpips_net=build_lpips(device, pretrained_backbone=False))
    flat = (-1, *images.shape[1:])
    originals = images.unsqueeze(0).expand_as(recons)
    metrics(originals[0], recons[0])  # warm-up
    batched_s, batched = timed(lambda: metrics(originals.reshape(flat), recons.reshape(flat)), device)
    per_t_s, per_t = timed(lambda: [metrics(originals[s], recons[s]) for s in range(recons.shape[0])], device)
    diff = max(
        float((batched[k].reshape(recons.shape[:2]) - torch.stack([p[k] for p in per_t])).abs().max()) for k in batched
    )
    return [
        f"ablation LPIPS+MSE batched over all (image, t): {batched_s:.2f} s; one call per start t: {per_t_s:.2f} s "
        f"({per_t_s / batched_s:.2f}x), max_abs_diff {diff:.1e}"
    ]


# --- command line ------------------------------------------------------------------------------------------------


SWITCH_CHOICES = ("auto", "0", "1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 4: finishes within ~3 minutes on 2 CPU cores")
    p.add_argument("--preset", type=str, choices=sorted(MODEL_PRESETS), default=None,
                   help="model preset (random init); default small, tiny with --quick")
    p.add_argument("--image_size", type=int, default=28, help="square image side in pixels (default 28)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="image channels (default 1)")
    p.add_argument("--skip_factor", type=int, default=4, help="start point every k-th grid point (default 4: 25 starts)")
    p.add_argument("--num_inference_steps", type=int, default=100, help="PLMS grid size (default 100)")
    p.add_argument("--batch_size", type=int, default=None, help="images per batch, same for both paths "
                   "(default 4 with --quick, else 1)")
    p.add_argument("--reference_images", type=int, default=None,
                   help="time the reference on the first N images of the batch only (default: all of them)")
    p.add_argument("--device", type=str, choices=DEVICE_CHOICES, default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", type=str, choices=("auto", *PRECISIONS), default="auto",
                   help="fast path precision: auto = the fastest this machine computes natively (bf16 only on a "
                   "CPU with AVX512-BF16/AMX, fp16 on CUDA, else fp32)")
    p.add_argument("--channels_last", type=str, choices=SWITCH_CHOICES, default="auto",
                   help="fast path channels_last memory format: auto = best for the device, 0, 1")
    p.add_argument("--compile", type=str, choices=SWITCH_CHOICES, default="auto",
                   help="fast path torch.compile (dynamic shapes): auto = best for the device, 0, 1")
    p.add_argument("--max_batch", type=int, default=None,
                   help="fast path: at most this many samples per network call (default: best for the device)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both paths (default: torch's choice, every core). On a machine "
                   "that other jobs share, 1 thread is steadier: benchmarks/README.md")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, images and noise (default 0)")
    p.add_argument("--ablation", action="store_true",
                   help="also measure, one by one, what pays on top of batching (bf16/fp16, channels_last, chunk size, "
                   "grad mode, LPIPS batching)")
    p.add_argument("--ablation_compile", action="store_true",
                   help="with --ablation: also torch.compile (several minutes of compilation on a small CPU)")
    return p


def setup_from_args(args: argparse.Namespace) -> tuple[BenchmarkSetup, FastSettings]:
    """(benchmark setup, fast-path settings) from parsed flags; bad values raise UserError."""
    preset = args.preset or ("tiny" if args.quick else "small")
    # Defaults sized for a 2-core CPU: --quick within 3 minutes, the small preset within 10 (benchmarks/README.md).
    batch_size = args.batch_size if args.batch_size is not None else (4 if args.quick else 1)
    for flag, value in (("--batch_size", batch_size), ("--skip_factor", args.skip_factor),
                        ("--image_size", args.image_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.max_batch is not None and args.max_batch < 1:
        raise UserError(f"--max_batch must be >= 1, got {args.max_batch}")
    if args.reference_images is not None and args.reference_images < 1:
        raise UserError(f"--reference_images must be >= 1, got {args.reference_images}")
    config = model_config_from_preset(preset, 2, args.channels)
    levels = len(config.channels) - 1
    if args.image_size % (2**levels):
        raise UserError(f"--image_size={args.image_size} must be divisible by {2**levels} for the {preset} preset")
    device = resolve_device(args.device)
    best = best_settings(device)
    settings = FastSettings(
        precision=best.precision if args.precision == "auto" else args.precision,
        channels_last=best.channels_last if args.channels_last == "auto" else args.channels_last == "1",
        compile=best.compile if args.compile == "auto" else args.compile == "1",
        max_batch=args.max_batch if args.max_batch is not None else best.max_batch,
    )
    setup = BenchmarkSetup(
        model_config=config,
        image_shape=(args.channels, args.image_size, args.image_size),
        batch_size=batch_size,
        skip_factor=args.skip_factor,
        num_inference_steps=args.num_inference_steps,
        reference_images=args.reference_images,
        seed=args.seed,
        device=str(device),
    )
    setup.start_ts  # noqa: B018 - validates skip factor / steps now, before any work
    return setup, settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        log(f"warning: load average {load:.2f} before starting: other jobs share the CPU and slow both paths unevenly")
    setup, settings = setup_from_args(args)
    started = time.perf_counter()
    res = run_benchmark(setup, settings)
    lines = format_report(setup, settings, res)
    if args.ablation:
        # Printed before the main report so that speedup_vs_reference stays the last line.
        for line in run_ablation(setup, with_compile=args.ablation_compile):
            print(line, flush=True)
    log(f"total wall time {time.perf_counter() - started:.0f} s")
    print("\n".join(lines), flush=True)
    return 0 if res["max_abs_diff_mse"] < FP32_TOLERANCE else 1


if __name__ == "__main__":
    from ddpm_ood.cli.runner import run_cli

    sys.exit(run_cli(main))
