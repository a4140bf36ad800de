"""The optimizer step and the check of a saved optimizer state, shared by every training task (DDPM, VQ-VAE) so
the fp16 GradScaler path and the resume-time shape check are written once.
"""

from __future__ import annotations

import torch


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward ``loss`` and step ``optimizer`` (through the fp16 GradScaler when there is one, which skips a step
    whose gradients are not finite)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def optimizer_state_fits(optimizer: torch.optim.Optimizer, state_dict: dict) -> bool:
    """True if a saved optimizer state matches the parameters (count and moment shapes), so that loading it
    cannot fail later inside ``step``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = state_dict.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        return False
    if sum(len(g["params"]) for g in groups) != len(params):
        return False
    ids = [i for g in groups for i in g["params"]]
    for param_id, param in zip(ids, params, strict=True):
        st = state_dict.get("state", {}).get(param_id, {})
        for v in st.values():
            if torch.is_tensor(v) and v.ndim > 0 and tuple(v.shape) != tuple(param.shape):
                return False
    return True
