"""The training data path, kept apart from the loop because its order is part of reproducibility: every epoch's
shuffle comes from DistributedSampler's seed + epoch (never the global RNG), an epoch resumed mid-way skips exactly
the batches already done, each rank reads a disjoint unpadded validation shard, and a worker's UserError reaches the
user as one line.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ddpm_ood.distributed import DistContext
from ddpm_ood.errors import UserError
from ddpm_ood.preemption import loader_worker_init
from ddpm_ood.seeding import derive_generator


def clean_loader_errors(batches: Iterable[dict]) -> Iterator[dict]:
    """Re-raise a UserError from a DataLoader worker as a one-line UserError (the worker wrapper adds the
    worker's traceback to the message)."""
    try:
        yield from batches
    except UserError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        prefix = "ddpm_ood.errors.UserError: "
        raise UserError(last[len(prefix):] if last.startswith(prefix) else last) from None


class _EpochSampler(DistributedSampler):
    """DistributedSampler whose epoch can start part-way: the first ``skip`` of this rank's indices (the batches a
    mid-epoch checkpoint has done) are left out. The order is DistributedSampler's (seeded with seed + epoch), so
    the rest are exactly the batches an uninterrupted epoch takes next."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


def make_loaders(train_set: Dataset, val_set: Dataset, ctx: DistContext, *, batch_size: int, num_workers: int,
                 seed: int, stream: int) -> tuple[_EpochSampler, DataLoader, DataLoader]:
    """(train sampler, train loader, validation loader) of this rank; the train loader's generator is keyed by
    (``seed``, ``stream``, rank)."""
    # DistributedSampler also with one process: its permutation comes from a generator seeded with
    # seed + epoch (set_epoch), so shuffling never depends on global RNG state.
    sampler = _EpochSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                            seed=seed, drop_last=False)
    common = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": ctx.device.type == "cuda",
        "worker_init_fn": loader_worker_init() if num_workers > 0 else None,
    }
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=False,
                              generator=derive_generator(seed, stream, ctx.rank), **common)
    # Validation shards are disjoint and unpadded (no repeated images), so sums over ranks are exact.
    val_shard = Subset(val_set, list(range(ctx.rank, len(val_set), ctx.world_size)))
    val_loader = DataLoader(val_shard, shuffle=False, drop_last=False, **common)
    return sampler, train_loader, val_loader
