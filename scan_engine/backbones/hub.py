"""Weights from the download caches: the Hugging Face hub cache and torch.hub's checkpoints folder.

A cached file is used without the network. Downloading happens only when asked for and when
the machine is not marked offline: `HF_HUB_OFFLINE` is Hugging Face's own switch, read at call
time (huggingface_hub reads it once at import, which is too early for a process that sets it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .registry import BackboneSpec

__all__ = ["hub_offline", "cached_hub_file", "download_hub_file", "hub_source_text"]

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True where downloads are switched off (HF_HUB_OFFLINE set, in the environment or hub)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _torch_hub_path(url: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def cached_hub_file(spec: BackboneSpec) -> tuple[Path, str] | None:
    """(path, source id) of already-downloaded weights for `spec`, without touching the network."""
    if spec.hub_repo:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            found = try_to_load_from_cache(spec.hub_repo, spec.hub_filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found), f"hf://{spec.hub_repo}/{spec.hub_filename}"
    if spec.download_url:
        path = _torch_hub_path(spec.download_url)
        if path.is_file():
            return path, spec.download_url
    return None


def download_hub_file(spec: BackboneSpec) -> tuple[Path, str]:
    """Download `spec`'s weights into the hub cache; the Hugging Face hub first, else the URL."""
    if hub_offline():
        raise RuntimeError("downloads are switched off (HF_HUB_OFFLINE)")
    if spec.hub_repo:
        from huggingface_hub import hf_hub_download

        logger.info("downloading %s from hf://%s", spec.name, spec.hub_repo)
        path = hf_hub_download(spec.hub_repo, spec.hub_filename)
        return Path(path), f"hf://{spec.hub_repo}/{spec.hub_filename}"
    if spec.download_url:
        import torch

        path = _torch_hub_path(spec.download_url)
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s from %s", spec.name, spec.download_url)
        # Downloads to a temporary name and renames: an interrupted fetch leaves no partial file.
        torch.hub.download_url_to_file(spec.download_url, str(path), progress=False)
        return path, spec.download_url
    raise RuntimeError(f"{spec.name} has no download source")


def hub_source_text(spec: BackboneSpec) -> str:
    """Where a download would come from, for messages."""
    sources = []
    if spec.hub_repo:
        sources.append(f"hf://{spec.hub_repo}/{spec.hub_filename}")
    if spec.download_url:
        sources.append(spec.download_url)
    return " or ".join(sources) or "no download source"
