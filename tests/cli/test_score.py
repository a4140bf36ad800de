"""score.py end to end on tiny data: scores equal reconstruct.py + the scoring module, API = CLI, bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_run import FLOAT_ROUNDING, REPO_ROOT, lpips_installed, needs_lpips

from ddpm_ood.cli import reconstruct
from ddpm_ood.cli.runner import run_cli
from ddpm_ood.cli.score import main
from ddpm_ood.data.splits import read_split_csv
from ddpm_ood.fileio import image_stem
from ddpm_ood.ood.scorer import OUTPUT_COLUMNS, OODScorer
from ddpm_ood.ood.zscore import DEFAULT_SCORE, ValidationReference, image_scores, select_timesteps
from ddpm_ood.results.run_dir import RunDir
from ddpm_ood.results.schema import read_results

REPO = REPO_ROOT
SCORE_COLS = {"score": DEFAULT_SCORE, "mse_score": "mse", "perceptual_score": "perceptual"}


@pytest.fixture(scope="module")
def recon(toy_run, tmp_path_factory):
    """The toy run (a tiny random UNet), then reconstruct.py for its val and in sets (start points t = 1, 501)."""
    root, splits = toy_run.root, toy_run.splits
    out = toy_run.copy_to(tmp_path_factory.mktemp("score"))
    if lpips_installed():
        assert reconstruct.main([
            f"--output_dir={out}", "--model_name=toy", f"--validation_ids={splits / 'Toy_val.csv'}",
            f"--in_ids={splits / 'Toy_test.csv'}", "--run_out=0", "--num_inference_steps=4",
            "--inference_skip_factor=2", "--num_workers=0", "--device=cpu", "--batch_size=4",
        ]) == 0
    return root, splits, out


def _score_args(out: Path, inputs: str, out_csv: Path, *extra: str) -> list[str]:
    return [f"--output_dir={out}", "--model_name=toy", f"--inputs={inputs}", f"--out_csv={out_csv}",
            "--device=cpu", *extra]


@pytest.fixture(scope="module")
def scored_in(recon, tmp_path_factory):
    """score.py on the in set's split CSV: (output CSV path, stdout)."""
    import contextlib
    import io

    _, splits, out = recon
    out_csv = tmp_path_factory.mktemp("scored") / "in_scores.csv"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(_score_args(out, str(splits / "Toy_test.csv"), out_csv, "--batch_size=2")) == 0
    return out_csv, buf.getvalue()


@needs_lpips
def test_scores_equal_reconstruct_plus_scoring(recon, scored_in):
    _, splits, out = recon
    out_csv, stdout = scored_in
    got = pd.read_csv(out_csv, keep_default_na=False, na_values=[""])
    assert list(got.columns) == OUTPUT_COLUMNS
    assert list(got["path"]) == read_split_csv(splits / "Toy_test.csv")
    assert got["error"].isna().all()  # empty = no error

    val = read_results(RunDir(out, "toy").results("val"))
    ref = ValidationReference.fit(val, select_timesteps(val["t"]))
    expected = image_scores(read_results(RunDir(out, "toy").results("in")), ref)
    for column, name in SCORE_COLS.items():
        want = expected.loc[[image_stem(p) for p in got["path"]], name].to_numpy()
        # reconstruct.py batched these images with the others of the set, score.py on their own
        np.testing.assert_allclose(got[column].to_numpy(), want, rtol=FLOAT_ROUNDING, atol=FLOAT_ROUNDING)

    # The threshold is the 95% quantile of the validation images' own scores; is_ood = score above it.
    summary = json.loads(Path(f"{out_csv}.json").read_text())
    val_scores = image_scores(val, ref)[DEFAULT_SCORE].to_numpy()
    assert summary["threshold"] == pytest.approx(np.quantile(val_scores, 0.95), abs=1e-12)
    assert summary["expected_false_positive_rate"] == pytest.approx(0.05)
    assert summary["validation_false_positive_rate"] == pytest.approx(np.mean(val_scores > summary["threshold"]))
    assert summary["reconstruction"]["start_timesteps"] == [1, 501]
    assert list(got["is_ood"]) == list(got["score"] > summary["threshold"])
    n_flagged = int(got["is_ood"].sum())
    assert summary["n_flagged"] == n_flagged and summary["n_scored"] == 4 and summary["n_failed"] == 0
    assert f"{n_flagged} of 4 scored inputs flagged as OOD, 0 failed" in stdout
    assert "expected false-positive rate 5.0%" in stdout


