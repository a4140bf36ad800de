"""MONAI's MedNIST: six classes of 64x64 grayscale JPEGs (AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT), each an
in-distribution set whose OOD sets are the other five (upstream's ``src/data/get_mednist_datasets.py``).

Files as MONAI's ``MedNISTDataset`` downloads them into its ``root_dir`` (here the data root D):
``D/MedNIST/<Class>/*.jpeg``, or the archive ``D/MedNIST.tar.gz``. The JPEGs are used as they are: the split CSVs
``D/data_splits/<Class>_{train,val,test}.csv`` list them (no re-encoding).

Split: MONAI's rule and numbers (seed 0, a ``RandomState`` shuffle, the first 10% test, the next 10% val, the rest
train), applied to each class's SORTED file list. MONAI itself splits the files in ``Path.iterdir()`` order, which
depends on the file system, so its (and upstream's) split differs between machines; this one does not. Per class,
so each class keeps exactly 10%/10%.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ddpm_ood.data.sources import MEDNIST_CLASSES, DatasetFamily, DatasetUnavailable, SplitFiles
from ddpm_ood.data.sources.archives import obtain_folder

FOLDER = "MedNIST"  # MedNISTDataset.dataset_folder_name
ARCHIVE = "MedNIST.tar.gz"  # MedNISTDataset.compressed_file_name
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SEED = 0  # MedNISTDataset's default seed, as upstream
VAL_FRACTION = 0.1  # MedNISTDataset's defaults
# Images per class in MONAI's MedNIST (58,954 in all): a folder with other counts is a partial or foreign copy.
CLASS_SIZES = {"AbdomenCT": 10000, "BreastMRI": 8954, "CXR": 10000, "ChestCT": 10000, "Hand": 10000, "HeadCT": 10000}
TEST_FRACTION = 0.1


def monai_split(paths: list[str], seed: int = SEED, val_frac: float = VAL_FRACTION,
                test_frac: float = TEST_FRACTION) -> SplitFiles:
    """MedNISTDataset's split of a list: shuffle the indices with ``RandomState(seed)``; the first
    ``int(n * test_frac)`` are test, the next ``int(n * val_frac)`` val, the rest train (each in shuffled order)."""
    indices = np.arange(len(paths))
    np.random.RandomState(seed).shuffle(indices)
    n_test, n_val = int(len(paths) * test_frac), int(len(paths) * val_frac)
    parts = {"test": indices[:n_test], "val": indices[n_test:n_test + n_val], "train": indices[n_test + n_val:]}
    return {split: [paths[i] for i in parts[split]] for split in ("train", "val", "test")}


def _download_source() -> tuple[str, str]:
    from monai.apps import MedNISTDataset

    return MedNISTDataset.resource, MedNISTDataset.md5


def list_class(name: str, root: str, allow_download: bool, timeout_s: float) -> SplitFiles:
    """The train/val/test JPEG lists of MedNIST class ``name`` under ``root`` (MONAI's root_dir); see the module
    docstring. Raises DatasetUnavailable naming where the files were expected."""
    obtain_folder(Path(root) / FOLDER, Path(root) / ARCHIVE, ready=Path.is_dir, download_source=_download_source,
                  allow_download=allow_download, timeout_s=timeout_s, what=name,
                  expected=f"MONAI's MedNIST layout (one folder of JPEGs per class, {FOLDER}/{name}/*.jpeg)")
    class_dir = os.path.join(root, FOLDER, name)
    try:
        files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_SUFFIXES))
    except OSError:
        files = []
    if not files:
        raise DatasetUnavailable(f"{name}: no images (*.jpeg) in {class_dir}; expected MONAI's MedNIST layout "
                                 f"{os.path.join(root, FOLDER)}/<Class>/*.jpeg")
    if len(files) != CLASS_SIZES.get(name, len(files)):
        print(f"note: {class_dir} has {len(files):,} images where MONAI's MedNIST has {CLASS_SIZES[name]:,} (a partial "
              "copy?); the splits use the images that are there", file=sys.stderr, flush=True)
    return monai_split([os.path.join(class_dir, f) for f in files])


FAMILIES: dict[str, DatasetFamily] = {name: DatasetFamily(list_files=list_class) for name in MEDNIST_CLASSES}
