"""Small datasets written in torchvision's REAL raw formats, so torchvision's own parsers read them in tests.

Each writer returns the pixel arrays it wrote, in torchvision index order and in the layout get_datasets.py
saves (uint8; (N, 28, 28) for the MNISTs, (N, 3, 32, 32) CHW for CIFAR10/SVHN), so tests can compare files.
The formats follow the public dataset descriptions and torchvision's readers:
  * MNIST/FashionMNIST IDX: big-endian header (0, 0, 0x08, ndim, dims as int32), then the bytes;
  * CIFAR-10 python: pickled dicts {"data": (N, 3072) uint8 rows (R plane, G plane, B plane), "labels"},
    files data_batch_1..5, test_batch, batches.meta {"label_names"};
  * SVHN: MATLAB .mat with X (32, 32, 3, N) uint8 and y (N, 1) labels 1..10;
  * CelebA: img_align_celeba/*.jpg (178x218) and the five space-separated list files.
torchvision checks CIFAR10/SVHN/CelebA files against its md5 table; ``patch_torchvision_md5`` points that
table at these files (the check itself still runs).
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np

CELEBA_ATTRS = [f"Attr_{k}" for k in range(40)]


def _idx(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes() + array.tobytes()


def write_mnist_raw(raw: Path, n_train: int, n_test: int, gz: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """``raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; returns {"train": (N,28,28), "test": ...}."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = raw / f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(_idx(arr))
            else:
                name.write_bytes(_idx(arr))
        out[split] = images
    return out


def write_cifar10_raw(raw_root: Path, n_per_batch: int, n_test: int, seed: int = 1) -> dict[str, np.ndarray]:
    """``raw_root/cifar-10-batches-py/...`` (raw_root = D/CIFAR10/raw); returns CHW arrays per split."""
    rng = np.random.default_rng(seed)
    d = raw_root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)

    def batch(name: str, n: int) -> np.ndarray:
        rows = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": rows, "labels": [int(v) for v in rng.integers(0, 10, n)],
                         "filenames": [f"{name}_{i}.png" for i in range(n)]}, f)
        return rows.reshape(n, 3, 32, 32)

    train = np.concatenate([batch(f"data_batch_{k}", n_per_batch) for k in range(1, 6)])
    test = batch("test_batch", n_test)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)], "num_cases_per_batch": n_per_batch}, f)
    return {"train": train, "test": test}


def write_svhn_raw(raw_root: Path, n_train: int, n_test: int, seed: int = 2) -> dict[str, np.ndarray]:
    """``raw_root/{train,test}_32x32.mat`` (raw_root = D/SVHN/raw); returns CHW arrays per split."""
    import scipy.io

    rng = np.random.default_rng(seed)
    raw_root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N) as the real .mat files
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        scipy.io.savemat(raw_root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = x.transpose(3, 2, 0, 1)
    return out


def write_celeba_raw(raw_root: Path, n_train: int, n_valid: int, n_test: int, seed: int = 3) -> dict[str, list[Path]]:
    """``raw_root/celeba/...`` (raw_root = D/CelebA/raw); returns the image files per split, in index order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    d = raw_root / "celeba"
    img_dir = d / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    parts = [0] * n_train + [1] * n_valid + [2] * n_test
    # Interleave the partitions (the real list is ordered, but torchvision must select by the partition column).
    parts = list(rng.permutation(parts))
    names = [f"{k + 1:06d}.jpg" for k in range(len(parts))]
    files: dict[str, list[Path]] = {"train": [], "valid": [], "test": []}
    for name, part in zip(names, parts, strict=True):
        # Smooth images, so JPEG keeps them recognisable; 178 wide x 218 high like img_align_celeba.
        yy, xx = np.mgrid[0:218, 0:178]
        base = rng.integers(0, 256, size=3)
        img = np.stack([(base[c] + (xx if c == 0 else yy) * (c + 1)) % 256 for c in range(3)], -1).astype(np.uint8)
        Image.fromarray(img).save(img_dir / name, quality=95)
        files[("train", "valid", "test")[part]].append(img_dir / name)
    n = len(names)
    (d / "list_eval_partition.txt").write_text("".join(f"{nm} {p}\n" for nm, p in zip(names, parts, strict=True)))
    (d / "identity_CelebA.txt").write_text("".join(f"{nm} {k % 7 + 1}\n" for k, nm in enumerate(names)))
    (d / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{nm}    95  71 226 313\n" for nm in names))
    (d / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x "
        "rightmouth_y\n" + "".join(f"{nm}  69 109 106 113  77 142  73 152 108 154\n" for nm in names))
    (d / "list_attr_celeba.txt").write_text(
        f"{n}\n{' '.join(CELEBA_ATTRS)}\n"
        + "".join(nm + "".join(f" {int(v):2d}" for v in rng.choice([-1, 1], 40)) + "\n" for nm in names))
    return files


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def patch_torchvision_md5(monkeypatch, data_root: Path) -> None:
    """Point torchvision's md5 tables for CIFAR10, SVHN and CelebA at the fixture files under ``data_root``."""
    import torchvision.datasets as tvd

    cifar = data_root / "CIFAR10" / "raw" / "cifar-10-batches-py"
    if cifar.is_dir():
        monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{k}", _md5(cifar / f"data_batch_{k}")]
                                                        for k in range(1, 6)])
        monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", _md5(cifar / "test_batch")]])
        monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                                  "md5": _md5(cifar / "batches.meta")})
    svhn = data_root / "SVHN" / "raw"
    if svhn.is_dir():
        table = {k: list(v) for k, v in tvd.SVHN.split_list.items()}
        for split in ("train", "test"):
            if (svhn / f"{split}_32x32.mat").is_file():
                table[split][2] = _md5(svhn / f"{split}_32x32.mat")
        monkeypatch.setattr(tvd.SVHN, "split_list", table)
    celeba = data_root / "CelebA" / "raw" / "celeba"
    if celeba.is_dir():
        monkeypatch.setattr(tvd.CelebA, "file_list", [
            (fid, _md5(celeba / fn) if (celeba / fn).is_file() else md5, fn) for fid, md5, fn in tvd.CelebA.file_list
        ])
