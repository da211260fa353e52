"""The SimCLR view (Chen et al. 2020, CIFAR variant without blur), batched on tensors: random
resized crop + flip, colour jitter (p 0.8), grayscale (p 0.2), normalise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scan_engine.augment.ops import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    LUMA,
    RGB_TO_YIQ,
    affine_batch,
    check_uint8,
    identity_matrices,
    normalize_float_,
    uniform,
)

__all__ = ["SimCLRParams", "SimCLRAugment"]


@dataclass
class SimCLRParams:
    """Per-sample parameters of one SimCLR view (all on the input's device).

    theta (B, 3, 3): crop + flip, output -> input, normalised frame. jitter (B, 4): brightness,
    contrast, saturation factors and hue shift (turns), neutral (1, 1, 1, 0) where the jitter
    was not drawn. order (B, 4): the order in which those four are applied. grayscale (B,) bool.
    """

    theta: Tensor
    jitter: Tensor
    order: Tensor
    grayscale: Tensor


class SimCLRAugment(nn.Module):
    """SimCLR view (Chen et al. 2020, CIFAR variant without blur), fully batched.

    1. Random resized crop (area ``crop_scale_min``..1 of the image, aspect 3/4..4/3, ten tries
       per sample as torchvision does, else the whole image) and horizontal flip (p 0.5): one
       affine map per sample, one bilinear ``grid_sample`` for the batch, output ``image_size``.
    2. Colour jitter with probability ``jitter_p``: brightness, contrast, saturation in
       [1 - s, 1 + s] and hue in [-h, h] turns, applied in a random order per sample (as
       torchvision's ColorJitter). Hue is a rotation of the YIQ chroma plane, not an HSV shift.
       All four are affine in RGB, so they compose (with the grayscale step) into one 3x3 matrix
       plus offset per sample, applied in a single pass and clamped once at the end (torchvision
       clamps after each step; the difference only shows on saturated pixels).
    3. Grayscale with probability ``grayscale_p``; then normalise.
    """

    def __init__(
        self,
        image_size: int,
        crop_scale_min: float = 0.2,
        *,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        flip_p: float = 0.5,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if not 0.0 < crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
        self.image_size = int(image_size)
        self.crop_scale_min = float(crop_scale_min)
        self.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)
        self.jitter_p = float(jitter_p)
        self.grayscale_p = float(grayscale_p)
        self.flip_p = float(flip_p)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def sample_params(
        self,
        batch: int,
        height: int,
        width: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> SimCLRParams:
        """Draw the random parameters of ``batch`` views of (height, width) input images."""
        tries = 10
        u = uniform((batch, 2 * tries + 10), generator, device)
        # Random resized crop: area fraction and log-uniform aspect ratio, ten candidates each.
        area = height * width * (self.crop_scale_min + (1 - self.crop_scale_min) * u[:, :tries])
        log_lo, log_hi = (math.log(r) for r in self.crop_ratio)
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, tries : 2 * tries])
        crop_w = torch.sqrt(area * ratio)  # (B, tries), input pixels
        crop_h = torch.sqrt(area / ratio)
        fits = (crop_w <= width) & (crop_h <= height)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting try
        any_fit = fits.any(dim=1)
        crop_w = torch.where(any_fit, crop_w.gather(1, first).squeeze(1), float(width))
        crop_h = torch.where(any_fit, crop_h.gather(1, first).squeeze(1), float(height))
        k = 2 * tries
        left = (width - crop_w) * u[:, k]
        top = (height - crop_h) * u[:, k + 1]
        flip = torch.where(u[:, k + 2] < self.flip_p, -1.0, 1.0)
        theta = identity_matrices(batch, device)
        theta[:, 0, 0] = flip * crop_w / width
        theta[:, 1, 1] = crop_h / height
        theta[:, 0, 2] = (2 * left + crop_w) / width - 1  # crop centre, normalised
        theta[:, 1, 2] = (2 * top + crop_h) / height - 1

        jittered = u[:, k + 3] < self.jitter_p
        spreads = torch.tensor(
            [self.brightness, self.contrast, self.saturation, self.hue], device=device
        )
        centre = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
        jitter = centre + spreads * (2 * u[:, k + 4 : k + 8] - 1)  # (B, 4)
        jitter = torch.where(jittered.unsqueeze(1), jitter, centre)
        order = uniform((batch, 4), generator, device).argsort(dim=1)
        grayscale = u[:, k + 8] < self.grayscale_p
        return SimCLRParams(theta=theta, jitter=jitter, order=order, grayscale=grayscale)

    def _colour_affine(self, params: SimCLRParams, channel_mean: Tensor) -> tuple[Tensor, Tensor]:
        """Compose jitter (in its per-sample order) and grayscale into x -> A x + t.

        channel_mean (B, 3): RGB mean of each cropped image, which contrast needs. Returns
        A (B, 3, 3) and t (B, 3).
        """
        batch = channel_mean.shape[0]
        device = channel_mean.device
        eye = torch.eye(3, device=device)
        luma = torch.tensor(LUMA, device=device)
        to_gray = torch.ones(3, 1, device=device) * luma.view(1, 3)  # each channel <- luma
        yiq = torch.tensor(RGB_TO_YIQ, dtype=torch.float64)
        yiq_inv = torch.linalg.inv(yiq)
        yiq, yiq_inv = yiq.to(device, torch.float32), yiq_inv.to(device, torch.float32)

        brightness, contrast, saturation, hue = params.jitter.unbind(1)  # each (B,)
        b_mat = brightness.view(-1, 1, 1) * eye
        s_mat = saturation.view(-1, 1, 1) * eye + (1 - saturation).view(-1, 1, 1) * to_gray
        angle = 2 * math.pi * hue
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = identity_matrices(batch, device)
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        h_mat = yiq_inv @ rot @ yiq
        c_mat = contrast.view(-1, 1, 1) * eye

        matrix = eye.expand(batch, 3, 3).clone()
        offset = torch.zeros(batch, 3, device=device)
        for step in range(4):
            op = params.order[:, step].view(-1, 1, 1)
            # Contrast blends towards the grey level of the image as it is at this step.
            current_mean = (matrix @ channel_mean.unsqueeze(2)).squeeze(2) + offset  # (B, 3)
            grey_level = (current_mean * luma).sum(dim=1, keepdim=True)  # (B, 1)
            c_off = (1 - contrast).view(-1, 1) * grey_level.expand(-1, 3)
            step_mat = torch.where(
                op == 0, b_mat, torch.where(op == 1, c_mat, torch.where(op == 2, s_mat, h_mat))
            )
            step_off = torch.where(op.view(-1, 1) == 1, c_off, torch.zeros_like(c_off))
            matrix = step_mat @ matrix
            offset = (step_mat @ offset.unsqueeze(2)).squeeze(2) + step_off
        gray = params.grayscale.view(-1, 1, 1)
        matrix = torch.where(gray, to_gray @ matrix, matrix)
        offset = torch.where(gray.view(-1, 1), (to_gray @ offset.unsqueeze(2)).squeeze(2), offset)
        return matrix, offset

    def apply(self, images: Tensor, params: SimCLRParams) -> Tensor:
        """Apply given parameters to a uint8 batch -> normalised float (B, 3, S, S)."""
        check_uint8(images)
        size = (self.image_size, self.image_size)
        # Resample the 0..255 levels; the 1/255 is folded into the colour matrix below. Crops
        # lie inside the image, but upsampling samples up to half a pixel past its edge:
        # "border" repeats the edge there, as a resize does, instead of blending in black.
        x = affine_batch(images.to(torch.float32), params.theta, size, padding="border")
        matrix, offset = self._colour_affine(params, x.mean(dim=(2, 3)) / 255.0)
        matrix = matrix / 255.0
        # out_c = sum_k A[c, k] x_k + t_c: three broadcast multiply-adds, no bmm over pixels.
        out = torch.addcmul(offset.view(-1, 3, 1, 1), matrix[:, :, 0, None, None], x[:, 0:1])
        out.addcmul_(matrix[:, :, 1, None, None], x[:, 1:2])
        out.addcmul_(matrix[:, :, 2, None, None], x[:, 2:3])
        return normalize_float_(out.clamp_(0.0, 1.0), self.mean, self.std)

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, 3, H, W) -> one random SimCLR view, float32 (B, 3, S, S) normalised."""
        check_uint8(images)
        batch, _, height, width = images.shape
        params = self.sample_params(batch, height, width, images.device, generator)
        return self.apply(images, params)
