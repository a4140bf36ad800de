"""Split CSVs: upstream's one-line format, ours, and the errors a bad CSV gives."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from ddpm_ood.data.splits import format_split_csv, read_split_csv, write_split_csv
from ddpm_ood.errors import UserError


@pytest.fixture
def images(tmp_path) -> list[str]:
    paths = []
    for i in range(5):
        p = tmp_path / "img" / f"X_{i}.npy"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"")
        paths.append(str(p))
    return paths


def test_round_trip_ours(tmp_path, images):
    csv_path = tmp_path / "splits" / "X_train.csv"  # parent created
    write_split_csv(csv_path, images)
    assert read_split_csv(csv_path) == images
    text = csv_path.read_text()
    assert text.splitlines()[0] == "path" and len(text.splitlines()) == len(images) + 1
    assert text == format_split_csv(images)
    assert list(pd.read_csv(csv_path)["path"]) == images  # pandas reads our format as a table
    assert not list(csv_path.parent.glob(".*"))  # no temporary file left


def test_reads_upstream_one_line_format(tmp_path, images):
    # Exactly how upstream wrote it: csv.writer(...).writerow(list_of_paths).
    csv_path = tmp_path / "X_train.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerow(images)
    assert len(csv_path.read_text().splitlines()) == 1
    assert list(pd.read_csv(csv_path)) == images  # upstream's reader: the row is the header
    assert read_split_csv(csv_path) == images


def test_reads_headerless_one_path_per_row_and_keeps_duplicates(tmp_path, images):
    csv_path = tmp_path / "X.csv"
    csv_path.write_text("\n".join(images + images[:1]) + "\n\n")
    assert read_split_csv(csv_path) == images + images[:1]


def test_paths_with_commas_round_trip(tmp_path):
    p = tmp_path / "a,b" / "X_0.npy"
    p.parent.mkdir()
    p.write_bytes(b"")
    write_split_csv(tmp_path / "s.csv", [str(p)])
    assert read_split_csv(tmp_path / "s.csv") == [str(p)]


def test_relative_paths_are_relative_to_cwd(tmp_path, images, monkeypatch):
    rel = [str(Path(p).relative_to(tmp_path)) for p in images]
    write_split_csv(tmp_path / "s.csv", rel)
    monkeypatch.chdir(tmp_path)
    assert read_split_csv("s.csv") == rel
    monkeypatch.chdir(tmp_path / "img")
    with pytest.raises(UserError, match="not a file"):
        read_split_csv(tmp_path / "s.csv")


def test_missing_csv(tmp_path):
    with pytest.raises(UserError, match="X_test.csv: split CSV not found"):
        read_split_csv(tmp_path / "X_test.csv")


@pytest.mark.parametrize("content", ["", "\n\n", "path\n", ",,,\n"])
def test_empty_csv(tmp_path, content):
    (tmp_path / "e.csv").write_text(content)
    with pytest.raises(UserError, match=r"e\.csv.*empty"):
        read_split_csv(tmp_path / "e.csv")


def test_missing_image_names_csv_and_first_bad_path(tmp_path, images):
    bad = [images[0], str(tmp_path / "gone_1.npy"), str(tmp_path / "gone_2.npy")]
    write_split_csv(tmp_path / "s.csv", bad)
    with pytest.raises(UserError) as e:
        read_split_csv(tmp_path / "s.csv")
    msg = str(e.value)
    assert "s.csv" in msg and "gone_1.npy" in msg and "gone_2" not in msg and "\n" not in msg
    assert read_split_csv(tmp_path / "s.csv", check_exists=False) == bad


def test_multi_column_rows_without_header_are_refused(tmp_path, images):
    (tmp_path / "m.csv").write_text(f"{images[0]},{images[1]}\n{images[2]},{images[3]}\n")
    with pytest.raises(UserError, match="m.csv: not a split CSV"):
        read_split_csv(tmp_path / "m.csv")
