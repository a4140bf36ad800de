"""Start points: the README table (paper-era PLMS grid with steps_offset=1)."""

import math

import pytest

from ddpm_ood.config import ScheduleConfig
from ddpm_ood.diffusion.schedule import make_pndm_scheduler
from ddpm_ood.diffusion.timesteps import denoising_timesteps, inference_timesteps, start_timesteps
from ddpm_ood.errors import UserError

# The README's skip-factor table: k -> number of start points for 100 inference steps.
README_TABLE = {1: 100, 2: 50, 3: 34, 4: 25, 5: 20, 8: 13, 16: 7, 32: 4, 64: 2}


@pytest.mark.parametrize("k,count", sorted(README_TABLE.items()))
def test_readme_table(k, count):
    ts = start_timesteps(100, k)
    assert len(ts) == count == math.ceil(100 / k)
    assert ts[0] == 1 and ts == sorted(ts)
    assert all(b - a == 10 * k for a, b in zip(ts, ts[1:], strict=False))


def test_grid_matches_monai_pndm_with_offset():
    scheduler = make_pndm_scheduler(ScheduleConfig(), 100)
    assert inference_timesteps(100) == [int(t) for t in scheduler.timesteps]
    assert inference_timesteps(100)[0] == 991 and inference_timesteps(100)[-1] == 1


def test_num_inference_steps_is_honoured():
    assert start_timesteps(50, 1) == list(range(1, 1000, 20))
    assert start_timesteps(10, 2) == [1, 201, 401, 601, 801]


def test_denoising_path():
    assert denoising_timesteps(31, 100) == [31, 21, 11, 1]
    with pytest.raises(UserError):
        denoising_timesteps(30, 100)


@pytest.mark.parametrize("bad", [(0, 1), (1001, 1), (100, 0)])
def test_bad_values(bad):
    with pytest.raises(UserError):
        start_timesteps(*bad)
