"""The strong view of the SCAN step and of self-labeling (paper section 4.1, CIFAR setup),
batched on tensors: flip, pad-and-crop, ``num_ops`` RandAugment-style ops with random magnitudes,
cutout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scan_engine.augment.ops import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    COLOUR_OPS,
    MAX_ROTATE_DEGREES,
    MAX_SHEAR,
    MAX_TRANSLATE,
    OP,
    STRONG_OPS,
    affine_batch,
    channel_tensor,
    check_uint8,
    cutout,
    identity_matrices,
    normalize_float_,
    pixel_to_normalized,
    uniform,
)

__all__ = ["StrongParams", "StrongAugment"]


@dataclass
class StrongParams:
    """Per-sample parameters of one strong view (all on the input's device).

    flip (B,) bool; shift (B, 2) int pixels (dx, dy) of the pad-and-crop, content moves by it;
    ops (B, num_ops) int codes into ``STRONG_OPS``, applied left to right; magnitudes
    (B, num_ops) in [-1, 1] (signed ops use the sign, the others the absolute value);
    cutout_center (B, 2) int (row, column) and cutout_side (B,) int, side 0 = no hole.
    """

    flip: Tensor
    shift: Tensor
    ops: Tensor
    magnitudes: Tensor
    cutout_center: Tensor
    cutout_side: Tensor


class StrongAugment(nn.Module):
    """Strong view of the SCAN step and of self-labeling, fully batched.

    Per sample: horizontal flip (p 0.5); random crop equivalent to padding by ``crop_padding``
    pixels (default 4 per 32) and cropping back; ``num_ops`` ops drawn uniformly from
    ``STRONG_OPS`` with magnitudes uniform over their range; normalise; cutout (one square
    hole, side 1..``cutout_max_fraction`` of the shorter side, centre anywhere, clipped at the
    border) set to 0, i.e. to the dataset mean colour.

    All geometry (flip, crop, and the rotate / shear / translate ops, in their drawn order) is
    composed into one affine map per sample and resampled once, bilinear, *before* the colour
    ops, which then run in their drawn order. One resampling keeps 32 px images from blurring
    over repeated interpolation; the price is that a colour op drawn before a geometric op now
    acts on (and counts) the border fill. The fill is the normalisation mean (0 once
    normalised).
    Each colour op runs only on the samples that drew it in that round (a contiguous slice
    after regrouping the batch by op code).
    """

    def __init__(
        self,
        image_size: int,
        num_ops: int = 4,
        cutout: bool = True,
        *,
        crop_padding: int | None = None,
        cutout_max_fraction: float = 0.5,
        flip_p: float = 0.5,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_ops}")
        self.image_size = int(image_size)
        self.num_ops = int(num_ops)
        self.cutout = bool(cutout)
        self.crop_padding = (
            round(self.image_size * 4 / 32) if crop_padding is None else int(crop_padding)
        )
        self.cutout_max_side = max(1, int(self.image_size * cutout_max_fraction))
        self.flip_p = float(flip_p)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def sample_params(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> StrongParams:
        """Draw the random parameters of ``batch`` strong views."""
        n = self.num_ops
        u = uniform((batch, 6 + 2 * n), generator, device)
        pad = self.crop_padding
        size = self.image_size
        shift = (u[:, 1:3] * (2 * pad + 1)).floor().to(torch.int64) - pad  # uniform in -pad..pad
        ops = (u[:, 3 : 3 + n] * len(STRONG_OPS)).floor().to(torch.int64).clamp_(max=len(OP) - 1)
        magnitudes = 2 * u[:, 3 + n : 3 + 2 * n] - 1
        k = 3 + 2 * n
        center = (u[:, k : k + 2] * size).floor().to(torch.int64).clamp_(max=size - 1)
        side = 1 + (u[:, k + 2] * self.cutout_max_side).floor().to(torch.int64)
        side = side.clamp_(max=self.cutout_max_side) if self.cutout else torch.zeros_like(side)
        return StrongParams(
            flip=u[:, 0] < self.flip_p,
            shift=shift,
            ops=ops,
            magnitudes=magnitudes,
            cutout_center=center,
            cutout_side=side,
        )

    def _geometry(self, params: StrongParams, height: int, width: int) -> Tensor:
        """Compose flip, crop and the geometric ops -> (B, 3, 3), output -> input, normalised.

        Built in centred pixel units (so rotations stay rotations on non-square images). If a
        warp with map M1 is followed by one with M2, the result samples the input at M1 M2 p.
        """
        batch, device = params.flip.shape[0], params.flip.device
        theta = identity_matrices(batch, device)
        theta[:, 0, 0] = torch.where(params.flip, -1.0, 1.0)
        shift = identity_matrices(batch, device)
        shift[:, :2, 2] = -params.shift.to(torch.float32)  # content moves by +shift
        theta = theta @ shift
        for step in range(params.ops.shape[1]):
            op = params.ops[:, step]
            m = params.magnitudes[:, step]
            angle = torch.deg2rad(MAX_ROTATE_DEGREES * m)
            step_mat = identity_matrices(batch, device)
            is_rot = op == OP["rotate"]
            step_mat[:, 0, 0] = torch.where(is_rot, torch.cos(angle), 1.0)
            step_mat[:, 1, 1] = step_mat[:, 0, 0]
            step_mat[:, 0, 1] = torch.where(is_rot, -torch.sin(angle), 0.0)
            step_mat[:, 1, 0] = torch.where(is_rot, torch.sin(angle), 0.0)
            step_mat[:, 0, 1] += torch.where(op == OP["shear_x"], MAX_SHEAR * m, 0.0)
            step_mat[:, 1, 0] += torch.where(op == OP["shear_y"], MAX_SHEAR * m, 0.0)
            step_mat[:, 0, 2] = torch.where(op == OP["translate_x"], -MAX_TRANSLATE * m * width, 0)
            step_mat[:, 1, 2] = torch.where(op == OP["translate_y"], -MAX_TRANSLATE * m * height, 0)
            theta = theta @ step_mat
        return pixel_to_normalized(theta, height, width)

    @staticmethod
    def _colour_ops(x: Tensor, params: StrongParams) -> Tensor:
        """Run the drawn colour ops round by round on float (B, 3, H, W) in [0, 1].

        Each round regroups the batch by op code (a stable sort), so every op runs once, on a
        contiguous slice of the samples that drew it: one gather and one host sync per round
        instead of a mask, gather and scatter per op.
        """
        position = torch.arange(x.shape[0], device=x.device)  # x[i] is sample position[i]
        for step in range(params.ops.shape[1]):
            op = params.ops[:, step]
            order = torch.argsort(op, stable=True)  # samples grouped by op code
            counts = torch.bincount(op, minlength=len(STRONG_OPS)).tolist()
            # Sample order[j] sits at row inverse[order[j]] of x.
            inverse = torch.empty_like(position)
            inverse[position] = torch.arange(x.shape[0], device=x.device)
            x = x.index_select(0, inverse[order])
            position = order
            magnitudes = params.magnitudes[order, step]
            start = 0
            for code, count in enumerate(counts):
                end = start + count
                if count and code in COLOUR_OPS:
                    x[start:end] = COLOUR_OPS[code](x[start:end], magnitudes[start:end])
                start = end
        unsorted = torch.empty_like(x)
        return unsorted.index_copy_(0, position, x)

    def apply(self, images: Tensor, params: StrongParams) -> Tensor:
        """Apply given parameters to a uint8 batch -> normalised float (B, 3, S, S)."""
        check_uint8(images)
        size = (self.image_size, self.image_size)
        theta = self._geometry(params, *size)
        # Border fill = the mean colour: resample (levels - 255 mean) with zero padding, add the
        # mean back while scaling to [0, 1]. Bilinear weights sum to 1, so no clamp is needed.
        fill = channel_tensor(self.mean, images)  # (1, 3, 1, 1)
        x = images.to(torch.float32).sub_(fill * 255.0)
        x = torch.add(fill, affine_batch(x, theta, size=size), alpha=1.0 / 255.0)
        x = self._colour_ops(x, params)
        x = normalize_float_(x, self.mean, self.std)
        if self.cutout:
            x = cutout(x, params.cutout_center, params.cutout_side, 0.0)
        return x

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, 3, H, W) -> one random strong view, float32 (B, 3, S, S) normalised."""
        check_uint8(images)
        params = self.sample_params(images.shape[0], images.device, generator)
        return self.apply(images, params)
