"""How every image of a set is reconstructed (``ReconstructionPlan``): the one value the stage, the engine, the
results sidecars and the scorer pass around, so the grid, the start points, the seed and the noise protocol are
never unpacked into loose arguments on the way."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ddpm_ood.diffusion.timesteps import NUM_TRAIN_TIMESTEPS, start_timesteps
from ddpm_ood.errors import ParameterError
from ddpm_ood.seeding import DEFAULT_SEED, NOISE_PROTOCOLS, protocol_keys

ENGINES = ("batched", "reference")


@dataclass(frozen=True)
class ReconstructionPlan:
    """From each start t in ``start_ts`` (on the training schedule, in the order given), down the PLMS grid of
    ``num_inference_steps`` (at most ``recon_steps`` of its points), by the ``engine`` (``ENGINES``), with start noise
    seeded from (``seed``, the image's noise key, t) under the ``noise`` protocol "per_image" (the paper's: every
    image its own draw), or from (``seed``, t) alone under "shared" (``seeding.NOISE_PROTOCOLS``).

    ``start_ts`` None: every ``inference_skip_factor``-th point of the grid from t = 1, fixed by ``on_schedule`` once
    the model's number of training steps is known (reconstruct.py's flags give the plan before the model is open)."""

    num_inference_steps: int = 100
    inference_skip_factor: int = 1
    recon_steps: int | None = None
    engine: str = "batched"
    seed: int = DEFAULT_SEED
    noise: str = "per_image"
    start_ts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.start_ts is not None:
            object.__setattr__(self, "start_ts", tuple(int(t) for t in self.start_ts))
        if self.engine not in ENGINES:
            raise ParameterError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}", "engine")
        if self.engine == "reference" and self.recon_steps is not None:
            raise ParameterError("recon_steps needs the batched engine (the reference loop walks the full grid)",
                                 "recon_steps")
        if self.noise not in NOISE_PROTOCOLS:
            raise ParameterError(f"unknown noise protocol {self.noise!r} for reconstruction; accepted: "
                                 f"{', '.join(NOISE_PROTOCOLS)}", "recon_noise")

    @classmethod
    def at(cls, start_ts: Sequence[int], num_inference_steps: int, seed: int, **options) -> ReconstructionPlan:
        """A plan with explicit start points (tests, benchmarks, a sidecar's recorded ones)."""
        return cls(num_inference_steps=num_inference_steps, seed=seed, start_ts=tuple(start_ts), **options)

    def on_schedule(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> ReconstructionPlan:
        """This plan with its start points fixed for a model trained on ``num_train_timesteps`` steps."""
        if self.start_ts is not None:
            return self
        ts = start_timesteps(self.num_inference_steps, self.inference_skip_factor, num_train_timesteps)
        return dataclasses.replace(self, start_ts=tuple(ts))

    @property
    def starts(self) -> tuple[int, ...]:
        """The start points; ValueError while they are not fixed yet (``on_schedule``)."""
        if self.start_ts is None:
            raise ValueError("the plan's start points are fixed by on_schedule(num_train_timesteps) first")
        return self.start_ts

    def noise_keys(self, keys: Sequence[str]) -> list[str]:
        """The keys the start noise of images keyed ``keys`` is drawn with under this plan's protocol (idempotent)."""
        return protocol_keys(keys, self.noise)
