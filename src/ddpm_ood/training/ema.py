"""Exponential moving average of a model's weights (used for validation, samples and inference when enabled)."""

from __future__ import annotations

import torch

from ddpm_ood.upstream.weights import load_unet_state


class EMA:
    """Exponential moving average of a model's weights: ``ema = decay * ema + (1 - decay) * w`` after each step.

    Starts from the model's current weights. Buffers are copied, not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        import copy

        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict, source: str) -> None:
        load_unet_state(self.module, state_dict, source)
