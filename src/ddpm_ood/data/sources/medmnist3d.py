"""The six 3D MedMNIST sets (organ, nodule, fracture, adrenal, vessel, synapse; 28^3 uint8 volumes), upstream's
``src/data/get_3dmedmnist.py``.

Files as the ``medmnist`` package downloads them into its ``root`` (default ``D/MedMNIST3D``): ``<root>/<flag>.npz``,
e.g. ``organmnist3d.npz``, with the arrays train_images/val_images/test_images ((N, 28, 28, 28) uint8) and
train_labels/val_labels/test_labels. Reading a present .npz needs only numpy; downloading a missing one needs the
``medmnist`` package (``pip install medmnist``), imported only then.

Each volume is saved as ``<root>/<flag>/numpy/<split>/<flag>_<i>.npy`` ((28, 28, 28) uint8, i = index in the split);
the split CSVs ``D/data_splits/<flag>_{train,val,test}.csv`` follow MedMNIST's official splits. Upstream named them
``medmnist3d_<flag>_*.csv``; the results of an out set are named by the CSV's first "_"-token, so upstream's names
would give every MedMNIST out set the same name ("medmnist3d") and reconstruct.py refuses such a clash.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ddpm_ood.data.sources import (
    MEDMNIST3D_SETS,
    DatasetFamily,
    DatasetUnavailable,
    SplitSource,
    array_sources,
    socket_timeout,
)
from ddpm_ood.errors import one_line

FOLDER = "MedMNIST3D"
SPLITS = ("train", "val", "test")
KEYS = ", ".join(f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels"))


def _download(flag: str, npz: Path, timeout_s: float) -> None:
    """``<flag>.npz`` into ``npz.parent`` by the medmnist package's own class and downloader (md5-checked)."""
    try:
        import medmnist
        from medmnist import INFO
    except ImportError:
        raise DatasetUnavailable(f"{flag}: {npz} not found, and downloading it needs the medmnist package: "
                                 "pip install medmnist (or put the .npz there)") from None
    print(f"{flag}: {npz} not found; downloading with medmnist ...", flush=True)
    npz.parent.mkdir(parents=True, exist_ok=True)
    # medmnist writes straight to <root>/<flag>.npz: an interrupted or md5-failed download would leave a file that
    # looks present. So it downloads into a temporary folder beside it, and the checked file is renamed into place.
    with tempfile.TemporaryDirectory(dir=npz.parent, prefix=f".{flag}-download-") as partial:
        try:
            cls = getattr(medmnist, INFO[flag]["python_class"])
            with socket_timeout(timeout_s):
                cls(split="train", download=True, root=partial)
        except Exception as exc:  # network errors, medmnist's RuntimeError
            raise DatasetUnavailable(f"{flag}: {npz} not found, and the download failed ({one_line(exc)})") from None
        downloaded = Path(partial) / npz.name
        if not downloaded.is_file():
            raise DatasetUnavailable(f"{flag}: medmnist reported a download but wrote no {npz.name}")
        os.replace(downloaded, npz)


def read_npz(flag: str, npz: Path) -> dict[str, np.ndarray]:
    """{split: (N, D, H, W) uint8 volumes} from a MedMNIST .npz; DatasetUnavailable for a bad file."""
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {split: z[f"{split}_images"] for split in SPLITS}
    except Exception as exc:  # zipfile/pickle/KeyError for a truncated or foreign file
        raise DatasetUnavailable(f"{flag}: {npz} is not a MedMNIST .npz with {KEYS} ({one_line(exc)}); delete it "
                                 "to download it again") from None
    for split, a in arrays.items():
        if a.dtype != np.uint8 or a.ndim != 4:
            raise DatasetUnavailable(f"{flag}: {npz}: {split}_images is {a.dtype} {a.shape}, expected uint8 "
                                     "(N, D, H, W) volumes (a 3D MedMNIST set?)")
    return arrays


def open_set(flag: str, root: str, allow_download: bool, timeout_s: float) -> list[SplitSource]:
    """The train/val/test volumes of MedMNIST set ``flag`` from ``<root>/<flag>.npz``, downloaded if missing and
    allowed. Raises DatasetUnavailable naming where the file was expected."""
    npz = Path(root) / f"{flag}.npz"
    if not npz.is_file():
        if not allow_download:
            raise DatasetUnavailable(f"{flag}: {npz} not found (MedMNIST's file with {KEYS}); download disabled")
        _download(flag, npz, timeout_s)
    return array_sources(read_npz(flag, npz), lambda a: a)


FAMILIES: dict[str, DatasetFamily] = {
    name: DatasetFamily(open=open_set, csv_splits=tuple((s, s) for s in SPLITS), folder=FOLDER)
    for name in MEDMNIST3D_SETS
}
