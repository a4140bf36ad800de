"""File-system boundary: image file names, atomic writes, output-location checks, and the per-stage run lock.

Atomic writes: a file is either absent, the old version, or the complete new version. The new content goes to a
temporary file beside the target, is flushed to disk (``fsync``: a full disk or an I/O error surfaces there, not
after the rename), and only then renamed onto the target. Any ``OSError`` on the way leaves the previous file in
place and is re-raised naming the TARGET file (not the temporary one), for the one error boundary in
``cli/runner.py`` to print as one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddpm_ood.errors import UserError

# The image files every stage reads (MONAI's readers by extension), longest suffix first.
NUMPY_SUFFIXES = (".npy",)
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + NUMPY_SUFFIXES + PIL_SUFFIXES


def image_stem(path: str | os.PathLike) -> str:
    """File name without directories and without a known image extension: ``D/x/MNIST_7.npy`` -> ``MNIST_7``.

    ``a.nii.gz`` -> ``a``. This is the ``filename`` column of the results CSVs.
    """
    name = Path(path).name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success flush it to disk and rename it onto ``path``, on any error
    delete it. OSErrors are re-raised with ``filename`` = ``path``."""
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        _fsync_file(tmp_path)
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.filename == str(path):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # A file object, not a path: torch's own writer reports a full disk as an opaque RuntimeError.
        torch.save(obj, f)


def atomic_write_csv(df, path: str | os.PathLike) -> None:
    """Write a pandas DataFrame without its index, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def describe_os_error(exc: OSError) -> str:
    """``"<file>: No space left on device (ENOSPC)"``: the file and the cause of an OSError, in one line."""
    name = errno.errorcode.get(exc.errno or 0)
    cause = exc.strerror or str(exc)
    if "\n" in cause:  # re-raised from a DataLoader worker with the worker's traceback: keep its last line
        cause = [line for line in cause.splitlines() if line.strip()][-1]
    cause = f"{cause} ({name})" if name else cause
    return f"{exc.filename}: {cause}" if exc.filename else cause


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (and its parents) if needed and prove a file can be created in it; return it.

    UserError naming ``flag`` and the offending path when a component is a file, the folder cannot be created, or
    no file can be created in it (permissions, a read-only file system). Called by every stage before its long
    work, so a typo'd output path fails in a second, not after an hour of training. A disk that fills up later is
    the atomic writers' business.
    """
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag}: {parent} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{flag}: cannot write in {path}: {exc.strerror or exc}") from None
    return path


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, stage: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold ``<folder>/.<stage>.lock`` for the duration: a second process of the same stage on the same folder is
    refused with a UserError saying who holds it.

    The lock is an ``flock`` on an open file, so the kernel releases it when its process ends: a crashed or killed
    run never leaves it stuck (its file stays behind, unlocked, and is taken over). A clean exit removes the file.
    ``enabled=False`` (torchrun ranks other than 0, which write nothing) skips it.
    """
    if not enabled:
        yield
        return
    lock_path = Path(folder) / f".{stage}.lock"
    f = _acquire(lock_path, stage)
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield
    finally:
        # Unlink while still holding the lock: a process that opened the old file re-checks the inode and retries.
        with contextlib.suppress(OSError):
            lock_path.unlink()
        f.close()


def _acquire(lock_path: Path, stage: str):
    import fcntl

    for _ in range(10):
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{lock_path}: {stage} is already running on this run ({holder}); wait for it to "
                            "finish or use another --model_name") from None
        try:
            same_file = os.fstat(f.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return f
        f.close()  # the holder removed it between our open and flock: take the new file
    raise UserError(f"{lock_path}: could not take the lock (the file keeps being replaced)")
