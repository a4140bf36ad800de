"""Files written by earlier ddpm-ood versions, before precision was a named setting."""

from __future__ import annotations


def precision_from_legacy(settings: dict) -> str | None:
    """The precision recorded in settings written before precision was named: ``amp: false`` was fp32;
    ``amp: true`` was fp16 on CUDA or bf16 on CPU, which the file does not say (None)."""
    if "precision" in settings:
        return str(settings["precision"])
    if settings.get("amp") is False:
        return "fp32"
    return None


def upgrade_sidecar(saved: dict) -> dict:
    """A results sidecar as this version writes it: settings that say ``amp: false`` read as ``precision: fp32``
    (so finished fp32 files are not recomputed for nothing); ``amp: true`` (fp16 on CUDA or bf16 on a CPU: the file
    does not say which) keeps its ``amp`` key and has no ``precision``, so it matches no current settings."""
    if "precision" not in saved and "amp" in saved:
        legacy = precision_from_legacy(saved)
        if legacy is not None:
            return {**{k: v for k, v in saved.items() if k != "amp"}, "precision": legacy}
    return saved
