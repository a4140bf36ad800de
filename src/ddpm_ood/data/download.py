"""Stage 1 data preparation: torchvision datasets -> one ``.npy`` per image -> split CSVs (upstream's
``get_computer_vision_datasets.py``, made reproducible, resumable and usable offline).

Layout under a data root D (as upstream):

* raw files where torchvision keeps them: ``D/{MNIST,FashionMNIST}/raw`` (torchvision root = D),
  ``D/CIFAR10/raw/cifar-10-batches-py``, ``D/SVHN/raw/{train,test}_32x32.mat``,
  ``D/CelebA/raw/celeba/{img_align_celeba/,list_*.txt,identity_CelebA.txt}``;
* images: ``D/<Name>/numpy/<split>/<Name>_<i>.npy``, uint8, (28, 28) for the MNISTs, (3, 32, 32) CHW for
  CIFAR10, SVHN and CelebA (CelebA squashed from 178x218 to 32x32 by PIL bicubic, aspect not kept); i is the
  torchvision index within the split; splits are train/test (CelebA train/valid/test);
* split CSVs: ``D/data_splits/<Name>_{train,val,test}.csv`` (our format, see splits.py). val = 5% of the
  torchvision train set by ``train_test_split(test_size=0.05, random_state=42)`` over the files in index
  order, so the split is the same on every machine (upstream's came from an unsorted glob). CelebA uses its
  official train/valid/test partitions.

Raw files already present are used without any network access; otherwise torchvision downloads them (with
a short socket timeout so an offline machine fails fast). Images already written are skipped, so a re-run
over complete data only re-checks; every file is written atomically.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddpm_ood.data.splits import format_split_csv
from ddpm_ood.io import atomic_path, atomic_write_text

DATASETS = ("FashionMNIST", "MNIST", "CIFAR10", "SVHN", "CelebA")
MNIST_FAMILY = ("FashionMNIST", "MNIST")
VAL_FRACTION = 0.05
SPLIT_SEED = 42
CELEBA_SIZE = 32
DOWNLOAD_TIMEOUT_S = 15.0
SPLITS_DIR = "data_splits"
MANIFEST = ".manifest.json"
# (numpy sub-folder, CSV split name) per dataset family.
_CELEBA_SPLITS = (("train", "train"), ("valid", "val"), ("test", "test"))


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


def raw_dir(data_root: str | os.PathLike, name: str) -> Path:
    """Where torchvision expects the raw files of ``name`` under ``data_root`` (used in messages and tests)."""
    d = Path(data_root)
    return {
        "FashionMNIST": d / "FashionMNIST" / "raw",
        "MNIST": d / "MNIST" / "raw",
        "CIFAR10": d / "CIFAR10" / "raw" / "cifar-10-batches-py",
        "SVHN": d / "SVHN" / "raw",
        "CelebA": d / "CelebA" / "raw" / "celeba",
    }[name]


def torchvision_root(data_root: str | os.PathLike, name: str) -> str:
    """The ``root`` given to the torchvision class (as upstream: D for the MNISTs, D/<Name>/raw otherwise)."""
    return str(data_root) if name in MNIST_FAMILY else str(Path(data_root) / name / "raw")


def image_path(data_root: str | os.PathLike, name: str, folder: str, i: int) -> str:
    """``D/<Name>/numpy/<folder>/<Name>_<i>.npy``, relative if ``data_root`` is (as upstream)."""
    return os.path.join(str(data_root), name, "numpy", folder, f"{name}_{i}.npy")


def _expected_files(name: str) -> str:
    import torchvision.datasets as tvd

    if name in MNIST_FAMILY:
        return ", ".join(f"{n.removesuffix('.gz')}[.gz]" for n, _ in getattr(tvd, name).resources)
    if name == "CIFAR10":
        return ", ".join(n for n, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list) + ", batches.meta"
    if name == "SVHN":
        return "train_32x32.mat, test_32x32.mat"
    return "img_align_celeba/, " + ", ".join(f for _, _, f in tvd.CelebA.file_list if not f.endswith(".zip"))


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's urlopen calls pass no timeout, so they use the process default.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:300]}"


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
                raise DatasetUnavailable(f"{gz}: cannot be decompressed ({_one_line(exc)})") from None


def _hash(*parts: bytes | str) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def _array_sources(splits: dict[str, np.ndarray], to_saved: Callable[[np.ndarray], np.ndarray]) -> list[SplitSource]:
    out = []
    for folder, data in splits.items():
        data = np.ascontiguousarray(data)
        out.append(SplitSource(
            folder=folder,
            count=len(data),
            fingerprint=_hash(str(data.shape), str(data.dtype), data.tobytes()),
            get=lambda i, d=data: to_saved(d[i]),
        ))
    return out


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
            raise DatasetUnavailable(f"CelebA: {path}: cannot be read ({_one_line(exc)})") from None
        return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)

    return SplitSource(folder, len(files), _hash(f"bicubic{CELEBA_SIZE}\n", "\n".join(files)), get)


def _open_torchvision(name: str, data_root: str, download: bool) -> list[SplitSource]:
    """Build the torchvision datasets of ``name`` (raises whatever torchvision raises)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    root = torchvision_root(data_root, name)
    if name in MNIST_FAMILY:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
        return _array_sources({"train": train.data.numpy(), "test": test.data.numpy()}, lambda a: a)
    if name == "CIFAR10":
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
        # torchvision holds CIFAR10 as HWC; saved CHW as upstream.
        return _array_sources({"train": train.data, "test": test.data}, lambda a: a.transpose(2, 0, 1))
    if name == "SVHN":
        train = cls(root, split="train", download=download)
        test = cls(root, split="test", download=download)
        return _array_sources({"train": train.data, "test": test.data}, lambda a: a)  # already CHW
    if name == "CelebA":
        return [_celeba_source(cls(root, split=s, target_type=[], download=download), s) for s, _ in _CELEBA_SPLITS]
    raise ValueError(f"unknown dataset {name!r}")


