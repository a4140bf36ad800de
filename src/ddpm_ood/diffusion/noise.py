"""The noise of the forward process, Gaussian (default) or AnoDDPM's simplex noise: the one place that draws it.

``NOISE_TYPES`` names the types; a run's type is ``ScheduleConfig.noise_type`` (``--simplex_noise=1`` selects
``"simplex"``), stored in every checkpoint. Two entry points, both dispatching on the type:

- ``draw_noise(noise_type, generators, shape, timesteps)``: training-side noise (the training step, the validation
  loss, the sample grid), drawn from the seeded generators of ``training`` (``seeding.derive_generator``).
- ``row_noise_batch(noise_type, seed, keys, start_ts, sample_shape)``: the (S, B, ...) start noise of a
  reconstruction batch, row (s, b) seeded from (seed, keys[b], start_ts[s]) (``seeding.row_seed``).

Gaussian: exactly the torch draws the training loop and ``noise_batch`` have always made (the same numbers
as before noise types existed), N(0, 1) per element, drawn on the CPU.

Simplex (AnoDDPM, Wyatt et al. 2022, as copied into upstream ddpm-ood's ``src/utils/simplex_noise.py``): for one
row (one image or volume at timestep t) and one channel, with that channel's permutation table (OpenSimplex's
seed -> permutation, ``opensimplex._init``),

    n(p) = (1 / SIMPLEX_STD) * sum_{k=0}^{5} 0.8^k * noise3(p_x / f_k, p_y / f_k, (p_z + t) / f_k),  f_k = 64 / 2^k

where ``noise3`` is KdotJPG's 2014 OpenSimplex noise (in [-1, 1]), p_x the index along the last spatial dim,
p_y along the one before it, and p_z along the one before that in 3D (0 in 2D). In 2D this is AnoDDPM's
``rand_3d_fixed_T_octaves(shape, t, octaves=6, persistence=0.8, frequency=64)`` (a 2D slice at z = t of 6-octave
3D noise, one permutation for all octaves) divided by a constant (and for a detail of ``noise3``, see the last
paragraph). 3D volumes use 3D simplex noise over the
volume, offset by t voxels along its first spatial axis (a 4D field would add nothing: each (row, channel) has its
own permutation anyway; this keeps one noise function, and a volume of depth 1 equals the 2D image noise).

Normalisation: AnoDDPM uses the raw sum, whose standard deviation is about 0.51, not 1. The forward process
x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps defines its signal-to-noise ratio a_t / (1 - a_t) for unit-variance
noise; with the raw sum every start t would leave 1 / 0.51^2 = 3.9 times the signal-to-noise ratio of its Gaussian
counterpart, and the schedule would not mean what it says. So the sum is divided by one constant, ``SIMPLEX_STD``
(the standard deviation of the raw sum, see its comment): a fixed scale keeps AnoDDPM's field as it is (no per-image
standardisation, which would remove the low-frequency octaves that make it simplex noise). The mean is 0 over seeds
(the gradients are symmetric); one small image is one smooth field, so its own mean is not (it varies with a
standard deviation of about 0.7 across 28x28 images). Checkpoints trained by upstream ddpm-ood learned the raw sum;
for them, and only them, ``--simplex_noise=1`` selects it (``UPSTREAM_SIMPLEX``, ``noise_type_for_flags``).

Seeding: a row's 64-bit seed is what seeds its Gaussian noise: ``seeding.row_seed(seed, key, t)`` in
reconstruction, and in training one ``torch.randint`` per row from the step's (or the validation image's) generator,
right after its timesteps. Channel c gets ``splitmix64(row seed + (c + 1) * golden ratio)``
(``seeding.channel_seeds``; upstream draws a fresh permutation per channel too), which seeds OpenSimplex's
permutation. Hence the same (seed, key, t) gives the same noise in any batch, order or process; on any device too,
by construction (the field uses only IEEE-rounded +, -, *, / and floor, one torch op at a time; not yet checked on
a GPU).

Why not a package: ``opensimplex`` (PyPI, where AnoDDPM's code comes from) evaluates one permutation at a time,
point by point in Python or numba on the CPU (about 0.1 s per 28x28 image and channel in pure Python), with no torch
or GPU path; the GPU noise packages on PyPI target other frameworks (JAX, CuPy) or other noise functions, with one
seed per call. So the function is written here in torch, vectorised over all rows, channels and pixels,
on the model's device: every lattice vertex that can reach a point (26 per OpenSimplex cell, see ``_OFFSETS``) is
evaluated for every point, and the vertices out of reach add exactly 0, which replaces OpenSimplex's per-point
branching. That branching keeps only two vertices beyond the point's simplex, and at about 4 % of points a third one
is still in reach with a kernel weight below 1e-3 (the small discontinuities legacy OpenSimplex is known for); it is
counted here, so values differ from ``opensimplex``'s by at most 1e-4 (values in [-1, 1], std 0.31) and the field is
continuous. ``opensimplex`` stays the test oracle (tests/diffusion/test_noise.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ddpm_ood.config import NOISE_TYPE_NAMES, check_noise_type
from ddpm_ood.seeding import channel_seeds, row_seed, row_seed_draws

# AnoDDPM's reference parameters (upstream ddpm-ood uses them, and has no flags for them).
SIMPLEX_OCTAVES = 6
SIMPLEX_PERSISTENCE = 0.8
SIMPLEX_FREQUENCY = 64.0  # period of the first octave, in pixels; halved at every octave
# Standard deviation of the raw 6-octave sum over seeds, t and pixels, measured with ``fractal_field`` (row seeds
# 0..n-1 through ``channel_seeds``, t = row index mod 1000): 0.5088 (2,048 rows of 28x28), 0.5107 (1,024 of 32x32),
# 0.5064 (512 of 64x64), 0.5095 (128 of 128x128). The stationary value for independent octaves,
# sqrt(E[sum_v (2 - |d_v|^2)_+^8 d_v' E[g g'] d_v] / 103^2 * sum_k 0.64^k), is 0.5048. Dividing by it gives unit
# variance, as the forward process assumes (tests/diffusion/test_noise.py checks it).
SIMPLEX_STD = 0.509
UPSTREAM_SIMPLEX = NOISE_TYPE_NAMES[2]

# OpenSimplex 3D (KdotJPG, 2014; opensimplex.constants): skew constants, normaliser and the 24 gradients.
_STRETCH3 = -1.0 / 6
_SQUISH3 = 1.0 / 3
_NORM3 = 103.0
_GRADIENTS3 = (
    (-11, 4, 4), (-4, 11, 4), (-4, 4, 11), (11, 4, 4), (4, 11, 4), (4, 4, 11),
    (-11, -4, 4), (-4, -11, 4), (-4, -4, 11), (11, -4, 4), (4, -11, 4), (4, -4, 11),
    (-11, 4, -4), (-4, 11, -4), (-4, 4, -11), (11, 4, -4), (4, 11, -4), (4, 4, -11),
    (-11, -4, -4), (-4, -11, -4), (-4, -4, -11), (11, -4, -4), (4, -11, -4), (4, -4, -11),
)
# Lattice offsets, relative to a point's skewed cell origin, of the vertices whose kernel (2 - |d|^2)^4 can be
# non-zero at that point. In skewed coordinates the squared distance from a vertex is |e|^2 + (sum e)^2 (e = point
# minus vertex), so a vertex is in reach (< 2) only if at most one of its offsets leaves {0, 1} and 0 <= sum <= 3:
# the 8 cell corners and 18 neighbours. OpenSimplex picks from exactly these per point with its branches.
_OFFSETS = tuple(
    o for o in itertools.product((-1, 0, 1, 2), repeat=3)
    if sum(c not in (0, 1) for c in o) <= 1 and 0 <= sum(o) <= 3
)
# Sample points per chunk of the simplex evaluation (bounds its memory: a few dozen tensors of this many elements).
_CHUNK_POINTS = 1 << 20

# OpenSimplex's seed -> permutation generator (a 64-bit LCG, opensimplex._init).
_LCG_MUL, _LCG_ADD = np.uint64(6364136223846793005), np.uint64(1442695040888963407)


# ------------------------------------------------------------------------------------------------ simplex noise
def permutation_tables(seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenSimplex's permutation and gradient tables for each seed, vectorised over seeds.

    seeds: (M,) uint64. Returns (perm, gradient index), both (M, 256) int64, perm a permutation of 0..255 and
    gradient index = perm % 24 (a row of ``_GRADIENTS3``): row m equals ``opensimplex.internals._init(seeds[m])``
    (its ``perm_grad_index3`` is 3 * ours). The loop runs over the 256 table slots, never over seeds.
    """
    state = np.asarray(seeds, dtype=np.uint64).reshape(-1).copy()
    m = state.shape[0]
    for _ in range(3):
        state = state * _LCG_MUL + _LCG_ADD
    source = np.tile(np.arange(256, dtype=np.int64), (m, 1))
    perm = np.empty((m, 256), dtype=np.int64)
    rows = np.arange(m)
    for i in range(255, -1, -1):
        state = state * _LCG_MUL + _LCG_ADD
        # Python's (seed + 31) % (i + 1) on the signed 64-bit state, without overflowing int64.
        r = (state.view(np.int64) % (i + 1) + 31) % (i + 1)
        perm[:, i] = source[rows, r]
        source[rows, r] = source[:, i]
    return perm, perm % len(_GRADIENTS3)


