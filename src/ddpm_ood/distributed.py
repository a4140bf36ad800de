"""Distributed data parallel (DDP) set-up when started by ``torchrun``; a single-process context otherwise.

torchrun sets LOCAL_RANK, RANK and WORLD_SIZE (plus MASTER_ADDR/MASTER_PORT) in each worker's environment. The
process group uses NCCL on CUDA and gloo on CPU. Only rank 0 writes files (checkpoints, TensorBoard, CSVs); every
rank keeps its stdout/stderr, so an error on any rank reaches the user (upstream sent non-zero ranks to /dev/null).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from ddpm_ood.devices import resolve_device
from ddpm_ood.errors import UserError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` in [0, world_size), its ``device``, and whether DDP is active."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or torch_dist.is_available() and torch_dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and prints progress."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise UserError(f"environment variable {name} must be an integer when started by torchrun, "
                        f"got {os.environ.get(name)!r}") from None


def init_distributed(device_name: str) -> DistContext:
    """Start the process group if torchrun launched us, else return a single-process context on ``device_name``."""
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device_name))
    local_rank = _env_int("LOCAL_RANK")
    world_size = _env_int("WORLD_SIZE")
    rank = int(os.environ.get("RANK", local_rank))
    device = resolve_device(device_name, local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch_dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                      **kwargs)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    """Destroy the process group if one is active (safe to call always)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        torch_dist.barrier()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few floats over all ranks (float64 so sums of per-image losses lose nothing); identity without DDP."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself without DDP."""
    if not ctx.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without DDP."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered
