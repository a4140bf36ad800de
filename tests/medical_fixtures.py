"""Small medical datasets in their libraries' REAL on-disk layouts, so MONAI's and numpy's own readers run in tests.

* MedNIST (MONAI ``MedNISTDataset``): ``<root>/MedNIST/<Class>/<000000>.jpeg``, 64x64 grayscale JPEGs, or the
  archive ``<root>/MedNIST.tar.gz`` holding the ``MedNIST/`` folder;
* a Medical Segmentation Decathlon task (MONAI ``DecathlonDataset``): ``<root>/<TaskXX_Name>/dataset.json`` with the
  real keys (name, description, reference, licence, release, tensorImageSize, modality, labels, numTraining,
  numTest, training = [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}], test = ["./imagesTs/
  y.nii.gz"]), NIfTI volumes written by nibabel (multi-channel ones as (H, W, D, C), channel last, like BraTS), or
  the archive ``<root>/<TaskXX_Name>.tar``;
* a 3D MedMNIST set (the ``medmnist`` package): ``<root>/<flag>.npz`` with train/val/test _images ((N, 28, 28, 28)
  uint8) and _labels ((N, 1)).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

BRATS_MODALITIES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}


def write_mednist(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """``root/MedNIST/<Class>/<k:06d>.jpeg`` (k = 0..n-1), written in a shuffled order; returns the sorted paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for cls, n in counts.items():
        d = root / "MedNIST" / cls
        d.mkdir(parents=True, exist_ok=True)
        for k in rng.permutation(n):
            yy, xx = np.mgrid[0:64, 0:64]
            img = ((xx * (k + 1) + yy * 3 + rng.integers(0, 255)) % 256).astype(np.uint8)  # smooth: JPEG keeps it
            Image.fromarray(img, mode="L").save(d / f"{k:06d}.jpeg", quality=95)
        out[cls] = sorted(str(p) for p in d.iterdir())
    return out


def tar_folder(folder: Path, archive: Path, remove: bool = True) -> Path:
    """``archive`` (.tar or .tar.gz by its name) holding ``<folder.name>/...``, as the libraries' archives do."""
    import shutil

    mode = "w:gz" if archive.name.endswith(".gz") else "w"
    with tarfile.open(archive, mode) as tar:
        tar.add(folder, arcname=folder.name)
    if remove:
        shutil.rmtree(folder)
    return archive


def _save_nifti(path: Path, volume: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine=np.eye(4)), str(path))


def write_decathlon_task(root: Path, task: str, n_train: int, n_test: int, channels: int = 1,
                         shape: tuple[int, int, int] = (8, 8, 6), seed: int = 0) -> dict:
    """A task folder ``root/<task>/`` in MSD's layout; returns the parsed dataset.json (its lists in file order:
    the training list is deliberately not sorted, as in the real files)."""
    rng = np.random.default_rng(seed)
    d = root / task
    stem = task.split("_", 1)[1].lower()
    train_ids = [int(i) for i in rng.permutation(n_train)]  # the real files list e.g. BRATS_457 first
    training = [{"image": f"./imagesTr/{stem}_{i:03d}.nii.gz", "label": f"./labelsTr/{stem}_{i:03d}.nii.gz"}
                for i in train_ids]
    test = [f"./imagesTs/{stem}_{n_train + i:03d}.nii.gz" for i in range(n_test)]
    vol_shape = (*shape, channels) if channels > 1 else shape
    for rel in [t["image"] for t in training] + test:
        _save_nifti(d / rel, rng.normal(size=vol_shape).astype(np.float32))
    for t in training:
        _save_nifti(d / t["label"], rng.integers(0, 3, size=shape).astype(np.uint8))
    modality = BRATS_MODALITIES if channels == 4 else {str(c): f"MR{c}" for c in range(channels)}
    meta = {
        "name": stem.upper(), "description": f"{task} test fixture", "reference": "tests", "licence": "CC-BY-SA 4.0",
        "release": "1.0 01/01/2024", "tensorImageSize": "4D" if channels > 1 else "3D", "modality": modality,
        "labels": {"0": "background", "1": "a", "2": "b"}, "numTraining": n_train, "numTest": n_test,
        "training": training, "test": test,
    }
    (d / "dataset.json").write_text(json.dumps(meta, indent=4))
    return meta


def write_medmnist_npz(root: Path, flag: str, sizes: tuple[int, int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """``root/<flag>.npz`` with MedMNIST's keys; returns {split: (N, 28, 28, 28) uint8 images}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays, images = {}, {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        images[split] = rng.integers(0, 256, size=(n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_images"] = images[split]
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 1), dtype=np.uint8)
    np.savez_compressed(root / f"{flag}.npz", **arrays)
    return images
