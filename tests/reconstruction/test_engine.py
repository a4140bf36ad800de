"""The reconstruction engine: oracle stand-in model, batched == reference, PLMS reset, seeded rows."""

import pytest
import torch

from ddpm_ood.autoencoder.base import IdentityAutoencoder
from ddpm_ood.config import ScheduleConfig
from ddpm_ood.diffusion.eps import model_eps_fn
from ddpm_ood.diffusion.noise import row_noise
from ddpm_ood.diffusion.schedule import alphas_cumprod, make_pndm_scheduler
from ddpm_ood.diffusion.timesteps import denoising_timesteps, start_timesteps
from ddpm_ood.diffusion.unet import build_unet
from ddpm_ood.reconstruction.engine import (
    evaluations_per_image,
    reconstruct_batched,
    reconstruct_reference,
    trajectory_timesteps,
)
from ddpm_ood.reconstruction.plan import ReconstructionPlan

SCHEDULE = ScheduleConfig("scaled_linear_beta", 0.0015, 0.0195)
PATHS = [f"/data/img_{i}.npy" for i in range(7)]


def oracle_for(clean: torch.Tensor, schedule: ScheduleConfig):
    """A stand-in network that returns the exact noise of ``clean`` (1, C, H, W) for any x_t and t."""
    acp = alphas_cumprod(schedule)

    def eps_fn(x, t):
        a = acp[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * clean * schedule.b_scale) / (1 - a).sqrt()

    return eps_fn


@pytest.fixture(scope="module")
def unet_eps():
    from ddpm_ood.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig("test", 2, 1, (8, 16, 16), (False, False, True), 1, 16, 8)
    net = build_unet(cfg).eval()
    return model_eps_fn(net, SCHEDULE)


@pytest.mark.parametrize("engine", [reconstruct_reference, reconstruct_batched])
@pytest.mark.parametrize("schedule", [SCHEDULE, ScheduleConfig("cosine", None, None), ScheduleConfig(b_scale=2.0)])
def test_oracle_returns_the_clean_image(engine, schedule):
    torch.manual_seed(1)
    clean = torch.rand(1, 1, 8, 8)
    images = clean.repeat(3, 1, 1, 1)
    pixels = IdentityAutoencoder(schedule.b_scale)  # the engine works in model space: b_scale * image
    samples = engine(oracle_for(clean, schedule), schedule, pixels.encode(images), PATHS[:3],
                     ReconstructionPlan.at(start_timesteps(100, 16), 100, 2))
    recons = pixels.decode(samples)
    assert recons.shape == (7, 3, 1, 8, 8)
    assert (recons - clean).abs().max() < 1e-4


def test_oracle_catches_monai_pndm_without_repeated_timestep():
    """Driving MONAI's PNDM with its own timesteps (no repeat) shifts every later t label and ends a slot early:
    from a small start t (where the multistep history never settles) the oracle sees it."""
    torch.manual_seed(1)
    clean = torch.rand(1, 1, 8, 8)
    eps_fn = oracle_for(clean, SCHEDULE)
    scheduler = make_pndm_scheduler(SCHEDULE, 100)
    noise = torch.randn(1, 1, 8, 8)
    x = scheduler.add_noise(clean, noise, torch.tensor([31]))
    for t in denoising_timesteps(31, 100):
        x, _ = scheduler.step(eps_fn(x, torch.tensor([t])), t, x)
    assert (x - clean).abs().max() > 1e-3


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize(("k", "batch"), [(1, 3), (3, 3), (4, 1), (2, 2)])
def test_batched_equals_reference(unet_eps, k, batch, balanced):
    torch.manual_seed(2)
    images = torch.rand(batch, 1, 8, 8)
    starts = start_timesteps(10, k)
    ref = reconstruct_reference(unet_eps, SCHEDULE, images, PATHS[:batch],
                                ReconstructionPlan.at(starts, 10, 5))
    fast = reconstruct_batched(unet_eps, SCHEDULE, images, PATHS[:batch],
                               ReconstructionPlan.at(starts, 10, 5), balanced=balanced)
    assert (ref - fast).abs().max() < 1e-5


