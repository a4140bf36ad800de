"""fit(task) with a stand-in task: the loop alone (non-finite losses, loss read-back, checkpoint contents)."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_ood.checkpoint import LAST_CHECKPOINT, load_checkpoint
from ddpm_ood.distributed import DistContext
from ddpm_ood.errors import UserError
from ddpm_ood.training.loop import MAX_NON_FINITE_STEPS, TrainConfig, fit, loss_readback_every


class Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.zeros(1, 2, 2), "index": i}


class ScriptedTask:
    """Returns the scripted loss of each global step (cycling), like an fp16 task whose scaler skips bad steps."""

    def __init__(self, losses: list[float], skips_non_finite: bool) -> None:
        self.train_module = torch.nn.Linear(1, 1)
        self.skips_non_finite = skips_non_finite
        self.losses, self.calls = losses, 0

    def train_step(self, batch: dict, epoch: int, step: int) -> torch.Tensor:
        value = self.losses[self.calls % len(self.losses)]
        self.calls += 1
        return torch.tensor(value)

    def validation_loss(self, loader, max_batches):
        n = sum(b["image"].shape[0] for b in loader)
        return 0.5 * n, n

    def log_evaluation(self, writer, global_step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"model_state_dict": self.train_module.state_dict(), "config": None}

    def scalars(self) -> dict[str, float]:
        return {"lr": 0.1}


def _cfg(tmp_path, n_epochs=1) -> TrainConfig:
    return TrainConfig(run_dir=str(tmp_path / "run"), n_epochs=n_epochs, eval_freq=1, checkpoint_every=0,
                       batch_size=1, num_workers=0, seed=0, sample_steps=0)


def test_skipped_non_finite_steps_are_left_out_of_the_epoch_loss(tmp_path, capsys):
    task = ScriptedTask([1.0, math.nan, math.inf, 3.0], skips_non_finite=True)
    summary = fit(task, _cfg(tmp_path), Items(4), Items(2), DistContext())
    assert summary.epoch_losses == [2.0] and summary.global_step == 4
    assert capsys.readouterr().out.count("the GradScaler skipped the step") == 2
    ckpt = load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)
    assert ckpt["epoch"] == 1 and ckpt["best_loss"] == 0.5 and "model_state_dict" in ckpt


def test_a_non_finite_loss_without_a_scaler_stops_at_once(tmp_path):
    task = ScriptedTask([1.0, math.nan], skips_non_finite=False)
    with pytest.raises(UserError, match=r"training diverged: loss is nan at epoch 1, step 2"):
        fit(task, _cfg(tmp_path), Items(4), Items(2), DistContext())


def test_a_persistent_non_finite_loss_is_divergence_even_with_a_scaler(tmp_path):
    task = ScriptedTask([math.nan], skips_non_finite=True)
    with pytest.raises(UserError, match=f"step {MAX_NON_FINITE_STEPS}; lower --lr"):
        fit(task, _cfg(tmp_path), Items(MAX_NON_FINITE_STEPS + 5), Items(2), DistContext())


def test_losses_are_read_back_in_groups_on_a_gpu_only():
    assert loss_readback_every(torch.device("cpu")) == 1
    assert loss_readback_every(torch.device("cuda", 0)) > 1
