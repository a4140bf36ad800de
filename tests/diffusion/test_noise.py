"""diffusion.noise: Gaussian draws unchanged, simplex noise = AnoDDPM's (opensimplex as the oracle), seeded per row,
vectorised, unit variance, spatially correlated; 2D and 3D."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from opensimplex import OpenSimplex
from opensimplex.internals import _init as opensimplex_init

from ddpm_ood.config import ScheduleConfig
from ddpm_ood.diffusion import noise
from ddpm_ood.diffusion.noise import noise_batch
from ddpm_ood.errors import UserError
from ddpm_ood.seeding import channel_seeds, derive_generator, row_seed
from ddpm_ood.training.ddpm import draw_train_noise
from ddpm_ood.training.loop import STREAM_TRAIN

pytestmark = pytest.mark.usefixtures("one_thread")

# Legacy OpenSimplex's branches skip a few far lattice vertices that we count (module docstring): values differ by
# at most ~1e-4 per noise3 call, so an octave sum (amplitudes add to 3.69) by well under 1e-3.
NOISE3_TOLERANCE = 2e-4
FIELD_TOLERANCE = 1e-3


def anoddpm_field(seed: int, shape: tuple[int, int], t: int) -> np.ndarray:
    """AnoDDPM's ``rand_3d_fixed_T_octaves(shape, t, 6, 0.8, 64)`` with ``opensimplex.OpenSimplex(seed)``."""
    simplex = OpenSimplex(seed)
    y, x = (np.arange(n) for n in shape)
    total = np.zeros((1, *shape))
    frequency, amplitude = 64.0, 1.0
    for _ in range(6):
        total += amplitude * simplex.noise3array(x / frequency, y / frequency, np.array([t]) / frequency)
        frequency /= 2
        amplitude *= 0.8
    return total[0]


def raw_field(seed: int, shape: tuple[int, ...], t: int) -> np.ndarray:
    """Our un-normalised field for one OpenSimplex seed."""
    perm, grad = (torch.from_numpy(a) for a in noise.permutation_tables(np.array([seed], dtype=np.uint64)))
    return noise.fractal_field(perm, grad, torch.tensor([t]), shape)[0].numpy()


# ---------------------------------------------------------------------------------------------------- Gaussian
def test_gaussian_noise_is_exactly_the_torch_draws_it_always_was():
    shape = (3, 1, 6, 6)
    a = noise.draw_noise("gaussian", torch.Generator().manual_seed(4), shape, torch.zeros(3))
    assert torch.equal(a, torch.randn(shape, generator=torch.Generator().manual_seed(4)))
    per_row = noise.draw_noise("gaussian", [torch.Generator().manual_seed(s) for s in (1, 2)], (2, 1, 6, 6),
                               torch.zeros(2))
    assert torch.equal(per_row[1], torch.randn((1, 6, 6), generator=torch.Generator().manual_seed(2)))
    rows = noise.row_noise_batch("gaussian", 7, ["a", "b"], [1, 501], (1, 4, 4))
    assert torch.equal(rows, noise_batch(7, ["a", "b"], [1, 501], (1, 4, 4)))
    # The training step's draws: timesteps then randn, from the step's generator.
    ts, eps = draw_train_noise(1, 2, 3, 0, (4, 1, 8, 8), 1000)
    g = derive_generator(1, STREAM_TRAIN, 2, 3, 0)
    assert torch.equal(ts, torch.randint(0, 1000, (4,), generator=g))
    assert torch.equal(eps, torch.randn((4, 1, 8, 8), generator=g))


# ------------------------------------------------------------------------------------- simplex = AnoDDPM's noise
def test_permutation_tables_are_opensimplex_seeding():
    seeds = [0, 3, 1234567, 2**62 + 11, 2**63 - 1, 2**64 - 1]
    perm, grad = noise.permutation_tables(np.array(seeds, dtype=np.uint64))
    for row, seed in enumerate(seeds):
        ref_perm, ref_grad3 = opensimplex_init(seed)
        assert np.array_equal(perm[row], ref_perm) and np.array_equal(3 * grad[row], ref_grad3)
    assert sorted(perm[0]) == list(range(256))


