"""Whether two files' numbers may be compared: every such decision of the project goes through ``require_same``.

Settings are the JSON sidecars' dictionaries (``writer.reconstruction_settings``, a feature file's settings) or the
same keys taken from what is at hand now (the checkpoint's epoch, noise type, autoencoder, a published model's
identity). A nested dictionary (a family's own settings, a published model's identity) is compared key by key, so a
refusal names the inner key that differs (``settings.levels``, ``pretrained.weights_sha256``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ddpm_ood.errors import UserError

ABSENT = "absent"
# The settings that say which model made a file: every part of one score must share them.
MODEL_KEYS = ("checkpoint", "checkpoint_epoch", "use_ema", "precision", "noise_type", "autoencoder", "pretrained")


def changed_keys(reference: Mapping[str, Any], other: Mapping[str, Any], keys: Iterable[str] | None = None,
                 prefix: str = "") -> list[str]:
    """The keys (of ``keys``, default every key of either) whose values differ, sorted; nested dictionaries by
    their inner keys, as ``outer.inner``."""
    changed = []
    for key in sorted(set(reference) | set(other)) if keys is None else keys:
        if isinstance(reference.get(key), Mapping) and isinstance(other.get(key), Mapping):
            changed += changed_keys(reference[key], other[key], None, f"{prefix}{key}.")
        elif reference.get(key) != other.get(key):
            changed.append(prefix + key)
    return changed


def _lookup(settings: Mapping[str, Any], dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return ABSENT
        value = value[part]
    return value


def describe_changes(reference: Mapping[str, Any] | None, other: Mapping[str, Any],
                     keys: Iterable[str] | None = None) -> str:
    """``"precision: bf16 -> fp32; seed: 2 -> 3"`` (reference's value first; a missing key is ``absent``), or that
    the reference is unreadable."""
    if not isinstance(reference, Mapping):
        return "no readable settings file"
    return "; ".join(f"{k}: {_lookup(reference, k)} -> {_lookup(other, k)}"
                     for k in changed_keys(reference, other, keys))


def require_same(reference: Mapping[str, Any], other: Mapping[str, Any], *, reference_name: str, other_name: str,
                 fix: str, keys: Iterable[str] | None = None) -> None:
    """UserError, one line, when ``other`` differs from ``reference`` in any of ``keys`` (default: every key):
    ``<other_name>: not comparable with <reference_name> (<key>: <reference's> -> <other's>; ...); <fix>``."""
    keys = None if keys is None else tuple(keys)
    if changed_keys(reference, other, keys):
        raise UserError(f"{other_name}: not comparable with {reference_name} "
                        f"({describe_changes(reference, other, keys)}); {fix}")