def open_dataset(name: str, data_root: str, allow_download: bool = True,
                 timeout_s: float = DOWNLOAD_TIMEOUT_S) -> list[SplitSource]:
    """The splits of ``name``: from raw files already present, else downloaded by torchvision.

    Raises DatasetUnavailable (one line: the dataset, where its files were expected, and why) if neither works.
    """
    raw = raw_dir(data_root, name)
    if name in MNIST_FAMILY:
        import torchvision.datasets as tvd

        decompress_present_gz(raw, [n for n, _ in getattr(tvd, name).resources])
    try:
        return _open_torchvision(name, data_root, download=False)
    except Exception as exc:  # torchvision: RuntimeError "not found or corrupted"; parsers: various
        local_error = exc
    where = f"{name}: raw files not found or unreadable in {raw} (expected {_expected_files(name)})"
    if not allow_download:
        raise DatasetUnavailable(f"{where}; download disabled ({_one_line(local_error)})")
    print(f"{name}: raw files not found in {raw}; downloading with torchvision ...", flush=True)
    try:
        with _socket_timeout(timeout_s):
            return _open_torchvision(name, data_root, download=True)
    except Exception as exc:
        raise DatasetUnavailable(f"{where}, and the download failed ({_one_line(exc)})") from None


def _npy_header(a: np.ndarray, cache: dict[tuple[int, ...], bytes]) -> bytes:
    """The .npy header np.save writes for a C-contiguous uint8 array of this shape (made once per shape by
    np.save itself: the files are byte-identical to np.save's, at less than half the cost per file)."""
    if a.shape not in cache:
        buf = io.BytesIO()
        np.save(buf, a)
        cache[a.shape] = buf.getvalue()[: -a.nbytes or None]
    return cache[a.shape]


def write_split_images(data_root: str, name: str, source: SplitSource) -> int:
    """Write ``D/<Name>/numpy/<folder>/<Name>_<i>.npy`` for every i not yet written; returns how many were written.

    A folder written from a different source (manifest fingerprint differs) is rewritten, and files with
    an index beyond ``count`` are removed, so the folder always holds exactly this split.
    """
    from tqdm import tqdm

    out = Path(data_root) / name / "numpy" / source.folder
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


def make_splits(data_root: str, name: str, sources: Sequence[SplitSource]) -> dict[str, list[str]]:
    """The train/val/test path lists of a prepared dataset (see the module docstring)."""
    from sklearn.model_selection import train_test_split

    paths = {}
    for s in sources:
        prefix = image_path(data_root, name, s.folder, 0).removesuffix("0.npy")
        paths[s.folder] = [f"{prefix}{i}.npy" for i in range(s.count)]
    if name == "CelebA":
        return {csv_split: paths[folder] for folder, csv_split in _CELEBA_SPLITS}
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
                    timeout_s: float = DOWNLOAD_TIMEOUT_S) -> dict[str, int]:
    """Raw files -> .npy images -> split CSVs for one dataset. Returns the number of paths per CSV split.

    Raises DatasetUnavailable if the raw files can be neither found nor downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    sources = open_dataset(name, data_root, allow_download=allow_download, timeout_s=timeout_s)
    for source in sources:
        write_split_images(data_root, name, source)
    splits = make_splits(data_root, name, sources)
    write_splits(data_root, name, splits)
    return {split: len(paths) for split, paths in splits.items()}