def opensimplex3(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, perm: torch.Tensor,
                 gradient_index: torch.Tensor) -> torch.Tensor:
    """OpenSimplex 3D noise in [-1, 1] at points (x, y, z), one permutation table per row.

    x, y, z: float64, broadcastable to (R, P) (R rows of P points); perm, gradient_index: (R, 256) int64
    (``permutation_tables``), on the points' device. Returns (R, P) float64: ``opensimplex``'s ``noise3(x, y, z)``
    with that row's seed, within 1e-4 (its branches drop a few far vertices, module docstring).

    Cells and offsets are computed in float64 (coordinates reach ~500 at the finest octave for t = 999); the kernel
    sums, on offsets in [-1, 2], in float32 (error < 1e-6, a third faster). Only IEEE +, -, * and floor, one torch
    op at a time: the same numbers on a CPU and a GPU.
    """
    stretch = (x + y + z) * _STRETCH3
    cell = [torch.floor(c + stretch) for c in (x, y, z)]  # skewed cell origin
    squish = (cell[0] + cell[1] + cell[2]) * _SQUISH3
    # Point minus the cell origin, unskewed: in [-1, 2] whatever the coordinates, so float32 is precise enough.
    dx0, dy0, dz0 = ((c - (b + squish)).float() for c, b in zip((x, y, z), cell, strict=True))
    bx, by, bz = (b.long().expand(dx0.shape) for b in cell)
    table = torch.tensor(_GRADIENTS3, dtype=torch.float32, device=perm.device)
    gx, gy, gz = (table[:, i][gradient_index] for i in range(3))  # (R, 256): each slot's gradient components
    # OpenSimplex's hash of vertex (X, Y, Z) is perm[(perm[(perm[X & 255] + Y) & 255] + Z) & 255]; its first two
    # levels are shared by several offsets, so they are computed once each.
    level1: dict[int, torch.Tensor] = {}
    level2: dict[tuple[int, int], torch.Tensor] = {}
    value = torch.zeros_like(dx0)
    for a, b, c in _OFFSETS:
        shift = (a + b + c) * _SQUISH3
        dx, dy, dz = dx0 - (a + shift), dy0 - (b + shift), dz0 - (c + shift)
        attn = (2.0 - dx * dx - dy * dy - dz * dz).clamp_(min=0.0)  # 0 = out of reach
        if a not in level1:
            level1[a] = torch.gather(perm, 1, (bx + a) & 255)
        if (a, b) not in level2:
            level2[a, b] = torch.gather(perm, 1, (level1[a] + by + b) & 255)
        slot = (level2[a, b] + bz + c) & 255
        attn = attn * attn
        value += attn * attn * (torch.gather(gx, 1, slot) * dx + torch.gather(gy, 1, slot) * dy
                                + torch.gather(gz, 1, slot) * dz)
    return value.double() / _NORM3


