"""Latent diffusion end to end: train_vqvae.py -> train_ddpm.py --vqvae_checkpoint -> reconstruct.py ->
ood_detection.py (and score.py), in 2D (.npy images) and 3D (NIfTI volumes written here), the pixel-space 3D route,
exact VQ-VAE resume, and every bad input the issue names (one line, exit status 2)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_run import needs_lpips, one_torch_thread

from ddpm_ood.checkpoint import load_checkpoint, run_config_of
from ddpm_ood.cli import ood_detection, reconstruct, score, train_ddpm, train_vqvae
from ddpm_ood.cli.runner import run_cli
from ddpm_ood.data.splits import write_split_csv
from ddpm_ood.reconstruction.plan import ReconstructionPlan

TINY_VQ_FLAGS = [
    "--vqvae_num_channels=[8,16]", "--vqvae_num_res_channels=[8,16]", "--vqvae_num_res_layers=1",
    "--vqvae_downsample_parameters=[[2,4,1,1],[2,4,1,1]]", "--vqvae_upsample_parameters=[[2,4,1,1,0],[2,4,1,1,0]]",
    "--vqvae_num_embeddings=16", "--vqvae_embedding_dim=3",
]
TINY_VQ_3D_FLAGS = [
    "--vqvae_num_channels=[8]", "--vqvae_num_res_channels=[8]", "--vqvae_num_res_layers=1",
    "--vqvae_downsample_parameters=[[2,4,1,1]]", "--vqvae_upsample_parameters=[[2,4,1,1,0]]",
    "--vqvae_num_embeddings=16", "--vqvae_embedding_dim=2",
]
SCHEDULE = ["--beta_schedule=scaled_linear_beta", "--beta_start=0.0015", "--beta_end=0.0195"]


def blobs_2d(folder: Path, prefix: str, n: int, seed: int, kind: str) -> list[str]:
    """16x16 uint8 .npy images: "in" = a bright square, "out" = random noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        if kind == "in":
            a = np.zeros((16, 16), np.uint8)
            r, c, size = rng.integers(2, 8), rng.integers(2, 8), rng.integers(3, 8)
            a[r:r + size, c:c + size] = 200
        else:
            a = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
        p = folder / f"{prefix}_{i}.npy"
        np.save(p, a)
        paths.append(str(p))
    return paths


