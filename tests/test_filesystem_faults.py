"""File-system faults in every stage: wrong output locations are refused up front in one line; a full disk while
writing any kind of file leaves the earlier complete files byte-identical, and a re-run finishes with the numbers of
an unfaulted run; a second process on the same run is refused, and a killed one leaves no stuck lock.

Faults are injected the way they surface: ``os.fsync`` (where a full disk or an I/O error shows up for a buffered
write) raises ENOSPC for the file under test, and a read-only folder is an injected EACCES (tests run as root, whom
permission bits do not stop).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tiny_run import REPO_ROOT, lpips_installed, needs_lpips, one_torch_thread

from ddpm_ood.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint
from ddpm_ood.cli import get_datasets, ood_detection, reconstruct, score, train_ddpm
from ddpm_ood.cli.runner import EXIT_IO_ERROR, run_cli
from ddpm_ood.errors import UserError
from ddpm_ood.fileio import run_lock

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = REPO_ROOT


def inject_enospc(monkeypatch, name: str) -> dict:
    """Make ``os.fsync`` fail with ENOSPC while file ``name`` is written: the file itself (appended in place) or
    the atomic writer's temporary ``.<name>.XXXX.tmp`` beside it. Returns a hit counter."""
    real_fsync = os.fsync
    hits = {"n": 0}

    def is_target(path: str) -> bool:
        base = os.path.basename(path)
        return base == name or (base.startswith(f".{name}.") and base.endswith(".tmp"))

    def fsync(fd: int) -> None:
        if is_target(os.readlink(f"/proc/self/fd/{fd}")):
            hits["n"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hits


def one_error_line(capsys, *fragments: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


# --------------------------------------------------------------------------------------------- training
@pytest.fixture
def train_data(toy_run):
    return toy_run.splits


def train_args(splits: Path, out: Path, n_epochs: int) -> list[str]:
    return [f"--output_dir={out}", "--model_name=run", f"--training_ids={splits / 'Toy_train.csv'}",
            f"--validation_ids={splits / 'Toy_val.csv'}", "--model_type=tiny", "--is_grayscale=1", "--batch_size=4",
            f"--n_epochs={n_epochs}", "--eval_freq=1", "--checkpoint_every=0", "--num_workers=0", "--lr=1e-3",
            "--sample_steps=0", "--cache_data=1"]


def test_output_dir_that_is_a_file_is_refused_in_one_line(train_data, tmp_path, capsys):
    a_file = tmp_path / "typo"
    a_file.write_text("not a folder")
    assert run_cli(train_ddpm.main, train_args(train_data, a_file, 1)) == 2
    one_error_line(capsys, str(a_file), "is a file, not a folder")
    assert a_file.read_text() == "not a folder"


def test_unwritable_output_dir_is_refused_before_training(train_data, tmp_path, capsys, monkeypatch):
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, **kwargs):
        if ".write-test." in str(kwargs.get("prefix", "")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert run_cli(train_ddpm.main, train_args(train_data, tmp_path / "out", 1)) == 2
    one_error_line(capsys, "cannot write in", "Permission denied")
    assert not (tmp_path / "out" / "run" / LAST_CHECKPOINT).exists()


def test_full_disk_at_a_checkpoint_keeps_the_last_one_and_a_rerun_matches(train_data, tmp_path, capsys, monkeypatch):
    clean = tmp_path / "clean"
    assert run_cli(train_ddpm.main, train_args(train_data, clean, 2)) == 0
    out = tmp_path / "faulted"
    assert run_cli(train_ddpm.main, train_args(train_data, out, 1)) == 0
    run = out / "run"
    before = (run / LAST_CHECKPOINT).read_bytes()
    capsys.readouterr()
    hits = inject_enospc(monkeypatch, LAST_CHECKPOINT)
    assert run_cli(train_ddpm.main, train_args(train_data, out, 2)) == EXIT_IO_ERROR
    assert hits["n"] == 1
    one_error_line(capsys, str(run / LAST_CHECKPOINT), "No space left on device (ENOSPC)")
    assert (run / LAST_CHECKPOINT).read_bytes() == before  # still the complete epoch-1 checkpoint
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert run_cli(train_ddpm.main, train_args(train_data, out, 2)) == 0
    resumed, uninterrupted = load_checkpoint(run / LAST_CHECKPOINT), load_checkpoint(clean / "run" / LAST_CHECKPOINT)
    assert resumed["epoch"] == uninterrupted["epoch"] == 2
    for key, value in uninterrupted["model_state_dict"].items():
        assert torch.equal(resumed["model_state_dict"][key], value), key
    assert resumed["best_loss"] == uninterrupted["best_loss"]
    assert (run / BEST_CHECKPOINT).is_file()


# ------------------------------------------------------------------------- reconstruction, detection, scoring
def recon_args(splits: Path, out: Path) -> list[str]:
    return [f"--output_dir={out}", "--model_name=toy", f"--validation_ids={splits / 'Toy_val.csv'}",
            f"--in_ids={splits / 'Toy_test.csv'}", f"--out_ids={splits / 'Other_test.csv'}", "--is_grayscale=1",
            "--num_inference_steps=10", "--inference_skip_factor=4", "--num_workers=0", "--batch_size=2",
            "--device=cpu"]


@pytest.fixture(scope="module")
def clean(toy_run, tmp_path_factory) -> Path:
    """A copy of the toy run: the output folder of unfaulted runs (clean_results)."""
    return toy_run.copy_to(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def clean_results(toy_run, clean):
    splits = toy_run.splits
    if lpips_installed():
        with one_torch_thread():  # as the tests: the thread count changes float rounding
            assert reconstruct.main(recon_args(splits, clean)) == 0
            assert ood_detection.main([f"--output_dir={clean}", "--model_name=toy"]) == 0
    return clean / "toy" / "ood"


@needs_lpips
@pytest.mark.parametrize("faulty", ["results_in.csv.partial", "results_in.csv", "results_in.json"])
def test_full_disk_while_writing_results_then_rerun_matches(toy_run, clean_results, tmp_path, capsys, monkeypatch,
                                                           faulty):
    splits = toy_run.splits
    out = toy_run.copy_to(tmp_path / "out")
    ood = out / "toy" / "ood"
    hits = inject_enospc(monkeypatch, faulty)
    assert run_cli(reconstruct.main, recon_args(splits, out)) == EXIT_IO_ERROR
    assert hits["n"] == 1
    line = one_error_line(capsys, "No space left on device (ENOSPC)")
    assert str(ood / faulty) in line
    val_before = (ood / "results_val.csv").read_bytes()  # finished before the fault
    assert val_before == (clean_results / "results_val.csv").read_bytes()
    assert not [p for p in ood.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert run_cli(reconstruct.main, recon_args(splits, out)) == 0
    for name in ("results_val.csv", "results_in.csv", "results_Other.csv"):
        assert (ood / name).read_bytes() == (clean_results / name).read_bytes(), name


@needs_lpips
@pytest.mark.parametrize("faulty", ["summary.json", "roc_curves.png"])
def test_full_disk_while_writing_detection_outputs(toy_run, clean_results, tmp_path, capsys, monkeypatch, faulty):
    out = toy_run.copy_to(tmp_path / "out")
    ood = out / "toy" / "ood"
    shutil.copytree(clean_results, ood, dirs_exist_ok=True)
    before = snapshot(ood)
    (ood / "summary.csv").write_text("an earlier complete summary\n")
    inject_enospc(monkeypatch, faulty)
    assert run_cli(ood_detection.main, [f"--output_dir={out}", "--model_name=toy"]) == EXIT_IO_ERROR
    one_error_line(capsys, str(ood / faulty), "ENOSPC")
    assert (ood / faulty).read_bytes() == before[faulty]
    monkeypatch.undo()
    assert run_cli(ood_detection.main, [f"--output_dir={out}", "--model_name=toy"]) == 0
    assert (ood / "summary.csv").read_bytes() == before["summary.csv"]


@needs_lpips
def test_score_csv_faults_and_missing_folder(toy_run, clean, clean_results, tmp_path, capsys, monkeypatch):
    args = [f"--output_dir={clean}", "--model_name=toy", f"--inputs={toy_run.splits / 'Other_test.csv'}",
            "--device=cpu"]
    out_csv = tmp_path / "scores.csv"
    assert run_cli(score.main, [*args, f"--out_csv={out_csv}"]) == 0
    good = out_csv.read_bytes()
    capsys.readouterr()
    inject_enospc(monkeypatch, "scores.csv")
    assert run_cli(score.main, [*args, f"--out_csv={out_csv}"]) == EXIT_IO_ERROR
    one_error_line(capsys, str(out_csv), "ENOSPC")
    assert out_csv.read_bytes() == good
    monkeypatch.undo()
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    assert run_cli(score.main, [*args, f"--out_csv={a_file / 'scores.csv'}"]) == 2
    one_error_line(capsys, "--out_csv", str(a_file), "is a file, not a folder")
    created = tmp_path / "new_folder" / "scores.csv"  # a missing folder is created, as every output folder
    assert run_cli(score.main, [*args, f"--out_csv={created}"]) == 0
    assert created.read_bytes() == good


@needs_lpips
def test_reconstruct_and_detection_refuse_a_file_as_output_dir(toy_run, tmp_path, capsys):
    a_file = tmp_path / "F"
    a_file.write_text("x")
    assert run_cli(reconstruct.main, recon_args(toy_run.splits, a_file)) == 2
    one_error_line(capsys, str(a_file), "is a file, not a folder")
    assert run_cli(ood_detection.main, [f"--output_dir={a_file}", "--model_name=toy"]) == 2
    one_error_line(capsys, str(a_file))


def test_get_datasets_refuses_a_file_as_data_root(tmp_path, capsys):
    a_file = tmp_path / "data"
    a_file.write_text("x")
    assert run_cli(get_datasets.main, [f"--data_root={a_file}", "--datasets=MNIST", "--download=0"]) == 2
    one_error_line(capsys, "--data_root", "is a file, not a folder")


# ------------------------------------------------------------------------------------------------ double launch
def test_second_run_on_the_same_folder_is_refused(train_data, tmp_path, capsys):
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    with run_lock(run, "train_ddpm"):
        assert run_cli(train_ddpm.main, train_args(train_data, tmp_path / "out", 1)) == 2
        one_error_line(capsys, ".train_ddpm.lock", "already running", f"pid {os.getpid()}")
        with run_lock(run, "reconstruct"):  # another stage has its own lock
            pass
    assert not (run / LAST_CHECKPOINT).exists()
    assert run_cli(train_ddpm.main, train_args(train_data, tmp_path / "out", 1)) == 0


def test_a_killed_run_leaves_no_stuck_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ddpm_ood.fileio import run_lock\n"
         f"with run_lock({str(tmp_path)!r}, 'train_ddpm'):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="already running"), run_lock(tmp_path, "train_ddpm"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(tmp_path, "train_ddpm"):
        assert "pid" in (tmp_path / ".train_ddpm.lock").read_text()
