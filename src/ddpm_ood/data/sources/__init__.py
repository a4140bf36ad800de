"""Dataset families, one module each, and the registry that ``data.stage`` dispatches through.

A family is one of two kinds:

* array families turn their raw files (present on disk, or downloaded where that is possible) into ``SplitSource``s,
  one per split folder, each giving the uint8 array saved as ``.npy`` for image i: the five computer-vision sets of
  the paper (``torchvision_sets``) and the 3D MedMNIST sets (``medmnist3d``);
* file families list image files that are used as they are (no re-encoding): MedNIST's JPEGs (``mednist``) and the
  Medical Segmentation Decathlon's NIfTI volumes (``decathlon``).

Each family's files live in a folder under the data root D, laid out as the library that downloads them lays them
out (``DatasetFamily.folder``: "" = D itself). A new family adds a module and registers its names in
``_FAMILY_MODULES``; ``GROUPS`` names the families on the command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


class DatasetUnavailable(Exception):
    """A dataset whose raw files are neither present nor downloadable. The message is one line."""


@dataclass(frozen=True)
class SplitSource:
    """One split folder of an array family: ``count`` images, ``get(i)`` -> the uint8 array saved for image i.

    ``fingerprint`` identifies the content (a hash of the pixel data or of the file list), so a folder
    written from another source (e.g. the 5,000-digit MNIST subset) is rewritten instead of being reused.
    """

    folder: str
    count: int
    fingerprint: str
    get: Callable[[int], np.ndarray]


SplitFiles = dict[str, list[str]]  # CSV split ("train", "val", "test") -> image paths, in CSV order


@dataclass(frozen=True)
class DatasetFamily:
    """How one family's datasets are obtained; exactly one of ``open`` and ``list_files`` is set. Both are called as
    ``f(name, root, allow_download, timeout_s)`` with ``root`` = the family's folder (``source_root``) and raise
    DatasetUnavailable (one line: the dataset, where its files were expected, why) when the files can be neither found
    nor downloaded.

    ``open``: the split sources whose arrays are written as .npy (array families). ``csv_splits``: (source folder,
    CSV split) pairs when the dataset has official train/val/test partitions; None = val is 5% of the train folder,
    test the test folder. ``list_files``: the train/val/test lists of existing image files (file families).
    ``folder``: the family's folder under the data root ("" = the data root itself).
    """

    open: Callable[[str, str, bool, float], list[SplitSource]] | None = None
    csv_splits: tuple[tuple[str, str], ...] | None = None
    list_files: Callable[[str, str, bool, float], SplitFiles] | None = None
    folder: str = ""

    def __post_init__(self) -> None:
        if (self.open is None) == (self.list_files is None):
            raise ValueError("a DatasetFamily needs exactly one of open (arrays) and list_files (existing files)")

    def source_root(self, data_root: str | os.PathLike) -> str:
        """The family's folder under ``data_root`` (relative if ``data_root`` is, so the CSVs keep it relative)."""
        return os.path.join(str(data_root), self.folder) if self.folder else str(data_root)


COMPUTER_VISION = ("FashionMNIST", "MNIST", "CIFAR10", "SVHN", "CelebA")
# MONAI's MedNIST: one folder of 64x64 grayscale JPEGs per class.
MEDNIST_CLASSES = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
# The Medical Segmentation Decathlon, as MONAI's DecathlonDataset names its tasks.
DECATHLON_TASKS = ("Task01_BrainTumour", "Task02_Heart", "Task03_Liver", "Task04_Hippocampus", "Task05_Prostate",
                   "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon")
# The 3D MedMNIST sets (28^3 volumes), by the medmnist package's flags (= their .npz file names).
MEDMNIST3D_SETS = ("organmnist3d", "nodulemnist3d", "fracturemnist3d", "adrenalmnist3d", "vesselmnist3d",
                   "synapsemnist3d")

# dataset name -> the module of its family, which defines ``FAMILIES: dict[str, DatasetFamily]``. Modules are
# imported on first use (their libraries are heavy); the names are listed here so that parsing needs no import.
_FAMILY_MODULES = {
    **dict.fromkeys(COMPUTER_VISION, "ddpm_ood.data.sources.torchvision_sets"),
    **dict.fromkeys(MEDNIST_CLASSES, "ddpm_ood.data.sources.mednist"),
    **dict.fromkeys(DECATHLON_TASKS, "ddpm_ood.data.sources.decathlon"),
    **dict.fromkeys(MEDMNIST3D_SETS, "ddpm_ood.data.sources.medmnist3d"),
}
DATASETS = tuple(_FAMILY_MODULES)
# Names that stand for several datasets on the command line (``--datasets=Decathlon``).
GROUPS: dict[str, tuple[str, ...]] = {
    "MedNIST": MEDNIST_CLASSES,
    "Decathlon": DECATHLON_TASKS,
    "MedMNIST3D": MEDMNIST3D_SETS,
    "all": DATASETS,
}


def family_of(name: str) -> DatasetFamily:
    """The registry entry of dataset ``name`` (ValueError listing the accepted names otherwise)."""
    if name not in _FAMILY_MODULES:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    return importlib.import_module(_FAMILY_MODULES[name]).FAMILIES[name]


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
