"""The five computer-vision sets of the paper (FashionMNIST, MNIST, CIFAR10, SVHN, CelebA) through torchvision:
one table entry each (where the raw files live, which constructor keywords make each split, how an item is saved).

Raw files where torchvision keeps them: ``D/{MNIST,FashionMNIST}/raw`` (torchvision root = D),
``D/CIFAR10/raw/cifar-10-batches-py``, ``D/SVHN/raw/{train,test}_32x32.mat``,
``D/CelebA/raw/celeba/{img_align_celeba/,list_*.txt,identity_CelebA.txt}``. Images are saved uint8, (28, 28) for
the MNISTs, (3, 32, 32) CHW for CIFAR10, SVHN and CelebA (CelebA squashed from 178x218 to 32x32 by PIL bicubic,
aspect not kept). Raw files already present are used without any network access; otherwise torchvision downloads
them (with a short socket timeout so an offline machine fails fast).
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddpm_ood.data.sources import (
    DatasetFamily,
    DatasetUnavailable,
    SplitSource,
    array_sources,
    content_hash,
    socket_timeout,
)
from ddpm_ood.errors import one_line
from ddpm_ood.fileio import atomic_path

CELEBA_SIZE = 32
CELEBA_SPLITS = (("train", "train"), ("valid", "val"), ("test", "test"))


@dataclass(frozen=True)
class TorchvisionSet:
    """One torchvision dataset. ``raw``: the raw-file folder under the data root; ``root_is_data_root``: torchvision's
    ``root`` is D itself (the MNISTs) rather than ``D/<Name>/raw``; ``splits``: source folder -> the constructor
    keywords of that split; ``to_saved``: an item of the torchvision ``data`` array -> the saved uint8 array (None:
    the split is read from image files, CelebA); ``gz``: raw .gz archives present are decompressed here first."""

    raw: tuple[str, ...]
    root_is_data_root: bool
    splits: dict[str, dict]
    to_saved: Callable[[np.ndarray], np.ndarray] | None
    gz: bool = False


_TRAIN_TEST = {"train": {"train": True}, "test": {"train": False}}
TORCHVISION_SETS: dict[str, TorchvisionSet] = {
    "FashionMNIST": TorchvisionSet(("FashionMNIST", "raw"), True, _TRAIN_TEST, lambda a: a, gz=True),
    "MNIST": TorchvisionSet(("MNIST", "raw"), True, _TRAIN_TEST, lambda a: a, gz=True),
    # torchvision holds CIFAR10 as HWC; saved CHW as upstream.
    "CIFAR10": TorchvisionSet(("CIFAR10", "raw", "cifar-10-batches-py"), False, _TRAIN_TEST,
                              lambda a: a.transpose(2, 0, 1)),
    "SVHN": TorchvisionSet(("SVHN", "raw"), False, {"train": {"split": "train"}, "test": {"split": "test"}},
                           lambda a: a),  # already CHW
    "CelebA": TorchvisionSet(("CelebA", "raw", "celeba"), False,
                             {folder: {"split": folder, "target_type": []} for folder, _ in CELEBA_SPLITS}, None),
}


def raw_dir(data_root: str | os.PathLike, name: str) -> Path:
    """Where torchvision expects the raw files of ``name`` under ``data_root`` (used in messages and tests)."""
    return Path(data_root).joinpath(*TORCHVISION_SETS[name].raw)


def torchvision_root(data_root: str | os.PathLike, name: str) -> str:
    """The ``root`` given to the torchvision class (as upstream: D for the MNISTs, D/<Name>/raw otherwise)."""
    return str(data_root) if TORCHVISION_SETS[name].root_is_data_root else str(Path(data_root) / name / "raw")


def _expected_files(name: str) -> str:
    import torchvision.datasets as tvd

    if TORCHVISION_SETS[name].gz:
        return ", ".join(f"{n.removesuffix('.gz')}[.gz]" for n, _ in getattr(tvd, name).resources)
    if name == "CIFAR10":
        return ", ".join(n for n, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list) + ", batches.meta"
    if name == "SVHN":
        return "train_32x32.mat, test_32x32.mat"
    return "img_align_celeba/, " + ", ".join(f for _, _, f in tvd.CelebA.file_list if not f.endswith(".zip"))


def decompress_present_gz(raw: Path, names: Sequence[str]) -> None:
    """Extract each ``<name>.gz`` in ``raw`` whose extracted file is missing, atomically.

    torchvision only extracts a present .gz whose md5 matches its own table and downloads otherwise; Debian's
    ``dataset-fashion-mnist`` ships the same data recompressed (different md5), and test fixtures are small,
    so the archives present are extracted here and torchvision then finds the raw IDX files.
    """
    for gz_name in names:
        target = raw / gz_name.removesuffix(".gz")
        gz = raw / gz_name
        if gz_name.endswith(".gz") and not target.exists() and gz.is_file():
            try:
                with gzip.open(gz, "rb") as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (OSError, EOFError) as exc:
                if isinstance(exc, OSError) and exc.filename == str(target):
                    raise  # writing failed (a full disk, ...), not the archive: the error boundary says so
                raise DatasetUnavailable(f"{gz}: cannot be decompressed ({one_line(exc)})") from None


def _celeba_source(ds, folder: str) -> SplitSource:
    from PIL import Image

    img_dir = Path(ds.root) / ds.base_folder / "img_align_celeba"
    files = list(ds.filename)

    def get(i: int) -> np.ndarray:
        path = img_dir / files[i]
        try:
            with Image.open(path) as im:
                # Squash to 32x32 (no crop, aspect not kept) with bicubic, PIL's default resize filter upstream used.
                small = im.convert("RGB").resize((CELEBA_SIZE, CELEBA_SIZE), Image.Resampling.BICUBIC)
        except Exception as exc:
            raise DatasetUnavailable(f"CelebA: {path}: cannot be read ({one_line(exc)})") from None
        return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)

    return SplitSource(folder, len(files), content_hash(f"bicubic{CELEBA_SIZE}\n", "\n".join(files)), get)


def _open_torchvision(name: str, data_root: str, download: bool) -> list[SplitSource]:
    """Build the torchvision datasets of ``name``, one per split (raises whatever torchvision raises)."""
    import torchvision.datasets as tvd

    spec = TORCHVISION_SETS[name]
    cls = getattr(tvd, name)
    root = torchvision_root(data_root, name)
    opened = {folder: cls(root, download=download, **kwargs) for folder, kwargs in spec.splits.items()}
    if spec.to_saved is None:
        return [_celeba_source(ds, folder) for folder, ds in opened.items()]
    arrays = {folder: ds.data.numpy() if hasattr(ds.data, "numpy") else ds.data for folder, ds in opened.items()}
    return array_sources(arrays, spec.to_saved)


def open_dataset(name: str, data_root: str, allow_download: bool, timeout_s: float) -> list[SplitSource]:
    """The splits of ``name``: from raw files already present, else downloaded by torchvision.

    Raises DatasetUnavailable (one line: the dataset, where its files were expected, and why) if neither works.
    """
    raw = raw_dir(data_root, name)
    if TORCHVISION_SETS[name].gz:
        import torchvision.datasets as tvd

        decompress_present_gz(raw, [n for n, _ in getattr(tvd, name).resources])
    try:
        return _open_torchvision(name, data_root, download=False)
    except Exception as exc:  # torchvision: RuntimeError "not found or corrupted"; parsers: various
        local_error = exc
    where = f"{name}: raw files not found or unreadable in {raw} (expected {_expected_files(name)})"
    if not allow_download:
        raise DatasetUnavailable(f"{where}; download disabled ({one_line(local_error)})")
    print(f"{name}: raw files not found in {raw}; downloading with torchvision ...", flush=True)
    try:
        with socket_timeout(timeout_s):
            return _open_torchvision(name, data_root, download=True)
    except Exception as exc:
        raise DatasetUnavailable(f"{where}, and the download failed ({one_line(exc)})") from None


FAMILIES: dict[str, DatasetFamily] = {
    name: DatasetFamily(open=open_dataset, csv_splits=CELEBA_SPLITS if name == "CelebA" else None)
    for name in TORCHVISION_SETS
}
