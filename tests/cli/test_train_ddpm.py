"""train_ddpm.py end to end: flags, files written, resume, Ctrl-C, upstream checkpoints, and bad input.

In-process runs go through ``run_cli`` (the same boundary as the root script); a few run the root script in a
subprocess. The ``tiny`` preset on 8x8 grayscale .npy images, a few steps each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_run import REPO_ROOT, one_torch_thread

from ddpm_ood.checkpoint import LAST_CHECKPOINT, load_checkpoint, periodic_checkpoint_name, run_config_of
from ddpm_ood.cli.runner import run_cli
from ddpm_ood.cli.train_ddpm import build_parser, main
from ddpm_ood.diffusion.unet import build_unet, model_config_from_preset
from ddpm_ood.training import ddpm as training

ROOT = REPO_ROOT


pytestmark = pytest.mark.usefixtures("one_thread")


def write_images(folder: Path, n: int, shape=(8, 8), start: int = 0) -> list[str]:
    """n uint8 .npy images of a bright bar on black (as upstream's MNIST .npy files), absolute paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        a = np.zeros(shape, np.uint8)
        a[(slice(1, -1),) * (len(shape) - 1) + (slice(i % 3, i % 3 + 3),)] = 200 + i
        p = folder / f"img_{i}.npy"
        np.save(p, a)
        paths.append(str(p))
    return paths


def write_csv(path: Path, paths: list[str]) -> str:
    path.write_text("path\n" + "".join(f"{p}\n" for p in paths))
    return str(path)


@pytest.fixture
def data(tmp_path):
    train = write_csv(tmp_path / "train.csv", write_images(tmp_path / "img", 8))
    val = write_csv(tmp_path / "val.csv", write_images(tmp_path / "img", 4, start=8))
    return {"train": train, "val": val, "tmp": tmp_path}


def argv(data, name="run", **overrides) -> list[str]:
    flags = {
        "output_dir": str(data["tmp"] / "out"), "model_name": name, "training_ids": data["train"],
        "validation_ids": data["val"], "model_type": "tiny", "is_grayscale": 1, "batch_size": 4, "n_epochs": 2,
        "eval_freq": 1, "checkpoint_every": 0, "num_workers": 0, "lr": 1e-3, "sample_steps": 2,
        "beta_schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195, "cache_data": 1,
    }
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items() if v is not None]


def run_dir(data, name="run") -> Path:
    return data["tmp"] / "out" / name


def test_parser_defaults_and_help():
    parser = build_parser()
    args = parser.parse_args(["--output_dir=o", "--model_name=m", "--training_ids=t.csv", "--validation_ids=v.csv"])
    assert (args.n_epochs, args.eval_freq, args.checkpoint_every, args.batch_size) == (300, 10, 100, 512)
    assert args.ddpm_checkpoint_epoch is None and args.quick_test is False
    assert (args.lr, args.ema_decay, args.seed, args.amp, args.precision) == (2.5e-5, 0.0, 2, False, None)
    assert (args.model_type, args.beta_schedule, args.prediction_type) == ("small", "linear_beta", "epsilon")
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest
    args = parser.parse_args(["--output_dir=o", "--model_name=m", "--training_ids=t", "--validation_ids=v",
                              "--is_grayscale=1", "--quick_test=1", "--ddpm_checkpoint_epoch=100"])
    assert args.is_grayscale is True and args.quick_test is True and args.ddpm_checkpoint_epoch == 100
    with pytest.raises(SystemExit):
        parser.parse_args(["--output_dir=o", "--model_name=m", "--training_ids=t", "--validation_ids=v",
                           "--ema_decay=1.5"])


def test_cli_run_writes_the_expected_files(data, capsys):
    assert run_cli(main, argv(data, n_epochs=2, checkpoint_every=2)) == 0
    d = run_dir(data)
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["checkpoint.pth", LAST_CHECKPOINT, periodic_checkpoint_name(2), "train", "val"])
    assert len(list((d / "train").iterdir())) == 1 and len(list((d / "val").iterdir())) == 1
    ckpt = load_checkpoint(d / LAST_CHECKPOINT)
    cfg = run_config_of(ckpt)
    assert cfg.model.preset == "tiny" and cfg.data.is_grayscale and cfg.image_shape == (1, 8, 8)
    assert (cfg.schedule.beta_schedule, cfg.schedule.beta_start, cfg.schedule.beta_end) == (
        "scaled_linear_beta", 0.0015, 0.0195)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 4
    assert "trained 2/2 epochs" in capsys.readouterr().out


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model_state_dict"]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_command_resumes_bit_for_bit_and_completed_run_exits_0(data, capsys):
    assert run_cli(main, argv(data, "full", n_epochs=3)) == 0
    assert run_cli(main, argv(data, "split", n_epochs=1)) == 0
    assert run_cli(main, argv(data, "split", n_epochs=3)) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "continuing at epoch 2/3" in out
    _assert_same(_weights(run_dir(data, "full") / LAST_CHECKPOINT), _weights(run_dir(data, "split") / LAST_CHECKPOINT))
    # Done already: says so, exits 0, touches nothing.
    before = (run_dir(data, "split") / LAST_CHECKPOINT).read_bytes()
    assert run_cli(main, argv(data, "split", n_epochs=3)) == 0
    assert "already complete" in capsys.readouterr().out
    assert (run_dir(data, "split") / LAST_CHECKPOINT).read_bytes() == before


