"""runs.py, the one way to open a trained run: open_run checks the flags against a stored configuration,
with_image_shape completes an upstream checkpoint's from its flags, load_run_model puts the network and its
autoencoder on a device."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_run import TINY_VQ_2D, save_tiny_checkpoint, to_upstream_keys

from ddpm_ood import runs
from ddpm_ood.autoencoder import base as autoencoder_base
from ddpm_ood.autoencoder import vqvae as vqvae_module
from ddpm_ood.autoencoder.vqvae import (
    VQVAE_CONFIG_FILE,
    VQVAEAutoencoder,
    build_vqvae,
    load_vqvae,
    upstream_config_json,
    with_latent,
)
from ddpm_ood.checkpoint import save_checkpoint
from ddpm_ood.config import DataConfig, ModelConfig
from ddpm_ood.diffusion.unet import build_unet, model_config_from_preset, randomize_zero_init_convs
from ddpm_ood.errors import UserError
from ddpm_ood.run_flags import RunFlags
from ddpm_ood.runs import check_image_shape, load_run_model, open_run, with_image_shape
from ddpm_ood.upstream.flags import run_config_from_flags

# The flags an upstream checkpoint of the tiny preset is opened with (upstream's defaults for the rest).
UPSTREAM_FLAGS = RunFlags(model_type="tiny", is_grayscale=True, beta_schedule="scaled_linear_beta", beta_start=0.0015,
                          beta_end=0.0195)
CPU = torch.device("cpu")


def save_upstream_checkpoint(path, model: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A DDPM checkpoint as upstream's train_ddpm.py writes it (weights under MONAI Generative's key names,
    counters, no configuration); returns the network (random weights that predict something for every input)."""
    torch.manual_seed(seed)
    unet = randomize_zero_init_convs(build_unet(model)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "global_step": 30, "best_loss": 0.1,
                "model_state_dict": to_upstream_keys(unet.state_dict())}, path)
    return unet


def save_upstream_vqvae(path) -> None:
    """A VQ-VAE checkpoint as upstream's train_vqvae.py writes it: weights only, vqvae_config.json beside them."""
    torch.manual_seed(1)
    save_checkpoint(path, {"epoch": 1, "model_state_dict": build_vqvae(TINY_VQ_2D).state_dict()})
    (path.parent / VQVAE_CONFIG_FILE).write_text(upstream_config_json(TINY_VQ_2D))


def test_open_run_refuses_a_contradicting_flag_naming_the_file(tmp_path):
    path = tmp_path / "toy" / "checkpoint.pth"
    saved = save_tiny_checkpoint(path)
    run = open_run(path, RunFlags(is_grayscale=True, beta_schedule="scaled_linear", beta_end=0.0195))
    assert run.config == saved and not run.upstream and run.epoch == 1 and run.data == saved.data
    file = re.escape(str(path))
    with pytest.raises(UserError, match=rf"^--beta_schedule=cosine contradicts {file} which was trained with "
                                        r"scaled_linear_beta; drop the flag$"):
        open_run(path, RunFlags(beta_schedule="cosine"))
    with pytest.raises(UserError, match=rf"^--model_type=tiny contradicts {file} which was trained with test"):
        open_run(path, RunFlags(model_type="tiny"))
    with pytest.raises(UserError, match=rf"^--latent_pad=\[0, 1, 0, 1\] contradicts {file} which was trained with "
                                        r"none \(pixel space\); drop the flag$"):
        open_run(path, latent_pad=(0, 1, 0, 1))


