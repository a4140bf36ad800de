"""reconstruct.py --scores (the feature families) and ood_detection.py's table of every family, on the toy run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_run import needs_lpips, one_torch_thread, save_tiny_checkpoint, write_npy_images

from ddpm_ood.cli import ood_detection, reconstruct
from ddpm_ood.cli.runner import run_cli
from ddpm_ood.data.datasets import dataset_from_csv
from ddpm_ood.data.splits import read_split_csv as read_split
from ddpm_ood.data.splits import write_split_csv
from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.families import ScoreOptions, compute_features, get_family, make_settings
from ddpm_ood.families.base import even_levels
from ddpm_ood.fileio import image_stem
from ddpm_ood.reconstruction.stage import score_context
from ddpm_ood.results.run_dir import RunDir
from ddpm_ood.results.writer import ResumableResults
from ddpm_ood.runs import load_run_model, open_run
from ddpm_ood.seeding import noise_key

FAMILIES = ("eps_norm", "denoising_error", "msma", "diffpath6d", "diffpath1d")
FAST = ["--scores=eps_norm,denoising_error,msma,diffpath", "--score_levels=3", "--diffpath_steps=2"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    splits = root / "data_splits"
    write_split_csv(splits / "Toy_val.csv", write_npy_images(root / "val", "Toy", 12, 0))
    write_split_csv(splits / "Toy_test.csv", write_npy_images(root / "test", "Toy", 7, 1))
    write_split_csv(splits / "Other_test.csv", write_npy_images(root / "other", "Other", 5, 2))
    out = root / "out"
    save_tiny_checkpoint(out / "toy" / "checkpoint.pth")
    return root, splits, out


def _argv(splits: Path, out: Path, *extra: str) -> list[str]:
    return [f"--output_dir={out}", "--model_name=toy", f"--validation_ids={splits / 'Toy_val.csv'}",
            f"--in_ids={splits / 'Toy_test.csv'}", f"--out_ids={splits / 'Other_test.csv'}", "--num_workers=0",
            *FAST, *extra]


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to the network's float32 rounding for other batch compositions, relative to each feature
    column's magnitude (DiffPath's sums cancel: an absolute tolerance per column, not per value)."""
    scale = np.abs(expected).max(axis=0, keepdims=True)
    assert (np.abs(actual - expected) <= 1e-5 * np.maximum(scale, 1.0)).all(), np.abs(actual - expected).max()


