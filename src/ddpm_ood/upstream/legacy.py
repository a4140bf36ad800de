"""Files written by earlier ddpm-ood versions: before precision was a named setting, and feature sidecars from before
each score family had settings of its own."""

from __future__ import annotations


def precision_from_legacy(settings: dict) -> str | None:
    """The precision recorded in settings written before precision was named: ``amp: false`` was fp32;
    ``amp: true`` was fp16 on CUDA or bf16 on CPU, which the file does not say (None)."""
    if "precision" in settings:
        return str(settings["precision"])
    if settings.get("amp") is False:
        return "fp32"
    return None


# Feature sidecars written before the score registry kept each family's settings as top-level keys; the noise-level
# families drew per-image noise then.
_LEGACY_FEATURE_KEYS = ("levels", "diffpath_steps", "diffpath_clip")


def _upgrade_feature_sidecar(saved: dict) -> dict:
    """An older feature sidecar with its family's settings under ``settings``, as the registry stores them."""
    kept = {k: v for k, v in saved.items() if k not in _LEGACY_FEATURE_KEYS}
    if saved.get("levels") is not None:
        own = {"levels": saved["levels"], "noise": "per_image", "draws": 1, "seed": saved.get("seed"),
               "noise_type": saved.get("noise_type", "gaussian")}
    elif saved.get("diffpath_steps") is not None:
        own = {"steps": saved["diffpath_steps"], "clip": saved.get("diffpath_clip")}
    else:
        return saved
    return {**kept, "settings": own}


def upgrade_sidecar(saved: dict) -> dict:
    """A results or feature sidecar as this version writes it: settings that say ``amp: false`` read as
    ``precision: fp32`` (so finished fp32 files are not recomputed for nothing); ``amp: true`` (fp16 on CUDA or bf16
    on a CPU: the file does not say which) keeps its ``amp`` key and has no ``precision``, so it matches no current
    settings. An older feature sidecar gets its family's settings under ``settings`` (``_upgrade_feature_sidecar``)."""
    if "precision" not in saved and "amp" in saved:
        legacy = precision_from_legacy(saved)
        if legacy is not None:
            saved = {**{k: v for k, v in saved.items() if k != "amp"}, "precision": legacy}
    if "family" in saved and "settings" not in saved:
        saved = _upgrade_feature_sidecar(saved)
    return saved