def fractal_field(perm: torch.Tensor, gradient_index: torch.Tensor, ts: torch.Tensor,
                  spatial: Sequence[int]) -> torch.Tensor:
    """AnoDDPM's raw octave sum (not normalised) for R rows: (R, *spatial) float64 on the tables' device.

    perm, gradient_index: (R, 256) int64 (``permutation_tables``); ts: (R,) timesteps (the z offset);
    spatial: (H, W) or (D, H, W). The module docstring has the formula and the axis convention.
    """
    device = perm.device
    axes = [torch.arange(n, dtype=torch.float64, device=device) for n in spatial]
    grids = torch.meshgrid(*axes, indexing="ij")
    px, py = grids[-1].reshape(1, -1), grids[-2].reshape(1, -1)
    pz = grids[-3].reshape(1, -1) if len(spatial) == 3 else torch.zeros_like(px)
    pz = pz + ts.to(device=device, dtype=torch.float64).reshape(-1, 1)  # (R, P)
    total = torch.zeros(pz.shape, dtype=torch.float64, device=device)
    frequency, amplitude = SIMPLEX_FREQUENCY, 1.0
    for _ in range(SIMPLEX_OCTAVES):
        total += amplitude * opensimplex3(px / frequency, py / frequency, pz / frequency, perm, gradient_index)
        frequency /= 2
        amplitude *= SIMPLEX_PERSISTENCE
    return total.reshape(-1, *spatial)


