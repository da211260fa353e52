"""The models folder: converted weights stored once by sha256, a JSON manifest naming them.

    MODELS_DIR/manifest.json             {"format": 1, "backbones": {name: entry}}
    MODELS_DIR/weights/<sha256>.safetensors

Weights are stored in timm's layout as safetensors (no pickle on load). Their id is
`state_dict_sha256`: a hash of the tensors themselves, so the same weights have the same id
whichever file layout they arrived in, and a feature cache keyed by it survives re-imports.
Every write goes to a temporary file that is renamed into place; the manifest's
read-modify-write holds a lock, so two imports at once lose nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

__all__ = [
    "MANIFEST_NAME",
    "ManifestEntry",
    "ModelsFolder",
    "CorruptWeightsError",
    "state_dict_sha256",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = 1
_WEIGHTS_SUBDIR = "weights"


class CorruptWeightsError(ValueError):
    """A stored weights file whose tensors no longer hash to the manifest's sha256."""


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of the tensors."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass(frozen=True)
class ManifestEntry:
    name: str  # backbone name
    sha256: str  # state_dict_sha256 of the stored weights
    file: str  # relative to the models folder
    timm_model: str
    imported_from: str  # the original file's name (or hub id), for the operator
    imported_at: str  # ISO 8601, UTC

    def to_json(self) -> dict[str, str]:
        return {
            "sha256": self.sha256,
            "file": self.file,
            "timm_model": self.timm_model,
            "imported_from": self.imported_from,
            "imported_at": self.imported_at,
        }


def _atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file beside `path`, fsync, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


class ModelsFolder:
    """A folder the service owns, holding imported backbone weights."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def entries(self) -> dict[str, ManifestEntry]:
        """Backbone name → entry; an absent folder or manifest is an empty store."""
        if not self.manifest_path.is_file():
            return {}
        try:
            data = json.loads(self.manifest_path.read_text())
            backbones = data["backbones"]
        except (ValueError, KeyError, TypeError) as error:
            raise CorruptWeightsError(f"{self.manifest_path} is not a manifest: {error}") from None
        return {name: ManifestEntry(name=name, **fields) for name, fields in backbones.items()}

    def entry(self, name: str) -> ManifestEntry | None:
        return self.entries().get(name)

    def weights_path(self, entry: ManifestEntry) -> Path:
        return self.root / entry.file

    def has_weights(self, name: str) -> bool:
        entry = self.entry(name)
        return entry is not None and self.weights_path(entry).is_file()

    def read(self, entry: ManifestEntry) -> dict[str, torch.Tensor]:
        """The stored state dict, checked against the manifest's sha256."""
        from safetensors.torch import load_file

        path = self.weights_path(entry)
        state = load_file(str(path), device="cpu")
        actual = state_dict_sha256(state)
        if actual != entry.sha256:
            raise CorruptWeightsError(
                f"{path} hashes to {actual[:12]}…, the manifest says {entry.sha256[:12]}… for "
                f"{entry.name!r}; import the weights again"
            )
        return state

    def store(
        self, name: str, timm_model: str, state: Mapping[str, torch.Tensor], imported_from: str
    ) -> ManifestEntry:
        """Write `state` once under its sha256 (kept if present) and name it in the manifest."""
        from safetensors.torch import save

        sha256 = state_dict_sha256(state)
        relative = f"{_WEIGHTS_SUBDIR}/{sha256}.safetensors"
        path = self.root / relative
        if not path.is_file():
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            _atomic_write(path, lambda file: file.write(save(tensors)))
            logger.info("stored %s weights as %s", name, path)
        entry = ManifestEntry(
            name=name,
            sha256=sha256,
            file=relative,
            timm_model=timm_model,
            imported_from=imported_from,
            imported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        with self._manifest_lock():
            entries = self.entries()
            entries[name] = entry
            document = {
                "format": _MANIFEST_FORMAT,
                "backbones": {n: e.to_json() for n, e in sorted(entries.items())},
            }
            text = json.dumps(document, indent=2) + "\n"
            _atomic_write(self.manifest_path, lambda file: file.write(text.encode()))
        return entry

    @contextlib.contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
