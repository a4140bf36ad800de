"""Stage 1 data preparation, one path for every dataset family (``data.sources``): the family's files -> split CSVs
(upstream's ``get_computer_vision_datasets.py``, ``get_mednist_datasets.py``, ``get_decathlon_datasets.py`` and
``get_3dmedmnist.py``, made reproducible, resumable and usable offline).

Array families (the computer-vision sets, 3D MedMNIST) write one ``.npy`` per image, file families (MedNIST,
Decathlon) list existing image files; either way the lists become ``D/data_splits/<Name>_{train,val,test}.csv``
(our format, see splits.py). Each family's files live in its folder under the data root D (``source_root``).

Layout of the computer-vision sets under D (as upstream):

* raw files where torchvision keeps them: ``D/{MNIST,FashionMNIST}/raw`` (torchvision root = D),
  ``D/CIFAR10/raw/cifar-10-batches-py``, ``D/SVHN/raw/{train,test}_32x32.mat``,
  ``D/CelebA/raw/celeba/{img_align_celeba/,list_*.txt,identity_CelebA.txt}``;
* images: ``D/<Name>/numpy/<split>/<Name>_<i>.npy``, uint8, (28, 28) for the MNISTs, (3, 32, 32) CHW for
  CIFAR10, SVHN and CelebA (CelebA squashed from 178x218 to 32x32 by PIL bicubic, aspect not kept); i is the
  torchvision index within the split; splits are train/test (CelebA train/valid/test);
* split CSVs: val = 5% of the torchvision train set by ``train_test_split(test_size=0.05, random_state=42)`` over
  the files in index order, so the split is the same on every machine (upstream's came from an unsorted glob).
  CelebA uses its official train/valid/test partitions.

The medical families' layouts and split rules are in their modules (sources/mednist.py, decathlon.py, medmnist3d.py).
Files already present are used without any network access; otherwise the family's library downloads them (with
a short socket timeout so an offline machine fails fast). Images already written are skipped, so a re-run
over complete data only re-checks; every file is written atomically.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddpm_ood.data.sources import DATASETS, GROUPS, DatasetUnavailable, SplitSource, family_of
from ddpm_ood.data.splits import format_split_csv
from ddpm_ood.fileio import atomic_write_text

__all__ = ["DATASETS", "DOWNLOAD_TIMEOUT_S", "GROUPS", "DatasetUnavailable", "prepare_dataset"]

VAL_FRACTION = 0.05
SPLIT_SEED = 42
DOWNLOAD_TIMEOUT_S = 15.0
SPLITS_DIR = "data_splits"
MANIFEST = ".manifest.json"


def image_path(root: str | os.PathLike, name: str, folder: str, i: int) -> str:
    """``<root>/<Name>/numpy/<folder>/<Name>_<i>.npy``, relative if ``root`` is (as upstream). ``root``: the family's
    folder (the data root D for the computer-vision sets)."""
    return os.path.join(str(root), name, "numpy", folder, f"{name}_{i}.npy")


def _npy_header(a: np.ndarray, cache: dict[tuple[int, ...], bytes]) -> bytes:
    """The .npy header np.save writes for a C-contiguous uint8 array of this shape (made once per shape by
    np.save itself: the files are byte-identical to np.save's, at less than half the cost per file)."""
    if a.shape not in cache:
        buf = io.BytesIO()
        np.save(buf, a)
        cache[a.shape] = buf.getvalue()[: -a.nbytes or None]
    return cache[a.shape]


def write_split_images(root: str, name: str, source: SplitSource) -> int:
    """Write ``<root>/<Name>/numpy/<folder>/<Name>_<i>.npy`` for every i not yet written; returns how many were
    written (``root``: the family's folder, see ``image_path``).

    A folder written from a different source (manifest fingerprint differs) is rewritten, and files with
    an index beyond ``count`` are removed, so the folder always holds exactly this split.
    """
    from tqdm import tqdm

    out = Path(root) / name / "numpy" / source.folder
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    want = {"count": source.count, "fingerprint": source.fingerprint}
    present = set()
    for entry in os.scandir(out):
        if entry.name.endswith(".tmp.npy"):  # left by an interrupted run
            os.remove(entry.path)
        else:
            present.add(entry.name)
    old = None
    if manifest.is_file():
        with contextlib.suppress(ValueError, OSError):
            old = json.loads(manifest.read_text())
    rewrite = old is not None and old != want
    if rewrite:
        print(f"{name} {source.folder}: {out} was written from different source files "
              f"({old.get('count')} images); rewriting all {source.count}", flush=True)
    todo = [i for i in range(source.count) if rewrite or f"{name}_{i}.npy" not in present]
    headers: dict[tuple[int, ...], bytes] = {}
    for i in tqdm(todo, desc=f"{name} {source.folder}", unit="img", mininterval=1.0, disable=not todo):
        a = np.ascontiguousarray(source.get(i), dtype=np.uint8)
        tmp = out / f"{name}_{i}.tmp.npy"
        with open(tmp, "wb") as f:
            f.write(_npy_header(a, headers) + a.tobytes())
        os.replace(tmp, out / f"{name}_{i}.npy")
    image_name = re.compile(re.escape(name) + r"_(\d+)\.npy")
    for fname in present:
        m = image_name.fullmatch(fname)
        if m and int(m.group(1)) >= source.count:
            os.remove(out / fname)
    if old != want:
        atomic_write_text(manifest, json.dumps(want))
    return len(todo)


def split_csv_path(data_root: str | os.PathLike, name: str, split: str) -> Path:
    """``D/data_splits/<Name>_<split>.csv`` (split: train, val, test)."""
    return Path(data_root) / SPLITS_DIR / f"{name}_{split}.csv"


def make_splits(root: str, name: str, sources: Sequence[SplitSource]) -> dict[str, list[str]]:
    """The train/val/test path lists of a prepared array dataset in ``root`` (see the module docstring)."""
    from sklearn.model_selection import train_test_split

    paths = {}
    for s in sources:
        prefix = image_path(root, name, s.folder, 0).removesuffix("0.npy")
        paths[s.folder] = [f"{prefix}{i}.npy" for i in range(s.count)]
    official = family_of(name).csv_splits
    if official is not None:
        return {csv_split: paths[folder] for folder, csv_split in official}
    # Index order (0, 1, 2, ...), not glob order: the same split on every machine.
    train, val = train_test_split(paths["train"], test_size=VAL_FRACTION, random_state=SPLIT_SEED)
    return {"train": list(train), "val": list(val), "test": paths["test"]}


def write_splits(data_root: str, name: str, splits: dict[str, list[str]]) -> None:
    """Write the split CSVs (our format); a CSV that already has exactly this content is left untouched."""
    for split, paths in splits.items():
        csv = split_csv_path(data_root, name, split)
        text = format_split_csv(paths)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if csv.read_text() == text:
                continue
        atomic_write_text(csv, text)


def prepare_dataset(name: str, data_root: str, allow_download: bool = True,
                    timeout_s: float = DOWNLOAD_TIMEOUT_S, source_root: str | None = None) -> dict[str, int]:
    """The family's files -> (.npy images ->) split CSVs in ``<data_root>/data_splits`` for one dataset. Returns the
    number of paths per CSV split.

    ``source_root``: the family's folder (default ``family.source_root(data_root)``, e.g. ``D/Decathlon``); the
    upstream scripts take it as their ``--data_root``. Raises DatasetUnavailable if the files can be neither found
    nor downloaded.
    """
    family = family_of(name)
    root = family.source_root(data_root) if source_root is None else str(source_root)
    if family.list_files is not None:
        splits = family.list_files(name, root, allow_download, timeout_s)
    else:
        sources = family.open(name, root, allow_download, timeout_s)
        for source in sources:
            write_split_images(root, name, source)
        splits = make_splits(root, name, sources)
    write_splits(data_root, name, splits)
    return {split: len(paths) for split, paths in splits.items()}


@dataclass(frozen=True)
class PreparationJob:
    """Everything get_datasets.py (and upstream's per-family scripts) do: prepare the datasets ``names`` under
    ``data_root`` (split CSVs in ``<data_root>/data_splits``), downloading what is missing when ``allow_download``;
    ``source_root``: the family's own folder when an upstream per-family script names it."""

    names: tuple[str, ...]
    data_root: str
    allow_download: bool = True
    timeout_s: float = DOWNLOAD_TIMEOUT_S
    source_root: str | None = None


def run_preparation(job: PreparationJob) -> int:
    """Prepare every dataset of ``job``; return 0, or 1 after naming, one line each on stderr, those that could be
    neither found nor downloaded (the others are prepared all the same)."""
    failed: dict[str, str] = {}
    names = list(job.names)
    for name in names:
        start = time.perf_counter()
        try:
            counts = prepare_dataset(name, job.data_root, allow_download=job.allow_download, timeout_s=job.timeout_s,
                                     source_root=job.source_root)
        except DatasetUnavailable as exc:
            print(f"{name}: not prepared (reported at the end)", flush=True)
            failed[name] = str(exc)
            continue
        sizes = "/".join(str(counts[s]) for s in ("train", "val", "test"))
        print(f"{name}: train/val/test = {sizes} images ({time.perf_counter() - start:.1f} s)", flush=True)
    for message in failed.values():
        print(f"error: {message}", file=sys.stderr)
    if failed:
        done = [n for n in names if n not in failed]
        kept = f"; prepared: {', '.join(done)}" if done else ""
        print(f"error: not prepared: {', '.join(failed)}{kept}", file=sys.stderr)
        return 1
    return 0