def volumes_3d(folder: Path, prefix: str, n: int, seed: int, kind: str, channels: int = 1) -> list[str]:
    """12x12x12 NIfTI volumes (a bright cube, or noise); ``channels`` > 1 writes 4-D images as BraTS does."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        if kind == "in":
            a = np.zeros((12, 12, 12), np.float32)
            s, size = rng.integers(2, 5, size=3), rng.integers(3, 7)
            a[s[0]:s[0] + size, s[1]:s[1] + size, s[2]:s[2] + size] = 1.0
        else:
            a = rng.random((12, 12, 12)).astype(np.float32)
        if channels > 1:
            a = np.stack([a * (k + 1) for k in range(channels)], axis=-1)
        p = folder / f"{prefix}_{i:03d}.nii.gz"
        nib.Nifti1Image(a, np.eye(4)).to_filename(str(p))
        paths.append(str(p))
    return paths


def run(module, argv: list[str]) -> int:
    with one_torch_thread():
        return run_cli(module.main, argv)


@pytest.fixture(scope="module")
def data2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm2d")
    s = root / "data_splits"
    write_split_csv(s / "Sq_train.csv", blobs_2d(root / "train", "Sq", 16, 0, "in"))
    write_split_csv(s / "Sq_val.csv", blobs_2d(root / "val", "Sq", 6, 1, "in"))
    write_split_csv(s / "Sq_test.csv", blobs_2d(root / "test", "Sq", 6, 2, "in"))
    write_split_csv(s / "Noise_test.csv", blobs_2d(root / "noise", "Noise", 6, 3, "out"))
    write_split_csv(s / "Rgb_test.csv", [str(p) for p in _rgb(root / "rgb")])
    return root, s


def _rgb(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(2):
        p = folder / f"Rgb_{i}.npy"
        np.save(p, np.random.default_rng(i).integers(0, 256, size=(3, 16, 16), dtype=np.uint8))
        paths.append(p)
    return paths


def vqvae_argv(out: Path, s: Path, name: str, *extra: str, n_epochs: int = 2) -> list[str]:
    return [f"--output_dir={out}", f"--model_name={name}", f"--training_ids={s / 'Sq_train.csv'}",
            f"--validation_ids={s / 'Sq_val.csv'}", "--is_grayscale=1", "--spatial_dimension=2", "--batch_size=8",
            f"--n_epochs={n_epochs}", "--eval_freq=1", "--checkpoint_every=0", "--num_workers=0",
            "--perceptual_weight=0", "--vqvae_learning_rate=1e-3", *TINY_VQ_FLAGS, *extra]


def ddpm_argv(out: Path, s: Path, name: str, vq: Path, *extra: str) -> list[str]:
    return [f"--output_dir={out}", f"--model_name={name}", f"--training_ids={s / 'Sq_train.csv'}",
            f"--validation_ids={s / 'Sq_val.csv'}", "--is_grayscale=1", "--batch_size=8", "--n_epochs=1",
            "--eval_freq=1", "--checkpoint_every=0", "--num_workers=0", "--model_type=tiny", "--sample_steps=2",
            "--lr=1e-3", f"--vqvae_checkpoint={vq}", *SCHEDULE, *extra]


def recon_argv(out: Path, s: Path, name: str, *extra: str) -> list[str]:
    return [f"--output_dir={out}", f"--model_name={name}", f"--validation_ids={s / 'Sq_val.csv'}",
            f"--in_ids={s / 'Sq_test.csv'}", f"--out_ids={s / 'Noise_test.csv'}", "--num_inference_steps=10",
            "--inference_skip_factor=4", "--num_workers=0", *extra]


@pytest.fixture(scope="module")
def trained2d(data2d):
    root, s = data2d
    out = root / "out"
    assert run(train_vqvae, vqvae_argv(out, s, "vq")) == 0
    vq = out / "vq" / "checkpoint.pth"
    assert run(train_ddpm, ddpm_argv(out, s, "ldm", vq)) == 0
    return root, s, out, vq


def test_vqvae_run_writes_upstream_json_and_a_complete_checkpoint(trained2d):
    _, _, out, vq = trained2d
    config = json.loads((out / "vq" / "vqvae_config.json").read_text())
    assert config["num_channels"] == [8, 16] and config["embedding_dim"] == 3 and "channels" not in config
    ck = load_checkpoint(vq, kind="vqvae")
    for key in ("model_state_dict", "discriminator_state_dict", "optimizer_g_state_dict", "optimizer_d_state_dict",
                "best_loss", "config", "train_config"):
        assert ck.get(key) is not None, key
    assert ck["config"]["kind"] == "vqvae" and ck["config"]["image_shape"] == [1, 16, 16]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = EventAccumulator(str(out / "vq" / "train")).Reload()
    for tag in ("l1_loss", "vq_loss", "perceptual_loss", "jukebox_loss", "adversarial_loss", "generator_loss",
                "discriminator_loss", "loss"):
        assert tag in train.Tags()["scalars"], tag
    val = EventAccumulator(str(out / "vq" / "val")).Reload()
    assert "recons" in val.Tags()["images"] and "loss" in val.Tags()["scalars"]


def test_latent_ddpm_records_its_vqvae(trained2d):
    _, _, out, vq = trained2d
    run_config = run_config_of(load_checkpoint(out / "ldm" / "checkpoint.pth"))
    from ddpm_ood.autoencoder.vqvae import load_vqvae

    assert run_config.latent is not None and run_config.latent.weights_sha256 == load_vqvae(vq).sha256
    assert run_config.model.in_channels == 3 and run_config.latent.latent_shape == (3, 4, 4)
    assert run_config.image_shape == (1, 16, 16)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    val = EventAccumulator(str(out / "ldm" / "val")).Reload()
    samples = val.Images("samples")[-1]  # decoded to images: 8 tiles of 16x16 in a 4-wide grid
    assert (samples.width, samples.height) == (4 * 18 + 2, 2 * 18 + 2)


def test_latent_ddpm_resume_equals_an_uninterrupted_run(trained2d):
    _, s, out, vq = trained2d
    assert run(train_ddpm, ddpm_argv(out, s, "ldm_straight", vq, "--n_epochs=2", "--sample_steps=0")) == 0
    assert run(train_ddpm, ddpm_argv(out, s, "ldm_split", vq, "--n_epochs=1", "--sample_steps=0")) == 0
    assert run(train_ddpm, ddpm_argv(out, s, "ldm_split", vq, "--n_epochs=2", "--sample_steps=0")) == 0
    a = load_checkpoint(out / "ldm_straight" / "checkpoint_last.pth")
    b = load_checkpoint(out / "ldm_split" / "checkpoint_last.pth")
    assert a["epoch"] == b["epoch"] == 2 and a["best_loss"] == b["best_loss"]
    for name, tensor in a["model_state_dict"].items():
        assert torch.equal(tensor, b["model_state_dict"][name]), name


@needs_lpips
def test_latent_reconstruction_detection_and_scoring(trained2d, capsys):
    _, s, out, vq = trained2d
    assert run(reconstruct, recon_argv(out, s, "ldm")) == 0
    ood = out / "ldm" / "ood"
    val = pd.read_csv(ood / "results_val.csv")
    assert len(val) == 6 * 3 and np.isfinite(val[["mse", "perceptual_difference"]].to_numpy()).all()
    sidecar = json.loads((ood / "results_val.json").read_text())
    assert sidecar["autoencoder"] == run_config_of(load_checkpoint(out / "ldm" / "checkpoint.pth")).latent.weights_sha256
    # An explicit --vqvae_checkpoint with the recorded weights changes nothing: the finished files are kept.
    before = (ood / "results_Noise.csv").read_bytes()
    assert run(reconstruct, recon_argv(out, s, "ldm", f"--vqvae_checkpoint={vq}")) == 0
    assert "already complete" in capsys.readouterr().out and (ood / "results_Noise.csv").read_bytes() == before
    assert run(ood_detection, [f"--output_dir={out}", "--model_name=ldm"]) == 0
    assert "AUC for ldm vs Noise" in capsys.readouterr().out
    scores = out / "scores.csv"
    assert run(score, [f"--output_dir={out}", "--model_name=ldm", f"--inputs={s / 'Noise_test.csv'}",
                       f"--out_csv={scores}", "--batch_size=4"]) == 0
    assert len(pd.read_csv(scores)) == 6
    # Validation results made with another VQ-VAE (or in pixel space) are not comparable: the scorer refuses them.
    from ddpm_ood.errors import UserError
    from ddpm_ood.ood.scorer import OODScorer

    sidecar_path = ood / "results_val.json"
    original = sidecar_path.read_text()
    try:
        sidecar_path.write_text(json.dumps({**json.loads(original), "autoencoder": "0" * 64}))
        with pytest.raises(UserError, match=r"not comparable with .*results_val.json \(autoencoder: 0{64} -> "):
            OODScorer.from_run(out, "ldm", device="cpu")
    finally:
        sidecar_path.write_text(original)


@needs_lpips
def test_latent_engine_reference_and_batched_agree(trained2d):
    from ddpm_ood.data.datasets import dataset_from_csv
    from ddpm_ood.diffusion.timesteps import start_timesteps
    from ddpm_ood.reconstruction.pipeline import reconstruct_images
    from ddpm_ood.runs import load_run_model, open_run

    _, s, out, _ = trained2d
    ckpt_file = out / "ldm" / "checkpoint.pth"
    run = open_run(ckpt_file)
    ds = dataset_from_csv(str(s / "Noise_test.csv"), run.data)
    images = torch.stack([ds[i]["image"] for i in range(3)])
    keys = [f"k{i}" for i in range(3)]
    ts = start_timesteps(10, 3)
    with one_torch_thread():
        model = load_run_model(run, torch.device("cpu"))
        ref = reconstruct_images(model, images, keys, ReconstructionPlan.at(ts, 10, 2, engine="reference"))
        fast = reconstruct_images(model, images, keys, ReconstructionPlan.at(ts, 10, 2, engine="batched"))
    assert ref.shape == (len(ts), 3, 1, 16, 16)
    assert torch.allclose(ref, fast, rtol=0, atol=1e-5)


def test_vqvae_resume_equals_an_uninterrupted_run(data2d):
    root, s = data2d
    out = root / "resume"
    # Adversarial loss on (discriminator and its optimizer in play), perceptual off to keep it fast.
    assert run(train_vqvae, vqvae_argv(out, s, "straight", n_epochs=2)) == 0
    assert run(train_vqvae, vqvae_argv(out, s, "split", n_epochs=1)) == 0
    assert run(train_vqvae, vqvae_argv(out, s, "split", n_epochs=2)) == 0
    a = load_checkpoint(out / "straight" / "checkpoint_last.pth", kind="vqvae")
    b = load_checkpoint(out / "split" / "checkpoint_last.pth", kind="vqvae")
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model_state_dict", "discriminator_state_dict"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert a["best_loss"] == b["best_loss"]


def _error(module, argv, capsys) -> str:
    capsys.readouterr()  # drop what earlier runs printed
    assert run(module, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def other_vqvae(trained2d) -> Path:
    """A VQ-VAE with other weights than the one the DDPM "ldm" was trained on (another seed, 1 epoch)."""
    _, s, out, _ = trained2d
    assert run(train_vqvae, vqvae_argv(out, s, "vq2", "--seed=5", n_epochs=1)) == 0
    return out / "vq2" / "checkpoint.pth"


@dataclass(frozen=True)
class Latent2D:
    """What a bad-input case builds its command line from: the trained 2D run, a folder of its own, and the
    module's other fixtures on demand."""

    root: Path
    s: Path
    out: Path
    vq: Path
    tmp_path: Path
    request: pytest.FixtureRequest

    @property
    def ddpm(self) -> Path:
        return self.out / "ldm" / "checkpoint.pth"

    @property
    def other_vq(self) -> Path:
        return self.request.getfixturevalue("other_vqvae")


