"""The medical data families (MedNIST, Decathlon, 3D MedMNIST) end to end, offline, on small files in their libraries'
real layouts (tests/medical_fixtures.py), through get_datasets.py and upstream's src/data/ scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from medical_fixtures import tar_folder, write_decathlon_task, write_medmnist_npz, write_mednist
from tiny_run import REPO_ROOT

from ddpm_ood.cli import get_3dmedmnist, get_decathlon_datasets, get_mednist_datasets
from ddpm_ood.cli.get_datasets import build_parser, main
from ddpm_ood.config import DataConfig
from ddpm_ood.data.datasets import _say_channel_kept, dataset_from_csv, load_image
from ddpm_ood.data.sources import DATASETS, DECATHLON_TASKS, GROUPS, MEDMNIST3D_SETS, MEDNIST_CLASSES
from ddpm_ood.data.sources.mednist import monai_split
from ddpm_ood.data.splits import read_split_csv
from ddpm_ood.errors import UserError
from ddpm_ood.results.schema import out_set_name

SPLITS = ("train", "val", "test")
MEDNIST = {"AbdomenCT": 20, "BreastMRI": 13, "CXR": 10, "ChestCT": 10, "Hand": 11, "HeadCT": 10}
GRAY_3D = DataConfig(is_grayscale=True, spatial_dims=3)


def csv_rows(data_root: Path, name: str, check_exists: bool = True) -> dict[str, list[str]]:
    return {s: read_split_csv(data_root / "data_splits" / f"{name}_{s}.csv", check_exists) for s in SPLITS}


def snapshot(root: Path) -> dict[Path, int]:
    """mtime of every file under ``root`` (what a re-run must leave alone)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error: ") and "not prepared:" not in ln]


# ------------------------------------------------------------------------------------------------------ MedNIST


def test_mednist_each_class_split_80_10_10_from_sorted_files(tmp_path, capsys):
    files = write_mednist(tmp_path, MEDNIST)
    assert main([f"--data_root={tmp_path}", "--datasets=MedNIST", "--download=0"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "where MONAI's MedNIST has" in line]
    assert len(notes) == len(MEDNIST) and "BreastMRI has" in " ".join(notes) and "8,954" in " ".join(notes)
    for cls, n in MEDNIST.items():
        rows = csv_rows(tmp_path, cls)
        assert [len(rows[s]) for s in SPLITS] == [n - 2 * int(n * 0.1), int(n * 0.1), int(n * 0.1)]
        assert sorted(rows["train"] + rows["val"] + rows["test"]) == files[cls]  # the JPEGs themselves, each once
        assert rows == monai_split(files[cls])  # seed 0, from the sorted list


def test_mednist_split_is_monais_rule_on_a_sorted_list(tmp_path, monkeypatch):
    """monai_split = what MONAI's MedNISTDataset returns for one class when its folder lists in sorted order."""
    from monai.apps import MedNISTDataset

    files = write_mednist(tmp_path, {"Hand": 23})["Hand"]
    real_iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(real_iterdir(self))))
    ours = monai_split(files)
    for split, section in zip(SPLITS, ("training", "validation", "test"), strict=True):
        ds = MedNISTDataset(tmp_path, section=section, download=False, cache_rate=0.0, progress=False)
        assert [item["image"] for item in ds.data] == ours[split]


def test_mednist_csvs_load_as_64x64_grayscale(tmp_path):
    write_mednist(tmp_path, {"CXR": 10})
    assert main([f"--data_root={tmp_path}", "--datasets=CXR", "--download=0"]) == 0
    ds = dataset_from_csv(str(tmp_path / "data_splits" / "CXR_train.csv"), DataConfig(is_grayscale=True))
    x = ds[0]["image"]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and x.min() == 0 and x.max() == 1
    assert ds.image_shape == (1, 64, 64) and len(ds) == 8


