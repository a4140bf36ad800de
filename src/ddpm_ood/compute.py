"""How a stage computes (``ComputeOptions``): one value shared by training, reconstruct.py and score.py.

None of it changes a number beyond float rounding except the precision (recorded with every results file). Each stage
holds its own default instance (reconstruct.py batches 256 images, score.py 64), and its flags read their defaults
from that instance."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ddpm_ood.devices import Precision, resolve_precision
from ddpm_ood.distributed import DEFAULT_DIST_TIMEOUT_S, DistContext, check_shared_folder, init_distributed
from ddpm_ood.errors import ParameterError


@dataclass(frozen=True)
class ComputeOptions:
    """``device``: "auto" (CUDA if available), "cpu" or "cuda". ``precision`` / ``amp``: ``devices.resolve_precision``
    (``amp`` None: not asked; the scorer then uses the validation files' precision). ``batch_size``: images loaded
    and processed together (inference stages; training's batch size is part of its recipe, ``TrainConfig``).
    ``max_batch``: most samples per network call (None: unbounded on a CPU, sized from free memory on CUDA).
    ``num_workers``: data-loader processes (training records them in ``TrainConfig``). ``cache_data``: keep decoded
    images in memory after the first epoch or pass. ``dist_timeout``: seconds a torchrun rank waits for the others."""

    device: str = "auto"
    precision: str | None = None
    amp: bool | None = False
    batch_size: int = 64
    max_batch: int | None = None
    num_workers: int = 8  # upstream's; the CLI caps it at this machine's cores (devices.default_num_workers)
    cache_data: bool = True
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ParameterError(f"batch_size must be >= 1, got {self.batch_size}", "batch_size")
        if self.max_batch is not None and self.max_batch < 1:
            raise ParameterError(f"max_batch must be >= 1, got {self.max_batch}", "max_batch")
        if self.num_workers < 0:
            raise ParameterError(f"num_workers must be >= 0, got {self.num_workers}", "num_workers")

    def launch(self, shared_folder: str | os.PathLike, flag: str) -> tuple[DistContext, Precision]:
        """Join the launch on ``device`` (``distributed.init_distributed``: this process alone unless torchrun
        started it), check that every rank sees ``shared_folder`` (which must exist; UserError naming ``flag``
        otherwise) and resolve the precision for the launch's device. The caller tears the process group down
        (``distributed.cleanup_distributed``), also when this raises."""
        ctx = init_distributed(self.device, self.dist_timeout)
        check_shared_folder(shared_folder, ctx, flag)
        return ctx, resolve_precision(ctx.device, precision=self.precision, amp=bool(self.amp))
