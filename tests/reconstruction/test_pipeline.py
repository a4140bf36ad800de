"""encode -> engine -> decode -> clamp -> metrics: the path reconstruct.py and the scorer share."""

from __future__ import annotations

import torch

from ddpm_ood.autoencoder.base import IdentityAutoencoder
from ddpm_ood.config import ScheduleConfig
from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.reconstruction.engine import reconstruct_batched
from ddpm_ood.reconstruction.metrics import mse
from ddpm_ood.reconstruction.pipeline import ReconstructionModel, reconstruct_images, result_rows
from ddpm_ood.results.schema import METRIC_COLUMNS

KEYS = ["a", "b"]


def _oracle(clean_samples: torch.Tensor, schedule: ScheduleConfig):
    acp = alphas_cumprod(schedule)

    def eps_fn(x, t):
        a = acp[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * clean_samples.repeat(x.shape[0] // clean_samples.shape[0], 1, 1, 1)) / (1 - a).sqrt()

    return eps_fn


def test_images_come_back_through_the_autoencoder_and_are_clamped_last():
    schedule = ScheduleConfig(b_scale=2.0)
    images = torch.rand(2, 1, 8, 8)
    ae = IdentityAutoencoder(schedule.b_scale)
    model = ReconstructionModel(_oracle(ae.encode(images), schedule), schedule, ae, tuple(images.shape[1:]))
    starts = start_timesteps(10, 4)
    recons = reconstruct_images(model, images, KEYS, starts, 10, 3)
    assert recons.shape == (len(starts), 2, 1, 8, 8)
    assert (recons - images).abs().max() < 1e-4  # the oracle restores the image, b_scale undone by decode
    # The same as the engine in model space, decoded and clamped by hand.
    samples = reconstruct_batched(model.eps_fn, schedule, ae.encode(images), KEYS, starts, 10, 3)
    assert torch.equal(recons, (samples / 2.0).clamp(0, 1))


def test_result_rows_are_image_major_and_follow_the_metric_columns():
    # values: (S=2 start points, B=3 images)
    values = {"mse": torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]),
              "perceptual_difference": torch.tensor([[1.1, 1.2, 1.3], [1.4, 1.5, 1.6]])}
    rows = result_rows([5, 6, 7], ["x", "y", "z"], "in", [11, 21], values)
    assert rows["index"].tolist() == [5, 5, 6, 6, 7, 7] and rows["t"].tolist() == [11, 21] * 3
    assert rows["filename"].tolist() == ["x", "x", "y", "y", "z", "z"] and set(rows["type"]) == {"in"}
    for r, row in enumerate(rows.itertuples()):
        s, b = r % 2, r // 2
        for k in METRIC_COLUMNS:
            assert getattr(row, k) == float(values[k][s, b])  # the fp32 value, widened exactly
    assert mse(torch.ones(1, 2), torch.zeros(1, 2)).item() == 1.0


def test_memory_sized_calls():
    from ddpm_ood.reconstruction.pipeline import MEMORY_FRACTION, max_batch_for_memory

    assert max_batch_for_memory(10 * 2**30, 2**20) == int(MEMORY_FRACTION * 10 * 1024)
    assert max_batch_for_memory(100, 10**9) == 1  # never zero
