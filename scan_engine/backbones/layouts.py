"""Checkpoint key layouts converted to timm's, so one loader serves every file a user brings.

Handled here: the wrappers (`state_dict` / `model` / DINO `teacher` nesting, `module.` from
DataParallel, MoCo `module.encoder_q.`, DINO `backbone.`), torchvision ResNet (already timm's key
names), and `efficientnet_pytorch` names (`_blocks.N._expand_conv`, the bundled EfficientNet-Lite0).
Handed on to timm's own per-architecture filter (`checkpoint_filter_fn` in the model's module):
torch.hub DINOv2 (`mask_token`, 518 px position grid resampled), open_clip / OpenAI CLIP
(`visual.transformer.resblocks.N`), Facebook ConvNeXt (`downsample_layers`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "WeightsFileError",
    "read_state_dict",
    "unwrap_checkpoint",
    "efficientnet_pytorch_to_timm",
    "to_timm_layout",
    "load_strict",
]


class WeightsFileError(ValueError):
    """A weights file that is unreadable or does not fit the backbone it was given for."""


StateDict = dict[str, torch.Tensor]

# Nesting keys seen in training checkpoints, most specific first: DINO keeps `teacher` (the
# weights its paper evaluates) next to `student`; MoCo, timm and most trainers use `state_dict`.
_NESTING_KEYS = ("teacher", "state_dict", "model", "state_dict_ema", "module")
# Wrapper prefixes: keys that carry one are kept stripped; when some keys carry it, the others
# belong to something else (MoCo's key encoder and queue, DINO's projection head) and are dropped.
_WRAPPER_PREFIXES = ("module.", "encoder_q.", "base_encoder.", "backbone.", "_orig_mod.")


def read_state_dict(path: str | Path) -> Mapping[str, object]:
    """Read a checkpoint without running pickled code: safetensors, or torch.load(weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated files, pickled code, TorchScript archives: unreadable
        raise WeightsFileError(
            f"cannot read {path} as a state dict ({type(error).__name__}: {error}); "
            "TorchScript archives (OpenAI's original CLIP .pt) need converting with open_clip first"
        ) from None
    if not isinstance(loaded, Mapping):
        raise WeightsFileError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def unwrap_checkpoint(checkpoint: Mapping[str, object]) -> StateDict:
    """A flat {name: tensor} dict from a checkpoint: nesting and wrapper prefixes removed."""
    state: Mapping[str, object] = checkpoint
    for _ in range(3):  # e.g. {"teacher": {"module.backbone.x": ...}} is two levels of wrapping
        nested = next((state[k] for k in _NESTING_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = nested  # type: ignore[assignment]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsFileError("the checkpoint holds no tensors")
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


# efficientnet_pytorch → timm, per block. Blocks without an expansion (the first, depthwise-
# separable ones) have no `_expand_conv`: their BNs are numbered from 1 in timm, not 0.
_EFFNET_BLOCK_EXPANDED = {
    "_expand_conv.": "conv_pw.",
    "_bn0.": "bn1.",
    "_depthwise_conv.": "conv_dw.",
    "_bn1.": "bn2.",
    "_se._se_reduce.": "se.conv_reduce.",
    "_se._se_expand.": "se.conv_expand.",
    "_project_conv.": "conv_pwl.",
    "_bn2.": "bn3.",
}
_EFFNET_BLOCK_SEPARABLE = {
    "_depthwise_conv.": "conv_dw.",
    "_bn1.": "bn1.",
    "_se._se_reduce.": "se.conv_reduce.",
    "_se._se_expand.": "se.conv_expand.",
    "_project_conv.": "conv_pw.",
    "_bn2.": "bn2.",
}
_EFFNET_TOP = {
    "_conv_stem.": "conv_stem.",
    "_bn0.": "bn1.",
    "_conv_head.": "conv_head.",
    "_bn1.": "bn2.",
    "_fc.": "classifier.",
}
_EFFNET_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(.+)")


def efficientnet_pytorch_to_timm(state: StateDict, model: nn.Module) -> StateDict:
    """Rename `efficientnet_pytorch` keys to a timm EfficientNet's.

    efficientnet_pytorch numbers blocks flat (`_blocks.0` … `_blocks.15`); timm nests them by
    stage (`blocks.0.0` … `blocks.6.0`), so the flat index is mapped through the model's stages.
    """
    from timm.models.efficientnet import EfficientNet

    if not isinstance(model, EfficientNet):
        raise WeightsFileError(
            f"the file holds EfficientNet weights (efficientnet_pytorch names), "
            f"not weights for a {type(model).__name__}"
        )
    stages = model.blocks
    flat_to_nested = [
        (stage_index, block_index)
        for stage_index, stage in enumerate(stages)
        for block_index in range(len(stage))
    ]
    converted: StateDict = {}
    for key, value in state.items():
        match = _EFFNET_BLOCK_KEY.fullmatch(key)
        if match:
            flat, rest = int(match.group(1)), match.group(2)
            if flat >= len(flat_to_nested):
                raise WeightsFileError(f"{key}: the model has only {len(flat_to_nested)} blocks")
            stage_index, block_index = flat_to_nested[flat]
            block = stages[stage_index][block_index]
            expanded = hasattr(block, "conv_pwl")  # an inverted residual: it has an expansion conv
            table = _EFFNET_BLOCK_EXPANDED if expanded else _EFFNET_BLOCK_SEPARABLE
            new_rest = _rename_prefix(rest, table)
            converted[f"blocks.{stage_index}.{block_index}.{new_rest}"] = value
        else:
            converted[_rename_prefix(key, _EFFNET_TOP)] = value
    return converted


def _rename_prefix(key: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key  # left as is: the strict load names it as unexpected


def _timm_filter(model: nn.Module):
    """timm's own checkpoint converter for this architecture, if its module has one."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def to_timm_layout(checkpoint: Mapping[str, object], model: nn.Module) -> StateDict:
    """Any supported layout → the state dict of `model` (a timm model built with num_classes=0).

    Classifier / projection heads are dropped: the backbone gives pre-logits features.
    """
    state = unwrap_checkpoint(checkpoint)
    if "_conv_stem.weight" in state:
        state = efficientnet_pytorch_to_timm(state, model)
    timm_filter = _timm_filter(model)
    if timm_filter is not None:
        try:
            state = timm_filter(state, model)
        except Exception as error:  # a filter meets another architecture's keys: KeyError, shapes
            raise WeightsFileError(
                f"timm's converter for {type(model).__name__} cannot read this checkpoint "
                f"({type(error).__name__}: {error}); is it for another backbone?"
            ) from None
    expected = model.state_dict()
    # Heads: timm's `head.` / `classifier.` / `fc.` (torchvision), or MoCo v2's `fc.0`/`fc.2` MLP.
    head_prefixes = ("head.", "classifier.", "fc.", "head_dist.")
    return {k: v for k, v in state.items() if k in expected or not k.startswith(head_prefixes)}


def load_strict(model: nn.Module, state: StateDict, *, what: str) -> None:
    """Load `state` into `model`, every key and shape accounted for, or say what is wrong."""
    expected = model.state_dict()
    # BN step counters do not change eval outputs; some exports (DINO ResNet-50) leave them out.
    state = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:2]}")
        raise WeightsFileError(f"{what} does not fit: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
