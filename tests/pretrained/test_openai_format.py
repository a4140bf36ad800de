"""improved-diffusion / guided-diffusion checkpoints: the published key layouts load strictly; learned sigmas,
rescaled timesteps and 4000 -> 1000 respacing against closed forms (Gaussian data, whose exact noise estimate is
known); flags that do not match; untrusted pickles."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrained_fixtures import TINY_OPENAI_FLAGS, save_openai
from tiny_run import one_torch_thread

from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.errors import UserError
from ddpm_ood.families.diffpath import DiffPathSettings, diffpath_timesteps
from ddpm_ood.families.registry import compute_features
from ddpm_ood.pretrained import open_pretrained
from ddpm_ood.pretrained.model import grid_steps, load_strict
from ddpm_ood.pretrained.openai_format import model_betas, parse_flags, resolve_flags, unet_config
from ddpm_ood.pretrained.openai_unet import OpenAIUNet
from ddpm_ood.runs import load_run_model, open_pretrained_run

LAYOUTS = json.loads((Path(__file__).parent / "data" / "openai_key_layouts.json").read_text())


@pytest.mark.parametrize("name", ["improved_cifar10", "improved_imagenet64", "guided_256_uncond"])
def test_published_key_layouts_load_strictly(name):
    """Every key and shape of the openai UNet for the README flags of CIFAR-10 and ImageNet-64 (improved-diffusion)
    and 256x256 unconditional (guided-diffusion), as their own code lays them out (the fixture says how it was
    made), built on the meta device (no memory)."""
    entry = LAYOUTS[name]
    codebase, flags = resolve_flags(parse_flags(entry["flags"]))
    assert codebase == entry["codebase"]
    with torch.device("meta"):
        net = OpenAIUNet(unet_config(flags))
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == entry["keys"]
    load_strict(net, {k: torch.empty(s, device="meta") for k, s in entry["keys"].items()}, name, "the flags")


def test_flags_that_do_not_match_name_the_first_key(tmp_path):
    save_openai(tmp_path / "m.pt")
    wrong = TINY_OPENAI_FLAGS.replace("--num_channels 32", "--num_channels 64")
    with pytest.raises(UserError) as err:
        open_pretrained(tmp_path / "m.pt", wrong)
    message = str(err.value)
    assert "key time_embed.0.weight has shape (128, 32) in the file, (256, 64) from" in message
    assert "\n" not in message
    with pytest.raises(UserError, match=r"key out.2.weight has shape \(6, 32, 3, 3\) in the file, \(3, 32, 3, 3\)"):
        open_pretrained(tmp_path / "m.pt", TINY_OPENAI_FLAGS.replace("--learn_sigma True", "--learn_sigma False"))


def test_conditional_and_unknown_flags_are_refused(tmp_path):
    save_openai(tmp_path / "m.pt")
    with pytest.raises(UserError, match="class-conditional"):
        open_pretrained(tmp_path / "m.pt", TINY_OPENAI_FLAGS + " --class_cond True")
    with pytest.raises(UserError, match="unknown flag --num_chanels"):
        open_pretrained(tmp_path / "m.pt", "--num_chanels 32")
    with pytest.raises(UserError, match="give the model and diffusion flags"):
        open_pretrained(tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    state["label_emb.weight"] = torch.zeros(1000, 128)
    torch.save(state, tmp_path / "cond.pt")
    with pytest.raises(UserError, match="class-conditional model \\(it has label_emb.weight\\)"):
        open_pretrained(tmp_path / "cond.pt", TINY_OPENAI_FLAGS)


class _RunsCode:
    """A pickle that would call os.getcwd when unpickled without weights_only: any code, refused."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    torch.save({"time_embed.0.weight": torch.zeros(1), "x": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused: not a plain state dict readable with weights_only=True") as err:
        open_pretrained(tmp_path / "evil.pt", TINY_OPENAI_FLAGS)
    assert "\n" not in str(err.value)


def test_flags_from_a_json_file(tmp_path):
    save_openai(tmp_path / "m.pt")
    flags = parse_flags(TINY_OPENAI_FLAGS)
    (tmp_path / "flags.json").write_text(json.dumps(flags))
    a = open_pretrained(tmp_path / "m.pt", str(tmp_path / "flags.json"))
    b = open_pretrained(tmp_path / "m.pt", TINY_OPENAI_FLAGS)
    assert a.identity() == b.identity()
    assert a.format == "improved-diffusion" and a.flags["rescale_timesteps"] is True  # improved-diffusion's default


