"""Dataset families, one module each, and the registry that ``data.prepare`` dispatches through.

A family turns its raw files (present on disk, or downloaded where that is possible) into ``SplitSource``s: one per
split folder, each giving the uint8 array saved for image i. The five computer-vision sets of the paper are table
entries of ``torchvision_sets``; a new family adds a module and registers its names in ``_FAMILY_MODULES``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


class DatasetUnavailable(Exception):
    """A dataset whose raw files are neither present nor downloadable. The message is one line."""


@dataclass(frozen=True)
class SplitSource:
    """One torchvision split: ``count`` images, ``get(i)`` -> the uint8 array saved for image i.

    ``fingerprint`` identifies the content (a hash of the pixel data or of the file list), so a folder
    written from another source (e.g. the 5,000-digit MNIST subset) is rewritten instead of being reused.
    """

    folder: str
    count: int
    fingerprint: str
    get: Callable[[int], np.ndarray]


@dataclass(frozen=True)
class DatasetFamily:
    """How one family's datasets are opened. ``open(name, data_root, allow_download, timeout_s)`` returns the split
    sources or raises DatasetUnavailable (one line). ``csv_splits``: (source folder, CSV split) pairs when the
    dataset has official train/val/test partitions; None = val is 5% of the train folder, test the test folder."""

    open: Callable[[str, str, bool, float], list[SplitSource]]
    csv_splits: tuple[tuple[str, str], ...] | None = None


# dataset name -> the module of its family, which defines ``FAMILIES: dict[str, DatasetFamily]``.
_FAMILY_MODULES = {name: "ddpm_ood.data.sources.torchvision_sets"
                   for name in ("FashionMNIST", "MNIST", "CIFAR10", "SVHN", "CelebA")}
DATASETS = tuple(_FAMILY_MODULES)


def family_of(name: str) -> DatasetFamily:
    """The registry entry of dataset ``name`` (ValueError listing the accepted names otherwise)."""
    if name not in _FAMILY_MODULES:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    return importlib.import_module(_FAMILY_MODULES[name]).FAMILIES[name]


def one_line(exc: BaseException) -> str:
    """``"<ExceptionName>: <message on one line, at most 300 characters>"``."""
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:300]}"


def content_hash(*parts: bytes | str) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def array_sources(splits: dict[str, np.ndarray], to_saved: Callable[[np.ndarray], np.ndarray]) -> list[SplitSource]:
    out = []
    for folder, data in splits.items():
        data = np.ascontiguousarray(data)
        out.append(SplitSource(
            folder=folder,
            count=len(data),
            fingerprint=content_hash(str(data.shape), str(data.dtype), data.tobytes()),
            get=lambda i, d=data: to_saved(d[i]),
        ))
    return out


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's urlopen calls pass no timeout, so they use the process default.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)