# id -> case(c: Latent2D) -> (CLI module, argv, fragments the one error line must hold)
BAD_INPUTS: dict[str, Callable[[Latent2D], tuple[object, list[str], list[str]]]] = {}


def bad_input(case):
    BAD_INPUTS[case.__name__.replace("_", "-")] = case
    return case


@bad_input
def vqvae_checkpoint_as_the_ddpm(c):
    return (reconstruct, recon_argv(c.out, c.s, "ldm", f"--eval_checkpoint={c.vq}"),
            [f"{c.vq}: is a VQVAE checkpoint", "--vqvae_checkpoint"])


@bad_input
def ddpm_checkpoint_as_the_vqvae(c):
    return train_ddpm, ddpm_argv(c.out, c.s, "other", c.ddpm), [f"{c.ddpm}: is a DDPM checkpoint"]


@bad_input
def reconstruct_with_another_vqvaes_weights(c):
    return (reconstruct, recon_argv(c.out, c.s, "ldm", f"--vqvae_checkpoint={c.other_vq}"),
            [f"{c.other_vq}: VQ-VAE weights differ from the one {c.ddpm} was trained on"])


@bad_input
def resume_the_ddpm_with_another_vqvae(c):
    return (train_ddpm, ddpm_argv(c.out, c.s, "ldm", c.other_vq, "--n_epochs=2"),
            [f"{c.out / 'ldm' / 'checkpoint_last.pth'}: flags contradict", "--vqvae_checkpoint (VQ-VAE weights)"])


