"""Batched image augmentations on tensors for SimCLR, the SCAN step and self-labeling.

Every view takes a uint8 batch (B, 3, H, W) on any device and returns float32 (B, 3, S, S)
normalised with a per-channel mean/std (CIFAR-10 by default). Per-sample random parameters are
drawn as tensors (from an optional ``torch.Generator``, so a seed fixes the output) and applied
with whole-batch tensor ops: no per-image Python loop, no PIL.

Views (paper: Van Gansbeke et al., ECCV 2020, section 4.1 and its CIFAR setup):
- ``normalize`` (ops.py): the weak / evaluation view (images are centre-cropped at load time).
- ``SimCLRAugment`` (simclr_augment.py): random resized crop + flip, colour jitter (p 0.8),
  grayscale (p 0.2).
- ``StrongAugment`` (strong_augment.py): flip, pad-and-crop, ``num_ops`` RandAugment-style ops
  with random magnitudes, cutout; the SCAN step and self-labeling's strong view.

benchmarks/augment_throughput.py measures images/s of both views on this machine.
"""

from scan_engine.augment.ops import CIFAR10_MEAN, CIFAR10_STD, STRONG_OPS, denormalize, normalize
from scan_engine.augment.simclr_augment import SimCLRAugment, SimCLRParams
from scan_engine.augment.strong_augment import StrongAugment, StrongParams

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "STRONG_OPS",
    "normalize",
    "denormalize",
    "SimCLRParams",
    "SimCLRAugment",
    "StrongParams",
    "StrongAugment",
]
