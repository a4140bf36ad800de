"""Split CSVs: the lists of image paths that define the train, val and test sets.

Two formats are read:

* upstream's: ONE line, no header, every image path a comma-separated field of that single row
  (``csv.writer.writerow(paths)``). pandas would read that row as the header.
* ours: a ``path`` header, then one path per row (what :func:`write_split_csv` writes).

A header-less file with one path per row is read as a plain list too. Relative paths are relative to the
current working directory at read time, as upstream.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from ddpm_ood.errors import UserError
from ddpm_ood.fileio import atomic_path

PATH_COLUMN = "path"


def _rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: split CSV cannot be read ({exc.__class__.__name__}: {exc})") from None
    # Drop blank lines and blank fields (a trailing comma, a final empty line).
    rows = [[field.strip() for field in row if field.strip()] for row in rows]
    return [row for row in rows if row]


def read_split_csv(path: str | os.PathLike, check_exists: bool = True) -> list[str]:
    """Image paths listed in a split CSV, in file order (duplicates kept).

    Raises UserError naming the CSV if it is missing or lists no path, if our format has a row that is
    not one path, or (``check_exists``) naming the first listed path that is not a file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: split CSV not found")
    rows = _rows(path)
    if not rows:
        raise UserError(f"{path}: split CSV is empty (no image paths)")
    header = rows[0]
    if PATH_COLUMN in header:
        # Ours (possibly with extra columns added by hand): the "path" column of every following row.
        col = header.index(PATH_COLUMN)
        paths = []
        for lineno, row in enumerate(rows[1:], start=2):
            if len(row) != len(header):
                raise UserError(
                    f"{path}: row {lineno} has {len(row)} field(s) but the header has {len(header)} "
                    f"({','.join(header)})"
                )
            paths.append(row[col])
    elif len(rows) == 1:
        paths = rows[0]  # upstream's single line: every field is a path
    elif all(len(row) == 1 for row in rows):
        paths = [row[0] for row in rows]  # header-less, one path per row
    else:
        raise UserError(
            f"{path}: not a split CSV: expected a 'path' header with one path per row, or upstream's single "
            f"line of comma-separated paths, but found {len(rows)} rows with several fields"
        )
    if not paths:
        raise UserError(f"{path}: split CSV is empty (no image paths)")
    if check_exists:
        for p in paths:
            if not os.path.isfile(p):
                raise UserError(
                    f"{path}: lists {p!r}, which is not a file (relative paths are relative to the current "
                    f"directory {os.getcwd()})"
                )
    return paths


def format_split_csv(paths: Sequence[str]) -> str:
    """The text of our format: a ``path`` header, then one path per row (quoted by csv rules if needed)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([PATH_COLUMN])
    w.writerows([str(p)] for p in paths)
    return buf.getvalue()


def write_split_csv(path: str | os.PathLike, paths: Sequence[str]) -> None:
    """Write our format (``path`` header, one path per row), atomically; parent directories are created."""
    text = format_split_csv(paths)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)


# An out CSV path ending in one of these before "_test.csv" means the flipped images of the base CSV.
FLIP_SUFFIXES = ("_vflip", "_hflip")


def split_flip(csv_path: str) -> tuple[str, str | None]:
    """``D/X_vflip_test.csv`` -> (``D/X_test.csv``, "vflip"); a path without the suffix -> (path, None).

    Only ``_vflip``/``_hflip`` right before ``_test.csv`` counts (upstream matched "vflip" anywhere in the path).
    The flipped CSV itself need not exist: the flipped images of the base CSV are meant.
    """
    p = Path(csv_path)
    for suffix in FLIP_SUFFIXES:
        if p.name.endswith(suffix + "_test.csv"):
            return str(p.with_name(p.name[: -len(suffix + "_test.csv")] + "_test.csv")), suffix[1:]
    return str(p), None