@bad_input
def resume_the_vqvae_with_other_loss_weights(c):
    return (train_vqvae, vqvae_argv(c.out, c.s, "vq", "--adversarial_weight=0", n_epochs=3),
            ["vq/checkpoint_last.pth: flags contradict", "loss weights"])


@bad_input
def channel_without_grayscale(c):
    return (train_vqvae, vqvae_argv(c.out, c.s, "bad", "--channel=1", "--is_grayscale=0"),
            ["--channel=1", "needs --is_grayscale=1"])


@bad_input
def rgb_data_for_a_one_channel_vqvae(c):
    return train_vqvae, vqvae_argv(c.out, c.s, "bad", "--is_grayscale=0"), ["--vqvae_in_channels=1", "--is_grayscale=0"]


@bad_input
def rgb_out_set_for_a_grayscale_model(c):
    return (reconstruct, recon_argv(c.out, c.s, "ldm", f"--out_ids={c.s / 'Rgb_test.csv'}", "--run_val=0",
                                    "--run_in=0"), [f"{c.root / 'rgb' / 'Rgb_0.npy'}: has 3 channels", "--is_grayscale=1"])


@bad_input
def image_size_the_vqvae_cannot_take(c):
    return train_vqvae, vqvae_argv(c.out, c.s, "bad", "--image_size=18"), [f"{c.s / 'Sq_train.csv'}: image size 18x18 does not come back", "--image_size"]