def test_opensimplex3_is_opensimplex_noise3():
    rng = np.random.default_rng(0)
    points = rng.uniform(-3, 40, size=(3000, 3))
    for seed in (5, 2**40 + 1):
        perm, grad = (torch.from_numpy(a) for a in noise.permutation_tables(np.array([seed], dtype=np.uint64)))
        ours = noise.opensimplex3(*(torch.from_numpy(points[:, i]).reshape(1, -1) for i in range(3)), perm, grad)
        simplex = OpenSimplex(seed)
        ref = np.array([simplex.noise3(*p) for p in points])
        err = np.abs(ours[0].numpy() - ref)
        assert err.max() < NOISE3_TOLERANCE
        assert (err < 1e-6).mean() > 0.9  # the same function, not merely close: most agree to float32 rounding
        assert ref.std() > 0.2


def test_2d_field_is_anoddpm_fixed_t_slice():
    for seed, t, shape in [(11, 0, (9, 7)), (2**50 + 3, 999, (5, 12)), (42, 517, (16, 16))]:
        np.testing.assert_allclose(raw_field(seed, shape, t), anoddpm_field(seed, shape, t), atol=FIELD_TOLERANCE)


def test_3d_field_is_3d_simplex_over_the_volume_offset_by_t():
    seed, t, shape = 9, 300, (3, 4, 5)
    simplex = OpenSimplex(seed)
    ref = np.zeros(shape)
    for (i, j, k), octave in itertools.product(np.ndindex(*shape), range(6)):
        f = 64.0 / 2**octave
        ref[i, j, k] += 0.8**octave * simplex.noise3(k / f, j / f, (i + t) / f)
    np.testing.assert_allclose(raw_field(seed, shape, t), ref, atol=FIELD_TOLERANCE)
    # A volume of depth 1 is the 2D image noise.
    volume = noise.simplex_noise([5, 6], [10, 20], (2, 1, 6, 7))
    assert torch.equal(volume[:, :, 0], noise.simplex_noise([5, 6], [10, 20], (2, 6, 7)))


def test_candidate_vertices_are_exactly_those_in_reach():
    # Squared distance to a vertex, in skewed coordinates e: |e|^2 + (sum e)^2; in reach when < 2.
    g = np.linspace(0, 1, 21)
    cell = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    in_reach = set()
    for offset in itertools.product(range(-2, 4), repeat=3):
        e = cell - np.array(offset)
        if ((e**2).sum(1) + e.sum(1) ** 2).min() < 2 - 1e-9:
            in_reach.add(offset)
    assert in_reach == set(noise._OFFSETS) and len(noise._OFFSETS) == 26


# --------------------------------------------------------------------------------------- seeding per row
def test_rows_depend_only_on_seed_key_and_t_whatever_the_batch():
    shape = (2, 8, 8)
    full = noise.row_noise_batch("simplex", 3, ["a", "b", "c"], [1, 501], shape)
    assert full.shape == (2, 3, *shape) and full.dtype == torch.float32
    swapped = noise.row_noise_batch("simplex", 3, ["c", "a"], [501], shape)
    assert torch.equal(swapped[0, 0], full[1, 2]) and torch.equal(swapped[0, 1], full[1, 0])
    again = noise.row_noise_batch("simplex", 3, ["a", "b", "c"], [1, 501], shape)
    assert torch.equal(again, full)
    # Vectorised == row by row (each row's seed from seeding.row_seed, as the Gaussian generator's).
    one_by_one = torch.stack([torch.stack([noise.simplex_noise([row_seed(3, k, t)], [t], shape)[0] for k in "abc"])
                              for t in (1, 501)])
    assert torch.equal(full, one_by_one)


def test_other_keys_t_seeds_and_channels_give_other_noise():
    shape = (2, 8, 8)
    base = noise.row_noise_batch("simplex", 3, ["a"], [1], shape)[0, 0]
    for other in (noise.row_noise_batch("simplex", 3, ["b"], [1], shape)[0, 0],
                  noise.row_noise_batch("simplex", 3, ["a"], [11], shape)[0, 0],
                  noise.row_noise_batch("simplex", 4, ["a"], [1], shape)[0, 0]):
        assert (base - other).abs().mean() > 0.1
    assert (base[0] - base[1]).abs().mean() > 0.1  # channels get their own permutation
    seeds = channel_seeds([1, 2], 3)
    assert seeds.shape == (2, 3) and len(set(seeds.ravel().tolist())) == 6


