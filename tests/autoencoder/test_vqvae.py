"""The VQ-VAE seam: upstream's vqvae_config.json, latent padding, encode/decode shapes, weights identity, loading."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_run import TINY_VQ_2D, save_tiny_checkpoint

from ddpm_ood.autoencoder.base import autoencoder_for
from ddpm_ood.autoencoder.vqvae import (
    VQVAE_CONFIG_FILE,
    VQVAEAutoencoder,
    auto_latent_pad,
    build_vqvae,
    check_image_fits_vqvae,
    latent_config,
    load_vqvae,
    padded_spatial,
    read_vqvae_config_json,
    upstream_config_json,
    weights_hash,
)
from ddpm_ood.checkpoint import load_checkpoint, save_checkpoint
from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig
from ddpm_ood.diffusion.unet import model_config_from_preset
from ddpm_ood.errors import UserError
from ddpm_ood.training.vqvae import vqvae_checkpoint_config

TINY_VQ_3D = dataclasses.replace(TINY_VQ_2D, spatial_dims=3, channels=(8,), num_res_channels=(8,),
                                 downsample_parameters=((2, 4, 1, 1),), upsample_parameters=((2, 4, 1, 1, 0),))

# What upstream's train_vqvae.py dumps for its README Decathlon recipe (MONAI Generative keyword names).
UPSTREAM_JSON = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "num_res_layers": 3,
    "downsample_parameters": [[2, 4, 1, 1]] * 4, "upsample_parameters": [[2, 4, 1, 1, 0]] * 4,
    "num_channels": [256, 256, 256, 256], "num_res_channels": [256, 256, 256, 256], "num_embeddings": 2048,
    "embedding_dim": 128, "decay": 0.9, "commitment_cost": 0.25, "epsilon": 1e-5, "dropout": 0.0, "ddp_sync": True,
}


def save_vqvae(path, config=TINY_VQ_2D, seed=0, image_shape=(1, 28, 28)) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_vqvae(config)
    save_checkpoint(path, {"epoch": 1, "model_state_dict": model.state_dict(),
                           "config": vqvae_checkpoint_config(config, DataConfig(is_grayscale=True,
                                                                                spatial_dims=config.spatial_dims),
                                                             image_shape)})
    return model


def test_upstream_config_json_is_read_and_round_trips(tmp_path):
    path = tmp_path / VQVAE_CONFIG_FILE
    path.write_text(json.dumps(UPSTREAM_JSON))
    config = read_vqvae_config_json(path)
    assert config.channels == (256, 256, 256, 256) and config.embedding_dim == 128 and config.downsampling == 16
    written = json.loads(upstream_config_json(config))
    assert written == UPSTREAM_JSON  # the same keys (num_channels) and values upstream writes
    path.write_text(upstream_config_json(TINY_VQ_2D))
    assert read_vqvae_config_json(path) == TINY_VQ_2D
    core = {**UPSTREAM_JSON, "channels": UPSTREAM_JSON["num_channels"]}
    del core["num_channels"]
    path.write_text(json.dumps(core))  # MONAI core's key name is accepted too
    assert read_vqvae_config_json(path) == config


@pytest.mark.parametrize("content, message", [
    (json.dumps({**UPSTREAM_JSON, "use_checkpointing": True, "act": "relu"}), "unknown VQ-VAE key"),
    ("{not json", "cannot be read as JSON"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({**UPSTREAM_JSON, "num_channels": [8, 8]}), "one entry per level"),
])
def test_bad_vqvae_config_json_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / VQVAE_CONFIG_FILE
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        read_vqvae_config_json(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("spatial, factor, pad, padded", [
    ((7, 7), 4, (0, 1, 0, 1), (8, 8)),
    ((8, 8), 4, (0, 0, 0, 0), (8, 8)),
    ((5, 6, 7), 4, (0, 1, 1, 1, 1, 2), (8, 8, 8)),
    ((3, 10), 8, (3, 3, 2, 3), (8, 16)),
])
def test_auto_latent_pad_reaches_the_next_multiple(spatial, factor, pad, padded):
    assert auto_latent_pad(spatial, factor) == pad
    assert padded_spatial(spatial, pad) == padded


@pytest.mark.parametrize("config, image_shape", [(TINY_VQ_2D, (1, 28, 28)), (TINY_VQ_3D, (1, 10, 12, 14))])
def test_encode_pads_and_decode_unpads_exactly(config, image_shape):
    torch.manual_seed(0)
    model = build_vqvae(config).eval()
    spatial = check_image_fits_vqvae(image_shape, config, "x.csv")
    assert spatial == tuple(s // config.downsampling for s in image_shape[1:])
    pad = auto_latent_pad(spatial, 4)
    ae = VQVAEAutoencoder(model, pad)
    x = torch.rand(2, *image_shape)
    z = ae.encode(x)
    assert tuple(z.shape) == (2, config.embedding_dim, *padded_spatial(spatial, pad))
    with torch.no_grad():
        plain = model.encode_stage_2_inputs(x)
        expected = model.decode_stage_2_outputs(plain)
    # The padding holds zeros and is cut away exactly: decode(encode(x)) is the VQ-VAE's own reconstruction.
    assert torch.equal(torch.nn.functional.pad(z, [-p for p in pad]), plain)
    assert torch.equal(ae.decode(z), expected) and ae.decode(z).shape == x.shape
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    low, high = ae.sample_range
    assert low <= float(plain.min()) and high >= float(plain.max())


def test_weights_hash_identifies_the_weights():
    torch.manual_seed(0)
    a = build_vqvae(TINY_VQ_2D).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert weights_hash(a) == weights_hash(b)
    b["quantizer.quantizer.embedding.weight"][0, 0] += 1e-3
    assert weights_hash(a) != weights_hash(b)


def test_image_must_survive_the_vqvae(tmp_path):
    assert check_image_fits_vqvae((1, 28, 28), TINY_VQ_2D, "x.csv") == (7, 7)
    with pytest.raises(UserError, match="x.csv: image size 30x30 does not come back"):
        check_image_fits_vqvae((1, 30, 30), TINY_VQ_2D, "x.csv")
    with pytest.raises(UserError, match="3 channel"):
        check_image_fits_vqvae((3, 28, 28), TINY_VQ_2D, "x.csv")
    with pytest.raises(UserError, match="3 spatial dimensions"):
        check_image_fits_vqvae((1, 8, 8, 8), TINY_VQ_2D, "x.csv")


def test_checkpoint_kinds_are_told_apart(tmp_path):
    save_vqvae(tmp_path / "vq.pth")
    save_tiny_checkpoint(tmp_path / "ddpm.pth")
    with pytest.raises(UserError, match=r"vq.pth: is a VQVAE checkpoint .* a DDPM checkpoint is expected here "
                                        r"\(give it as --vqvae_checkpoint\)"):
        load_checkpoint(tmp_path / "vq.pth")
    with pytest.raises(UserError, match=r"ddpm.pth: is a DDPM checkpoint .* a VQVAE checkpoint is expected"):
        load_vqvae(tmp_path / "ddpm.pth")


def test_upstream_vqvae_checkpoint_loads_with_its_json(tmp_path):
    torch.manual_seed(1)
    model = build_vqvae(TINY_VQ_2D)
    # The reference's checkpoint: weights and counters only; the configuration is vqvae_config.json beside it.
    save_checkpoint(tmp_path / "checkpoint.pth", {"epoch": 3, "global_step": 10, "best_loss": 0.1,
                                                  "model_state_dict": model.state_dict()})
    with pytest.raises(UserError, match="vqvae_config.json: not found"):
        load_vqvae(tmp_path / "checkpoint.pth")
    (tmp_path / VQVAE_CONFIG_FILE).write_text(upstream_config_json(TINY_VQ_2D))
    loaded = load_vqvae(tmp_path / "checkpoint.pth")
    assert loaded.config == TINY_VQ_2D and loaded.image_shape is None
    assert loaded.sha256 == weights_hash(model.state_dict())
    (tmp_path / VQVAE_CONFIG_FILE).write_text(upstream_config_json(dataclasses.replace(TINY_VQ_2D, embedding_dim=5)))
    with pytest.raises(UserError, match="weights do not fit its VQ-VAE configuration"):
        load_vqvae(tmp_path / "checkpoint.pth")


def test_latent_config_checks_the_data_and_the_pad(tmp_path):
    save_vqvae(tmp_path / "vq.pth")
    vq = load_vqvae(tmp_path / "vq.pth")
    latent = latent_config(vq, (1, 28, 28), unet_levels=3, latent_pad=None, source="t.csv")
    assert latent.latent_shape == (3, 8, 8) and latent.latent_pad == (0, 1, 0, 1)
    assert latent_config(vq, (1, 28, 28), 3, (1, 0, 1, 0), "t.csv").latent_pad == (1, 0, 1, 0)
    with pytest.raises(UserError, match="not divisible by 4"):
        latent_config(vq, (1, 28, 28), 3, (0, 0, 0, 0), "t.csv")
    with pytest.raises(UserError, match="needs 4 values"):
        latent_config(vq, (1, 28, 28), 3, (1, 1), "t.csv")
    with pytest.raises(UserError, match=r"t.csv: images load as \(3, 28, 28\) but the VQ-VAE .* was trained on"):
        latent_config(vq, (3, 28, 28), 3, None, "t.csv")
    with pytest.raises(UserError, match=r"t.csv: images load as \(1, 32, 32\) but the VQ-VAE .* was trained on"):
        latent_config(vq, (1, 32, 32), 3, None, "t.csv")
    with pytest.raises(UserError, match=r"--channel=2: the VQ-VAE .* was trained with --channel=0"):
        latent_config(vq, (1, 28, 28), 3, None, "t.csv", DataConfig(is_grayscale=True, channel=2))
    # Same shape, other preprocessing (upstream's crop then resize): refused, naming both values.
    with pytest.raises(UserError, match=r"--image_roi=\(20, 20\): the VQ-VAE .* was trained with --image_roi=None"):
        latent_config(vq, (1, 28, 28), 3, None, "t.csv", DataConfig(is_grayscale=True, image_roi=(20, 20),
                                                                     image_size=28))
    assert latent_config(vq, (1, 28, 28), 3, None, "t.csv", DataConfig(is_grayscale=True)).latent_shape == (3, 8, 8)


def test_upstream_vqvae_is_checked_against_the_images(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "checkpoint.pth", {"epoch": 1, "model_state_dict": build_vqvae(TINY_VQ_2D).state_dict()})
    (tmp_path / VQVAE_CONFIG_FILE).write_text(upstream_config_json(TINY_VQ_2D))
    vq = load_vqvae(tmp_path / "checkpoint.pth")  # no stored image shape: the round trip is what is checked
    assert latent_config(vq, (1, 28, 28), 3, None, "t.csv").latent_shape == (3, 8, 8)
    with pytest.raises(UserError, match="30x30 does not come back"):
        latent_config(vq, (1, 30, 30), 3, None, "t.csv")
    with pytest.raises(UserError, match=r"images have 3 channel\(s\) but the VQ-VAE takes 1"):
        latent_config(vq, (3, 28, 28), 3, None, "t.csv")


def test_b_scale_multiplies_latents_and_is_undone_before_decoding():
    torch.manual_seed(0)
    model = build_vqvae(TINY_VQ_2D).eval()
    plain, scaled = VQVAEAutoencoder(model, (0, 1, 0, 1)), VQVAEAutoencoder(model, (0, 1, 0, 1), b_scale=2.5)
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(scaled.encode(x), 2.5 * plain.encode(x), rtol=0, atol=1e-6)
    assert torch.equal(scaled.decode(scaled.encode(x)), plain.decode(plain.encode(x)))
    assert scaled.sample_range == tuple(2.5 * v for v in plain.sample_range)


def test_chunked_calls_give_the_same_latents_and_images(monkeypatch):
    import ddpm_ood.autoencoder.vqvae as vqvae_module

    torch.manual_seed(0)
    ae = VQVAEAutoencoder(build_vqvae(TINY_VQ_2D), (0, 1, 0, 1), downsampling=4)
    x = torch.rand(5, 1, 28, 28)
    whole_z, whole_x = ae.encode(x), ae.decode(ae.encode(x))
    calls = []
    original = ae.model.decode_stage_2_outputs
    monkeypatch.setattr(ae.model, "decode_stage_2_outputs", lambda z: calls.append(len(z)) or original(z))
    monkeypatch.setattr(vqvae_module, "VOXELS_PER_CALL", 2 * 28 * 28)  # two images per call
    assert torch.allclose(ae.encode(x), whole_z, rtol=0, atol=1e-6)
    assert torch.allclose(ae.decode(whole_z), whole_x, rtol=0, atol=1e-5)
    assert calls == [2, 2, 1]


def test_quantizer_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_vqvae(TINY_VQ_2D).eval()
    seen = []
    # MONAI's quantizer turns off CUDA autocast only; ours must also run with CPU autocast off, on fp32 inputs.
    model.quantizer.quantizer.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype)))
    z = model.encode(torch.rand(2, 1, 28, 28))
    with torch.no_grad():
        want, _ = model.quantize(z)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            got, _ = model.quantize(z.bfloat16())
    assert seen == [(False, torch.float32), (False, torch.float32)]
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=0, atol=1e-6)


def test_autoencoder_for_refuses_another_vqvae(tmp_path):
    save_vqvae(tmp_path / "vq.pth", seed=0)
    save_vqvae(tmp_path / "other.pth", seed=1)
    vq = load_vqvae(tmp_path / "vq.pth")
    latent = latent_config(vq, (1, 28, 28), 3, None, "t.csv")
    run = RunConfig(model_config_from_preset("tiny", 2, 3), ScheduleConfig(), DataConfig(is_grayscale=True),
                    (1, 28, 28), latent=latent)
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    ae = autoencoder_for(run, source="ddpm.pth")
    assert isinstance(ae, VQVAEAutoencoder) and ae.latent_pad == (0, 1, 0, 1)
    with pytest.raises(UserError, match=r"other.pth: VQ-VAE weights differ from the one ddpm.pth was trained on"):
        autoencoder_for(run, vqvae_checkpoint=tmp_path / "other.pth", source="ddpm.pth")
    pixel = dataclasses.replace(run, latent=None)
    with pytest.raises(UserError, match="ddpm.pth is a pixel-space DDPM"):
        autoencoder_for(pixel, vqvae_checkpoint=tmp_path / "vq.pth", source="ddpm.pth")
    # The recorded VQ-VAE moved: say which file it is and how to point at the new place, which then works.
    (tmp_path / "vq.pth").rename(tmp_path / "moved.pth")
    with pytest.raises(UserError, match=r"vq.pth: not found: the VQ-VAE ddpm.pth was trained on .* --vqvae_checkpoint"):
        autoencoder_for(run, source="ddpm.pth")
    assert isinstance(autoencoder_for(run, vqvae_checkpoint=tmp_path / "moved.pth", source="ddpm.pth"),
                      VQVAEAutoencoder)


def test_malformed_stored_vqvae_checkpoints_are_one_line_naming_the_file(tmp_path):
    model = save_vqvae(tmp_path / "vq.pth")
    ck = load_checkpoint(tmp_path / "vq.pth", kind="vqvae")
    # A configuration our own checks refuse (levels of channels and of downsampling differ).
    ck["config"]["vqvae"]["channels"] = [8, 16, 32]
    save_checkpoint(tmp_path / "levels.pth", ck)
    with pytest.raises(UserError, match=r"levels.pth: stored VQ-VAE configuration is malformed \(UserError: "):
        load_vqvae(tmp_path / "levels.pth")
    # A weight that is not a tensor.
    ck = load_checkpoint(tmp_path / "vq.pth", kind="vqvae")
    ck["model_state_dict"][next(iter(model.state_dict()))] = [0.0]
    save_checkpoint(tmp_path / "list.pth", ck)
    with pytest.raises(UserError, match=r"list.pth: weights do not fit its VQ-VAE configuration \(0 missing, 0 "
                                        r"unexpected, 1 not a tensor"):
        load_vqvae(tmp_path / "list.pth")
