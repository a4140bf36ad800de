"""encode -> engine -> decode -> clamp -> metrics: the path reconstruct.py and the scorer share."""

from __future__ import annotations

import torch

from ddpm_ood.autoencoder.base import IdentityAutoencoder
from ddpm_ood.config import ScheduleConfig
from ddpm_ood.diffusion.schedule import alphas_cumprod
from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.reconstruction.engine import reconstruct_batched
from ddpm_ood.reconstruction.metrics import mse
from ddpm_ood.reconstruction.pipeline import reconstruct_images, result_rows
from ddpm_ood.reconstruction.plan import ReconstructionPlan
from ddpm_ood.results.schema import METRIC_COLUMNS
from ddpm_ood.runs import RunModel

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
    model = RunModel(_oracle(ae.encode(images), schedule), schedule, ae, tuple(images.shape[1:]))
    starts = start_timesteps(10, 4)
    recons = reconstruct_images(model, images, KEYS, ReconstructionPlan.at(starts, 10, 3))
    assert recons.shape == (len(starts), 2, 1, 8, 8)
    assert (recons - images).abs().max() < 1e-4  # the oracle restores the image, b_scale undone by decode
    # The same as the engine in model space, decoded and clamped by hand.
    samples = reconstruct_batched(model.eps_fn, schedule, ae.encode(images), KEYS,
                                                                    ReconstructionPlan.at(starts, 10, 3))
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
    from ddpm_ood.devices import MEMORY_FRACTION, max_batch_for_memory

    assert max_batch_for_memory(10 * 2**30, 2**20) == int(MEMORY_FRACTION * 10 * 1024)
    assert max_batch_for_memory(100, 10**9) == 1  # never zero


def test_volumes_are_decoded_and_measured_in_bounded_chunks_with_the_same_values(monkeypatch):
    from ddpm_ood.perceptual.lpips import build_lpips
    from ddpm_ood.reconstruction import pipeline
    from ddpm_ood.reconstruction.metrics import ReconstructionMetrics

    schedule = ScheduleConfig()
    images = torch.rand(3, 1, 8, 8, 8)
    decoded_rows: list[int] = []

    class CountingIdentity(IdentityAutoencoder):
        def decode(self, samples):
            decoded_rows.append(samples.shape[0])
            return super().decode(samples)

    ae = CountingIdentity()
    clean = ae.encode(images) * 0.9  # reconstructions differ from the images: the metrics are not all zero
    acp = alphas_cumprod(schedule)

    def eps_fn(x, t):
        a = acp[t].reshape(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * clean.repeat(x.shape[0] // 3, 1, 1, 1, 1)) / (1 - a).sqrt()

    model = RunModel(eps_fn, schedule, ae, tuple(images.shape[1:]))
    torch.manual_seed(0)
    metrics = ReconstructionMetrics("cpu", lpips_net=build_lpips(pretrained_backbone=False))
    starts = start_timesteps(10, 4)  # S start points x 3 images = 3S reconstructions
    whole = pipeline.measure_batch(model, metrics, images, ["a", "b", "c"],
                                   ReconstructionPlan.at(starts, 10, 3))
    assert decoded_rows == [3 * len(starts)]
    decoded_rows.clear()
    monkeypatch.setattr(pipeline, "MEASURE_VOXELS", 2 * 512)  # two 8^3 volumes at a time
    chunked = pipeline.measure_batch(model, metrics, images, ["a", "b", "c"],
                                     ReconstructionPlan.at(starts, 10, 3))
    assert decoded_rows == [2] * (3 * len(starts) // 2) + [1] * (3 * len(starts) % 2)
    for name in METRIC_COLUMNS:
        assert whole[name].shape == (len(starts), 3) and whole[name].min() > 0
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-7)
    # Each (start, image) cell is that pair's own value: pair the rows up by hand.
    recons = pipeline.reconstruct_images(model, images, ["a", "b", "c"], ReconstructionPlan.at(starts, 10, 3))
    assert torch.allclose(whole["mse"][1, 2], mse(images[2:3], recons[1, 2:3])[0])


def test_chunks_are_whole_lpips_batches_where_one_fits():
    from ddpm_ood.reconstruction.pipeline import MEASURE_VOXELS, measure_chunk_rows

    assert measure_chunk_rows(784, 256) % 256 == 0 and measure_chunk_rows(784, 256) * 784 <= MEASURE_VOXELS
    assert measure_chunk_rows(128**3, 256) == MEASURE_VOXELS // 128**3  # volumes: fewer than an LPIPS batch
    assert measure_chunk_rows(4 * 160**3 * 10, 256) == 1  # never zero