def _error_lines(err: str) -> list[str]:
    """The ``error:`` lines of stderr (progress bars write there too)."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]


def _run(main, argv) -> int:
    with one_torch_thread():
        return run_cli(main, argv)


def _copy_run(toy, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(toy[2] / "toy", out / "toy")
    return out


def test_every_family_writes_its_file_equal_to_a_direct_computation(toy, tmp_path):
    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert _run(reconstruct.main, _argv(splits, out, "--batch_size=4")) == 0
    assert not (out / "toy" / "ood" / "results_val.csv").exists()  # reconstruction was not asked for
    run = open_run(out / "toy" / "checkpoint.pth")
    model = load_run_model(run, torch.device("cpu"))
    settings = make_settings(FAMILIES, ScoreOptions(score_levels=even_levels(3), diffpath_steps=2),
                             score_context(run, 2))
    assert settings["diffpath6d"].clip == (0.0, run.config.schedule.b_scale)  # the authors' clip to the data range
    dataset = dataset_from_csv(str(splits / "Other_test.csv"), run.data)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    keys = [noise_key(p) for p in dataset.paths]
    with one_torch_thread():
        expected = compute_features(list(FAMILIES), model.eps_fn, images, keys, alphas_cumprod(run.config.schedule),
                                    settings)
    for family in FAMILIES:
        path = RunDir(out, "toy").features(family, "Other")
        frame = pd.read_csv(path)
        assert list(frame.columns) == ["filename", "type", *get_family(family).columns(settings[family])]
        assert list(frame["filename"]) == [image_stem(p) for p in dataset.paths] and set(frame["type"]) == {"out"}
        _assert_close(frame.iloc[:, 2:].to_numpy(), expected[family])
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["family"] == family and sidecar["nfe"] == get_family(family).nfe(settings[family])
        assert sidecar["settings"] == get_family(family).settings_record(settings[family])
        assert get_family(family).settings_from(sidecar["settings"]) == settings[family]


def test_batch_sizes_1_and_7_give_identical_feature_rows(toy, tmp_path):
    _, splits, _ = toy
    files = {}
    for batch in (1, 7):
        out = _copy_run(toy, tmp_path / f"b{batch}")
        assert _run(reconstruct.main, _argv(splits, out, f"--batch_size={batch}", "--run_val=0", "--run_out=0")) == 0
        files[batch] = {f: pd.read_csv(RunDir(out, "toy").features(f, "in")) for f in FAMILIES}
    for family in FAMILIES:
        a, b = files[1][family], files[7][family]
        assert list(a["filename"]) == list(b["filename"])
        # Per-row seeded noise: only the network's float rounding for other batch compositions may differ.
        _assert_close(a.iloc[:, 2:].to_numpy(), b.iloc[:, 2:].to_numpy())


def test_a_killed_run_resumes_to_the_uninterrupted_rows(toy, tmp_path, monkeypatch):
    _, splits, _ = toy
    argv_of = lambda out: _argv(splits, out, "--batch_size=2", "--run_val=0", "--run_out=0")  # noqa: E731
    whole = _copy_run(toy, tmp_path / "whole")
    assert _run(reconstruct.main, argv_of(whole)) == 0
    killed = _copy_run(toy, tmp_path / "killed")
    appended = []
    real_append = ResumableResults.append

    def append_then_die(self, rows):
        real_append(self, rows)
        appended.append(len(rows))
        if len(appended) == 2 * len(FAMILIES):  # two batches of every family written, then the process "dies"
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumableResults, "append", append_then_die)
    assert _run(reconstruct.main, argv_of(killed)) == 130
    monkeypatch.undo()
    partial = RunDir(killed, "toy").features("eps_norm", "in").with_name("features_in.csv.partial")
    assert len(pd.read_csv(partial)) == 4  # two batches of two images kept
    assert _run(reconstruct.main, argv_of(killed)) == 0
    for family in FAMILIES:
        assert RunDir(killed, "toy").features(family, "in").read_bytes() == \
            RunDir(whole, "toy").features(family, "in").read_bytes()


def test_detection_reports_every_family_and_the_ensemble_with_their_nfe(toy, tmp_path, capsys):
    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert _run(reconstruct.main, _argv(splits, out)) == 0
    assert _run(ood_detection.main, [f"--output_dir={out}", "--model_name=toy", "--score=eps_norm"]) == 0
    summary = pd.read_csv(out / "toy" / "ood" / "summary.csv")
    assert list(summary["score"]) == [*FAMILIES, "ensemble"]
    msma = int(summary.loc[summary["score"] == "msma", "nfe"].iloc[0])
    # the ensemble (diffpath1d left out: a column of diffpath6d) counts each shared group of calls once
    assert list(summary["nfe"]) == [3, 3, msma, 2, 2, 3 + msma + 2]
    assert (summary["n_in"] == 7).all() and (summary["n_out"] == 5).all()
    assert summary[["auroc", "fpr95", "aupr_in", "aupr_out"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (out / "toy" / "ood" / "auroc_vs_nfe.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "AUC for toy vs Other" in printed and "nfe" in printed


def test_the_density_is_fitted_on_validation_rows_only(toy, tmp_path):
    from ddpm_ood.ood.detection import all_family_scores

    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert _run(reconstruct.main, _argv(splits, out)) == 0
    directory = RunDir(out, "toy")
    before = {f.family: f for f in all_family_scores(directory, None)}
    # Rewrite the OOD rows wildly: the densities are fitted on validation alone, so the fitted models and every
    # validation and in-set score stay exactly as they were; only the OOD scores move.
    for family in FAMILIES:
        path = RunDir(out, "toy").features(family, "Other")
        frame = pd.read_csv(path)
        frame.iloc[:, 2:] = frame.iloc[:, 2:].to_numpy() * 3.0 + 7.0
        frame.to_csv(path, index=False)
    after = {f.family: f for f in all_family_scores(directory, None)}
    assert set(after) == {*FAMILIES, "ensemble"}
    for name, scores in after.items():
        assert scores.model == before[name].model
        pd.testing.assert_series_equal(scores.sets["val"], before[name].sets["val"])
        pd.testing.assert_series_equal(scores.sets["in"], before[name].sets["in"])
        assert not scores.sets["Other"].equals(before[name].sets["Other"])


def test_detection_without_validation_features_names_the_command(toy, tmp_path, capsys):
    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert _run(reconstruct.main, _argv(splits, out, "--run_val=0", "--scores=eps_norm")) == 0
    assert _run(ood_detection.main, [f"--output_dir={out}", "--model_name=toy"]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1
    err = errors[0]
    assert "features_val.csv: not found" in err and "reconstruct.py --run_val=1 --scores=eps_norm" in err


def test_an_unknown_family_lists_the_accepted_ones(toy, tmp_path, capsys):
    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert _run(reconstruct.main, [*_argv(splits, out), "--scores=eps_norm,mahalanobis"]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "unknown score family 'mahalanobis'" in errors[0]
    err = errors[0]
    for name in ("reconstruction", *FAMILIES, "diffpath", "all"):
        assert name in err
    assert not (out / "toy" / "ood").exists()  # refused before anything was written


def test_feature_files_made_with_other_settings_are_refused_when_mixed(toy, tmp_path, capsys):
    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert _run(reconstruct.main, _argv(splits, out, "--scores=eps_norm", "--run_out=0")) == 0
    assert _run(reconstruct.main, _argv(splits, out, "--scores=eps_norm", "--run_val=0", "--run_in=0",
                                        "--score_levels=2")) == 0
    assert _run(ood_detection.main, [f"--output_dir={out}", "--model_name=toy"]) == 2
    err = capsys.readouterr().err
    assert "features_Other.json: not comparable with features_val.json" in err and "levels" in err


@pytest.mark.parametrize("score", ["eps_norm", "diffpath6d", "ensemble"])
def test_the_scorer_gives_a_file_its_detection_score(toy, tmp_path, score):
    from ddpm_ood import OODScorer
    from ddpm_ood.data.splits import read_split_csv
    from ddpm_ood.ood.detection import all_family_scores

    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert _run(reconstruct.main, _argv(splits, out)) == 0
    expected = {f.family: f for f in all_family_scores(RunDir(out, "toy"), None)}[score]
    with one_torch_thread():
        scorer = OODScorer.from_run(out, "toy", device="cpu", score=score, batch_size=3)
        got = scorer.score(read_split_csv(str(splits / "Other_test.csv")), progress=False)
    want = expected.sets["Other"].to_numpy()
    assert got["error"].eq("").all() and got["mse_score"].isna().all()  # no reconstruction was needed
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    val = expected.sets["val"].to_numpy()
    assert scorer.threshold == pytest.approx(float(np.quantile(val, 0.95)))
    assert list(got["is_ood"]) == list(got["score"] > scorer.threshold)


def test_score_py_flags_inputs_with_a_family_and_names_the_command_when_it_is_missing(toy, tmp_path, capsys):
    from ddpm_ood.cli import score as score_cli

    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    args = [f"--output_dir={out}", "--model_name=toy", f"--inputs={splits / 'Other_test.csv'}",
            f"--out_csv={tmp_path / 'scores.csv'}", "--device=cpu"]
    assert _run(score_cli.main, [*args, "--score=diffpath1d"]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "diffpath1d/features_val.json: not found" in errors[0]
    assert "reconstruct.py --run_val=1 --scores=diffpath1d" in errors[0]
    assert _run(reconstruct.main, _argv(splits, out, "--run_in=0", "--run_out=0")) == 0
    assert _run(score_cli.main, [*args, "--score=diffpath1d"]) == 0
    written = pd.read_csv(tmp_path / "scores.csv")
    assert len(written) == 5 and written["score"].notna().all()
    assert json.loads((tmp_path / "scores.csv.json").read_text())["score"] == "diffpath1d"


@pytest.mark.slow
def test_two_processes_under_torchrun_write_the_rows_of_one(toy, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from tiny_run import REPO_ROOT

    _, splits, _ = toy
    single, sharded = _copy_run(toy, tmp_path / "one"), _copy_run(toy, tmp_path / "two")
    argv = ["--scores=eps_norm,diffpath1d", "--score_levels=3", "--diffpath_steps=2", "--batch_size=2",
            "--run_val=0", "--run_out=0", "--device=cpu"]
    assert _run(reconstruct.main, [*_argv(splits, single), *argv]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", str(REPO_ROOT / "reconstruct.py"), *_argv(splits, sharded), *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for family in ("eps_norm", "diffpath1d"):
        one = pd.read_csv(RunDir(single, "toy").features(family, "in"))
        two = pd.read_csv(RunDir(sharded, "toy").features(family, "in"))
        assert list(two["filename"]) == list(one["filename"])  # every image once, in the set's order
        _assert_close(two.iloc[:, 2:].to_numpy(), one.iloc[:, 2:].to_numpy())


# ---- one registry: a score registered by this test alone goes through every stage --------------------------------

@dataclasses.dataclass(frozen=True)
class MeanEpsSettings:
    t: int = 300


def _mean_eps(eps_fn, x0, keys, acp, settings):
    t = torch.full((x0.shape[0],), settings.t, dtype=torch.long)
    e = eps_fn(acp[settings.t].sqrt() * x0, t).double()
    return {"mean_eps": torch.stack([e.mean(dim=(1, 2, 3)), e.std(dim=(1, 2, 3))], dim=1).numpy()}


@pytest.fixture
def mean_eps_registered():
    from ddpm_ood.families import ScoreFamily, register, unregister
    from ddpm_ood.families.base import CallGroup

    family = ScoreFamily("mean_eps", "a test's own score", MeanEpsSettings, lambda options, context: MeanEpsSettings(),
                         lambda settings: ["mean", "std"], CallGroup("mean_eps", lambda settings: 1, _mean_eps))
    register(family)
    yield family
    unregister("mean_eps")


def test_a_score_registered_by_a_test_runs_through_reconstruct_detect_and_score(toy, tmp_path, capsys,
                                                                                 mean_eps_registered):
    from ddpm_ood import OODScorer
    from ddpm_ood.data.splits import read_split_csv
    from ddpm_ood.families import feature_family_names, score_names
    from ddpm_ood.ood.detection import all_family_scores

    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert "mean_eps" in feature_family_names() and "mean_eps" in score_names()
    assert _run(reconstruct.main, _argv(splits, out, "--scores=mean_eps,eps_norm")) == 0
    sidecar = json.loads(RunDir(out, "toy").features("mean_eps", "val").with_suffix(".json").read_text())
    assert sidecar["settings"] == {"t": 300} and sidecar["nfe"] == 1
    assert _run(ood_detection.main, [f"--output_dir={out}", "--model_name=toy", "--score=mean_eps"]) == 0
    summary = pd.read_csv(out / "toy" / "ood" / "summary.csv")
    assert list(summary["score"]) == ["eps_norm", "mean_eps", "ensemble"]
    assert "AUC for toy vs Other" in capsys.readouterr().out
    expected = {f.family: f for f in all_family_scores(RunDir(out, "toy"), None)}["mean_eps"].sets["Other"]
    with one_torch_thread():
        scorer = OODScorer.from_run(out, "toy", device="cpu", score="mean_eps", batch_size=2)
        got = scorer.score(read_split_csv(str(splits / "Other_test.csv")), progress=False)
    np.testing.assert_allclose(got["score"].to_numpy(), expected.to_numpy(), rtol=1e-4, atol=1e-4)
    assert "mean_eps" not in feature_family_names() or mean_eps_registered  # unregistered after the test


def test_detection_of_feature_scores_only_prints_the_first_present_and_refuses_an_absent_chosen_one(toy, tmp_path,
                                                                                                     capsys):
    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert _run(reconstruct.main, _argv(splits, out, "--scores=msma,diffpath6d")) == 0
    capsys.readouterr()
    assert _run(ood_detection.main, [f"--output_dir={out}", "--model_name=toy"]) == 0
    printed = capsys.readouterr().out
    summary = pd.read_csv(out / "toy" / "ood" / "summary.csv")
    assert list(summary["score"]) == ["msma", "diffpath6d", "ensemble"]
    auc = float(summary.loc[summary["score"] == "msma", "auroc"].iloc[0])
    assert f"AUC for toy vs Other: {100 * auc:.1f}" in printed  # msma: the first present in the registry's order
    assert json.loads((out / "toy" / "ood" / "summary.json").read_text())["settings"]["score"] == "msma"
    assert _run(ood_detection.main, [f"--output_dir={out}", "--model_name=toy", "--score=mse+perceptual"]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "mse+perceptual: not computed" in errors[0] and "msma, diffpath6d" in errors[0]


def test_nothing_fitted_moves_when_the_ood_rows_change(toy, tmp_path):
    """Levels, densities, the ensemble and the scorer's threshold come from validation rows only."""
    from ddpm_ood import OODScorer

    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert _run(reconstruct.main, _argv(splits, out)) == 0
    with one_torch_thread():
        before = {s: OODScorer.from_run(out, "toy", device="cpu", score=s) for s in (*FAMILIES, "ensemble")}
    sidecars = {f: RunDir(out, "toy").features(f, "val").with_suffix(".json").read_text() for f in FAMILIES}
    for family in FAMILIES:
        path = RunDir(out, "toy").features(family, "Other")
        frame = pd.read_csv(path)
        frame.iloc[:, 2:] = frame.iloc[:, 2:].to_numpy() * -2.0 + 11.0
        frame.to_csv(path, index=False)
    with one_torch_thread():
        after = {s: OODScorer.from_run(out, "toy", device="cpu", score=s) for s in (*FAMILIES, "ensemble")}
    for score in before:
        assert after[score].threshold == before[score].threshold
        assert after[score].recipe.family_settings == before[score].recipe.family_settings
        np.testing.assert_array_equal(after[score].recipe.val_scores, before[score].recipe.val_scores)
    assert sidecars == {f: RunDir(out, "toy").features(f, "val").with_suffix(".json").read_text() for f in FAMILIES}