def test_ctrl_c_mid_epoch_then_same_command_resumes(data, monkeypatch, capsys):
    assert run_cli(main, argv(data, "full", n_epochs=2)) == 0
    real_step = training.train_step
    calls = {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # first step of epoch 2
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(training, "train_step", step)
    assert run_cli(main, argv(data, "split", n_epochs=2)) == 130
    assert "interrupted during epoch 2" in capsys.readouterr().out
    assert load_checkpoint(run_dir(data, "split") / LAST_CHECKPOINT)["epoch"] == 1
    monkeypatch.setattr(training, "train_step", real_step)
    assert run_cli(main, argv(data, "split", n_epochs=2)) == 0
    _assert_same(_weights(run_dir(data, "full") / LAST_CHECKPOINT), _weights(run_dir(data, "split") / LAST_CHECKPOINT))


def _to_upstream_keys(state_dict: dict) -> dict:
    """Inverse of MONAI's load_old_state_dict key mapping (see test_checkpoint.to_upstream_keys)."""
    import re

    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"\.attn\.(to_q|to_k|to_v)\.", r".\1.", k)
        k = re.sub(r"\.attn\.out_proj\.", ".proj_attn.", k).replace("postconv", "conv")
        out[k] = v.clone()
    return out


def test_resume_from_an_upstream_checkpoint(data, capsys):
    torch.manual_seed(0)
    model = build_unet(model_config_from_preset("tiny", 2, 1))
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-5)
    model(torch.rand(2, 1, 8, 8), torch.tensor([1, 2])).pow(2).mean().backward()
    opt.step()
    d = run_dir(data, "upstream")
    d.mkdir(parents=True)
    # Upstream's dict: no config, Generative key names, best_loss = a train loss, epoch = epochs completed.
    torch.save({"epoch": 1, "global_step": 8, "model_state_dict": _to_upstream_keys(model.state_dict()),
                "optimizer_state_dict": opt.state_dict(), "best_loss": 0.01}, d / "checkpoint.pth")
    before = (d / "checkpoint.pth").read_bytes()
    # Flags for another preset: refused, naming the flags the weights need; nothing written.
    assert run_cli(main, argv(data, "upstream", model_type="small")) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pth" in err and "--model_type=tiny --is_grayscale=1" in err
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint.pth"]
    assert run_cli(main, argv(data, "upstream", n_epochs=2, eval_freq=5)) == 0
    out = capsys.readouterr().out
    assert "continuing at epoch 2/2" in out and "upstream" in out
    last = load_checkpoint(d / LAST_CHECKPOINT)
    assert last["epoch"] == 2 and last["global_step"] == 8 + 2 and run_config_of(last).model.preset == "tiny"
    # Its train-loss best_loss is not compared with our validation loss: the evaluation made a new best.
    assert (d / "checkpoint.pth").read_bytes() != before and last["best_loss"] > 0.01