@needs_lpips
def test_api_equals_cli(recon, scored_in):
    _, splits, out = recon
    cli = pd.read_csv(scored_in[0], keep_default_na=False, na_values=[""])
    scorer = OODScorer.from_run(out, "toy", device="cpu", batch_size=3)
    api = scorer.score(read_split_csv(splits / "Toy_test.csv"), progress=False)
    assert list(api.columns) == OUTPUT_COLUMNS and list(api["path"]) == list(cli["path"])
    for column in SCORE_COLS:
        np.testing.assert_allclose(api[column].to_numpy(), cli[column].to_numpy(), rtol=FLOAT_ROUNDING,
                                   atol=FLOAT_ROUNDING)
    assert list(api["is_ood"]) == list(cli["is_ood"])
    assert scorer.threshold == pytest.approx(json.loads(Path(f"{scored_in[0]}.json").read_text())["threshold"])


@needs_lpips
def test_folder_with_bad_files_gets_error_rows(recon, tmp_path, capsys):
    root, splits, out = recon
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(read_split_csv(splits / "Toy_test.csv")[0], folder / "a_good.npy")
    np.save(folder / "b_rgb.npy", np.zeros((3, 8, 8), dtype=np.uint8))
    (folder / "c_corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(folder / "d_big.npy", np.zeros((16, 16), dtype=np.uint8))
    np.save(folder / "e_volume.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    (folder / "f_notes.txt").write_text("not an image")
    out_csv = tmp_path / "res" / "mixed.csv"
    assert main(_score_args(out, str(folder), out_csv)) == 0
    got = pd.read_csv(out_csv, keep_default_na=False, na_values=[""])
    assert [Path(p).name for p in got["path"]] == ["a_good.npy", "b_rgb.npy", "c_corrupt.npy", "d_big.npy",
                                                   "e_volume.npy"]  # the .txt is not an image: ignored
    assert np.isfinite(got.loc[0, ["score", "mse_score", "perceptual_score"]].astype(float)).all()
    assert pd.isna(got.at[0, "error"])
    errors = got["error"].tolist()[1:]
    for name, message in zip(["b_rgb", "c_corrupt", "d_big", "e_volume"],
                             ["3 channels", "cannot be read", "(1, 16, 16)", "3D volume"], strict=True):
        error = errors.pop(0)
        assert name in error and message in error, error
    assert got.loc[1:, ["score", "mse_score", "perceptual_score", "is_ood"]].isna().all().all()
    assert "of 1 scored inputs flagged as OOD, 4 failed" in capsys.readouterr().out



@needs_lpips
def test_no_readable_input_is_an_error_and_writes_nothing(recon, tmp_path, capsys):
    _, _, out = recon
    folder = tmp_path / "bad"
    folder.mkdir()
    np.save(folder / "rgb.npy", np.zeros((3, 8, 8), dtype=np.uint8))
    assert run_cli(main, _score_args(out, str(folder), tmp_path / "x.csv")) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.strip() and not line.startswith("score:")]  # not tqdm
    assert "Traceback" not in stderr and len(err) == 1
    assert err[0].startswith("error: none of the 1 input(s) could be scored;")
    assert "rgb.npy: has 3 channels" in err[0]
    assert not (tmp_path / "x.csv").exists()


def test_missing_validation_results_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    np.save(tmp_path / "imgs" / "a.npy", np.zeros((8, 8)))
    args = _score_args(tmp_path / "out", str(tmp_path / "imgs"), tmp_path / "s.csv")
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "results_val.csv" in err[0]
    assert "run reconstruct.py with --run_val=1 first" in err[0]


def test_empty_folder_is_a_one_line_error_from_the_root_script(tmp_path):
    (tmp_path / "empty").mkdir()
    args = _score_args(tmp_path / "out", str(tmp_path / "empty"), tmp_path / "s.csv")
    proc = subprocess.run([sys.executable, "score.py", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "has no image files" in err[0]
    assert not (tmp_path / "s.csv").exists()


def test_every_flag_has_help():
    from ddpm_ood.cli.score import build_parser

    for action in build_parser()._actions:
        assert action.help, action.dest