def test_shared_noise_features_of_an_image_do_not_depend_on_its_file_name(toy, tmp_path):
    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    images = read_split(splits / "Toy_test.csv")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    copies = [shutil.copy(p, renamed / f"Copy_{i}.npy") for i, p in enumerate(images)]
    write_split_csv(tmp_path / "Copy_test.csv", copies)
    argv = [f"--output_dir={out}", "--model_name=toy", f"--in_ids={splits / 'Toy_test.csv'}",
            f"--out_ids={tmp_path / 'Copy_test.csv'}", "--run_val=0", "--num_workers=0", "--scores=eps_norm",
            "--score_levels=3", "--batch_size=3"]
    assert _run(reconstruct.main, [*argv, "--score_noise=shared"]) == 0
    a = pd.read_csv(RunDir(out, "toy").features("eps_norm", "in")).iloc[:, 2:].to_numpy()
    b = pd.read_csv(RunDir(out, "toy").features("eps_norm", "Copy")).iloc[:, 2:].to_numpy()
    np.testing.assert_array_equal(a, b)
    assert _run(reconstruct.main, [*argv, "--score_noise=per_image"]) == 0  # recomputed: other settings
    a = pd.read_csv(RunDir(out, "toy").features("eps_norm", "in")).iloc[:, 2:].to_numpy()
    b = pd.read_csv(RunDir(out, "toy").features("eps_norm", "Copy")).iloc[:, 2:].to_numpy()
    assert (a != b).all()