def test_with_image_shape_builds_an_upstream_checkpoints_config_from_the_flags(tmp_path):
    path = tmp_path / "upstream" / "checkpoint.pth"
    unet = save_upstream_checkpoint(path, model_config_from_preset("tiny", 2, 1))
    run = open_run(path, UPSTREAM_FLAGS)
    assert run.upstream and run.config is None and run.epoch == 3
    assert run.data == DataConfig(is_grayscale=True)  # how its images are read, before their shape is known
    complete = with_image_shape(run, (1, 8, 8), "x.csv")
    assert complete.config == run_config_from_flags(UPSTREAM_FLAGS, (1, 8, 8))
    assert complete.config.model == model_config_from_preset("tiny", 2, 1) and complete.config.latent is None
    assert (complete.config.schedule.beta_schedule, complete.config.schedule.beta_end) == ("scaled_linear_beta", 0.0195)
    # The upstream weights load into the UNet the flags build: the run predicts what the saved network does.
    model = load_run_model(complete, CPU)
    x, t = torch.rand(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        want = unet(x, timesteps=t)
    assert want.abs().max() > 0
    torch.testing.assert_close(model.eps_fn(x, t), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vqvae_checkpoint", [None, "None", ""], ids=["not-given", "None", "empty"])
def test_with_image_shape_refuses_latent_pad_without_a_vqvae(tmp_path, vqvae_checkpoint):
    path = tmp_path / "upstream" / "checkpoint.pth"
    save_upstream_checkpoint(path, model_config_from_preset("tiny", 2, 1))
    run = open_run(path, UPSTREAM_FLAGS, vqvae_checkpoint=vqvae_checkpoint, latent_pad=[0, 1, 0, 1])
    with pytest.raises(UserError, match=r"^--latent_pad only applies to latent diffusion: give --vqvae_checkpoint "
                                        r"too$"):
        with_image_shape(run, (1, 8, 8), "x.csv")


def test_check_image_shape_refuses_other_images(tmp_path):
    path = tmp_path / "toy" / "checkpoint.pth"
    saved = save_tiny_checkpoint(path)
    run = open_run(path)
    assert with_image_shape(run, [1, 8, 8], "x.csv") is run
    with pytest.raises(UserError, match=r"^x\.csv: images load as \(3, 8, 8\) but the model was trained on "
                                        r"\(1, 8, 8\) \(check --is_grayscale / --image_size\)$"):
        with_image_shape(run, (3, 8, 8), "x.csv")
    check_image_shape(saved, (1, 8, 8), "y.csv")
    with pytest.raises(UserError, match=r"^y\.csv: images load as \(1, 16, 16\)"):
        check_image_shape(saved, (1, 16, 16), "y.csv")


def test_an_upstream_latent_checkpoints_vqvae_is_read_and_hashed_once(tmp_path, monkeypatch):
    vq_path = tmp_path / "vq" / "checkpoint.pth"
    save_upstream_vqvae(vq_path)
    expected = with_latent(run_config_from_flags(UPSTREAM_FLAGS, (1, 28, 28)), load_vqvae(vq_path), None, "x.csv")
    ddpm_path = tmp_path / "ldm" / "checkpoint.pth"
    save_upstream_checkpoint(ddpm_path, expected.model)
    calls = {"load_vqvae": 0, "weights_hash": 0}

    def count(module, name: str) -> None:  # a spy: the real function runs, its calls are counted
        real = getattr(module, name)

        def spy(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    count(runs, "load_vqvae")
    count(autoencoder_base, "load_vqvae")  # where load_run_model's autoencoder would read it again
    count(vqvae_module, "weights_hash")
    run = open_run(ddpm_path, UPSTREAM_FLAGS, vqvae_checkpoint=vq_path)
    run = with_image_shape(run, (1, 28, 28), "x.csv")
    model = load_run_model(run, CPU)
    assert calls == {"load_vqvae": 1, "weights_hash": 1}
    assert run.config == expected and run.vqvae.sha256 == run.config.latent.weights_sha256
    assert isinstance(model.autoencoder, VQVAEAutoencoder) and model.model_shape == (3, 8, 8)
    latents = model.autoencoder.encode(torch.rand(2, 1, 28, 28))
    assert latents.shape == (2, 3, 8, 8) and model.eps_fn(latents, torch.tensor([1, 999])).shape == (2, 3, 8, 8)


def test_load_run_model_refuses_an_incomplete_upstream_config(tmp_path):
    path = tmp_path / "upstream" / "checkpoint.pth"
    save_upstream_checkpoint(path, model_config_from_preset("tiny", 2, 1))
    run = open_run(path, UPSTREAM_FLAGS)
    with pytest.raises(ValueError, match=r"configuration needs its image shape first \(with_image_shape\)"):
        load_run_model(run, CPU)