def test_grid_steps():
    assert grid_steps(1000) == list(range(1000))
    assert grid_steps(4000) == [4 * k for k in range(1000)]
    # DiffPath's 10 steps on a 4000-step model: its authors' 0, 400, ..., 3600.
    assert [grid_steps(4000)[t] for t in diffpath_timesteps(10)] == list(range(0, 4000, 400))
    odd = grid_steps(1500)  # space_timesteps rounding: 1000 distinct steps from 0 to T - 1
    assert odd[0] == 0 and odd[-1] == 1499 and len(set(odd)) == 1000 and odd == sorted(odd)
    assert all(abs(s - k * 1499 / 999) <= 0.5 + 1e-9 for k, s in enumerate(odd))
    few = grid_steps(500)
    assert few[:4] == [0, 0, 1, 1] and few[-1] == 499


class _GaussianOracle(torch.nn.Module):
    """Stands in for an openai network on data x0 ~ N(0, s^2 I): the exact noise estimate
    E[eps | x_t] = sqrt(1 - a) x_t / (a s^2 + 1 - a), a = the model's alphas_cumprod at the step it is given
    (undone from 1000 / T when timesteps are rescaled), then C channels of garbage (learned sigmas). Records the
    timesteps it sees."""

    def __init__(self, model_acp: np.ndarray, variance: float, time_scale: float | None) -> None:
        super().__init__()
        self.acp, self.variance, self.time_scale = torch.tensor(model_acp), variance, time_scale
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        step = (t.double() / self.time_scale).round().long() if self.time_scale else t.long()
        a = self.acp[step].float().reshape(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * x / (a * self.variance + 1 - a)
        return torch.cat([eps, torch.full_like(eps, 1e3)], dim=1)


@pytest.mark.parametrize("rescale", [True, False])
def test_respaced_4000_step_cosine_model_against_closed_form(tmp_path, rescale):
    """A 4000-step cosine learn_sigma model on the 1000-step grid: grid step k is model step 4k (the network sees
    4k, or k with rescale_timesteps: 4k * 1000 / 4000), the grid's alphas_cumprod are the model's at 4k, the
    sigma channels are dropped, and the noise estimate is the closed form of Gaussian data."""
    flags = TINY_OPENAI_FLAGS + f" --rescale_timesteps {rescale}"
    save_openai(tmp_path / "m.pt")
    with one_torch_thread():
        run = open_pretrained_run(tmp_path / "m.pt", flags)
        model_acp = np.cumprod(1 - model_betas(resolve_flags(parse_flags(flags))[1]))
        oracle = _GaussianOracle(model_acp, variance=0.25, time_scale=0.25 if rescale else None)
        run.pretrained.network.network = oracle
        assert run.pretrained.respacing == "4000 -> 1000 steps: grid step k is model step 4k"
        model = load_run_model(run, torch.device("cpu"))
        grid_acp = alphas_cumprod(model.schedule).double()
        assert torch.allclose(grid_acp, torch.tensor(model_acp[::4]), rtol=1e-5, atol=1e-7)
        t = torch.tensor([0, 1, 250, 999])
        x = torch.randn(4, 3, 32, 32)
        eps = model.eps_fn(x, t)
        a = torch.tensor(model_acp[4 * t.numpy()]).float().reshape(-1, 1, 1, 1)
        assert torch.allclose(eps, (1 - a).sqrt() * x / (a * 0.25 + 1 - a), atol=1e-6)
        seen = oracle.seen[-1]
        assert seen.tolist() == ((t.float()).tolist() if rescale else (4 * t).tolist())
        # DiffPath's inversion calls the network at the authors' model steps.
        oracle.seen.clear()
        compute_features(["diffpath6d"], model.eps_fn, x[:1], ["k"], grid_acp.float(),
                         {"diffpath6d": DiffPathSettings(steps=10, clip=run.data_range)})
        steps = [float(s[0]) * (4 if rescale else 1) for s in oracle.seen]
        assert steps == [float(s) for s in range(0, 4000, 400)]
    assert run.data_range == (-1.0, 1.0)


def test_linear_schedule_scaled_to_the_step_count():
    betas = model_betas({"diffusion_steps": 4000, "noise_schedule": "linear"})
    assert math.isclose(betas[0], 0.25e-4) and math.isclose(betas[-1], 0.005)
    cosine = np.cumprod(1 - model_betas({"diffusion_steps": 1000, "noise_schedule": "cosine"}))
    f = np.cos((np.arange(1, 1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    assert np.allclose(cosine[:-5], f[:-5], rtol=1e-9)  # the last steps are capped at beta 0.999
