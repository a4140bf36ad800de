"""Device and mixed-precision selection, shared by training and reconstruction.

Mixed precision is opt-in (``--amp=1``): fp16 autocast (with a GradScaler when training) on CUDA, bf16 autocast on
CPU (no scaler: bf16 has fp32's exponent range). Losses are always computed in fp32.
"""

from __future__ import annotations

import contextlib

import torch

from ddpm_ood.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a UserError.

    ``local_rank`` (from torchrun's LOCAL_RANK) picks ``cuda:<local_rank>``; it is ignored on CPU.
    """
    if name not in DEVICE_CHOICES:
        raise UserError(f"--device: unknown device {name!r}; accepted: {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device=cuda was asked for but no CUDA GPU is available; use --device=cpu or auto")
    index = 0 if local_rank is None else local_rank
    if index >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK={index} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype used with ``--amp=1`` on ``device``: float16 on CUDA, bfloat16 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast for the network's forward pass: fp16 on CUDA, bf16 on CPU, a no-op when ``enabled`` is False."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def make_grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 training on CUDA; None otherwise (fp32, or bf16 on CPU, need no loss scaling)."""
    if enabled and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
