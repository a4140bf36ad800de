"""Distributed data parallel (DDP) set-up when started by ``torchrun``; a single-process context otherwise.

torchrun sets LOCAL_RANK, RANK and WORLD_SIZE (plus MASTER_ADDR/MASTER_PORT) in each worker's environment. The
process group uses NCCL on CUDA and gloo on CPU. The GLOBAL rank decides who writes: only rank 0 writes files
(checkpoints, TensorBoard, CSVs), so on several nodes the output directory must be on a filesystem every node shares
(``check_shared_folder`` refuses otherwise); the LOCAL rank decides the device (``cuda:<LOCAL_RANK>``). Every rank
keeps its stdout/stderr, so an error on any rank reaches the user (upstream sent non-zero ranks to /dev/null).

Restarts and hangs (``torchrun --max_restarts=K``): torchrun's rendezvous shares ONE key-value store with every
generation of workers it starts (``TORCHELASTIC_USE_AGENT_STORE``), and ``init_process_group`` writes the same keys
in every generation; a restarted worker could read the address its dead predecessor published and fail ("Gloo
connectFullMesh failed ... Connection refused") or hang. Our workers prefix their keys with the restart count
(``TORCHELASTIC_RESTART_COUNT``), which all workers of one torchrun agent share; with several agents (nodes) the
counts may differ, so there torchrun must be told to start a fresh store per generation
(``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, docs/cluster.md). Every wait is bounded by the process-group timeout
(``--dist_timeout``): a start-up that does not complete within it ends the process (exit status 1), a collective
that does not complete raises, and torchrun restarts the workers.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from ddpm_ood.devices import resolve_device
from ddpm_ood.errors import UserError

# torch's own default for gloo: long enough for the work only rank 0 does while the others wait (the sample grid of a
# 3D model, writing a large checkpoint); lower it to find a hang sooner.
DEFAULT_DIST_TIMEOUT_S = 1800.0
# Exit status of a start-up that did not complete within --dist_timeout (any failure: torchrun restarts the workers).
EXIT_START_TIMEOUT = 1
# CPU collectives (stop flags, small sums) go through a gloo group also when the main group is NCCL: no GPU sync.
_host_group: Any = None


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` in [0, world_size), its ``device``, and whether DDP is active."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    restart_count: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: worker-group restarts so far

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


def init_distributed(device_name: str, timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> DistContext:
    """Start the process group if torchrun launched us, else return a single-process context on ``device_name``.

    ``timeout_s`` (``--dist_timeout``) bounds every collective, and the start-up as a whole: joining the group and a
    first barrier of all ranks. A start-up that does not finish in time ends this process with exit status 1 (a hang
    in C++ cannot be interrupted otherwise), so that torchrun restarts the workers."""
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device_name))
    if not timeout_s > 0:
        raise UserError(f"--dist_timeout must be a positive number of seconds, got {timeout_s}")
    local_rank = _env_int("LOCAL_RANK")
    world_size = _env_int("WORLD_SIZE")
    rank = int(os.environ.get("RANK", local_rank))
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    device = resolve_device(device_name, local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        global _host_group
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        timeout = timedelta(seconds=timeout_s)
        with _exit_unless_done_within(timeout_s, f"rank {rank}: joining the process group of {world_size} ranks"):
            store = _worker_store(world_size, restart_count, timeout)
            if store is not None:
                kwargs["store"] = store
            else:
                kwargs["init_method"] = "env://"
            torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                          **kwargs)
            _host_group = torch_dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
            # Every rank has arrived (a missing one is named by rank 0) before any long work starts.
            torch_dist.monitored_barrier(group=_host_group, timeout=timeout, wait_all_ranks=True)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                       restart_count=restart_count)


def _worker_store(world_size: int, restart_count: int, timeout: timedelta) -> Any:
    """torchrun's shared store with this worker generation's own key prefix, or None (``env://``) when torchrun
    gives each generation a fresh store (or did not start us under a rendezvous)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), world_size, is_master=False,
                                timeout=timeout)
    return torch_dist.PrefixStore(f"ddpm_ood/restart_{restart_count}", store)


@contextmanager
def _exit_unless_done_within(seconds: float, what: str) -> Iterator[None]:
    """Run the block; if it has not finished after ``seconds``, say so on stderr and end the process at once."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            sys.stderr.write(f"error: {what} did not complete within --dist_timeout={seconds:g} s; exiting so that "
                             "torchrun can restart the workers\n")
            sys.stderr.flush()
            os._exit(EXIT_START_TIMEOUT)

    watcher = threading.Thread(target=watch, name="ddpm-ood-start-timeout", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def multi_node_restart_note(ctx: DistContext) -> str | None:
    """A warning when restarts over several nodes rely on torchrun's shared store (see the module docstring)."""
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size) or ctx.world_size)
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and local_size < ctx.world_size
            and restarts > 0):
        return ("note: torchrun on several nodes with --max_restarts shares one store across worker generations, "
                "which can make a restart fail or hang; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun "
                "(docs/cluster.md)")
    return None


def cleanup_distributed() -> None:
    """Destroy the process group if one is active (safe to call always)."""
    global _host_group
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _host_group = None


def any_rank(flags: Sequence[bool], ctx: DistContext) -> list[bool]:
    """For each flag, whether it is set on at least one rank (a CPU collective every rank must call at the same
    point); the flags themselves without DDP."""
    if not ctx.distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=_host_group)
    return [bool(v) for v in t.tolist()]


def check_shared_folder(folder: str | os.PathLike, ctx: DistContext, flag: str, wait_s: float = 5.0) -> None:
    """UserError on every rank unless every rank sees the file rank 0 writes in ``folder``: only rank 0 writes, so on
    several nodes ``folder`` must be on a filesystem every node shares, at the same path. A rank that does not see
    the file yet looks again for ``wait_s`` seconds (network filesystems cache directory listings)."""
    if not ctx.distributed or ctx.world_size == 1:
        return
    folder = Path(folder)
    probe = folder / f".shared-folder-check.{broadcast_object(uuid.uuid4().hex, ctx)}"
    host = socket.gethostname()
    if ctx.is_main:
        probe.write_text(host)
    barrier(ctx)
    deadline = time.monotonic() + wait_s
    while not probe.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = gather_objects((ctx.rank, host, probe.is_file()), ctx)
    if ctx.is_main:
        probe.unlink(missing_ok=True)
    missing = [(rank, where) for rank, where, ok in seen if not ok]
    if missing:
        ranks = ", ".join(f"{rank} (host {where})" for rank, where in missing)
        raise UserError(f"{flag}: ranks see different folders at {folder}: rank(s) {ranks} do not see the file rank 0 "
                        f"(host {seen[0][1]}) wrote there; under torchrun on several nodes the output directory "
                        "must be on a filesystem every node mounts at the same path (an absolute path)")


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a CPU barrier: no GPU sync); a no-op without DDP."""
    if ctx.distributed:
        torch_dist.barrier(group=_host_group)


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
