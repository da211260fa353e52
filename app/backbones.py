"""The pretrained backbones as the service offers them: which ones a job may name, which one it
gets by default, where their weights and each dataset's cached features live.

Weights are looked up where a worker's `load_backbone` would find them without downloading
(MODELS_DIR, a package that bundles them, the hub cache); the API and the workers share
MODELS_DIR and DATA_DIR. The engine (and torch) is imported on first use only: the API process
does not need it before someone asks for backbones or starts a pretrained-route job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.core.config import Settings

__all__ = [
    "BackboneChoiceError",
    "BackboneOffer",
    "FEATURES_DIR",
    "backbone_offers",
    "check_backbone",
    "feature_cache_dir",
    "preset_is_pretrained",
]

FEATURES_DIR = "features"  # DATA_DIR/features/<dataset_id>: one folder per dataset


class BackboneChoiceError(ValueError):
    """A backbone a job cannot run with: unknown, or no weights on this server."""


@dataclass(frozen=True)
class BackboneOffer:
    """One backbone as GET /backbones shows it."""

    name: str
    feature_dim: int
    input_size: int
    weights_present: bool
    weights_source: str | None  # "models_dir", "bundled" or "hub"; None when absent
    default: bool
    licence: str
    notes: str
    unavailable_reason: str | None  # why a job cannot use it now (weights missing)


def _missing_weights_text(name: str, expected_file: str) -> str:
    # No server path in the text: tenants read it; the operator knows the service's MODELS_DIR.
    example = expected_file or "WEIGHTS_FILE"
    return (
        f"backbone {name!r} has no weights on this server (not in the models folder, not "
        f"bundled, not in the hub cache). An operator imports a file with `scan-weights import "
        f"{name} /path/to/{example}`, or on a machine that is online runs `scan-weights fetch "
        f"{name}` (with MODELS_DIR set as for the service)."
    )


def backbone_offers(settings: Settings) -> list[BackboneOffer]:
    """Every registered backbone with its weights' availability; the default one first."""
    from scan_engine.backbones import list_backbones, weights_status

    models_dir = _models_dir(settings)
    offers = []
    for spec in list_backbones():
        source = weights_status(spec, models_dir)
        offers.append(
            BackboneOffer(
                name=spec.name,
                feature_dim=spec.feature_dim,
                input_size=spec.input_size,
                weights_present=source is not None,
                weights_source=source,
                default=spec.name == settings.DEFAULT_BACKBONE,
                licence=spec.licence,
                notes=spec.notes,
                unavailable_reason=(
                    None
                    if source is not None
                    else _missing_weights_text(spec.name, spec.expected_file)
                ),
            )
        )
    return sorted(offers, key=lambda offer: not offer.default)


def check_backbone(name: str, settings: Settings) -> None:
    """Raise BackboneChoiceError unless a job can run backbone `name` here (known, weights)."""
    from scan_engine.backbones import UnknownBackboneError, get_spec, weights_status

    try:
        spec = get_spec(name)
    except UnknownBackboneError as error:
        hint = " (the DEFAULT_BACKBONE setting)" if name == settings.DEFAULT_BACKBONE else ""
        raise BackboneChoiceError(f"{error}{hint}") from None
    models_dir = _models_dir(settings)
    if weights_status(spec, models_dir) is None:
        raise BackboneChoiceError(_missing_weights_text(spec.name, spec.expected_file))


def preset_is_pretrained(preset: str) -> bool:
    """True when `preset` runs the pretrained route (it names a backbone), False for SimCLR."""
    from scan_engine.config import PRESETS

    return PRESETS.get(preset, {}).get("pretrained_backbone") is not None


def feature_cache_dir(settings: Settings, dataset_id: str) -> Path:
    """Where the features of dataset `dataset_id` are cached, for every job and backbone on it
    (the engine keys entries by backbone, weights and size inside)."""
    return settings.DATA_DIR / FEATURES_DIR / dataset_id


def _models_dir(settings: Settings) -> Path:
    return settings.MODELS_DIR or settings.DATA_DIR / "models"
