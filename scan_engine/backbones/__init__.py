"""Named pretrained backbones through timm, with weights from a file, a models folder or the hub.

backbone = load_backbone("efficientnet_lite0", models_dir=models_dir)
features = backbone.module(images)  # (B, 3, S, S) normalised → (B, D), S = spec.input_size
"""

from .layouts import WeightsFileError
from .loader import (
    WEIGHTS_SOURCES,
    LoadedBackbone,
    MissingWeightsError,
    build_model,
    bundled_weights_file,
    fetch_weights,
    import_weights,
    load_backbone,
    weights_status,
)
from .registry import (
    DEFAULT_BACKBONE,
    BackboneSpec,
    UnknownBackboneError,
    get_spec,
    list_backbones,
)
from .store import CorruptWeightsError, ModelsFolder, state_dict_sha256

__all__ = [
    "DEFAULT_BACKBONE",
    "WEIGHTS_SOURCES",
    "BackboneSpec",
    "CorruptWeightsError",
    "LoadedBackbone",
    "MissingWeightsError",
    "ModelsFolder",
    "UnknownBackboneError",
    "WeightsFileError",
    "build_model",
    "bundled_weights_file",
    "fetch_weights",
    "get_spec",
    "import_weights",
    "list_backbones",
    "load_backbone",
    "state_dict_sha256",
    "weights_status",
]
