"""The results CSV schema and file names: one row per (image, start t), written by reconstruction.

Columns: filename (image path stem), type ("val" | "in" | "out"), t (start timestep on the 1000-step schedule),
perceptual_difference (LPIPS, >= 0), mse (mean squared error in [0, 1] image space).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from ddpm_ood.data.splits import split_flip
from ddpm_ood.errors import UserError, one_line

RESULT_COLUMNS = ["filename", "type", "t", "perceptual_difference", "mse"]
# The per-(image, t) metrics, in the order they are reported. Names are the CSV column names.
METRIC_COLUMNS = ("mse", "perceptual_difference")
VAL_NAME = "val"
IN_NAME = "in"
# How users name a run folder (``run_dir.RunDir``), for the messages about it: every stage's folder checks.
RUN_DIR_FLAGS = "--output_dir/--model_name"
RESULTS_PATTERN = re.compile(r"^results_(?P<name>.+)\.csv$")


def out_set_name(csv_path: str) -> str:
    """Upstream's name rule: first "_"-token of the CSV stem, plus "_vflip"/"_hflip" for flipped sets.

    MNIST_test.csv -> MNIST; FashionMNIST_vflip_test.csv -> FashionMNIST_vflip; Task02_Heart_test.csv -> Task02.
    """
    base, flip = split_flip(csv_path)
    name = Path(base).stem.split("_")[0]
    return f"{name}_{flip}" if flip else name


# Feature files of the score families (families/; where: ``run_dir.RunDir.features``): one row per image, columns
# FEATURE_KEY_COLUMNS then the family's feature columns; settings beside them in ``features_<set>.json``.
FEATURE_KEY_COLUMNS = ["filename", "type"]
FEATURES_PATTERN = re.compile(r"^features_(?P<name>.+)\.csv$")


def read_features(path: str | os.PathLike) -> pd.DataFrame:
    """A feature file: index ``filename`` (duplicates dropped, first kept), one float column per feature, in file
    order; UserError naming the file when it is unreadable, empty or has non-numeric features."""
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for malformed files
        raise UserError(f"{path}: cannot be read as CSV ({one_line(exc)})") from None
    missing = [c for c in FEATURE_KEY_COLUMNS if c not in df.columns]
    if missing or len(df.columns) <= len(FEATURE_KEY_COLUMNS):
        raise UserError(f"{path}: expected columns {','.join(FEATURE_KEY_COLUMNS)} and at least one feature")
    if df.empty:
        raise UserError(f"{path}: no feature rows")
    df["filename"] = df["filename"].astype(str)
    df = df.drop_duplicates("filename").set_index("filename").drop(columns=["type"])
    values = df.apply(pd.to_numeric, errors="coerce")
    if values.isna().any().any():
        raise UserError(f"{path}: non-numeric or empty feature values")
    return values.astype(float)


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a results CSV (ours, or upstream's with its unnamed index column); check the schema."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: results file not found")
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for malformed files
        raise UserError(f"{path}: cannot be read as CSV ({one_line(exc)})") from None
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed")]]
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(RESULT_COLUMNS)}")
    if df.empty:
        raise UserError(f"{path}: no result rows")
    df = df[RESULT_COLUMNS].copy()
    df["filename"] = df["filename"].astype(str)
    df["t"] = df["t"].astype(int)
    for m in METRIC_COLUMNS:
        df[m] = pd.to_numeric(df[m], errors="coerce")
        if df[m].isna().any():
            raise UserError(f"{path}: column {m} has non-numeric or empty values")
    return df