def test_feature_files_of_earlier_versions_are_complete_under_per_image_noise(toy, tmp_path, capsys):
    """A sidecar written before the registry (the family's settings as top-level keys, per-image noise) is the
    same settings as --score_noise=per_image: the file is kept, not recomputed."""
    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    argv = _argv(splits, out, "--scores=eps_norm,diffpath6d", "--run_val=0", "--run_out=0", "--score_noise=per_image")
    assert _run(reconstruct.main, argv) == 0
    for family in ("eps_norm", "diffpath6d"):
        path = RunDir(out, "toy").features(family, "in").with_suffix(".json")
        d = json.loads(path.read_text())
        own = d.pop("settings")
        d.update({"levels": own["levels"]} if family == "eps_norm" else
                 {"diffpath_steps": own["steps"], "diffpath_clip": own["clip"]})
        path.write_text(json.dumps(d))
    capsys.readouterr()
    assert _run(reconstruct.main, argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("already complete, skipped") == 2
    assert _run(reconstruct.main, argv[:-1]) == 0  # the default, shared noise: recomputed, and says why
    assert "made with other settings" in capsys.readouterr().out


def test_reconstruction_with_shared_noise_is_recorded_and_batch_invariant(toy, tmp_path):
    _, splits, _ = toy
    rows = {}
    for batch in (1, 7):
        out = _copy_run(toy, tmp_path / f"b{batch}")
        argv = [f"--output_dir={out}", "--model_name=toy", f"--in_ids={splits / 'Toy_test.csv'}", "--run_val=0",
                "--run_out=0", "--num_workers=0", "--inference_skip_factor=34", "--recon_noise=shared",
                f"--batch_size={batch}"]
        assert _run(reconstruct.main, argv) == 0
        results = out / "toy" / "ood" / "results_in.csv"
        rows[batch] = pd.read_csv(results)
        assert json.loads(results.with_suffix(".json").read_text())["recon_noise"] == "shared"
    np.testing.assert_allclose(rows[1][["mse"]].to_numpy(), rows[7][["mse"]].to_numpy(), rtol=1e-5)
    per_image = _copy_run(toy, tmp_path / "per_image")
    argv = [f"--output_dir={per_image}", "--model_name=toy", f"--in_ids={splits / 'Toy_test.csv'}", "--run_val=0",
            "--run_out=0", "--num_workers=0", "--inference_skip_factor=34", "--batch_size=7"]
    assert _run(reconstruct.main, argv) == 0
    sidecar = json.loads((per_image / "toy" / "ood" / "results_in.json").read_text())
    assert "recon_noise" not in sidecar  # per_image, the paper's, is recorded as before: no key
    assert not np.allclose(pd.read_csv(per_image / "toy" / "ood" / "results_in.csv")["mse"], rows[7]["mse"])


@needs_lpips
def test_the_ensemble_with_the_paper_score_scores_a_file_as_detection_does(toy, tmp_path):
    """With reconstruction results present the ensemble's members include mse+perceptual: the scorer reconstructs
    the inputs and combines them with the feature scores exactly as ood_detection.py did."""
    from ddpm_ood import OODScorer
    from ddpm_ood.data.splits import read_split_csv
    from ddpm_ood.families.ensemble import PAPER_SCORE
    from ddpm_ood.ood.detection import all_family_scores
    from ddpm_ood.ood.zscore import ValidationReference, image_scores, select_timesteps
    from ddpm_ood.results.schema import read_results

    _, splits, _ = toy
    out = _copy_run(toy, tmp_path)
    assert _run(reconstruct.main, _argv(splits, out, "--scores=reconstruction,eps_norm,msma",
                                        "--inference_skip_factor=34", "--batch_size=4")) == 0
    assert _run(ood_detection.main, [f"--output_dir={out}", "--model_name=toy"]) == 0
    summary = pd.read_csv(out / "toy" / "ood" / "summary.csv")
    ensemble_nfe = int(summary.loc[summary["score"] == "ensemble", "nfe"].iloc[0])
    parts = summary.drop_duplicates("score").set_index("score")["nfe"]
    assert ensemble_nfe == parts[PAPER_SCORE] + parts["eps_norm"] + parts["msma"]
    with one_torch_thread():
        scorer = OODScorer.from_run(out, "toy", device="cpu", score="ensemble", batch_size=3)
        got = scorer.score(read_split_csv(str(splits / "Other_test.csv")), progress=False)
    assert scorer.recipe.ensemble.members == (PAPER_SCORE, "eps_norm", "msma")
    assert got["mse_score"].notna().all()  # reconstructed for the paper's member
    val = read_results(out / "toy" / "ood" / "results_val.csv")
    ref = ValidationReference.fit(val, select_timesteps(val["t"]))
    paper = {s: image_scores(read_results(out / "toy" / "ood" / f"results_{s}.csv"), ref)[PAPER_SCORE]
             for s in ("val", "in", "Other")}
    expected = {f.family: f for f in all_family_scores(RunDir(out, "toy"), None, paper)}["ensemble"]
    want = expected.sets["Other"].to_numpy()
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