@pytest.mark.parametrize(("steps", "k", "batch", "recon_steps"), [(100, 4, 1, None), (100, 16, 3, None), (20, 1, 2, 3)])
def test_balanced_ticks_keep_the_call_count_and_even_out_their_size(steps, k, batch, recon_steps):
    """As many network calls as the longest trajectory needs, each of ceil(all calls / that) samples but the last
    few; without balancing the first call carries every trajectory."""
    clean = torch.rand(1, 1, 4, 4)
    exact = oracle_for(clean, SCHEDULE)
    starts = start_timesteps(steps, k)
    per_trajectory = []
    for t in starts:
        n = len(trajectory_timesteps(t, steps, recon_steps))
        per_trajectory += [n + 1 if n > 1 else n] * batch
    for balanced in (True, False):
        sizes = []

        def counting(x, t, sizes=sizes):
            sizes.append(x.shape[0])
            return exact(x, t)

        images = clean.repeat(batch, 1, 1, 1)
        out = reconstruct_batched(counting, SCHEDULE, images, PATHS[:batch],
                                  ReconstructionPlan.at(starts, steps, 5, recon_steps=recon_steps),
                                  balanced=balanced)
        assert (out - clean).abs().max() < 1e-3  # the oracle still lands on the clean image
        assert len(sizes) == max(per_trajectory) and sum(sizes) == sum(per_trajectory)
        if balanced:
            tick = -(-sum(per_trajectory) // max(per_trajectory))
            assert max(sizes) == tick and sum(s == tick for s in sizes) >= len(sizes) // 2
        else:
            assert sizes[0] == len(per_trajectory)


def test_batch_size_order_and_chunking_change_nothing(unet_eps):
    torch.manual_seed(3)
    images = torch.rand(7, 1, 8, 8)
    starts = start_timesteps(20, 2)
    full = reconstruct_batched(unet_eps, SCHEDULE, images, PATHS, ReconstructionPlan.at(starts, 20, 5))
    one_by_one = torch.cat(
        [reconstruct_batched(unet_eps, SCHEDULE, images[i : i + 1], PATHS[i : i + 1],
                             ReconstructionPlan.at(starts, 20, 5)) for i in range(7)],
        dim=1,
    )
    assert (full - one_by_one).abs().max() < 1e-5
    reversed_starts = reconstruct_batched(unet_eps, SCHEDULE, images, PATHS,
                                          ReconstructionPlan.at(starts[::-1], 20, 5))
    assert (full - reversed_starts.flip(0)).abs().max() < 1e-5
    chunked = reconstruct_batched(_rechunk(unet_eps, 5), SCHEDULE, images, PATHS,
                                           ReconstructionPlan.at(starts, 20, 5))
    assert (full - chunked).abs().max() < 1e-5


def _rechunk(eps_fn, size):
    def chunked(x, t):
        return torch.cat([eps_fn(x[i : i + size], t[i : i + size]) for i in range(0, x.shape[0], size)])

    return chunked


def test_plms_history_reset_per_start_point(unet_eps):
    """A start point's result does not depend on which other start points ran before it (upstream's leak)."""
    torch.manual_seed(4)
    images = torch.rand(2, 1, 8, 8)
    alone = reconstruct_reference(unet_eps, SCHEDULE, images, PATHS[:2], ReconstructionPlan.at([101], 20, 5))
    with_others = reconstruct_reference(unet_eps, SCHEDULE, images, PATHS[:2],
                                        ReconstructionPlan.at([1, 51, 101], 20, 5))
    assert torch.equal(alone[0], with_others[2])


def test_noise_is_seeded_per_row():
    a = row_noise(2, "x/a.npy", 11, (1, 4, 4))
    assert torch.equal(a, row_noise(2, "x/a.npy", 11, (1, 4, 4)))
    for other in [row_noise(3, "x/a.npy", 11, (1, 4, 4)), row_noise(2, "x/b.npy", 11, (1, 4, 4)),
                  row_noise(2, "x/a.npy", 21, (1, 4, 4))]:
        assert not torch.equal(a, other)


def test_recon_steps(unet_eps):
    assert trajectory_timesteps(991, 100, 4) == [991, 661, 331, 1]
    assert trajectory_timesteps(31, 100, 10) == [31, 21, 11, 1]
    torch.manual_seed(5)
    images = torch.rand(2, 1, 8, 8)
    starts = start_timesteps(20, 4)
    full = reconstruct_batched(unet_eps, SCHEDULE, images, PATHS[:2],
                               ReconstructionPlan.at(starts[:2], 20, 5))
    same = reconstruct_batched(unet_eps, SCHEDULE, images, PATHS[:2],
                               ReconstructionPlan.at(starts[:2], 20, 5, recon_steps=20))
    assert torch.equal(full, same)
    clean = images[:1]
    exact = oracle_for(clean, SCHEDULE)
    oracle = reconstruct_batched(exact, SCHEDULE, clean, PATHS[:1],
                                 ReconstructionPlan.at(starts, 20, 5, recon_steps=3))
    assert (oracle - clean).abs().max() < 1e-4

    def imperfect(x, t):  # a model whose error depends on t, so the path taken matters
        return exact(x, t) + 0.2 * torch.sin(x * t.reshape(-1, 1, 1, 1) / 100)

    full = reconstruct_batched(imperfect, SCHEDULE, clean, PATHS[:1], ReconstructionPlan.at(starts, 20, 5))
    fewer = reconstruct_batched(imperfect, SCHEDULE, clean, PATHS[:1],
                                ReconstructionPlan.at(starts, 20, 5, recon_steps=3))
    assert torch.equal(full[0], fewer[0])  # t=1: a single step either way
    assert (full[1:] - fewer[1:]).abs().max() > 1e-3


@pytest.mark.parametrize(("recon_steps", "skip_factor"), [(None, 16), (10, 16), (3, 64)])
def test_evaluations_per_image_counts_the_engines_calls(recon_steps, skip_factor):
    calls = []

    def zero_noise(x, t):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    starts = start_timesteps(100, skip_factor)
    reconstruct_batched(zero_noise, SCHEDULE, torch.rand(1, 1, 4, 4), ["a.npy"],
                                                         ReconstructionPlan.at(starts, 100, 0, recon_steps=recon_steps))
    assert evaluations_per_image(starts, 100, recon_steps) == sum(calls)
    if recon_steps is None:
        batched_calls, calls[:] = list(calls), []
        reconstruct_reference(zero_noise, SCHEDULE, torch.rand(1, 1, 4, 4), ["a.npy"],
                                                               ReconstructionPlan.at(starts, 100, 0))
        assert sum(calls) == sum(batched_calls)
    if recon_steps is None and skip_factor == 16:
        assert sum(calls) == 349  # the README's figure for the quickstart's full path


@pytest.mark.parametrize("calls,tick", [([5, 3, 3, 1], 3), ([7] * 4 + [2] * 4, 6), ([4, 4, 4], 12), ([1], 1)])
def test_tick_schedule_is_computed_once_and_keeps_the_critical_path(calls, tick):
    from ddpm_ood.reconstruction.engine import balanced_tick_size, tick_schedule

    assert tick >= balanced_tick_size(calls)  # the engine's tick size is at least this
    ticks = tick_schedule(calls, tick)
    assert len(ticks) == max(calls)  # the longest trajectory is never held back
    made = [0] * len(calls)
    for chosen, done in ticks:
        assert len(chosen) <= tick and len(set(chosen.tolist())) == len(chosen)
        left_before = [c - m for c, m in zip(calls, made, strict=True)]
        # the chosen ones have at least as many calls left as any trajectory left out (with calls left)
        rest = [left_before[i] for i in range(len(calls)) if i not in chosen.tolist() and left_before[i] > 0]
        assert not rest or min(left_before[i] for i in chosen.tolist()) >= max(rest)
        for i, d in zip(chosen.tolist(), done.tolist(), strict=True):
            assert d == made[i]
            made[i] += 1
    assert made == list(calls)
