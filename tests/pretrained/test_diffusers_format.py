"""Diffusers models read offline: our noise estimate and schedule against diffusers' own (the oracle), the legacy
scheduler config, the pipeline layout, the PLMS reconstruction against diffusers' PNDMScheduler, bad folders."""

from __future__ import annotations

import json

import pytest
import torch
from pretrained_fixtures import save_diffusers_unet
from tiny_run import one_torch_thread

from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.errors import UserError
from ddpm_ood.pretrained import open_pretrained
from ddpm_ood.pretrained.diffusers_format import read_scheduler
from ddpm_ood.reconstruction.engine import reconstruct_batched
from ddpm_ood.reconstruction.plan import ReconstructionPlan
from ddpm_ood.runs import load_run_model, open_pretrained_run

diffusers = pytest.importorskip("diffusers")


def _diffusers_eps(model, scheduler, x, t, prediction_type):
    """diffusers' forward converted to eps as its schedulers do (DDIM's pred_epsilon)."""
    out = model(x, t).sample
    a = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return a**0.5 * out + (1 - a) ** 0.5 * x
    return (x - a**0.5 * out) / (1 - a) ** 0.5


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noise_estimate_equals_diffusers(tmp_path, attention, channels, prediction_type):
    with one_torch_thread():
        reference = save_diffusers_unet(tmp_path, channels=channels, attention=attention,
                                        prediction_type=prediction_type)
        run = open_pretrained_run(tmp_path)
        model = load_run_model(run, torch.device("cpu"))
        assert run.config.image_shape == (channels, 8, 8)
        scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path)
        torch.manual_seed(1)
        x = torch.randn(4, channels, 8, 8)
        t = torch.tensor([0, 17, 500, 999])
        with torch.no_grad():
            expected = _diffusers_eps(reference, scheduler, x, t, prediction_type)
        ours = model.eps_fn(x, t)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1e-5
    assert expected.abs().max() > 0.1  # a real network output, not zeros


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist()},
])
def test_alphas_cumprod_equal_diffusers_ddpm_scheduler(config):
    betas, acp, _, _ = read_scheduler({"num_train_timesteps": 1000, **config}, source="test")
    run_acp = alphas_cumprod(open_schedule(betas))
    expected = diffusers.DDPMScheduler(num_train_timesteps=1000, **config).alphas_cumprod
    assert (run_acp - expected).abs().max() <= 1e-7
    assert (torch.from_numpy(acp).float() - expected).abs().max() <= 1e-7


def open_schedule(betas):
    from ddpm_ood.pretrained.model import grid_schedule

    return grid_schedule(betas, "epsilon")[0]


def test_legacy_scheduler_config_is_read(tmp_path):
    """The first diffusers releases (google/ddpm-cifar10-32's original upload): class GaussianDDPMScheduler,
    ``timesteps`` for num_train_timesteps, no prediction_type."""
    save_diffusers_unet(tmp_path, attention=False)
    legacy = {"_class_name": "GaussianDDPMScheduler", "_diffusers_version": "0.0.4", "beta_end": 0.02,
              "beta_schedule": "linear", "beta_start": 0.0001, "timesteps": 1000, "variance_type": "fixed_small",
              "clip_predicted_image": True}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(legacy))
    model = open_pretrained(tmp_path)
    assert model.prediction_type == "epsilon" and model.model_steps == 1000 and model.respacing is None
    expected = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02).alphas_cumprod
    assert (alphas_cumprod(model.schedule) - expected).abs().max() <= 1e-7
    assert open_pretrained(tmp_path).identity()["flags"]["scheduler"] == "GaussianDDPMScheduler"
    legacy["predict_epsilon"] = False
    (tmp_path / "scheduler_config.json").write_text(json.dumps(legacy))
    assert open_pretrained(tmp_path).prediction_type == "sample"