def test_3d_volumes(tmp_path):
    train = write_csv(tmp_path / "t.csv", write_images(tmp_path / "v", 2, shape=(8, 8, 8)))
    val = write_csv(tmp_path / "v.csv", write_images(tmp_path / "v", 1, shape=(8, 8, 8), start=2))
    data = {"train": train, "val": val, "tmp": tmp_path}
    assert run_cli(main, argv(data, spatial_dimension=3, n_epochs=1, batch_size=2)) == 0
    cfg = run_config_of(load_checkpoint(run_dir(data) / LAST_CHECKPOINT))
    assert cfg.image_shape == (1, 8, 8, 8) and cfg.model.spatial_dims == 3


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line "error: ...", exit 2, no traceback, existing checkpoint untouched.


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 1-epoch tiny run to copy into tests that check nothing gets damaged."""
    tmp = tmp_path_factory.mktemp("trained")
    train = write_csv(tmp / "train.csv", write_images(tmp / "img", 4))
    val = write_csv(tmp / "val.csv", write_images(tmp / "img", 2, start=4))
    data = {"train": train, "val": val, "tmp": tmp}
    with one_torch_thread():
        assert run_cli(main, argv(data, n_epochs=1, sample_steps=0)) == 0
    return run_dir(data)


def _bad_case(name: str, tmp: Path, data: dict) -> tuple[list[str], str]:
    """(extra flags, text the message must contain) for one bad input."""
    img = tmp / "bad"
    img.mkdir()
    if name == "missing_csv":
        return ["--training_ids=" + str(tmp / "absent.csv")], "absent.csv"
    if name == "empty_csv":
        (tmp / "empty.csv").write_text("")
        return ["--training_ids=" + str(tmp / "empty.csv")], "empty.csv"
    if name == "missing_image":
        csv = write_csv(tmp / "m.csv", [str(img / "gone.npy")])
        return ["--training_ids=" + csv], "gone.npy"
    if name == "corrupt_image":
        (img / "junk.npy").write_bytes(b"this is not numpy")
        csv = write_csv(tmp / "c.csv", write_images(img, 1) + [str(img / "junk.npy")])
        return ["--training_ids=" + csv], "junk.npy"
    if name == "rgb_as_grayscale":
        np.save(img / "rgb.npy", np.zeros((3, 8, 8), np.uint8))
        csv = write_csv(tmp / "rgb.csv", [str(img / "rgb.npy")])
        return ["--training_ids=" + csv], "rgb.npy"
    if name in ("mixed_sizes", "mixed_sizes_lazy_worker"):
        csv = write_csv(tmp / "mixed.csv", write_images(img, 2) + write_images(img, 1, shape=(16, 16), start=5))
        extra = ["--cache_data=0", "--num_workers=1"] if name == "mixed_sizes_lazy_worker" else []
        return ["--training_ids=" + csv, "--batch_size=1", *extra], "img_5.npy"
    if name == "not_divisible":
        csv = write_csv(tmp / "ten.csv", write_images(img, 2, shape=(10, 10)))
        return ["--training_ids=" + csv], "not divisible by 4"
    if name == "other_preset":
        return ["--model_type=small"], "--model_type: checkpoint tiny, flags small"
    if name == "other_schedule":
        return ["--beta_schedule=sigmoid"], "--beta_schedule: checkpoint scaled_linear_beta, flags sigmoid_beta"
    if name == "other_grayscale":
        return ["--is_grayscale=0"], "--is_grayscale: checkpoint 1, flags 0"
    if name == "missing_periodic":
        return ["--ddpm_checkpoint_epoch=50"], "checkpoint_50.pth not found"
    if name == "simplex":  # resuming a Gaussian run with simplex noise
        return ["--simplex_noise=1"], "--simplex_noise: checkpoint 0, flags 1"
    raise AssertionError(name)


BAD_CASES = ["missing_csv", "empty_csv", "missing_image", "corrupt_image", "rgb_as_grayscale", "mixed_sizes",
             "mixed_sizes_lazy_worker", "not_divisible", "other_preset", "other_schedule", "other_grayscale",
             "missing_periodic", "simplex"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_damages_nothing(case, trained_run, tmp_path, capsys):
    run = tmp_path / "out" / "run"
    shutil.copytree(trained_run, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    data = {"train": str(trained_run.parents[1] / "train.csv"), "val": str(trained_run.parents[1] / "val.csv"),
            "tmp": tmp_path}
    extra, expected = _bad_case(case, tmp_path, data)
    # n_epochs=3: the run is not complete, so every check runs.
    lazy = case == "mixed_sizes_lazy_worker"
    rc = run_cli(main, argv(data, n_epochs=3, sample_steps=0, quick_test=0 if lazy else 1) + extra)
    captured = capsys.readouterr()
    assert rc == 2
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    if lazy:
        lines = lines[-1:]  # a progress bar was already drawn (and cleared) before the worker hit the image
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0]
    assert "Traceback" not in captured.err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    if lazy:
        # Found mid-epoch by a loader worker: training had started (TensorBoard events may have been added),
        # but no checkpoint changed.
        after = {k: v for k, v in after.items() if k.suffix == ".pth"}
        before = {k: v for k, v in before.items() if k.suffix == ".pth"}
    assert after == before  # checkpoint_last.pth byte-identical, no new files


def _root_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "train_ddpm.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_root_script_bad_inputs_exit_2_with_one_line(trained_run, tmp_path):
    run = tmp_path / "out" / "run"
    shutil.copytree(trained_run, run)
    before = (run / LAST_CHECKPOINT).read_bytes()
    data = {"train": str(trained_run.parents[1] / "train.csv"), "val": str(trained_run.parents[1] / "val.csv"),
            "tmp": tmp_path}
    # Two bad inputs in one process start each: a missing validation CSV, and a checkpoint of another preset.
    for extra, expected in [(["--validation_ids=" + str(tmp_path / "no_val.csv")], "no_val.csv"),
                            (["--model_type=small"], "--model_type: checkpoint tiny, flags small")]:
        proc = _root_script(argv(data, n_epochs=3) + extra, tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert (run / LAST_CHECKPOINT).read_bytes() == before


@pytest.mark.parametrize("native,recorded", [("0", "fp32"), ("1", "bf16")])
def test_amp_records_what_it_resolved_to(data, monkeypatch, capsys, native, recorded):
    monkeypatch.setenv("DDPM_OOD_CPU_NATIVE_BF16", native)
    assert run_cli(main, argv(data, n_epochs=1, amp=1)) == 0
    assert load_checkpoint(run_dir(data) / LAST_CHECKPOINT)["train_config"]["precision"] == recorded
    captured = capsys.readouterr()
    assert f"precision: {recorded}" in captured.out
    assert ("bf16 is emulated on this CPU" in captured.err) == (native == "0")
