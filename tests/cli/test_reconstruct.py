"""reconstruct.py end to end on tiny data: files, rows, resume, batch-size invariance, flips, torchrun, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_run import FLOAT_ROUNDING, REPO_ROOT, TINY_SCHEDULE, needs_lpips

from ddpm_ood.cli.reconstruct import main
from ddpm_ood.cli.runner import run_cli
from ddpm_ood.data.splits import write_split_csv
from ddpm_ood.results.schema import RESULT_COLUMNS

REPO = REPO_ROOT


pytestmark = needs_lpips


def _args(splits: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--output_dir={out}",
        "--model_name=toy",
        f"--validation_ids={splits / 'Toy_val.csv'}",
        f"--in_ids={splits / 'Toy_test.csv'}",
        f"--out_ids={splits / 'Other_test.csv'},{splits / 'Toy_vflip_test.csv'}",
        "--is_grayscale=1",
        "--num_inference_steps=10",
        "--inference_skip_factor=4",
        "--num_workers=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def baseline(toy_run, tmp_path_factory):
    out = toy_run.copy_to(tmp_path_factory.mktemp("baseline"))
    assert main(_args(toy_run.splits, out, "--batch_size=7")) == 0
    return out / "toy" / "ood"


def test_writes_expected_files_and_rows(baseline):
    files = sorted(p.name for p in baseline.glob("results_*.csv"))
    assert files == ["results_Other.csv", "results_Toy_vflip.csv", "results_in.csv", "results_val.csv"]
    val = pd.read_csv(baseline / "results_val.csv")
    assert list(val.columns) == RESULT_COLUMNS
    assert len(val) == 3 * 3  # 3 images x ceil(10 / 4) start points
    assert sorted(val["t"].unique()) == [1, 401, 801]
    assert set(val["type"]) == {"val"}
    assert (val["mse"] >= 0).all() and (val["perceptual_difference"] >= 0).all()
    assert set(pd.read_csv(baseline / "results_Toy_vflip.csv")["type"]) == {"out"}
    assert not list(baseline.glob("*.partial"))


def test_flipped_set_differs_from_unflipped(baseline):
    flipped = pd.read_csv(baseline / "results_Toy_vflip.csv")
    plain = pd.read_csv(baseline / "results_in.csv")
    assert list(flipped["filename"]) == list(plain["filename"])
    assert not np.allclose(flipped["mse"], plain["mse"])


def assert_same_results(ood: Path, baseline: Path) -> None:
    """Same rows in the same order, once each; values equal up to the float rounding of other batch compositions."""
    for f in baseline.glob("results_*.csv"):
        other, single = pd.read_csv(ood / f.name), pd.read_csv(f)
        assert other[["filename", "type", "t"]].equals(single[["filename", "type", "t"]]), f.name
        for metric in ("mse", "perceptual_difference"):
            assert np.abs(other[metric] - single[metric]).max() < FLOAT_ROUNDING, (f.name, metric)


def test_batch_size_changes_numbers_only_by_float_rounding(toy_run, baseline, tmp_path):
    toy_run.copy_to(tmp_path)
    assert main(_args(toy_run.splits, tmp_path, "--batch_size=1")) == 0
    assert_same_results(tmp_path / "toy" / "ood", baseline)


def test_moved_data_and_another_working_directory_change_no_number(toy_run, baseline, tmp_path, monkeypatch):
    """Noise is keyed by file stem, not path: the same images elsewhere, listed relative to another working
    directory, give byte-identical results files."""
    import shutil

    root = toy_run.root
    toy_run.copy_to(tmp_path / "out")
    moved = tmp_path / "elsewhere"
    rel_splits = tmp_path / "splits"
    for csv_name, folder in (("Toy_val.csv", "val"), ("Toy_test.csv", "test"), ("Other_test.csv", "other")):
        shutil.copytree(root / folder, moved / folder)
        names = sorted(p.name for p in (root / folder).iterdir())
        write_split_csv(rel_splits / csv_name, [f"elsewhere/{folder}/{n}" for n in names])
    monkeypatch.chdir(tmp_path)
    assert main(_args(rel_splits, tmp_path / "out", "--batch_size=7")) == 0
    for f in baseline.glob("results_*.csv"):
        assert (tmp_path / "out" / "toy" / "ood" / f.name).read_bytes() == f.read_bytes(), f.name


def test_reference_engine_gives_the_same_numbers(toy_run, baseline, tmp_path):
    toy_run.copy_to(tmp_path)
    assert main(_args(toy_run.splits, tmp_path, "--engine=reference", "--run_in=0", "--run_out=0")) == 0
    ref = pd.read_csv(tmp_path / "toy" / "ood" / "results_val.csv")
    fast = pd.read_csv(baseline / "results_val.csv")
    assert np.abs(ref["mse"] - fast["mse"]).max() < 1e-6
    assert np.abs(ref["perceptual_difference"] - fast["perceptual_difference"]).max() < 1e-4


def test_resume_after_interruption_gives_identical_files(toy_run, tmp_path, monkeypatch):
    from ddpm_ood.results import writer as results_writer

    splits = toy_run.splits
    uninterrupted = toy_run.copy_to(tmp_path / "uninterrupted")
    assert main(_args(splits, uninterrupted, "--batch_size=2")) == 0
    toy_run.copy_to(tmp_path)
    original = results_writer.ResumableResults.append
    calls = {"n": 0}

    def interrupting(self, rows):
        original(self, rows)
        calls["n"] += 1
        if calls["n"] == 3:  # in the middle of the in set (val took 2 batches of 2)
            raise KeyboardInterrupt

    monkeypatch.setattr(results_writer.ResumableResults, "append", interrupting)
    assert run_cli(main, _args(splits, tmp_path, "--batch_size=2")) == 130
    ood = tmp_path / "toy" / "ood"
    assert (ood / "results_val.csv").is_file() and (ood / "results_in.csv.partial").is_file()
    monkeypatch.setattr(results_writer.ResumableResults, "append", original)
    assert main(_args(splits, tmp_path, "--batch_size=2")) == 0
    for f in (uninterrupted / "toy" / "ood").glob("results_*.csv"):
        assert (ood / f.name).read_bytes() == f.read_bytes(), f.name


def test_sigterm_flushes_the_rows_done_exits_75_and_the_rerun_gives_identical_files(toy_run, tmp_path, monkeypatch,
                                                                                     capsys):
    import signal

    from ddpm_ood.preemption import EXIT_PREEMPTED
    from ddpm_ood.results import writer as results_writer

    splits = toy_run.splits
    uninterrupted = tmp_path / "uninterrupted"
    toy_run.copy_to(uninterrupted)
    assert main(_args(splits, uninterrupted, "--batch_size=2")) == 0
    toy_run.copy_to(tmp_path)
    original = results_writer.ResumableResults.append
    calls = {"n": 0}

    def signalled(self, rows):
        calls["n"] += 1
        if calls["n"] == 3:  # while the first batch of the in set is being written (val took 2 batches of 2)
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, rows)

    monkeypatch.setattr(results_writer.ResumableResults, "append", signalled)
    capsys.readouterr()
    assert run_cli(main, _args(splits, tmp_path, "--batch_size=2")) == EXIT_PREEMPTED
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert last.startswith("preempted: SIGTERM: stopped in set in after 2 of 4 images; their rows are in ")
    ood = tmp_path / "toy" / "ood"
    # The batch in progress was finished and flushed; nothing after it was started.
    assert len(pd.read_csv(ood / "results_in.csv.partial")) == 2 * 3 and calls["n"] == 3
    assert not (ood / "results_in.csv").exists()
    monkeypatch.setattr(results_writer.ResumableResults, "append", original)
    assert main(_args(splits, tmp_path, "--batch_size=2")) == 0
    for f in (uninterrupted / "toy" / "ood").glob("results_*.csv"):
        assert (ood / f.name).read_bytes() == f.read_bytes(), f.name


def test_complete_files_are_skipped_and_other_settings_recomputed(toy_run, tmp_path, capsys):
    toy_run.copy_to(tmp_path)
    args = _args(toy_run.splits, tmp_path, "--run_in=0", "--run_out=0")
    assert main(args) == 0
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert main([*args[:-2], "--inference_skip_factor=5", "--num_workers=0"]) == 0
    assert sorted(pd.read_csv(tmp_path / "toy" / "ood" / "results_val.csv")["t"].unique()) == [1, 501]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--beta_schedule=cosine"], "contradicts"),
        (["--model_type=big"], "contradicts"),
        (["--eval_checkpoint=nope.pth"], "checkpoint not found"),
        (["--is_grayscale=0"], "contradicts"),
    ],
)
def test_bad_flags_fail_with_one_line(toy_run, tmp_path, capsys, extra, message):
    toy_run.copy_to(tmp_path)
    assert run_cli(main, _args(toy_run.splits, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_bad_inputs_leave_earlier_results_intact(toy_run, baseline, tmp_path, capsys):
    splits = toy_run.splits
    toy_run.copy_to(tmp_path)
    ood = tmp_path / "toy" / "ood"
    ood.mkdir(parents=True)
    before = (baseline / "results_val.csv").read_bytes()
    (ood / "results_val.csv").write_bytes(before)
    cases = [
        (f"--out_ids={splits / 'Other_test.csv'},{splits / 'Other_vflip_test.csv'},{splits / 'Other_test.csv'}",
         "both write results_Other.csv"),
        (f"--out_ids={splits / 'Missing_vflip_test.csv'}", "Missing_test.csv"),
        (f"--out_ids={splits / 'Rgb_test.csv'}", "Rgb_0.npy"),
        (f"--out_ids={splits / 'nope.csv'}", "nope.csv"),
    ]
    for out_ids, message in cases:
        args = [a for a in _args(splits, tmp_path) if not a.startswith("--out_ids")] + [out_ids]
        assert run_cli(main, args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert (ood / "results_val.csv").read_bytes() == before


def test_root_script_reports_missing_checkpoint_without_traceback(toy_run, tmp_path):
    proc = subprocess.run(
        [sys.executable, "reconstruct.py", *_args(toy_run.splits, tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "checkpoint not found" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(toy_run, baseline, tmp_path):
    toy_run.copy_to(tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "reconstruct.py", *_args(toy_run.splits, tmp_path, "--batch_size=2")],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_results(tmp_path / "toy" / "ood", baseline)


def test_precision_is_recorded_and_a_file_is_never_continued_at_another(toy_run, tmp_path, capsys, monkeypatch):
    import json

    toy_run.copy_to(tmp_path)
    args = _args(toy_run.splits, tmp_path, "--run_in=0", "--run_out=0")
    sidecar = tmp_path / "toy" / "ood" / "results_val.json"
    monkeypatch.setenv("DDPM_OOD_CPU_NATIVE_BF16", "0")
    assert main([*args, "--amp=1"]) == 0  # bf16 emulated here: --amp=1 resolves to fp32
    assert json.loads(sidecar.read_text())["precision"] == "fp32"
    fp32_rows = pd.read_csv(tmp_path / "toy" / "ood" / "results_val.csv")
    capsys.readouterr()
    # A partial file at fp32 (as an interrupted fp32 run leaves), then a run at bf16: the final fp32 file is
    # recomputed and the fp32 rows of the partial file are discarded, not mixed in.
    partial = tmp_path / "toy" / "ood" / "results_val.csv.partial"
    fp32_rows.head(3).assign(index=0)[["index", *RESULT_COLUMNS]].to_csv(partial, index=False)
    partial.with_name(partial.name + ".json").write_text(sidecar.read_text())
    assert main([*args, "--precision=bf16"]) == 0
    out_text = capsys.readouterr().out
    assert "recomputing results_val.csv" in out_text and "precision: fp32 -> bf16" in out_text
    assert "discarding results_val.csv.partial" in out_text
    assert json.loads(sidecar.read_text())["precision"] == "bf16"
    bf16_rows = pd.read_csv(tmp_path / "toy" / "ood" / "results_val.csv")
    assert not np.allclose(bf16_rows["mse"], fp32_rows["mse"], rtol=0, atol=1e-9)  # really recomputed in bf16
    assert not partial.exists()


def test_noise_drawn_ahead_is_the_seeded_noise_and_its_shape_is_checked():
    from ddpm_ood.autoencoder.base import IdentityAutoencoder
    from ddpm_ood.diffusion.noise import noise_batch
    from ddpm_ood.reconstruction.engine import reconstruct_batched
    from ddpm_ood.reconstruction.pipeline import set_batches
    from ddpm_ood.reconstruction.plan import ReconstructionPlan
    from ddpm_ood.runs import RunModel
    from ddpm_ood.seeding import noise_key

    batches = [{"index": torch.tensor([2 * i, 2 * i + 1]), "path": [f"/d/a_{i}.npy", f"/d/b_{i}.npy"],
                "image": torch.rand(2, 1, 4, 4)} for i in range(3)]
    model = RunModel(lambda x, t: x, TINY_SCHEDULE, IdentityAutoencoder(), (1, 4, 4))
    plan = ReconstructionPlan.at((1, 501), 10, 7)
    got = list(set_batches(batches, plan, torch.device("cpu"), model))
    assert [images for _, _, images, _, _ in got] == [b["image"] for b in batches]
    for batch, (indices, filenames, _, keys, noise) in zip(batches, got, strict=True):
        assert indices == batch["index"].tolist() and filenames == [noise_key(p) for p in batch["path"]]
        assert keys == [noise_key(p) for p in batch["path"]]
        assert torch.equal(noise, noise_batch(7, keys, [1, 501], (1, 4, 4)))
    assert all(noise is None for *_, noise in set_batches(batches, plan, torch.device("cpu"), model,
                                                          with_noise=False))
    with pytest.raises(ValueError, match="start noise has shape"):
        reconstruct_batched(lambda x, t: x, TINY_SCHEDULE, torch.rand(2, 1, 4, 4), ["a", "b"], plan,
                            noise=torch.zeros(2, 2, 1, 8, 8))


def test_abbreviated_model_flags_count_as_given():
    # argparse accepts unambiguous abbreviations; a flag given that way must be checked like the full spelling.
    from ddpm_ood.cli.reconstruct import build_parser

    parser = build_parser()
    base = ["--output_dir=o", "--model_name=m"]
    args = parser.parse_args(base)
    assert (args.is_grayscale, args.spatial_dimension, args.channel) == (None, None, None)  # the checkpoint's
    args = parser.parse_args([*base, "--chan=2", "--is_gray=1", "--spatial_dim=3"])
    assert (args.is_grayscale, args.spatial_dimension, args.channel) == (True, 3, 2)