def test_pipeline_folder_and_bin_weights(tmp_path):
    """A pipeline folder (unet/, scheduler/) with pickled .bin weights (read with weights_only=True) gives the
    same noise estimate as the network it was saved from."""
    with one_torch_thread():
        reference = save_diffusers_unet(tmp_path, pipeline=True, safetensors=False)
        assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
        model = load_run_model(open_pretrained_run(tmp_path), torch.device("cpu"))
        x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
        with torch.no_grad():
            assert (model.eps_fn(x, t) - reference(x, t).sample).abs().max() <= 1e-5


def test_learned_variance_channels_are_dropped(tmp_path):
    with one_torch_thread():
        reference = save_diffusers_unet(tmp_path, channels=3, out_channels=6)
        model = load_run_model(open_pretrained_run(tmp_path), torch.device("cpu"))
        x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
        with torch.no_grad():
            assert (model.eps_fn(x, t) - reference(x, t).sample[:, :3]).abs().max() <= 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_plms_reconstruction_equals_diffusers_pndm(tmp_path, prediction_type):
    """Our batched engine from several start points equals diffusers' PNDMScheduler (skip_prk_steps, alpha 1 at
    the end, steps_offset 1) driven over the same timesteps with its own model outputs: t0, t1, t1, t2, ..., 1
    (diffusers repeats the second timestep of PLMS warm-up, as we do). A v-prediction model's outputs are turned
    into eps at each call before PNDM sees them: PLMS combines noise estimates; diffusers' PNDM would combine the
    raw v outputs of different timesteps and convert the mix with one timestep's alpha, a different sampler."""
    start_ts, n_steps = [1, 101, 491, 991], 100
    with one_torch_thread():
        reference = save_diffusers_unet(tmp_path, prediction_type=prediction_type, seed=3)
        model = load_run_model(open_pretrained_run(tmp_path), torch.device("cpu"))
        torch.manual_seed(2)
        x0 = torch.rand(2, 3, 8, 8) * 2 - 1
        noise = torch.randn(len(start_ts), 2, 3, 8, 8)
        ours = reconstruct_batched(model.eps_fn, model.schedule, x0, ["a", "b"],
                                   ReconstructionPlan.at(start_ts, n_steps, 0), noise=noise)
        ddpm = diffusers.DDPMScheduler.from_pretrained(tmp_path)
        for s, start in enumerate(start_ts):
            pndm = diffusers.PNDMScheduler(num_train_timesteps=1000, beta_schedule="linear", skip_prk_steps=True,
                                           set_alpha_to_one=True, steps_offset=1, prediction_type="epsilon")
            pndm.set_timesteps(n_steps)
            grid = list(range(start, 0, -10))
            calls = grid[:1] + grid[1:2] * 2 + grid[2:]
            x = pndm.add_noise(x0, noise[s], torch.tensor([start]))
            with torch.no_grad():
                for t in calls:
                    eps = _diffusers_eps(reference, ddpm, x, torch.tensor([t] * 2), prediction_type)
                    x = pndm.step(eps, t, x).prev_sample
            # A random network's trajectories grow to ~1e2; float32 rounding of two orders of operations, relative.
            assert (ours[s] - x).abs().max() <= 1e-5 * max(float(x.abs().max()), 1.0), start


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        open_pretrained(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        open_pretrained(tmp_path / "nowhere")
    save_diffusers_unet(tmp_path / "m", attention=False)
    (tmp_path / "m" / "scheduler_config.json").unlink()
    with pytest.raises(UserError, match="no scheduler: scheduler_config.json is missing"):
        open_pretrained(tmp_path / "m")


@pytest.mark.parametrize("change", [{"_class_name": "UNet2DConditionModel"}, {"num_class_embeds": 10},
                                    {"class_embed_type": "timestep"}])
def test_conditional_models_are_refused(tmp_path, change):
    save_diffusers_unet(tmp_path, attention=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match="conditional") as err:
        open_pretrained(tmp_path)
    assert "\n" not in str(err.value)


def test_unsupported_schedule_is_refused(tmp_path):
    save_diffusers_unet(tmp_path, attention=False, scheduler={"beta_schedule": "sigmoid"})
    with pytest.raises(UserError, match="beta_schedule 'sigmoid' is not supported; accepted: linear"):
        open_pretrained(tmp_path)
