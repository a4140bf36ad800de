"""--simplex_noise=1 end to end on tiny data: train_ddpm.py records it, reconstruct.py and the OODScorer use it (scores
equal reconstruct.py's rows), and reconstruction or scoring with the other noise type is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_run import FLOAT_ROUNDING, needs_lpips

from ddpm_ood.checkpoint import BEST_CHECKPOINT, load_checkpoint, run_config_of
from ddpm_ood.cli import reconstruct, train_ddpm
from ddpm_ood.cli.runner import run_cli
from ddpm_ood.diffusion.noise import row_noise_batch
from ddpm_ood.errors import UserError
from ddpm_ood.fileio import image_stem
from ddpm_ood.ood.scorer import OODScorer
from ddpm_ood.ood.zscore import DEFAULT_SCORE, ValidationReference, image_scores, select_timesteps
from ddpm_ood.results.run_dir import RunDir
from ddpm_ood.results.schema import read_results
from ddpm_ood.run_flags import flag_values

pytestmark = [needs_lpips, pytest.mark.usefixtures("one_thread")]


def _recon_args(out: Path, splits: Path, *extra: str) -> list[str]:
    return [f"--output_dir={out}", "--model_name=simplex", f"--validation_ids={splits / 'Toy_val.csv'}",
            f"--in_ids={splits / 'Toy_test.csv'}", "--run_out=0", "--num_inference_steps=4",
            "--inference_skip_factor=2", "--num_workers=0", "--device=cpu", "--batch_size=3", *extra]


@pytest.fixture(scope="module")
def simplex_run(simplex_toy_run, tmp_path_factory):
    """The simplex toy run (train_ddpm.py --simplex_noise=1, tiny UNet, 2 quick epochs), then reconstruct.py with
    no noise flag, in a copy of its run folder."""
    splits = simplex_toy_run.splits
    out = simplex_toy_run.copy_to(tmp_path_factory.mktemp("simplex"))
    assert reconstruct.main(_recon_args(out, splits)) == 0
    return splits, out


def test_checkpoint_and_sidecars_record_simplex_noise(simplex_run):
    _, out = simplex_run
    run = run_config_of(load_checkpoint(out / "simplex" / BEST_CHECKPOINT))
    assert run.schedule.noise_type == "simplex" and flag_values(run)["--simplex_noise"] == 1
    for name in ("val", "in"):
        assert json.loads(RunDir(out, "simplex").results(name).with_suffix(".json").read_text())["noise_type"] == "simplex"
        rows = read_results(RunDir(out, "simplex").results(name))
        assert len(rows) and np.isfinite(rows[["mse", "perceptual_difference"]].to_numpy()).all()


def test_scorer_scores_equal_reconstruct_rows(simplex_run):
    splits, out = simplex_run
    scorer = OODScorer.from_run(out, "simplex", device="cpu", batch_size=2)
    assert scorer.settings.noise_type == "simplex" and scorer.model.schedule.noise_type == "simplex"
    paths = [line for line in (splits / "Toy_test.csv").read_text().splitlines()[1:] if line]
    got = scorer.score(paths, progress=False)
    val = read_results(RunDir(out, "simplex").results("val"))
    expected = image_scores(read_results(RunDir(out, "simplex").results("in")),
                            ValidationReference.fit(val, select_timesteps(val["t"])))
    want = expected.loc[[image_stem(p) for p in paths], DEFAULT_SCORE].to_numpy()
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=FLOAT_ROUNDING, atol=FLOAT_ROUNDING)


def test_reconstruction_with_the_other_noise_type_is_refused(simplex_run, tmp_path, capsys):
    splits, out = simplex_run
    shutil.copytree(out / "simplex", tmp_path / "simplex", ignore=shutil.ignore_patterns("ood"))
    assert run_cli(reconstruct.main, _recon_args(tmp_path, splits, "--simplex_noise=0")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    ckpt = tmp_path / "simplex" / BEST_CHECKPOINT
    assert len(err) == 1 and err[0].startswith("error: --simplex_noise=0 contradicts") and str(ckpt) in err[0]
    assert not list(tmp_path.rglob("results_*"))
    assert run_cli(reconstruct.main, _recon_args(tmp_path, splits, "--simplex_noise=1", "--run_in=0")) == 0


def test_scoring_with_the_other_noise_type_is_refused(simplex_run, tmp_path):
    _, out = simplex_run
    shutil.copytree(out / "simplex", tmp_path / "simplex")
    sidecar = RunDir(tmp_path, "simplex").results("val").with_suffix(".json")
    settings = json.loads(sidecar.read_text())
    settings["checkpoint"] = str(tmp_path / "simplex" / BEST_CHECKPOINT)
    del settings["noise_type"]  # written before noise types existed: Gaussian
    sidecar.write_text(json.dumps(settings))
    with pytest.raises(UserError, match=r"not comparable with .*results_val.json \(noise_type: gaussian -> simplex\)") as exc:
        OODScorer.from_run(tmp_path, "simplex", device="cpu")
    assert str(sidecar) in str(exc.value) and "\n" not in str(exc.value)


def test_reconstruct_draws_simplex_start_noise_ahead():
    from ddpm_ood.autoencoder.base import IdentityAutoencoder
    from ddpm_ood.config import ScheduleConfig
    from ddpm_ood.reconstruction.pipeline import set_batches
    from ddpm_ood.reconstruction.plan import ReconstructionPlan
    from ddpm_ood.runs import RunModel

    batches = [{"index": torch.tensor([0, 1]), "path": [f"/d/a_{i}.npy", f"/d/b_{i}.npy"],
                "image": torch.rand(2, 1, 4, 4)} for i in range(2)]
    model = RunModel(lambda x, t: x, ScheduleConfig(noise_type="simplex"), IdentityAutoencoder(), (1, 4, 4))
    got = list(set_batches(batches, ReconstructionPlan.at((1, 501), 10, 7), torch.device("cpu"), model))
    for *_, keys, noise in got:
        assert torch.equal(noise, row_noise_batch("simplex", 7, keys, [1, 501], (1, 4, 4)))
        assert not torch.equal(noise, row_noise_batch("gaussian", 7, keys, [1, 501], (1, 4, 4)))


def test_simplex_and_gaussian_training_differ(simplex_run, tmp_path):
    splits, out = simplex_run
    common = [f"--training_ids={splits / 'Toy_train.csv'}", f"--validation_ids={splits / 'Toy_val.csv'}",
              "--model_type=tiny", "--is_grayscale=1", "--batch_size=4", "--n_epochs=1", "--eval_freq=1",
              "--checkpoint_every=0", "--num_workers=0", "--sample_steps=0", "--device=cpu",
              f"--output_dir={tmp_path}"]
    losses = {}
    for flag in ("0", "1"):
        assert train_ddpm.main([*common, f"--model_name=n{flag}", f"--simplex_noise={flag}"]) == 0
        losses[flag] = load_checkpoint(tmp_path / f"n{flag}" / BEST_CHECKPOINT)["best_loss"]
    assert losses["0"] != losses["1"]
    assert pd.notna(losses["1"]) and np.isfinite(losses["1"])


def test_an_upstream_simplex_checkpoint_gets_upstreams_raw_noise(simplex_run, tmp_path, capsys):
    # A checkpoint trained by upstream ddpm-ood (weights only) learned AnoDDPM's raw octave sum: reconstructing it
    # and resuming its training with --simplex_noise=1 use that noise, and say so.
    from ddpm_ood.diffusion.noise import UPSTREAM_SIMPLEX

    splits, out = simplex_run
    ck = load_checkpoint(out / "simplex" / BEST_CHECKPOINT)
    (tmp_path / "simplex").mkdir()
    torch.save({k: ck[k] for k in ("model_state_dict", "epoch", "global_step", "best_loss")},
               tmp_path / "simplex" / BEST_CHECKPOINT)
    model_flags = [f"{flag}={value}" for flag, value in flag_values(run_config_of(ck)).items() if value is not None]
    assert "--simplex_noise=1" in model_flags
    capsys.readouterr()
    assert run_cli(reconstruct.main, _recon_args(tmp_path, splits, "--run_in=0", *model_flags)) == 0
    assert f"noise {UPSTREAM_SIMPLEX}: AnoDDPM's raw" in capsys.readouterr().out
    sidecar = json.loads(RunDir(tmp_path, "simplex").results("val").with_suffix(".json").read_text())
    assert sidecar["noise_type"] == UPSTREAM_SIMPLEX
    ours = read_results(RunDir(out, "simplex").results("val"))
    theirs = read_results(RunDir(tmp_path, "simplex").results("val"))
    assert not np.allclose(ours["mse"], theirs["mse"])  # the same weights, other start noise

    train_flags = [f"--training_ids={splits / 'Toy_train.csv'}", f"--validation_ids={splits / 'Toy_val.csv'}",
                   f"--output_dir={tmp_path}", "--model_name=simplex", "--batch_size=4", "--n_epochs=3",
                   "--eval_freq=1", "--checkpoint_every=0", "--num_workers=0", "--sample_steps=0", "--device=cpu"]
    assert run_cli(train_ddpm.main, train_flags + model_flags) == 0
    assert "was trained by upstream ddpm-ood: resuming with its noise" in capsys.readouterr().out
    resumed = run_config_of(load_checkpoint(tmp_path / "simplex" / "checkpoint_last.pth"))
    assert resumed.schedule.noise_type == UPSTREAM_SIMPLEX
    # Resumed again, now from our own checkpoint of that run: the same flag keeps upstream's noise.
    assert run_cli(train_ddpm.main, [*train_flags, "--n_epochs=4", *model_flags]) == 0
    ck = load_checkpoint(tmp_path / "simplex" / "checkpoint_last.pth")
    assert ck["epoch"] == 4 and run_config_of(ck).schedule.noise_type == UPSTREAM_SIMPLEX