def simplex_noise(row_seeds: Sequence[int] | np.ndarray | torch.Tensor, ts: Sequence[int] | torch.Tensor,
                  sample_shape: Sequence[int], device: torch.device | str | None = None, *,
                  unit_variance: bool = True) -> torch.Tensor:
    """Unit-variance simplex noise (N, C, *spatial) float32 on ``device`` (default CPU) for N rows (AnoDDPM's raw
    octave sum, standard deviation about ``SIMPLEX_STD``, with ``unit_variance=False``).

    row_seeds: N integers in [0, 2^64) (one per row: ``seeding.row_seed``, or drawn from a training generator);
    ts: N timesteps in [0, T); sample_shape: (C, H, W) or (C, D, H, W). Row n depends only on (row_seeds[n], ts[n]),
    so any batch of rows equals the same rows drawn one by one. Chunked over rows to bound memory.
    """
    channels, *spatial = (int(s) for s in sample_shape)
    if len(spatial) not in (2, 3):
        raise ValueError(f"simplex noise needs (C, H, W) or (C, D, H, W) samples, got {tuple(sample_shape)}")
    device = torch.device(device or "cpu")
    seeds = channel_seeds(row_seeds, channels).reshape(-1)  # row-major: (row, channel)
    row_ts = torch.as_tensor(ts, dtype=torch.float64).reshape(-1).repeat_interleave(channels)
    if row_ts.numel() != seeds.size:
        raise ValueError(f"{seeds.size // channels} row seeds but {row_ts.numel() // channels} timesteps")
    points = int(np.prod(spatial))
    per_chunk = max(1, _CHUNK_POINTS // points)
    fields = []
    for start in range(0, seeds.size, per_chunk):
        perm, gradient_index = (torch.from_numpy(t).to(device)
                                for t in permutation_tables(seeds[start : start + per_chunk]))
        field = fractal_field(perm, gradient_index, row_ts[start : start + per_chunk], spatial)
        fields.append((field / SIMPLEX_STD if unit_variance else field).to(torch.float32))
    out = torch.cat(fields) if fields else torch.zeros((0, *spatial), device=device)
    return out.reshape(-1, channels, *spatial)


# --------------------------------------------------------------------------------------------------- registry
Generators = torch.Generator | Sequence[torch.Generator]


def _gaussian_draw(generators: Generators, shape: tuple[int, ...], timesteps: torch.Tensor,
                   device: torch.device | None) -> torch.Tensor:
    if isinstance(generators, torch.Generator):
        return torch.randn(shape, generator=generators)
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])


def _simplex_draw(generators: Generators, shape: tuple[int, ...], timesteps: torch.Tensor,
                  device: torch.device | None, unit_variance: bool = True) -> torch.Tensor:
    return simplex_noise(row_seed_draws(generators, shape[0]), timesteps, shape[1:], device,
                         unit_variance=unit_variance)


