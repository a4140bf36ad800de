"""reconstruct.py / ood_detection.py / score.py with --pretrained: every score family, the reconstruction score
and the ensemble on a diffusers model; the model's identity in every sidecar; mixing models and bad input refused
with one line, exit 2, no file written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pretrained_fixtures import save_diffusers_unet, save_openai
from tiny_run import needs_lpips, one_torch_thread, write_npy_images

from ddpm_ood.cli import ood_detection, reconstruct
from ddpm_ood.cli import score as score_cli
from ddpm_ood.cli.runner import run_cli
from ddpm_ood.data.splits import write_split_csv

pytest.importorskip("diffusers")
FAST = ["--scores=all", "--score_levels=3", "--diffpath_steps=2", "--num_inference_steps=10",
        "--inference_skip_factor=5", "--num_workers=0", "--device=cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    splits = root / "data_splits"
    write_split_csv(splits / "Toy_val.csv", write_npy_images(root / "val", "Toy", 8, 0))
    write_split_csv(splits / "Toy_test.csv", write_npy_images(root / "test", "Toy", 5, 1))
    write_split_csv(splits / "Other_test.csv", write_npy_images(root / "other", "Other", 5, 2))
    write_split_csv(splits / "Big_test.csv", write_npy_images(root / "big", "Big", 3, 3, shape=(16, 16)))
    save_diffusers_unet(root / "ddpm", channels=1, attention=True)
    return root, splits


def _argv(splits: Path, out: Path, model: Path, *extra: str, out_ids: str = "Other_test.csv") -> list[str]:
    return [f"--output_dir={out}", "--model_name=pre", f"--pretrained={model}",
            f"--validation_ids={splits / 'Toy_val.csv'}", f"--in_ids={splits / 'Toy_test.csv'}",
            f"--out_ids={splits / out_ids}", *FAST, *extra]


def _run(main, argv) -> int:
    with one_torch_thread():
        return run_cli(main, argv)


def _errors(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@needs_lpips
def test_every_score_on_a_diffusers_model(data, tmp_path, capsys):
    root, splits = data
    out = tmp_path / "out"
    assert _run(reconstruct.main, _argv(splits, out, root / "ddpm")) == 0
    ood = out / "pre" / "ood"
    sidecars = [ood / "results_val.json", *sorted(ood.glob("*/features_*.json"))]
    assert len(sidecars) == 1 + 5 * 3  # reconstruction + 5 feature families, val/in/Other each
    for path in sidecars:
        model = json.loads(path.read_text())["pretrained"]
        assert model["format"] == "diffusers" and len(model["weights_sha256"]) == 64
        assert model["prediction_type"] == "epsilon" and model["data_range"] == [-1.0, 1.0]
        assert model["image_shape"] == [1, 8, 8] and model["resize"] is False
    assert json.loads((ood / "diffpath6d" / "features_val.json").read_text())["settings"]["clip"] == [-1.0, 1.0]
    assert json.loads((ood / "msma" / "features_val.json").read_text())["settings"]["data_scale"] == 2.0
    assert _run(ood_detection.main, [f"--output_dir={out}", "--model_name=pre"]) == 0
    printed = capsys.readouterr().out
    for name in ("eps_norm", "denoising_error", "msma", "diffpath6d", "diffpath1d", "ensemble"):
        assert name in printed
    scores = tmp_path / "scores.csv"
    for score in ("mse+perceptual", "ensemble"):
        args = [f"--output_dir={out}", "--model_name=pre", f"--inputs={splits / 'Other_test.csv'}",
                f"--out_csv={scores}", "--device=cpu", f"--score={score}"]
        assert _run(score_cli.main, args) == 0
        written = pd.read_csv(scores)
        assert len(written) == 5 and written["score"].notna().all()


def test_a_changed_model_is_refused_when_scoring_and_when_mixed(data, tmp_path, capsys):
    root, splits = data
    out, model = tmp_path / "out", tmp_path / "model"
    shutil.copytree(root / "ddpm", model)
    argv = _argv(splits, out, model, "--run_in=0", "--run_out=0")
    argv[argv.index("--scores=all")] = "--scores=eps_norm"
    assert _run(reconstruct.main, argv) == 0
    save_diffusers_unet(model, channels=1, attention=True, seed=5)  # other weights at the same path
    args = [f"--output_dir={out}", "--model_name=pre", f"--inputs={splits / 'Other_test.csv'}",
            f"--out_csv={tmp_path / 's.csv'}", "--device=cpu", "--score=eps_norm"]
    capsys.readouterr()
    assert _run(score_cli.main, args) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "features_val.json (weights_sha256:" in errors[0]
    assert not (tmp_path / "s.csv").exists()
    # The in-distribution features with the other model: ood_detection refuses to mix them.
    argv_in = _argv(splits, out, model, "--run_val=0", "--run_out=0")
    argv_in[argv_in.index("--scores=all")] = "--scores=eps_norm"
    assert _run(reconstruct.main, argv_in) == 0
    capsys.readouterr()
    assert _run(ood_detection.main, [f"--output_dir={out}", "--model_name=pre"]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "not comparable with features_val.json (pretrained." in errors[0]


def test_images_of_another_size_need_resize(data, tmp_path, capsys):
    root, splits = data
    out = tmp_path / "out"
    argv = _argv(splits, out, root / "ddpm", out_ids="Big_test.csv")
    argv[argv.index("--scores=all")] = "--scores=eps_norm"
    assert _run(reconstruct.main, argv) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "Big_test.csv: images load as (1, 16, 16) but the pretrained model takes " \
        "(1, 8, 8); --resize=1 resizes them" in errors[0]
    assert _files(out) == []
    assert _run(reconstruct.main, [*argv, "--resize=1"]) == 0
    sidecar = json.loads((out / "pre" / "ood" / "eps_norm" / "features_Big.json").read_text())
    assert sidecar["pretrained"]["resize"] is True


@pytest.mark.parametrize("case", ["no_model", "model_flag", "flags_mismatch", "resize_without_pretrained",
                                  "pickle"])
def test_bad_input_is_one_line_exit_2_nothing_written(data, tmp_path, capsys, case):
    root, splits = data
    out = tmp_path / "out"
    model, extra = root / "ddpm", []
    if case == "no_model":
        model = tmp_path / "empty"
        model.mkdir()
        expected = "not a model folder"
    elif case == "model_flag":
        extra = ["--model_type=small"]
        expected = "--model_type: --pretrained="
    elif case == "flags_mismatch":
        model = tmp_path / "m.pt"
        save_openai(model)
        extra = ["--pretrained_flags=--image_size 32 --num_channels 64 --num_res_blocks 1"]
        expected = "does not match the architecture of the flags given: key"
    elif case == "pickle":
        model = tmp_path / "evil.pt"
        model.write_bytes(b"\x80\x04cos\nsystem\n(S'true'\ntR.")  # a pickle calling os.system
        extra = ["--pretrained_flags=--image_size 32"]
        expected = "refused: not a plain state dict readable with weights_only=True"
    else:
        argv = [a for a in _argv(splits, out, model, "--resize=1") if not a.startswith("--pretrained")]
        assert _run(reconstruct.main, argv) == 2
        assert "--resize applies to --pretrained models only" in _errors(capsys.readouterr().err)[0]
        assert _files(out) == []
        return
    assert _run(reconstruct.main, _argv(splits, out, model, *extra)) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and expected in errors[0], errors
    assert _files(out) == []