def test_training_draws_are_seeded_per_step_and_per_validation_image():
    ts, eps = draw_train_noise(1, 2, 3, 0, (4, 3, 8, 8), 1000, "simplex")
    ts_gauss, _ = draw_train_noise(1, 2, 3, 0, (4, 3, 8, 8), 1000)
    assert torch.equal(ts, ts_gauss)  # the timesteps are drawn first, as before
    assert eps.shape == (4, 3, 8, 8) and torch.equal(eps, draw_train_noise(1, 2, 3, 0, (4, 3, 8, 8), 1000,
                                                                            "simplex")[1])
    assert not torch.equal(eps, draw_train_noise(1, 2, 4, 0, (4, 3, 8, 8), 1000, "simplex")[1])
    # One generator per row (validation): row i depends on generator i only.
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    rows = noise.draw_noise("simplex", gens, (3, 1, 8, 8), torch.tensor([1, 2, 3]))
    alone = noise.draw_noise("simplex", [torch.Generator().manual_seed(6)], (1, 1, 8, 8), torch.tensor([2]))
    assert torch.equal(rows[1], alone[0])


# ------------------------------------------------------------------------------------------ shape, statistics
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 8, 12), (1, 4, 6, 8), (2, 3, 5, 4)])
def test_shapes_2d_and_3d(shape):
    out = noise.simplex_noise(np.arange(3, dtype=np.uint64), [0, 500, 999], shape)
    assert out.shape == (3, *shape) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all() and out.std() > 0.1
    with pytest.raises(ValueError, match="simplex noise needs"):
        noise.simplex_noise([1], [0], (1, 8))


def test_unit_variance_zero_mean_and_finite():
    rows = 192
    out = noise.simplex_noise(np.arange(10_000, 10_000 + rows, dtype=np.uint64), torch.arange(rows) * 5, (1, 28, 28))
    assert torch.isfinite(out).all()
    # One image's mean varies with std ~0.7 (its field is smooth), so the mean of 192 images with std ~0.05.
    assert abs(float(out.mean())) < 0.25
    assert 0.9 < float(out.std()) < 1.1
    assert float(out.abs().max()) < 6.0


def test_neighbouring_pixels_are_correlated_unlike_gaussian():
    def lag1_correlation(x: torch.Tensor) -> float:
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    simplex = noise.simplex_noise(np.arange(32, dtype=np.uint64), torch.arange(32) * 30, (1, 28, 28))
    gaussian = noise.draw_noise("gaussian", torch.Generator().manual_seed(0), (32, 1, 28, 28), torch.zeros(32))
    assert lag1_correlation(simplex) > 0.6
    assert abs(lag1_correlation(gaussian)) < 0.05


# ------------------------------------------------------------------------------------------------- registry
def test_noise_types_are_checked_at_construction():
    assert set(noise.NOISE_TYPES) == {"gaussian", "simplex", noise.UPSTREAM_SIMPLEX}
    assert ScheduleConfig().noise_type == "gaussian"
    old = ScheduleConfig().to_dict()
    del old["noise_type"]  # a checkpoint written before noise types existed
    assert ScheduleConfig.from_dict(old).noise_type == "gaussian"
    with pytest.raises(UserError, match="unknown noise type 'perlin'; accepted: gaussian, simplex"):
        ScheduleConfig(noise_type="perlin")
    with pytest.raises(UserError, match="unknown noise type"):
        noise.row_noise_batch("perlin", 1, ["a"], [1], (1, 4, 4))


def test_upstream_simplex_is_the_raw_octave_sum_and_only_for_upstream_checkpoints():
    from ddpm_ood.diffusion.noise import (
        SIMPLEX_STD,
        UPSTREAM_SIMPLEX,
        draw_noise,
        row_noise_batch,
    )
    from ddpm_ood.upstream.flags import noise_type_for_flags

    unit = row_noise_batch("simplex", 3, ["a", "b"], [10, 500], (1, 16, 16))
    raw = row_noise_batch(UPSTREAM_SIMPLEX, 3, ["a", "b"], [10, 500], (1, 16, 16))
    torch.testing.assert_close(raw, unit * SIMPLEX_STD)
    t = torch.tensor([3, 700])
    torch.testing.assert_close(draw_noise(UPSTREAM_SIMPLEX, torch.Generator().manual_seed(1), (2, 1, 8, 8), t),
                               draw_noise("simplex", torch.Generator().manual_seed(1), (2, 1, 8, 8), t) * SIMPLEX_STD)
    assert noise_type_for_flags(True, upstream_checkpoint=True) == UPSTREAM_SIMPLEX
    assert noise_type_for_flags(True, upstream_checkpoint=False) == "simplex"
    assert noise_type_for_flags(False, upstream_checkpoint=True) == "gaussian"