@bad_input
def upstream_vqvae_json_with_an_unknown_key(c):
    upstream = c.tmp_path / "upstream_vq"
    upstream.mkdir()
    ck = load_checkpoint(c.vq, kind="vqvae")
    torch.save({"epoch": 1, "model_state_dict": ck["model_state_dict"]}, upstream / "checkpoint.pth")
    cfg = json.loads((c.out / "vq" / "vqvae_config.json").read_text())
    (upstream / "vqvae_config.json").write_text(json.dumps({**cfg, "use_flash": True}))
    return (train_ddpm, ddpm_argv(c.out, c.s, "up", upstream / "checkpoint.pth"),
            [f"{upstream / 'vqvae_config.json'}: unknown VQ-VAE key(s) use_flash"])


@bad_input
def latent_pad_without_latent_diffusion(c):
    argv = ddpm_argv(c.out, c.s, "x", None, "--latent_pad=[1,1,1,1]")[:-1] + ["--latent_pad=[1,1,1,1]"]
    return train_ddpm, argv, ["--latent_pad", "give --vqvae_checkpoint too"]


@bad_input
def latent_pad_the_unet_cannot_halve(c):
    return train_ddpm, ddpm_argv(c.out, c.s, "x", c.vq, "--latent_pad=[1,0,1,0]"), ["--latent_pad=[1, 0, 1, 0]", "not divisible by 4"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line(trained2d, case, tmp_path, request, capsys):
    module, argv, fragments = BAD_INPUTS[case](Latent2D(*trained2d, tmp_path, request))
    err = _error(module, argv, capsys)
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_a_list_flag_that_does_not_parse_exits_2(trained2d, capsys):
    _, s, out, _ = trained2d
    with pytest.raises(SystemExit) as exit_info:
        train_vqvae.build_parser().parse_args(vqvae_argv(out, s, "bad", "--vqvae_downsample_parameters=[[2,4,1,"))
    assert exit_info.value.code == 2
    assert "expected a list of integer lists" in capsys.readouterr().err


def test_upstream_vqvae_checkpoint_trains_a_latent_ddpm(trained2d):
    root, s, out, vq = trained2d
    upstream = root / "upstream_ok"
    upstream.mkdir(exist_ok=True)
    ck = load_checkpoint(vq, kind="vqvae")
    torch.save({"epoch": 2, "global_step": 4, "best_loss": 0.1, "model_state_dict": ck["model_state_dict"]},
               upstream / "checkpoint.pth")
    (upstream / "vqvae_config.json").write_text((out / "vq" / "vqvae_config.json").read_text())
    assert run(train_ddpm, ddpm_argv(out, s, "ldm_up", upstream / "checkpoint.pth", "--sample_steps=0")) == 0
    assert run_config_of(load_checkpoint(out / "ldm_up" / "checkpoint.pth")).latent.checkpoint.endswith(
        "upstream_ok/checkpoint.pth")


@pytest.fixture(scope="module")
def data3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm3d")
    s = root / "data_splits"
    write_split_csv(s / "Vol_train.csv", volumes_3d(root / "train", "Vol", 6, 0, "in", channels=4))
    write_split_csv(s / "Vol_val.csv", volumes_3d(root / "val", "Vol", 3, 1, "in"))
    write_split_csv(s / "Vol_test.csv", volumes_3d(root / "test", "Vol", 3, 2, "in"))
    write_split_csv(s / "Noise_test.csv", volumes_3d(root / "noise", "Noise", 3, 3, "out"))
    return root, s


def _common_3d(s: Path) -> list[str]:
    # 12^3 volumes cropped to 10^3 (--image_roi) and resized to 8^3 (--image_size), as the README's Decathlon recipe.
    return ["--is_grayscale=1", "--spatial_dimension=3", "--image_roi=[10,10,10]", "--image_size=8",
            "--num_workers=0", "--batch_size=3"]


@needs_lpips
@pytest.mark.parametrize("route", ["latent", "pixel"])
def test_3d_routes_end_to_end(data3d, route, capsys):
    root, s = data3d
    out = root / f"out_{route}"
    train = [f"--output_dir={out}", f"--training_ids={s / 'Vol_train.csv'}", f"--validation_ids={s / 'Vol_val.csv'}",
             "--n_epochs=1", "--eval_freq=1", "--checkpoint_every=0", *_common_3d(s)]
    extra = []
    if route == "latent":
        assert run(train_vqvae, [*train, "--model_name=vq", "--perceptual_weight=0.001", *TINY_VQ_3D_FLAGS]) == 0
        extra = [f"--vqvae_checkpoint={out / 'vq' / 'checkpoint.pth'}"]
    assert run(train_ddpm, [*train, "--model_name=ddpm", "--model_type=tiny", "--sample_steps=2", *SCHEDULE,
                            *extra]) == 0
    recon = [f"--output_dir={out}", "--model_name=ddpm", f"--validation_ids={s / 'Vol_val.csv'}",
             f"--in_ids={s / 'Vol_test.csv'}", f"--out_ids={s / 'Noise_test.csv'}", "--num_inference_steps=10",
             "--inference_skip_factor=5", "--num_workers=0"]
    assert run(reconstruct, recon) == 0
    results = pd.read_csv(out / "ddpm" / "ood" / "results_Noise.csv")
    assert len(results) == 3 * 2 and np.isfinite(results[["mse", "perceptual_difference"]].to_numpy()).all()
    assert run(ood_detection, [f"--output_dir={out}", "--model_name=ddpm"]) == 0
    assert "AUC for ddpm vs Noise" in capsys.readouterr().out
    latent = run_config_of(load_checkpoint(out / "ddpm" / "checkpoint.pth")).latent
    assert (latent is not None) == (route == "latent")
    if latent is not None:
        assert latent.latent_shape == (2, 4, 4, 4)


def test_latent_resume_keeps_its_padding_and_refuses_another(trained2d, capsys):
    _, s, out, vq = trained2d
    assert run(train_ddpm, ddpm_argv(out, s, "ldm_pad", vq, "--latent_pad=[0,4,0,4]", "--sample_steps=0")) == 0
    # Resumed without the flag: the checkpoint's padding, not the automatic one.
    assert run(train_ddpm, ddpm_argv(out, s, "ldm_pad", vq, "--n_epochs=2", "--sample_steps=0")) == 0
    ck = load_checkpoint(out / "ldm_pad" / "checkpoint_last.pth")
    assert ck["epoch"] == 2 and run_config_of(ck).latent.latent_pad == (0, 4, 0, 4)
    message = _error(train_ddpm, ddpm_argv(out, s, "ldm_pad", vq, "--n_epochs=3", "--latent_pad=[4,0,4,0]"), capsys)
    assert "--latent_pad=[0, 4, 0, 4]" in message and "--latent_pad=[4, 0, 4, 0]" in message
    # A finished latent run rerun with contradicting flags is refused, not reported complete.
    message = _error(train_ddpm, ddpm_argv(out, s, "ldm_pad", vq, "--n_epochs=2", "--beta_end=0.02"), capsys)
    assert "--beta_end" in message and "contradict" in message
    assert load_checkpoint(out / "ldm_pad" / "checkpoint_last.pth")["epoch"] == 2


def test_an_out_set_without_the_models_channel_is_refused_before_anything_is_written(data3d, capsys):
    # As Task05_Prostate (2 channels) under a BraTS model of --channel=3.
    root, s = data3d
    write_split_csv(s / "Two_test.csv", volumes_3d(root / "two", "Two", 2, 4, "out", channels=2))
    out = root / "out_channel"
    assert run(train_ddpm, [f"--output_dir={out}", "--model_name=ddpm", f"--training_ids={s / 'Vol_train.csv'}",
                            f"--validation_ids={s / 'Vol_train.csv'}", "--n_epochs=1", "--checkpoint_every=0",
                            "--channel=3", "--model_type=tiny", "--sample_steps=0", *SCHEDULE, *_common_3d(s)]) == 0
    message = _error(reconstruct, [f"--output_dir={out}", "--model_name=ddpm",
                                   f"--validation_ids={s / 'Vol_train.csv'}", f"--in_ids={s / 'Vol_train.csv'}",
                                   f"--out_ids={s / 'Two_test.csv'}", "--num_inference_steps=10",
                                   "--inference_skip_factor=5", "--num_workers=0"], capsys)
    assert "Two_000.nii.gz: has 2 channels" in message and "--channel=3 is out of range 0..1" in message
    assert not list((out / "ddpm").rglob("results_*"))


def test_finished_vqvae_run_with_contradicting_flags_is_refused(trained2d, capsys):
    _, s, out, _ = trained2d
    message = _error(train_vqvae, vqvae_argv(out, s, "vq", "--vqvae_num_embeddings=32"), capsys)
    assert "vq" in message and "contradict" in message and "num_embeddings" in message
    message = _error(train_vqvae, vqvae_argv(out, s, "vq", "--adversarial_weight=0.5"), capsys)
    assert "loss weights" in message
    capsys.readouterr()
    assert run(train_vqvae, vqvae_argv(out, s, "vq")) == 0  # the same flags: already complete
    assert "already complete" in capsys.readouterr().out


def test_a_pixel_run_resumed_with_a_vqvae_is_refused_naming_both(trained2d, capsys):
    _, s, out, vq = trained2d
    pixel = ddpm_argv(out, s, "pixel", vq, "--sample_steps=0")
    pixel.remove(f"--vqvae_checkpoint={vq}")
    assert run(train_ddpm, pixel) == 0
    message = _error(train_ddpm, ddpm_argv(out, s, "pixel", vq, "--n_epochs=2"), capsys)
    assert "pixel-space DDPM" in message and f"--vqvae_checkpoint={vq}" in message



def test_every_score_family_works_on_the_latents(trained2d, tmp_path):
    # The families see the VQ-VAE's latents (the model space), never the images: features equal a direct
    # computation on the encoded images, and ood_detection reports every family.
    import shutil

    from ddpm_ood.data.datasets import dataset_from_csv
    from ddpm_ood.diffusion.schedule import alphas_cumprod
    from ddpm_ood.families import ScoreOptions, compute_features, make_settings
    from ddpm_ood.reconstruction.stage import score_context
    from ddpm_ood.results.run_dir import RunDir
    from ddpm_ood.runs import load_run_model, open_run
    from ddpm_ood.seeding import noise_key

    _, s, trained_out, _ = trained2d
    out = tmp_path / "out"
    shutil.copytree(trained_out / "ldm", out / "ldm")
    families = ["eps_norm", "denoising_error", "msma", "diffpath6d", "diffpath1d"]
    # per-image noise: the toy VQ-VAE maps many validation images to the same codes, whose shared-noise features
    # would be constant columns (refused by the density)
    argv = recon_argv(out, s, "ldm", "--scores=eps_norm,denoising_error,msma,diffpath", "--score_noise=per_image",
                      "--score_levels=2",
                      "--diffpath_steps=2")
    assert run(reconstruct, argv) == 0
    trained = open_run(out / "ldm" / "checkpoint.pth")
    assert trained.config.latent is not None
    model = load_run_model(trained, torch.device("cpu"))
    ds = dataset_from_csv(str(s / "Noise_test.csv"), trained.data)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with one_torch_thread(), torch.inference_mode():
        latents = model.autoencoder.encode(images)
        settings = make_settings(families, ScoreOptions(score_levels=(250, 750), diffpath_steps=2,
                                                        score_noise="per_image"), score_context(trained, 2))
        assert settings["diffpath6d"].clip is None and settings["msma"].data_scale == 1.0  # latents: no range
        want = compute_features(families, model.eps_fn, latents, [noise_key(p) for p in ds.paths],
                                alphas_cumprod(trained.config.schedule), settings)
    assert latents.shape[1:] == tuple(trained.config.model_shape) != tuple(images.shape[1:])
    for family in families:
        got = pd.read_csv(RunDir(out, "ldm").features(family, "Noise")).iloc[:, 2:].to_numpy()
        scale = np.maximum(np.abs(want[family]).max(axis=0, keepdims=True), 1.0)
        assert (np.abs(got - want[family]) <= 1e-5 * scale).all(), family
    assert run(ood_detection, [f"--output_dir={out}", "--model_name=ldm", "--score=eps_norm"]) == 0
    summary = pd.read_csv(out / "ldm" / "ood" / "summary.csv")
    assert {*families, "ensemble"} <= set(summary["score"])
