"""Every seed derivation of ddpm-ood, in one place.

- Training draws every random number from generators seeded from (seed, stream, epoch, step, rank)
  (``derive_seed``/``derive_generator``): a resumed run takes bit-for-bit the same steps as an uninterrupted one.
- Reconstruction noise for one (image, t) row comes from a generator seeded from (seed, the image's noise key, t)
  (``row_seed``; drawn by ``diffusion.noise.row_noise``): batch size, order, resuming, the number of processes and where the data sit change
  no noise. ``NOISE_KEY_RULE`` names the key rule and is recorded with every results file.
- Simplex noise (``diffusion.noise``) takes the same 64-bit row seeds (``row_seed``, or one draw per row from the
  training generator) and splits each into one OpenSimplex seed per channel (``channel_seeds``, splitmix64).
- ``seed_everything`` seeds the global RNGs (model initialisation draws from torch's); ``capture_rng_state`` /
  ``restore_rng_state`` carry them through checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence

import numpy as np
import torch

from ddpm_ood.fileio import image_stem

# The seed every stage uses unless told otherwise (upstream's --seed default); written here only.
DEFAULT_SEED = 2


def derive_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed mixed from ``seed`` and integer ``keys`` (numpy SeedSequence: nearby keys give unrelated
    streams). Deterministic across machines and processes."""
    entropy = [int(seed) % 2**64, *(int(k) % 2**64 for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def derive_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` (draw on CPU, then move: same numbers on any
    device)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch's global RNGs (model initialisation draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Global RNG states in a form ``torch.load(weights_only=True)`` accepts (tensors, ints, floats, lists)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # Only the current device's state, and only if CUDA is already in use (never initialise other GPUs).
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def restore_rng_state(state: dict | None) -> None:
    """Inverse of :func:`capture_rng_state` (missing parts are skipped)."""
    if not state:
        return
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state.get("numpy")
    if n:
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    p = state.get("python")
    if p:
        random.setstate((p[0], tuple(p[1]), p[2]))


# How a file's noise key is made; recorded with every results file, so results made under another rule are redone.
NOISE_KEY_RULE = "file stem"


def noise_key(path: str | os.PathLike) -> str:
    """The noise key of an image file: its stem, the results CSV's ``filename`` (``D/x/MNIST_7.npy`` -> ``MNIST_7``).

    Not the path: the same data moved elsewhere, or listed with relative paths and read from another working
    directory, must give the same numbers. Two files with one stem get the same noise, which biases nothing.
    """
    return image_stem(path)


# Noise protocols of the passes that noise their inputs (score families, reconstruction): "per_image" draws the
# noise of (image, t) from (seed, the image's noise key, t); "shared" draws one noise per t from (seed, t) only, the
# same for every image (common random numbers: an image's feature is then a function of the image alone).
NOISE_PROTOCOLS: tuple[str, ...] = ("shared", "per_image")


def shared_noise_key(draw: int = 0) -> str:
    """The noise key of shared draw number ``draw`` (0, 1, ...): the same for every image, so the noise of (draw, t)
    depends on (seed, t) only. It starts with "/", which no file stem (``noise_key``) has."""
    return f"/ddpm-ood-shared-noise/draw{int(draw)}"


def protocol_keys(keys: Sequence[str], protocol: str, draw: int = 0) -> list[str]:
    """The noise keys to draw with under ``protocol`` (``NOISE_PROTOCOLS``): the images' own keys (per_image, only
    draw 0 exists) or the shared key of ``draw`` for every image."""
    if protocol == "per_image":
        if draw:
            raise ValueError("per-image noise has one draw per (image, t)")
        return list(keys)
    if protocol == "shared":
        return [shared_noise_key(draw)] * len(keys)
    raise ValueError(f"unknown noise protocol {protocol!r}; accepted: {', '.join(NOISE_PROTOCOLS)}")


def row_seed(seed: int, key: str, t: int) -> int:
    """A 63-bit generator seed for the noise of one (image, t) row; ``key`` names the image (``noise_key``)."""
    digest = hashlib.sha256(f"{seed}|{key}|{int(t)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)



def row_seed_draws(generators: torch.Generator | Sequence[torch.Generator], n: int) -> torch.Tensor:
    """(n,) int64 row seeds in [0, 2^63 - 1) for training-side simplex noise: n draws from one generator (a training
    step's), or one draw from each of n generators (validation images')."""
    high = 2**63 - 1
    if isinstance(generators, torch.Generator):
        return torch.randint(0, high, (n,), generator=generators)
    return torch.cat([torch.randint(0, high, (1,), generator=g) for g in generators])


# splitmix64's constants (Steele, Lea & Flood 2014): the golden-ratio increment and the two multipliers.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def channel_seeds(row_seeds: Sequence[int] | np.ndarray | torch.Tensor, channels: int) -> np.ndarray:
    """(N, channels) uint64 seeds, one per channel of each row: splitmix64 of (row seed + (c + 1) * golden ratio),
    so the channels of a row, and rows with nearby seeds, get unrelated streams. ``row_seeds``: N ints in [0, 2^64)."""
    if isinstance(row_seeds, torch.Tensor):
        row_seeds = row_seeds.cpu().numpy()
    z = np.asarray(row_seeds, dtype=np.uint64).reshape(-1, 1) + _GOLDEN * np.arange(1, channels + 1, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _MIX1  # uint64 arrays wrap modulo 2^64, as splitmix64 wants
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))
