"""Device and numeric-precision selection: the one precision rule, shared by every stage.

Precision is one named setting, recorded in checkpoints and results sidecars:

- ``fp32``: IEEE fp32 everywhere. On CUDA, TF32 matmuls and cuDNN convolutions are switched OFF (PyTorch enables
  TF32 for cuDNN convolutions by default), so "same numbers" claims hold on Ampere/Hopper too.
- ``tf32``: fp32 storage, TF32 tensor-core matmuls and convolutions (CUDA only).
- ``bf16``: bf16 autocast for the network's forward pass (no loss scaling: bf16 has fp32's exponent range).
- ``fp16``: fp16 autocast (CUDA only), with a GradScaler when training.

``--amp=1`` means "the fastest precision this device computes natively": fp16 on CUDA (upstream's AMP), bf16 on a
CPU with native bf16 (AVX512-BF16 or AMX), otherwise fp32, said in one line. On a CPU without native bf16 (most
AVX2 machines), oneDNN emulates bf16 and a forward pass is 20-30x slower than fp32: never chosen silently.
Losses and reconstruction metrics are always computed in fp32.

How many samples one network call takes on a GPU is a device decision too: without ``--max_batch`` it is sized
from the free GPU memory (``memory_sized_max_batch``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from ddpm_ood.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
Precision = Literal["fp32", "tf32", "bf16", "fp16"]
# Set to 0 or 1 to override the detection of native bf16 on this CPU (benchmarks, or a misdetected CPU).
CPU_BF16_ENV = "DDPM_OOD_CPU_NATIVE_BF16"

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a UserError.

    ``local_rank`` (from torchrun's LOCAL_RANK) picks ``cuda:<local_rank>``; it is ignored on CPU. With one visible
    GPU per process (a scheduler that sets CUDA_VISIBLE_DEVICES per task), every rank uses ``cuda:0``.
    ``auto`` falling back to the CPU while a GPU is present (for example a driver too old for this CUDA build) is
    a loud warning on stderr.
    """
    if name not in DEVICE_CHOICES:
        raise UserError(f"--device: unknown device {name!r}; accepted: {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu" and _gpu_present_but_unusable():
            print("WARNING: an NVIDIA GPU is present but PyTorch cannot use it (driver too old for this CUDA build "
                  f"{torch.version.cuda}?); running on the CPU", file=sys.stderr)
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device=cuda was asked for but no CUDA GPU is available; use --device=cpu or auto")
    count = torch.cuda.device_count()
    index = 0 if local_rank is None else local_rank
    if index >= count:
        if count == 1:
            index = 0  # one visible GPU per process: CUDA_VISIBLE_DEVICES already picked it
        else:
            raise UserError(f"LOCAL_RANK={index} but only {count} CUDA device(s) are visible")
    return torch.device("cuda", index)


def _gpu_present_but_unusable() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")


def describe_device(device: torch.device) -> str:
    """One line naming the device, e.g. ``cpu (AMD EPYC, AVX512, native bf16, 2 cores, 2 threads)`` or
    ``cuda:0 (NVIDIA H200, CUDA 13.0)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return (f"cpu ({_cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {native}, {available_cpus()} cores, "
            f"{torch.get_num_threads()} threads)")


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), read from the CPU's feature flags.

    Not oneDNN's ``_is_mkldnn_bf16_supported``, which is also true on AVX-512 CPUs without bf16 instructions
    (Skylake to Ice Lake), where bf16 is emulated. ``DDPM_OOD_CPU_NATIVE_BF16=0/1`` overrides the detection.
    """
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None and forced.strip() != "":
        return forced.strip().lower() in ("1", "true", "yes")
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def fastest_native_precision(device: torch.device) -> tuple[Precision, str | None]:
    """What ``--amp=1`` means on ``device``: (precision, a one-line note when it is not the usual choice)."""
    if device.type == "cuda":
        return "fp16", None
    if cpu_has_native_bf16():
        return "bf16", None
    return "fp32", "bf16 is emulated on this CPU (no AVX512-BF16/AMX; 20-30x slower than fp32): using fp32"


def resolve_precision(device: torch.device, *, precision: str | None = None, amp: bool = False) -> Precision:
    """The precision a stage runs with: ``precision`` if given, else ``--amp=1``'s fastest native one, else fp32.

    UserError for an unknown name, for tf32/fp16 on a CPU, for fp16/bf16 on a GPU that lacks them, and for
    ``--precision`` contradicting ``--amp=1`` (fp32 or tf32 with amp). Explicit bf16 on a CPU that emulates it is
    obeyed with a warning. Prints one line when ``--amp=1`` resolves to something other than its usual meaning.
    """
    if precision is None:
        if not amp:
            return "fp32"
        chosen, note = fastest_native_precision(device)
        if note:
            print(f"note: --amp=1: {note}", file=sys.stderr)
        return chosen
    if precision not in PRECISIONS:
        raise UserError(f"--precision: unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
    if amp and precision in ("fp32", "tf32"):
        raise UserError(f"--amp=1 (mixed precision) contradicts --precision={precision}; give one of them")
    if device.type == "cpu":
        if precision in ("tf32", "fp16"):
            raise UserError(f"--precision={precision} is for CUDA GPUs; on a CPU use fp32 or bf16")
        if precision == "bf16" and not cpu_has_native_bf16():
            print("WARNING: --precision=bf16 on a CPU without native bf16: oneDNN emulates it, about 20-30x "
                  "slower than fp32", file=sys.stderr)
    elif precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision=bf16: {torch.cuda.get_device_name(device)} does not support bf16; use fp16")
    return precision  # type: ignore[return-value]


def configure_precision(precision: str, device: torch.device) -> None:
    """Set the process-wide TF32 switches for ``precision`` (on CUDA, TF32 only for ``tf32``). For training, whose
    backward pass runs outside any context; inference uses the scoped :func:`autocast_context`."""
    if device.type == "cuda":
        _set_tf32(precision == "tf32")


def _set_tf32(allow: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow


@contextlib.contextmanager
def _tf32_switches(allow: bool) -> Iterator[None]:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    _set_tf32(allow)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The network's forward pass in ``precision``: bf16/fp16 autocast, and on CUDA the TF32 switches (on for
    ``tf32`` only) set for the duration and restored after, so two models at other precisions in one process do
    not leak into each other. A no-op for fp32 and tf32 on a CPU."""
    stack = contextlib.ExitStack()
    if device.type == "cuda":
        stack.enter_context(_tf32_switches(precision == "tf32"))
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is not None:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    return stack


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 training on CUDA; None otherwise (fp32, tf32 and bf16 need no loss scaling)."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


# Share of the free GPU memory that one network call may take when max_batch is not given (the rest: the engine's
# per-trajectory state, LPIPS, the allocator's fragmentation).
MEMORY_FRACTION = 0.6


def max_batch_for_memory(free_bytes: int, bytes_per_sample: float, fraction: float = MEMORY_FRACTION) -> int:
    """Samples per network call that use at most ``fraction`` of ``free_bytes`` at ``bytes_per_sample`` each
    (at least 1)."""
    return max(1, int(fraction * free_bytes / max(bytes_per_sample, 1.0)))


def memory_sized_max_batch(model: torch.nn.Module, sample_shape: tuple[int, ...], device: torch.device,
                           autocast: Callable[[], contextlib.AbstractContextManager], probe: int = 8) -> int:
    """Samples per network call sized from the free GPU memory: the peak memory of one forward pass of ``probe``
    samples gives the bytes per sample, and calls may use ``MEMORY_FRACTION`` of what is free. Said in one line.
    Chunking changes numbers only by float rounding (the kernels round differently for other call sizes, about
    1e-6 in fp32), as any other batch composition does."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x = torch.zeros((probe, *sample_shape), device=device)
    t = torch.zeros((probe,), dtype=torch.long, device=device)
    with torch.inference_mode(), autocast():
        model(x, timesteps=t)
    torch.cuda.synchronize(device)
    per_sample = (torch.cuda.max_memory_allocated(device) - base) / probe
    free, _ = torch.cuda.mem_get_info(device)
    chosen = max_batch_for_memory(free, per_sample)
    print(f"samples per network call: at most {chosen} (sized from {free / 2**30:.1f} GiB free GPU memory, "
          f"{per_sample / 2**20:.1f} MiB per sample; --max_batch sets it)")
    return chosen


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def default_num_workers(upstream_default: int = 8, processes_sharing: int = 1) -> int:
    """Data-loader workers when ``--num_workers`` is not given: upstream's default, capped at the cores each of
    ``processes_sharing`` processes (torchrun ranks on this machine) has beside its own main thread."""
    return max(0, min(upstream_default, available_cpus() // max(processes_sharing, 1) - 1))