def row_noise(seed: int, key: str, t: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise (shape) for one (image, t), drawn on the CPU so every device gets the same numbers."""
    generator = torch.Generator().manual_seed(row_seed(seed, key, t))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def noise_batch(seed: int, keys: Sequence[str], start_ts: Sequence[int], image_shape: Sequence[int]) -> torch.Tensor:
    """(S, B, *image_shape) noise, row (s, b) seeded from (seed, keys[b], start_ts[s])."""
    return torch.stack(
        [torch.stack([row_noise(seed, k, t, image_shape) for k in keys]) for t in start_ts]
    )


def _gaussian_rows(seed: int, keys: Sequence[str], start_ts: Sequence[int], sample_shape: tuple[int, ...],
                   device: torch.device | None) -> torch.Tensor:
    return noise_batch(seed, keys, start_ts, sample_shape)


def _simplex_rows(seed: int, keys: Sequence[str], start_ts: Sequence[int], sample_shape: tuple[int, ...],
                  device: torch.device | None, unit_variance: bool = True) -> torch.Tensor:
    # One sha256 per row (keys are strings); everything after it is vectorised.
    seeds = [row_seed(seed, key, t) for t in start_ts for key in keys]
    ts = [int(t) for t in start_ts for _ in keys]
    noise = simplex_noise(seeds, ts, sample_shape, device, unit_variance=unit_variance)
    return noise.reshape(len(start_ts), len(keys), *sample_shape)


@dataclass(frozen=True)
class NoiseType:
    """One noise type: how it draws training noise (``draw``) and reconstruction start noise (``rows``)."""

    description: str
    draw: Callable[[Generators, tuple[int, ...], torch.Tensor, torch.device | None], torch.Tensor]
    rows: Callable[[int, Sequence[str], Sequence[int], tuple[int, ...], torch.device | None], torch.Tensor]


NOISE_TYPES: dict[str, NoiseType] = {
    "gaussian": NoiseType("N(0, 1) per element (default)", _gaussian_draw, _gaussian_rows),
    "simplex": NoiseType("AnoDDPM's 6-octave simplex noise, unit variance (--simplex_noise=1)", _simplex_draw,
                         _simplex_rows),
    # What upstream ddpm-ood trains with under --simplex_noise=1: only for its checkpoints (which record nothing),
    # so that they are reconstructed (and resumed) with the noise they learned.
    UPSTREAM_SIMPLEX: NoiseType("AnoDDPM's raw 6-octave simplex sum (standard deviation about 0.51), as upstream "
                                "trains with --simplex_noise=1", partial(_simplex_draw, unit_variance=False),
                                partial(_simplex_rows, unit_variance=False)),
}
# config.NOISE_TYPE_NAMES lists these names for the configuration, which validates before any noise is drawn.
assert tuple(NOISE_TYPES) == NOISE_TYPE_NAMES, "config.NOISE_TYPE_NAMES and diffusion.noise.NOISE_TYPES disagree"


def describe_noise(noise_type: str) -> str:
    """One line on a noise type, for messages."""
    return f"{noise_type}: {NOISE_TYPES[check_noise_type(noise_type)].description}"


def draw_noise(noise_type: str, generators: Generators, shape: Sequence[int], timesteps: torch.Tensor,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Training-side noise of ``shape`` (B, C, *spatial), float32, unit variance.

    generators: one generator for the whole batch (a training step, the sample grid) or one per row (validation
    images), each already advanced past its timesteps; timesteps: (B,) the rows' t (simplex noise depends on it).
    Gaussian: ``torch.randn`` from the generator(s), on the CPU (the caller copies it); simplex: computed on
    ``device`` (default CPU). Callers move the result with ``.to(device)``, a no-op when it is already there.
    """
    return NOISE_TYPES[check_noise_type(noise_type)].draw(generators, tuple(int(s) for s in shape), timesteps,
                                                          None if device is None else torch.device(device))


def row_noise_batch(noise_type: str, seed: int, keys: Sequence[str], start_ts: Sequence[int],
                    sample_shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Reconstruction start noise (S, B, *sample_shape) float32, row (s, b) seeded from (seed, keys[b], start_ts[s])
    (``seeding.row_seed``). Gaussian: ``noise_batch`` on the CPU; simplex: computed on ``device``."""
    return NOISE_TYPES[check_noise_type(noise_type)].rows(seed, keys, start_ts, tuple(int(s) for s in sample_shape),
                                                          None if device is None else torch.device(device))
