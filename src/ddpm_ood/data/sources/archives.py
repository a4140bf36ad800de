"""A dataset folder that its library downloads as one archive (MONAI's MedNIST and Decathlon tasks): use the folder
if it is there, else extract the archive if it is there, else download the archive with MONAI's own downloader (its
URL and md5, a progress bar) and extract it.

Extraction is atomic: the archive is unpacked into a hidden folder beside the target and renamed onto it only when
complete, so an interrupted run never leaves a half-extracted folder that a re-run would mistake for the data (MONAI's
``extractall`` skips any non-empty folder). An archive found on disk is not checked against MONAI's md5, as a copy
from the dataset's own site need not be byte-identical to MONAI's mirror; its content is checked instead (the
expected top folder, then each family's own checks). A downloaded archive is md5-checked by MONAI.
"""

from __future__ import annotations

import shutil
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

from ddpm_ood.data.sources import DatasetUnavailable, socket_timeout
from ddpm_ood.errors import one_line

EXTRACTING_SUFFIX = ".extracting"


def _extract_files(tar: tarfile.TarFile, dest: Path, desc: str) -> None:
    """Regular files of ``tar`` into ``dest`` (folders made as needed; links and devices skipped, as MONAI's
    extraction does). A member that would land outside ``dest`` is refused."""
    from tqdm import tqdm

    root = dest.resolve()
    for member in tqdm(tar, desc=desc, unit="file", mininterval=1.0):
        if not member.isfile():
            continue
        target = (dest / member.name).resolve()
        if not target.is_relative_to(root):
            raise DatasetUnavailable(f"{desc}: archive member {member.name!r} would be written outside {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        if source is None:
            continue
        with source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)


def extract_folder(archive: Path, folder: Path) -> None:
    """Unpack ``archive`` (.tar or .tar.gz holding ``<folder.name>/...``) so that ``folder`` appears complete or not at
    all. Raises DatasetUnavailable (one line) for an unreadable archive or one without that top folder."""
    staging = folder.with_name(f".{folder.name}{EXTRACTING_SUFFIX}")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    staging.mkdir(parents=True)
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                _extract_files(tar, staging, f"extracting {archive.name}")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            if isinstance(exc, OSError) and exc.filename and str(exc.filename).startswith(str(staging.resolve())):
                raise  # writing failed (a full disk, ...), not the archive: the error boundary says so
            raise DatasetUnavailable(f"{archive}: cannot be extracted ({one_line(exc)})") from None
        unpacked = staging / folder.name
        if not unpacked.is_dir():
            raise DatasetUnavailable(f"{archive}: does not contain the folder {folder.name}/ (the layout its library "
                                     "downloads)")
        unpacked.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def obtain_folder(folder: Path, archive: Path, *, ready: Callable[[Path], bool],
                  download_source: Callable[[], tuple[str, str]], allow_download: bool, timeout_s: float,
                  what: str, expected: str) -> Path:
    """``folder`` once it is ``ready``: as found, extracted from ``archive``, or downloaded to ``archive`` (MONAI's
    ``download_url`` with ``download_source() -> (url, md5)``, a progress bar, the md5 checked) and extracted.

    ``what`` names the dataset in messages; ``expected`` describes the folder's layout. Raises DatasetUnavailable
    (one line: what, where its files were expected, why) when none of the three works. A folder that exists but is
    not ready is reported, never overwritten.
    """
    if ready(folder):
        return folder
    where = f"{what}: not found: expected {expected} in {folder}, or the archive {archive}"
    if folder.exists():
        raise DatasetUnavailable(f"{where}; {folder} exists but is incomplete (move it away to extract or download "
                                 "it again)")
    if not archive.is_file():
        if not allow_download:
            raise DatasetUnavailable(f"{where}; download disabled")
        from monai.apps.utils import download_url

        url, md5 = download_source()
        print(f"{what}: downloading {url} to {archive} ...", flush=True)
        try:
            archive.parent.mkdir(parents=True, exist_ok=True)
            with socket_timeout(timeout_s):
                download_url(url, filepath=archive, hash_val=md5, hash_type="md5", progress=True)
        except Exception as exc:  # urllib/HTTP errors, MONAI's HashCheckError, RuntimeError
            raise DatasetUnavailable(f"{where}, and the download failed ({one_line(exc)})") from None
    extract_folder(archive, folder)
    if not ready(folder):
        raise DatasetUnavailable(f"{where}; {archive} was extracted but {folder} is still incomplete")
    return folder
