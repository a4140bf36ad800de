"""OODScorer (ddpm_ood.ood.scorer): threshold calibration, input collection, the docstring example, in-memory inputs.

The API tests use a run whose results_val.csv is synthetic (random metrics at the two start points), so no
reconstruct.py run is needed; tests/test_score_cli.py checks scores against a real reconstruct.py run.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_run import FLOAT_ROUNDING, REPO_ROOT, needs_lpips, save_tiny_checkpoint

from ddpm_ood.data.datasets import load_image
from ddpm_ood.data.splits import write_split_csv
from ddpm_ood.errors import UserError
from ddpm_ood.ood.scorer import (
    ARRAY_KEY_PREFIX,
    OUTPUT_COLUMNS,
    OODScorer,
    array_key,
    calibrate_threshold,
    collect_inputs,
)
from ddpm_ood.results.run_dir import RunDir
from ddpm_ood.results.schema import RESULT_COLUMNS
from ddpm_ood.seeding import NOISE_KEY_RULE

START_TS = [1, 501]  # num_inference_steps=4, inference_skip_factor=2


# ---------------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("n", [1, 2, 7, 20, 101, 1000])
@pytest.mark.parametrize("val_keep", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_flagged_fraction_of_validation_is_one_minus_val_keep_within_one_input(n, val_keep):
    scores = np.random.default_rng(n).normal(size=n)
    cal = calibrate_threshold(scores, val_keep)
    flagged = int((scores > cal.threshold).sum())
    assert cal.val_flagged == flagged and cal.n_val == n
    assert abs(flagged - (1 - val_keep) * n) <= 1
    assert cal.val_fpr == pytest.approx(flagged / n)
    assert cal.expected_fpr == pytest.approx(1 - val_keep)
    assert scores.min() <= cal.threshold <= scores.max()


def test_threshold_rises_with_val_keep():
    scores = np.random.default_rng(0).normal(size=50)
    thresholds = [calibrate_threshold(scores, k).threshold for k in (0.5, 0.9, 0.95, 1.0)]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == 4
    assert thresholds[-1] == scores.max()


@pytest.mark.parametrize("val_keep", [0.0, -0.1, 1.5, float("nan")])
def test_bad_val_keep_is_a_user_error(val_keep):
    with pytest.raises(UserError, match="^val_keep must be in") as raised:  # the parameter; the CLI says --val_keep
        calibrate_threshold([0.0, 1.0], val_keep)
    assert "--" not in str(raised.value)


def test_non_finite_validation_scores_are_refused():
    with pytest.raises(UserError, match="NaN"):
        calibrate_threshold([0.0, np.nan, 1.0])


# ------------------------------------------------------------------------------------------------ inputs
def test_collect_inputs_folder_csv_and_list(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.npy", "a.png", "c.nii.gz", "D.JPG", "notes.txt", ".hidden.npy"):
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "e.npy").write_bytes(b"x")
    assert collect_inputs(str(folder)) == [str(folder / n) for n in ("D.JPG", "a.png", "b.npy", "c.nii.gz")]
    listed = [str(folder / "b.npy"), str(tmp_path / "missing.npy")]
    write_split_csv(tmp_path / "set.csv", listed)
    assert collect_inputs(str(tmp_path / "set.csv")) == listed  # a missing file becomes an error row later
    assert collect_inputs(f"{folder / 'a.png'}, {folder / 'notes.txt'}") == [
        str(folder / "a.png"), str(folder / "notes.txt")
    ]
    assert collect_inputs(str(folder / "b.npy")) == [str(folder / "b.npy")]


def test_collect_inputs_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(UserError, match="has no image files"):
        collect_inputs(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not a folder, a split CSV or an image file"):
        collect_inputs(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="split CSV not found"):
        collect_inputs(str(tmp_path / "nowhere.csv"))


def test_array_key_is_content_based_and_never_a_file_key():
    from ddpm_ood.seeding import noise_key

    x = torch.rand(1, 8, 8)
    assert array_key(x) == array_key(x.clone()) and array_key(x).startswith(ARRAY_KEY_PREFIX)
    assert array_key(x) != array_key(x.flip(1)) and array_key(x) != array_key(x.reshape(1, 4, 16))
    # file keys are stems (no "/"), so an array never shares noise with a file
    assert "/" in array_key(x) and "/" not in noise_key("/data/a/b/MNIST_7.npy")


# ------------------------------------------------------------------------------------------------ the API
def _save_run(out: Path, model_name: str, epoch: int = 1) -> Path:
    ckpt = out / model_name / "checkpoint.pth"
    save_tiny_checkpoint(ckpt, epoch=epoch)
    return ckpt


def _write_synthetic_val(out: Path, model_name: str, ckpt: Path, n_val: int = 6, epoch: int = 1,
                         precision: dict | None = None) -> None:
    """results_val.csv with random metrics at START_TS, and the results_val.json reconstruct.py writes beside it."""
    rng = np.random.default_rng(0)
    rows = [
        {"filename": f"val_{i}", "type": "val", "t": t, "perceptual_difference": rng.uniform(0.01, 0.2),
         "mse": rng.uniform(0.01, 0.1)}
        for i in range(n_val) for t in START_TS
    ]
    path = RunDir(out, model_name).results("val")
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(path, index=False)
    settings = {
        "checkpoint": str(ckpt.resolve()), "checkpoint_epoch": epoch, "csv": "val.csv", "first_n": None, "seed": 2,
        "num_inference_steps": 4, "inference_skip_factor": 2, "recon_steps": None, "start_timesteps": START_TS,
        "use_ema": True, "noise_key": NOISE_KEY_RULE, **(precision or {"precision": "fp32"}),
    }
    path.with_suffix(".json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer")
    ckpt = _save_run(root / "runs", "mnist")
    _write_synthetic_val(root / "runs", "mnist", ckpt)
    return root


@pytest.fixture(scope="module")
def scorer(run_root):
    return OODScorer.from_run(run_root / "runs", "mnist", device="cpu")


def _docstring_example() -> str:
    doc = OODScorer.__doc__
    block = doc.split("Example::\n\n", 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(block)


def test_docstring_example_has_five_lines_and_is_the_readmes():
    example = _docstring_example().strip()
    assert len(example.splitlines()) == 5
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"```python\n{example}\n```" in readme


@needs_lpips
def test_docstring_example_runs_as_written(run_root, monkeypatch, capsys):
    from PIL import Image

    example = _docstring_example()
    monkeypatch.chdir(run_root)
    for name in re.findall(r'"(\w+\.png)"', example):
        Image.fromarray(np.random.default_rng(len(name)).integers(0, 256, (8, 8), dtype=np.uint8)).save(name)
    namespace: dict = {}
    exec(compile(example, "OODScorer docstring example", "exec"), namespace)
    result, scorer = namespace["result"], namespace["scorer"]
    assert list(result.columns) == OUTPUT_COLUMNS
    assert list(result["path"]) == ["digit_0.png", "digit_1.png"]
    assert np.isfinite(result["score"]).all() and (result["error"] == "").all()
    assert list(result["is_ood"]) == list(result["score"] > scorer.threshold)
    assert "flagged as OOD" in capsys.readouterr().out


@needs_lpips
def test_same_array_same_score_and_tensor_equals_raw_array(scorer, tmp_path):
    rng = np.random.default_rng(5)
    a, b = (rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(2))
    raw = scorer.score([a, b, a], progress=False)
    assert list(raw["path"]) == ["images[0]", "images[1]", "images[2]"]
    # Content-keyed noise: the same image gets the same noise (hence score) wherever it is in the call.
    for col in ("score", "mse_score", "perceptual_score"):
        assert raw.at[0, col] == pytest.approx(raw.at[2, col], rel=FLOAT_ROUNDING, abs=FLOAT_ROUNDING)
    assert abs(raw.at[0, "score"] - raw.at[1, "score"]) > 1e-3
    # A prepared (min-max scaled) tensor batch of the same images scores the same as the raw arrays.
    prepared = []
    for name, arr in (("a", a), ("b", b)):
        np.save(tmp_path / f"{name}.npy", arr)
        prepared.append(load_image(str(tmp_path / f"{name}.npy"), scorer.run.data))
    batch = scorer.score(torch.stack(prepared), progress=False)
    np.testing.assert_allclose(batch[["score", "mse_score", "perceptual_score"]].to_numpy(),
                               raw.loc[:1, ["score", "mse_score", "perceptual_score"]].to_numpy(),
                               rtol=FLOAT_ROUNDING, atol=FLOAT_ROUNDING)


@needs_lpips
def test_bad_items_get_error_rows_and_the_rest_is_scored(scorer):
    good = np.random.default_rng(6).integers(0, 256, (8, 8), dtype=np.uint8)
    items = [good, np.zeros((3, 8, 8)), np.zeros((16, 16)), "nowhere.npy", torch.rand(1, 4, 4), "notes.txt"]
    result = scorer.score(items, progress=False)
    assert result.at[0, "error"] == "" and np.isfinite(result.at[0, "score"])
    assert "3 channels" in result.at[1, "error"] and "images[1]" in result.at[1, "error"]
    assert "(1, 16, 16)" in result.at[2, "error"]
    assert "not found" in result.at[3, "error"]
    assert "images[4]" in result.at[4, "error"]
    assert "notes.txt: unsupported image type" in result.at[5, "error"]  # listed explicitly: reported, not ignored
    assert result.loc[1:, ["score", "mse_score", "perceptual_score"]].isna().all().all()
    assert result.loc[1:, "is_ood"].isna().all() and not pd.isna(result.at[0, "is_ood"])


@needs_lpips
@pytest.mark.parametrize(
    "images,message",
    [
        ([], "no inputs"),
        ([np.zeros((3, 8, 8))], "none of the 1 input"),
        (torch.rand(2, 1, 16, 16), "shape"),
        (torch.rand(2, 1, 8, 8) * 2, "[0, 1]"),
    ],
)
def test_unscorable_calls_are_user_errors(scorer, images, message):
    with pytest.raises(UserError) as err:
        scorer.score(images, progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_validation_results_say_to_run_reconstruct(tmp_path):
    with pytest.raises(UserError, match=r"results_val\.csv: not found; run reconstruct\.py with --run_val=1"):
        OODScorer.from_run(tmp_path, "nothing")


def test_missing_settings_sidecar_is_a_user_error(tmp_path):
    ckpt = _save_run(tmp_path, "m")
    _write_synthetic_val(tmp_path, "m", ckpt)
    RunDir(tmp_path, "m").results("val").with_suffix(".json").unlink()
    with pytest.raises(UserError, match=r"results_val\.json: not found"):
        OODScorer.from_run(tmp_path, "m", device="cpu")


def test_validation_results_under_another_noise_key_are_refused(tmp_path):
    ckpt = _save_run(tmp_path, "m")
    _write_synthetic_val(tmp_path, "m", ckpt)
    sidecar = RunDir(tmp_path, "m").results("val").with_suffix(".json")
    settings = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**settings, "noise_key": "absolute path"}))
    with pytest.raises(UserError, match=r"noise keyed by 'absolute path'.*rerun reconstruct\.py"):
        OODScorer.from_run(tmp_path, "m", device="cpu")
    del settings["noise_key"]
    sidecar.write_text(json.dumps(settings))
    with pytest.raises(UserError, match="missing setting.s. noise_key"):
        OODScorer.from_run(tmp_path, "m", device="cpu")


def test_retrained_checkpoint_is_refused(tmp_path):
    ckpt = _save_run(tmp_path, "m", epoch=3)
    _write_synthetic_val(tmp_path, "m", ckpt, epoch=2)
    with pytest.raises(UserError, match=r"checkpoint.pth: not comparable with .*results_val.json \(checkpoint_epoch: 2 -> 3\)"):
        OODScorer.from_run(tmp_path, "m", device="cpu")


@pytest.mark.parametrize("legacy,expected", [({"amp": False}, "fp32"), ({"precision": "bf16"}, "bf16")])
def test_scoring_runs_at_the_validation_results_precision(tmp_path, legacy, expected):
    ckpt = _save_run(tmp_path, "m")
    _write_synthetic_val(tmp_path, "m", ckpt, precision=legacy)
    assert OODScorer.from_run(tmp_path, "m", device="cpu").settings.precision == expected


@pytest.mark.parametrize(
    "recorded,kwargs,native,message",
    [
        ({"amp": True}, {}, "1", "does not say whether it was fp16"),
        ({"precision": "fp16"}, {}, "1", "reconstructed in fp16, which this device cannot run"),
        ({"precision": "fp32"}, {"amp": True}, "1", "reconstructed in fp32 but bf16 was asked for"),
        ({"precision": "bf16"}, {"precision": "fp32"}, "1", "reconstructed in bf16 but fp32 was asked for"),
    ],
)
def test_scoring_at_another_precision_is_refused(tmp_path, monkeypatch, recorded, kwargs, native, message):
    monkeypatch.setenv("DDPM_OOD_CPU_NATIVE_BF16", native)
    ckpt = _save_run(tmp_path, "m")
    _write_synthetic_val(tmp_path, "m", ckpt, precision=recorded)
    with pytest.raises(UserError, match=message):
        OODScorer.from_run(tmp_path, "m", device="cpu", **kwargs)


def test_amp_that_resolves_to_the_validation_precision_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_OOD_CPU_NATIVE_BF16", "0")  # --amp=1 means fp32 on this (faked) CPU
    ckpt = _save_run(tmp_path, "m")
    _write_synthetic_val(tmp_path, "m", ckpt, precision={"precision": "fp32"})
    assert OODScorer.from_run(tmp_path, "m", device="cpu", amp=True).settings.precision == "fp32"