def test_mednist_from_its_archive_then_a_rerun_changes_nothing(tmp_path):
    files = write_mednist(tmp_path, MEDNIST)
    tar_folder(tmp_path / "MedNIST", tmp_path / "MedNIST.tar.gz")
    assert not (tmp_path / "MedNIST").exists()
    assert main([f"--data_root={tmp_path}", "--datasets=MedNIST", "--download=0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MedNIST", "MedNIST.tar.gz", "data_splits"]  # no staging
    assert sum(len(v) for v in csv_rows(tmp_path, "Hand").values()) == MEDNIST["Hand"]
    assert sorted(sum(csv_rows(tmp_path, "Hand").values(), [])) == files["Hand"]
    before = snapshot(tmp_path)
    time.sleep(0.02)
    assert main([f"--data_root={tmp_path}", "--datasets=MedNIST", "--download=0"]) == 0
    assert snapshot(tmp_path) == before


def test_interrupted_extraction_is_redone_and_a_bad_archive_is_one_line(tmp_path, capsys):
    write_mednist(tmp_path, {"HeadCT": 10})
    tar_folder(tmp_path / "MedNIST", tmp_path / "MedNIST.tar.gz")
    (tmp_path / ".MedNIST.extracting" / "MedNIST" / "HeadCT").mkdir(parents=True)  # left by a killed run
    assert main([f"--data_root={tmp_path}", "--datasets=HeadCT", "--download=0"]) == 0
    assert not (tmp_path / ".MedNIST.extracting").exists() and len(csv_rows(tmp_path, "HeadCT")["train"]) == 8
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "MedNIST.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    assert main([f"--data_root={bad}", "--datasets=HeadCT", "--download=0"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "MedNIST.tar.gz: cannot be extracted" in lines[0]
    assert not (bad / "MedNIST").exists() and not (bad / ".MedNIST.extracting").exists()


@pytest.mark.parametrize("member", ["../escaped.jpeg", "Other/HeadCT/000000.jpeg"])
def test_archive_escaping_its_folder_or_without_the_expected_folder_is_refused(tmp_path, capsys, member):
    import io
    import tarfile

    with tarfile.open(tmp_path / "MedNIST.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert main([f"--data_root={tmp_path}", "--datasets=HeadCT", "--download=0"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and ("outside" in lines[0] or "does not contain the folder MedNIST/" in lines[0])
    assert [p.name for p in tmp_path.iterdir()] == ["MedNIST.tar.gz"]  # nothing left behind
    assert not (tmp_path.parent / "escaped.jpeg").exists()


def test_mednist_missing_is_one_line_per_class_naming_where(tmp_path, capsys, no_network):
    rc = main([f"--data_root={tmp_path}", "--datasets=MedNIST"])  # download allowed, but offline
    assert rc == 1 and no_network, "a download should have been attempted"
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == len(MEDNIST_CLASSES)
    for cls, line in zip(MEDNIST_CLASSES, lines, strict=True):
        assert line.startswith(f"error: {cls}: not found") and "download failed" in line
        assert str(tmp_path / "MedNIST") in line and str(tmp_path / "MedNIST.tar.gz") in line


# ---------------------------------------------------------------------------------------------------- Decathlon


@pytest.fixture
def decathlon(tmp_path):
    """BraTS (4 channels) and Task02 as folders, Task04 as its .tar only, under D/Decathlon."""
    root = tmp_path / "Decathlon"
    meta = {"Task01_BrainTumour": write_decathlon_task(root, "Task01_BrainTumour", 10, 3, channels=4, seed=1),
            "Task02_Heart": write_decathlon_task(root, "Task02_Heart", 6, 2, seed=2),
            "Task04_Hippocampus": write_decathlon_task(root, "Task04_Hippocampus", 5, 2, seed=3)}
    tar_folder(root / "Task04_Hippocampus", root / "Task04_Hippocampus.tar")
    return tmp_path, meta


def expected_decathlon(task_dir: Path, meta: dict) -> dict[str, list[str]]:
    """MONAI's DecathlonDataset rule, written out: RandomState(0) shuffle of the training list, first 20% val."""
    training = [os.path.normpath(task_dir / t["image"]) for t in meta["training"]]
    idx = np.arange(len(training))
    np.random.RandomState(0).shuffle(idx)
    n_val = int(len(training) * 0.2)
    return {"train": [training[i] for i in idx[n_val:]], "val": [training[i] for i in idx[:n_val]],
            "test": [os.path.normpath(task_dir / p) for p in meta["test"]]}


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}  # the shim must find the package itself
    return subprocess.run([sys.executable, str(REPO_ROOT / "src" / "data" / script), *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def run_shim(script: str, *args: str, monkeypatch) -> int:
    """Run src/data/<script> as ``python src/data/<script> args`` would, in this process (MONAI is imported already)."""
    import runpy

    path = str(REPO_ROOT / "src" / "data" / script)
    monkeypatch.setattr(sys, "argv", [path, *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(path, run_name="__main__")
    return exit_.value.code


def test_upstream_decathlon_command_prepares_the_tasks_present(decathlon, monkeypatch, capsys):
    data_root, meta = decathlon
    monkeypatch.chdir(data_root)
    rc = run_shim("get_decathlon_datasets.py", f"--data_root={data_root}/Decathlon", "--download=0",
                  monkeypatch=monkeypatch)
    out, err = capsys.readouterr()
    assert rc == 1, err[-2000:]
    for task in meta:  # as the reference: CSVs in the PARENT of --data_root
        assert csv_rows(data_root, task) == expected_decathlon(data_root / "Decathlon" / task, meta[task])
    lines = error_lines(err)
    missing = [t for t in DECATHLON_TASKS if t not in meta]
    assert len(lines) == len(missing) == 7
    for task, line in zip(missing, lines, strict=True):
        assert line.startswith(f"error: {task}: not found") and "download disabled" in line
        assert str(data_root / "Decathlon" / task) in line and f"{task}.tar" in line
    assert "Task01_BrainTumour: 4-channel volumes (0 FLAIR, 1 T1w, 2 t1gd, 3 T2w)" in out
    assert not (data_root / "Decathlon" / "data_splits").exists()


def test_decathlon_via_get_datasets_resumes_and_loads_as_3d(decathlon, capsys):
    data_root, meta = decathlon
    argv = [f"--data_root={data_root}", "--datasets=Task01_BrainTumour,Task02_Heart,Task04_Hippocampus",
            "--download=0"]
    assert main(argv) == 0
    rows = csv_rows(data_root, "Task02_Heart")
    assert [len(rows[s]) for s in SPLITS] == [5, 1, 2]
    assert all(p.endswith(".nii.gz") for s in SPLITS for p in rows[s])
    before = snapshot(data_root)
    time.sleep(0.02)
    assert main(argv) == 0
    assert snapshot(data_root) == before  # nothing re-extracted or rewritten
    _say_channel_kept.cache_clear()  # said once per process: maybe already, by another test
    for task in meta:
        ds = dataset_from_csv(str(data_root / "data_splits" / f"{task}_test.csv"), GRAY_3D)
        assert ds.image_shape == (1, 8, 8, 6)
    assert "4-channel NIfTI volumes: keeping channel 0 only" in capsys.readouterr().err


@pytest.mark.parametrize("channel", [0, 2, 3])
def test_brats_keeps_the_channel_asked_for(decathlon, channel):
    import nibabel as nib

    data_root, meta = decathlon
    path = str(data_root / "Decathlon" / "Task01_BrainTumour" / meta["Task01_BrainTumour"]["test"][0])
    volume = np.asarray(nib.load(path).dataobj)  # (H, W, D, C), channel last as BraTS
    x = load_image(path, DataConfig(is_grayscale=True, spatial_dims=3, channel=channel))
    want = torch.from_numpy(volume[..., channel])
    want = (want - want.min()) / (want.max() - want.min())
    torch.testing.assert_close(x, want[None])


def test_channel_out_of_range_and_single_channel_volumes(decathlon):
    data_root, meta = decathlon
    brats = str(data_root / "Decathlon" / "Task01_BrainTumour" / meta["Task01_BrainTumour"]["test"][0])
    with pytest.raises(UserError, match=r"has 4 channels .*--channel=4 is out of range 0..3"):
        load_image(brats, DataConfig(is_grayscale=True, spatial_dims=3, channel=4))
    heart = str(data_root / "Decathlon" / "Task02_Heart" / meta["Task02_Heart"]["test"][0])
    # An out set of a BraTS run with --channel=2: single-channel volumes are used as they are.
    assert load_image(heart, DataConfig(is_grayscale=True, spatial_dims=3, channel=2)).shape == (1, 8, 8, 6)
    with pytest.raises(UserError, match="--channel"):
        DataConfig(is_grayscale=True, channel=-1)


def test_decathlon_incomplete_task_is_reported_the_others_kept(decathlon, capsys):
    data_root, meta = decathlon
    lost = data_root / "Decathlon" / "Task02_Heart" / meta["Task02_Heart"]["training"][3]["image"]
    lost.unlink()
    rc = main([f"--data_root={data_root}", "--datasets=Task01_BrainTumour,Task02_Heart", "--download=0"])
    assert rc == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "Task02_Heart: 1 of the 8 volumes listed in" in lines[0]
    assert os.path.normpath(lost) in lines[0]
    assert len(csv_rows(data_root, "Task01_BrainTumour")["train"]) == 8
    assert not (data_root / "data_splits" / "Task02_Heart_train.csv").exists()


# ------------------------------------------------------------------------------------------------ 3D MedMNIST


def test_medmnist3d_official_splits_saved_as_npy_and_loaded_as_3d(tmp_path):
    src = write_medmnist_npz(tmp_path / "MedMNIST3D", "organmnist3d", (7, 2, 3))
    assert main([f"--data_root={tmp_path}", "--datasets=organmnist3d", "--download=0"]) == 0
    rows = csv_rows(tmp_path, "organmnist3d")
    assert [len(rows[s]) for s in SPLITS] == [7, 2, 3]
    for split in SPLITS:
        for i, p in enumerate(rows[split]):
            assert p == str(tmp_path / "MedMNIST3D" / "organmnist3d" / "numpy" / split / f"organmnist3d_{i}.npy")
            np.testing.assert_array_equal(np.load(p), src[split][i])
    ds = dataset_from_csv(str(tmp_path / "data_splits" / "organmnist3d_val.csv"), GRAY_3D)
    assert ds.image_shape == (1, 28, 28, 28)
    before = snapshot(tmp_path)
    time.sleep(0.02)
    assert main([f"--data_root={tmp_path}", "--datasets=organmnist3d", "--download=0"]) == 0
    assert snapshot(tmp_path) == before


def test_upstream_3dmedmnist_script_and_missing_sets(tmp_path, capsys, monkeypatch):
    write_medmnist_npz(tmp_path / "mm", "vesselmnist3d", (4, 1, 2))
    monkeypatch.setitem(sys.modules, "medmnist", None)  # not installed (an import raises ImportError)
    rc = get_3dmedmnist.main([f"--data_root={tmp_path / 'mm'}", "--datasets=vesselmnist3d,synapsemnist3d"])
    assert rc == 1
    assert [len(v) for v in csv_rows(tmp_path, "vesselmnist3d").values()] == [4, 1, 2]  # parent of --data_root
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(tmp_path / "mm" / "synapsemnist3d.npz") in lines[0]
    assert "pip install medmnist" in lines[0]


def test_medmnist3d_bad_npz_is_one_line(tmp_path, capsys):
    (tmp_path / "MedMNIST3D").mkdir()
    np.savez(tmp_path / "MedMNIST3D" / "nodulemnist3d.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    assert main([f"--data_root={tmp_path}", "--datasets=nodulemnist3d", "--download=0"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "is not a MedMNIST .npz" in lines[0] and "val_images" in lines[0]
    assert "delete it to download it again" in lines[0]


def test_medmnist_download_is_atomic(tmp_path, capsys, monkeypatch):
    # A stand-in for the medmnist package: its class downloads <root>/<flag>.npz; the first attempt dies half-way
    # (as a dropped connection), the second succeeds. Nothing half-written is ever taken for the set.
    import types

    attempts = []

    class FakeSet:
        def __init__(self, split, download, root):
            attempts.append(root)
            if len(attempts) == 1:
                (Path(root) / "adrenalmnist3d.npz").write_bytes(b"PK\x03\x04 truncated")
                raise RuntimeError("connection reset")
            write_medmnist_npz(Path(root), "adrenalmnist3d", (3, 1, 2))

    fake = types.SimpleNamespace(AdrenalMNIST3D=FakeSet, INFO={"adrenalmnist3d": {"python_class": "AdrenalMNIST3D"}})
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    folder = tmp_path / "MedMNIST3D"
    assert main([f"--data_root={tmp_path}", "--datasets=adrenalmnist3d"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "the download failed (RuntimeError: connection reset)" in lines[0]
    assert sorted(p.name for p in folder.iterdir()) == []  # no partial file, no temporary folder
    assert main([f"--data_root={tmp_path}", "--datasets=adrenalmnist3d"]) == 0
    assert Path(attempts[1]).parent == folder and not Path(attempts[1]).exists()
    assert (folder / "adrenalmnist3d.npz").is_file()
    assert [len(v) for v in csv_rows(tmp_path, "adrenalmnist3d").values()] == [3, 1, 2]


# ---------------------------------------------------------------------------------------- names and parsers


def test_results_names_of_every_registered_test_csv_are_distinct():
    """reconstruct.py names an out set by its CSV's first "_"-token: every dataset gets its own results file."""
    names = {d: out_set_name(f"/D/data_splits/{d}_test.csv") for d in DATASETS}
    assert names["Task02_Heart"] == "Task02" and names["AbdomenCT"] == "AbdomenCT"
    assert names["organmnist3d"] == "organmnist3d"
    assert len(set(names.values())) == len(DATASETS)
    assert out_set_name("/D/data_splits/Task01_BrainTumour_vflip_test.csv") == "Task01_vflip"


def test_parsers_accept_groups_and_upstream_flags():
    p = build_parser()
    assert p.parse_args(["--data_root=D", "--datasets=decathlon"]).datasets == DECATHLON_TASKS
    assert p.parse_args(["--data_root=D", "--datasets=MedNIST,hand"]).datasets == MEDNIST_CLASSES
    assert p.parse_args(["--data_root=D", "--datasets=all"]).datasets == DATASETS == GROUPS["all"]
    assert get_3dmedmnist.build_parser().parse_args(["--data_root=D"]).datasets == MEDMNIST3D_SETS
    assert get_mednist_datasets.build_parser().parse_args(["--data_root=D"]).download is True
    shim = get_decathlon_datasets.build_parser()
    assert shim.parse_args(["--data_root=D", "--datasets=task03_liver"]).datasets == ("Task03_Liver",)
    with pytest.raises(SystemExit):
        shim.parse_args(["--data_root=D", "--datasets=MNIST"])  # another family's name


def test_mednist_shim_writes_under_its_data_root(tmp_path):
    """Upstream's MedNIST script keeps data_splits/ in --data_root itself (relative paths stay relative)."""
    write_mednist(tmp_path / "D", {"ChestCT": 10})
    r = run_script("get_mednist_datasets.py", "--data_root=D", "--datasets=ChestCT", "--download=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = csv_rows(tmp_path / "D", "ChestCT", check_exists=False)  # relative to tmp_path
    assert all(p.startswith(os.path.join("D", "MedNIST", "ChestCT", "")) for s in SPLITS for p in rows[s])
    assert sum(len(v) for v in rows.values()) == 10
    assert all((tmp_path / p).is_file() for s in SPLITS for p in rows[s])


def test_channel_travels_in_the_run_config_and_a_contradicting_flag_is_refused(tmp_path):
    from tiny_run import TINY_MODEL, TINY_SCHEDULE

    from ddpm_ood.checkpoint import run_config_of
    from ddpm_ood.cli import reconstruct, train_ddpm
    from ddpm_ood.config import RunConfig
    from ddpm_ood.run_flags import RunFlags, check_flags

    run = RunConfig(TINY_MODEL, TINY_SCHEDULE, DataConfig(is_grayscale=True, spatial_dims=3, channel=2), (1, 8, 8, 6))
    ckpt = {"config": run.to_dict()}
    assert run_config_of(ckpt).data.channel == 2
    assert run_config_of(ckpt) == run
    check_flags(run, RunFlags(channel=2), tmp_path / "c.pth")
    with pytest.raises(UserError, match="--channel=0 contradicts .* trained with 2"):
        check_flags(run, RunFlags(channel=0), tmp_path / "c.pth")
    old = {"config": {**run.to_dict(), "data": {k: v for k, v in run.data.to_dict().items() if k != "channel"}}}
    assert run_config_of(old).data.channel == 0  # before the flag: upstream's
    common = ["--output_dir=o", "--model_name=m", "--channel=3"]
    assert train_ddpm.build_parser().parse_args([*common, "--training_ids=a", "--validation_ids=b"]).channel == 3
    assert reconstruct.build_parser().parse_args(common).channel == 3
