"""Published diffusion models read offline (diffusers, improved-diffusion, guided-diffusion): ``open_pretrained``
gives a ``PretrainedModel`` (noise estimate on the 1000-step grid, schedule, data range, shape), which ``runs.py``
opens beside our own checkpoints (docs/pretrained-models.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ddpm_ood.errors import UserError
from ddpm_ood.pretrained.model import PretrainedModel

__all__ = ["PretrainedModel", "open_pretrained"]

OPENAI_SUFFIXES = (".pt", ".pth")


def open_pretrained(path: str | os.PathLike, flags: str | Mapping | None = None) -> PretrainedModel:
    """The published model at ``path``: a diffusers folder (UNet or pipeline), or an openai ``.pt`` state dict
    with its ``flags`` (a string or a JSON file, ``openai_format.parse_flags``). UserError naming the path for
    anything else."""
    from ddpm_ood.pretrained.diffusers_format import is_diffusers_folder, read_diffusers
    from ddpm_ood.pretrained.openai_format import read_openai

    p = Path(path)
    if not p.exists():
        raise UserError(f"--pretrained={p}: not found")
    if p.is_dir():
        if not is_diffusers_folder(p):
            raise UserError(f"--pretrained={p}: not a model folder (a diffusers folder has config.json and "
                            "scheduler_config.json, or unet/ and scheduler/); an openai model is a .pt file")
        if flags is not None:
            raise UserError(f"--pretrained_flags: {p} is a diffusers folder, which carries its own configuration; "
                            "drop the flag")
        return read_diffusers(p)
    if p.suffix in OPENAI_SUFFIXES:
        return read_openai(p, flags)
    raise UserError(f"--pretrained={p}: not a model: give a diffusers folder or an openai .pt state dict")
