"""Batched image augmentations on tensors for SimCLR, the SCAN step and self-labeling.

Every transform takes a uint8 batch (B, 3, H, W) on any device and returns float32 (B, 3, S, S)
normalised with a per-channel mean/std (CIFAR-10 by default). Per-sample random parameters are
drawn as tensors (from an optional ``torch.Generator``, so a seed fixes the output) and applied
with whole-batch tensor ops: no per-image Python loop, no PIL. Geometry is one
``F.affine_grid`` + ``F.grid_sample`` call per batch; colour changes work on floats in [0, 1].

Views (paper: Van Gansbeke et al., ECCV 2020, section 4.1 and its CIFAR setup):
- ``normalize``: the weak / evaluation view (images are already centre-cropped at load time).
- ``SimCLRAugment``: random resized crop + flip, colour jitter (p 0.8), grayscale (p 0.2).
- ``StrongAugment`` (= ``ScanAugment``): flip, pad-and-crop, ``num_ops`` RandAugment-style ops
  with random magnitudes, cutout.

Run ``python -m scan_engine.augment`` for a throughput figure on this machine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    "ScanAugment",
    "benchmark_augment",
]

logger = logging.getLogger(__name__)

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

# ITU-R 601 luma, the weights PIL ("L" mode) and torchvision use for grayscale.
_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ (NTSC). Hue jitter is a rotation of the (I, Q) chroma plane: luma and grey stay put.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.595716, -0.274453, -0.321263),
    (0.211456, -0.522591, 0.311135),
)

# RandAugment-style op set of the strong view. Order fixes the op codes in StrongParams.ops.
STRONG_OPS: tuple[str, ...] = (
    "identity",
    "autocontrast",
    "equalize",
    "rotate",
    "solarize",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "posterize",
)
_OP = {name: code for code, name in enumerate(STRONG_OPS)}
_GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
# Magnitude ranges at |magnitude| = 1 (torchvision / FixMatch RandAugment ranges for 32 px).
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3  # x_in = x_out + shear * y_out
MAX_TRANSLATE = 0.3  # fraction of the side
MAX_ENHANCE = 0.9  # colour/contrast/brightness/sharpness factor in [0.1, 1.9]
MIN_POSTERIZE_BITS = 4  # bits kept: 8 (no-op) ... 4


# --------------------------------------------------------------------------------------------
# Small tensor helpers
# --------------------------------------------------------------------------------------------


def _check_uint8(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected a uint8 batch (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )


def _channel_tensor(values: Sequence[float], like: Tensor) -> Tensor:
    """(C,) floats -> (1, C, 1, 1) on the device of ``like``."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """U[0, 1) on ``device``, drawn where the generator lives so a CPU seed also drives CUDA."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _to_float(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def _normalize_float_(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """In place: x <- (x - mean) / std per channel."""
    return x.sub_(_channel_tensor(mean, x)).div_(_channel_tensor(std, x))


def normalize(
    images: Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Tensor:
    """The weak / eval view: uint8 (B, 3, H, W) -> float32 ``(x / 255 - mean) / std``."""
    _check_uint8(images)
    return _normalize_float_(_to_float(images), mean, std)


def denormalize(
    x: Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Tensor:
    """Inverse of ``normalize`` for viewing: float (B, 3, H, W) -> uint8, rounded and clamped."""
    pixels = (x * _channel_tensor(std, x) + _channel_tensor(mean, x)) * 255.0
    return pixels.round_().clamp_(0, 255).to(torch.uint8)


def _grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> luma (B, 1, H, W)."""
    return (x * _channel_tensor(_LUMA, x)).sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Geometry: one affine_grid + grid_sample for the whole batch
# --------------------------------------------------------------------------------------------


def _affine_batch(
    x: Tensor,
    matrices: Tensor,
    size: tuple[int, int] | None = None,
    padding: str = "zeros",
) -> Tensor:
    """Resample float (B, C, H, W) through per-sample affine maps, bilinear.

    ``matrices`` (B, 2, 3) or (B, 3, 3) map *output* to *input* coordinates in the normalised
    [-1, 1] frame of ``F.affine_grid`` (align_corners=False: -1 and 1 are the outer pixel
    edges), so the identity returns the input and ``diag(-1, 1)`` is a horizontal flip.
    ``size`` is the output (H, W), default the input's. ``padding`` is grid_sample's
    padding_mode: "zeros" outside the image, or "border" to repeat the edge pixels.
    """
    _, _, height, width = x.shape
    out_h, out_w = size if size is not None else (height, width)
    grid = _affine_grid(matrices.to(x.dtype), out_h, out_w)  # (B, out_h, out_w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _affine_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """(B, 2+, 3) maps -> sampling grid (B, H, W, 2), same values as ``F.affine_grid``.

    Built by broadcasting (x_in = a x + b y + c per output pixel centre) instead of affine_grid's
    batched matmul over a base grid, which is several times slower on a CPU.
    """
    xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1
    rows = theta[:, :2, :].reshape(-1, 2, 3, 1, 1)  # (B, 2 outputs, 3 coefficients, 1, 1)
    # (B, 2, 1, W) + (B, 2, H, 1) -> (B, 2, H, W), then channels last as grid_sample wants.
    grid = rows[:, :, 0] * xs.view(1, 1, 1, width) + (rows[:, :, 1] * ys.view(1, 1, height, 1))
    return grid.add_(rows[:, :, 2]).permute(0, 2, 3, 1)


def _pixel_to_normalized(matrices: Tensor, height: int, width: int) -> Tensor:
    """(B, 3, 3) maps in centred pixel units -> the normalised frame of ``_affine_batch``."""
    scale = matrices.new_tensor([width / 2.0, height / 2.0, 1.0])
    # D^-1 M D with D = diag(W/2, H/2, 1): rescale rows by 1/D and columns by D.
    return matrices * scale.view(1, 1, 3) / scale.view(1, 3, 1)


def _eye(batch: int, device: torch.device) -> Tensor:
    return torch.eye(3, device=device).expand(batch, 3, 3).clone()


# --------------------------------------------------------------------------------------------
# Colour ops of the strong view. x: float (n, 3, H, W) in [0, 1]; magnitude: (n,) in [-1, 1].
# Each mirrors the PIL operation of the same name (RandAugment was defined on PIL).
# --------------------------------------------------------------------------------------------


def _blend(x: Tensor, degenerate: Tensor | float, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor * (x - degenerate), factor (n,), clamped."""
    f = factor.view(-1, 1, 1, 1)
    return torch.lerp(torch.as_tensor(degenerate, dtype=x.dtype, device=x.device), x, f).clamp_(
        0.0, 1.0
    )


def _autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each image to [0, 1]; flat channels stay as they are."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    span = high - low
    flat = span <= 0
    scale = torch.where(flat, torch.ones_like(span), 1.0 / span.clamp_min(1e-12))
    offset = torch.where(flat, torch.zeros_like(low), low)
    return (x - offset).mul_(scale)


def _equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per image and channel, PIL's ImageOps.equalize lookup table."""
    n, channels, height, width = x.shape
    # x is in [0, 1], so the rounded levels are already 0..255.
    levels = (x * 255.0).round_().to(torch.int64).view(n * channels, -1)  # (N, P)
    hist = torch.zeros(n * channels, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(
        1, levels, torch.ones(1, 1, dtype=torch.int64, device=x.device).expand_as(levels)
    )
    # PIL: step = (pixels - count of the highest occupied level) // 255.
    bins = torch.arange(256, device=x.device)
    last_level = torch.where(hist > 0, bins, -1).amax(dim=1, keepdim=True)  # (N, 1)
    step = (levels.shape[1] - hist.gather(1, last_level)) // 255  # (N, 1)
    # lut[i] = (step // 2 + pixels below level i) // step
    below = torch.cumsum(hist, dim=1) - hist
    lut = torch.div(below + step // 2, step.clamp_min(1), rounding_mode="floor").clamp_(0, 255)
    # step == 0 (one level, or nearly all pixels at the top level): identity, as in PIL.
    lut = torch.where(step > 0, lut, bins).to(x.dtype) / 255.0  # (N, 256), small
    return lut.gather(1, levels).view(n, channels, height, width)


def _solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert pixels at or above ``threshold`` (n,) in [0, 1] (PIL: ``i >= threshold``)."""
    t = threshold.view(-1, 1, 1, 1).to(x.dtype)
    return torch.where(x >= t - 1e-6, 1.0 - x, x)


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits`` (n,) int bits of every 8-bit level (PIL ImageOps.posterize)."""
    levels = (x * 255.0).round_().to(torch.uint8)  # x in [0, 1]
    mask = (255 - ((1 << (8 - bits.to(torch.int64))) - 1)).to(torch.uint8).view(-1, 1, 1, 1)
    return torch.bitwise_and(levels, mask).to(x.dtype).div_(255.0)


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, 0.0, factor)


def _color(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _grayscale(x), factor)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = _grayscale(x).mean(dim=(2, 3), keepdim=True)  # (n, 1, 1, 1)
    return _blend(x, mean, factor)


def _smooth(x: Tensor) -> Tensor:
    """PIL's ImageFilter.SMOOTH: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, borders unchanged."""
    # Separable 3x3 box sum on the interior (B, C, H-2, W-2); the centre weighs 1 + 4.
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    out = x.clone()
    out[..., 1:-1, 1:-1] = (box + 4.0 * x[..., 1:-1, 1:-1]) / 13.0
    return out


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _smooth(x), factor)


def _enhance_factor(magnitude: Tensor) -> Tensor:
    return 1.0 + MAX_ENHANCE * magnitude


_COLOUR_OPS: dict[int, Callable[[Tensor, Tensor], Tensor]] = {
    _OP["autocontrast"]: lambda x, m: _autocontrast(x),
    _OP["equalize"]: lambda x, m: _equalize(x),
    _OP["solarize"]: lambda x, m: _solarize(x, 1.0 - m.abs()),
    _OP["color"]: lambda x, m: _color(x, _enhance_factor(m)),
    _OP["contrast"]: lambda x, m: _contrast(x, _enhance_factor(m)),
    _OP["brightness"]: lambda x, m: _brightness(x, _enhance_factor(m)),
    _OP["sharpness"]: lambda x, m: _sharpness(x, _enhance_factor(m)),
    _OP["posterize"]: lambda x, m: _posterize(x, _posterize_bits(m)),
}


def _posterize_bits(magnitude: Tensor) -> Tensor:
    """|magnitude| in [0, 1] -> bits kept, uniform over 8 ... MIN_POSTERIZE_BITS."""
    steps = 9 - MIN_POSTERIZE_BITS  # 5 outcomes: 8, 7, 6, 5, 4
    drop = (magnitude.abs() * steps).floor().clamp_(max=steps - 1)
    return (8 - drop).to(torch.int64)


def _cutout(x: Tensor, center: Tensor, side: Tensor, value: float = 0.0) -> Tensor:
    """Set one square hole per image to ``value``; the part outside the image is dropped.

    center (B, 2) int (row, column); side (B,) int. The hole spans rows
    [row - side // 2, row - side // 2 + side) and the same for columns.
    """
    height, width = x.shape[-2:]
    top = (center[:, 0] - side // 2).view(-1, 1)
    left = (center[:, 1] - side // 2).view(-1, 1)
    rows = torch.arange(height, device=x.device).view(1, -1)
    cols = torch.arange(width, device=x.device).view(1, -1)
    in_rows = (rows >= top) & (rows < top + side.view(-1, 1))  # (B, H)
    in_cols = (cols >= left) & (cols < left + side.view(-1, 1))  # (B, W)
    hole = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)  # (B, 1, H, W)
    return x.masked_fill(hole, value)


# --------------------------------------------------------------------------------------------
# SimCLR view
# --------------------------------------------------------------------------------------------


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
        u = _uniform((batch, 2 * tries + 10), generator, device)
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
        theta = _eye(batch, device)
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
        order = _uniform((batch, 4), generator, device).argsort(dim=1)
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
        luma = torch.tensor(_LUMA, device=device)
        to_gray = torch.ones(3, 1, device=device) * luma.view(1, 3)  # each channel <- luma
        yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
        yiq_inv = torch.linalg.inv(yiq)
        yiq, yiq_inv = yiq.to(device, torch.float32), yiq_inv.to(device, torch.float32)

        brightness, contrast, saturation, hue = params.jitter.unbind(1)  # each (B,)
        b_mat = brightness.view(-1, 1, 1) * eye
        s_mat = saturation.view(-1, 1, 1) * eye + (1 - saturation).view(-1, 1, 1) * to_gray
        angle = 2 * math.pi * hue
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = _eye(batch, device)
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
        _check_uint8(images)
        size = (self.image_size, self.image_size)
        # Resample the 0..255 levels; the 1/255 is folded into the colour matrix below. Crops
        # lie inside the image, but upsampling samples up to half a pixel past its edge:
        # "border" repeats the edge there, as a resize does, instead of blending in black.
        x = _affine_batch(images.to(torch.float32), params.theta, size, padding="border")
        matrix, offset = self._colour_affine(params, x.mean(dim=(2, 3)) / 255.0)
        matrix = matrix / 255.0
        # out_c = sum_k A[c, k] x_k + t_c: three broadcast multiply-adds, no bmm over pixels.
        out = torch.addcmul(offset.view(-1, 3, 1, 1), matrix[:, :, 0, None, None], x[:, 0:1])
        out.addcmul_(matrix[:, :, 1, None, None], x[:, 1:2])
        out.addcmul_(matrix[:, :, 2, None, None], x[:, 2:3])
        return _normalize_float_(out.clamp_(0.0, 1.0), self.mean, self.std)

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, 3, H, W) -> one random SimCLR view, float32 (B, 3, S, S) normalised."""
        _check_uint8(images)
        batch, _, height, width = images.shape
        params = self.sample_params(batch, height, width, images.device, generator)
        return self.apply(images, params)


# --------------------------------------------------------------------------------------------
# Strong (RandAugment + cutout) view
# --------------------------------------------------------------------------------------------


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
        u = _uniform((batch, 6 + 2 * n), generator, device)
        pad = self.crop_padding
        size = self.image_size
        shift = (u[:, 1:3] * (2 * pad + 1)).floor().to(torch.int64) - pad  # uniform in -pad..pad
        ops = (u[:, 3 : 3 + n] * len(STRONG_OPS)).floor().to(torch.int64).clamp_(max=len(_OP) - 1)
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
        theta = _eye(batch, device)
        theta[:, 0, 0] = torch.where(params.flip, -1.0, 1.0)
        shift = _eye(batch, device)
        shift[:, :2, 2] = -params.shift.to(torch.float32)  # content moves by +shift
        theta = theta @ shift
        for step in range(params.ops.shape[1]):
            op = params.ops[:, step]
            m = params.magnitudes[:, step]
            angle = torch.deg2rad(MAX_ROTATE_DEGREES * m)
            step_mat = _eye(batch, device)
            is_rot = op == _OP["rotate"]
            step_mat[:, 0, 0] = torch.where(is_rot, torch.cos(angle), 1.0)
            step_mat[:, 1, 1] = step_mat[:, 0, 0]
            step_mat[:, 0, 1] = torch.where(is_rot, -torch.sin(angle), 0.0)
            step_mat[:, 1, 0] = torch.where(is_rot, torch.sin(angle), 0.0)
            step_mat[:, 0, 1] += torch.where(op == _OP["shear_x"], MAX_SHEAR * m, 0.0)
            step_mat[:, 1, 0] += torch.where(op == _OP["shear_y"], MAX_SHEAR * m, 0.0)
            step_mat[:, 0, 2] = torch.where(op == _OP["translate_x"], -MAX_TRANSLATE * m * width, 0)
            step_mat[:, 1, 2] = torch.where(
                op == _OP["translate_y"], -MAX_TRANSLATE * m * height, 0
            )
            theta = theta @ step_mat
        return _pixel_to_normalized(theta, height, width)

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
                if count and code in _COLOUR_OPS:
                    x[start:end] = _COLOUR_OPS[code](x[start:end], magnitudes[start:end])
                start = end
        unsorted = torch.empty_like(x)
        return unsorted.index_copy_(0, position, x)

    def apply(self, images: Tensor, params: StrongParams) -> Tensor:
        """Apply given parameters to a uint8 batch -> normalised float (B, 3, S, S)."""
        _check_uint8(images)
        size = (self.image_size, self.image_size)
        theta = self._geometry(params, *size)
        # Border fill = the mean colour: resample (levels - 255 mean) with zero padding, add the
        # mean back while scaling to [0, 1]. Bilinear weights sum to 1, so no clamp is needed.
        fill = _channel_tensor(self.mean, images)  # (1, 3, 1, 1)
        x = images.to(torch.float32).sub_(fill * 255.0)
        x = torch.add(fill, _affine_batch(x, theta, size=size), alpha=1.0 / 255.0)
        x = self._colour_ops(x, params)
        x = _normalize_float_(x, self.mean, self.std)
        if self.cutout:
            x = _cutout(x, params.cutout_center, params.cutout_side, 0.0)
        return x

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, 3, H, W) -> one random strong view, float32 (B, 3, S, S) normalised."""
        _check_uint8(images)
        params = self.sample_params(images.shape[0], images.device, generator)
        return self.apply(images, params)


# The SCAN step trains on the strong view too (paper section 4.1, CIFAR setup).
ScanAugment = StrongAugment


# --------------------------------------------------------------------------------------------
# Throughput check (not a test): python -m scan_engine.augment
# --------------------------------------------------------------------------------------------


def benchmark_augment(
    batch: int = 512, size: int = 32, device: str | None = None, seconds: float = 2.0
) -> dict[str, float]:
    """Print and return images/s of a SimCLR pair of views and of one strong view.

    Runs each transform on a random uint8 (batch, 3, size, size) batch for about ``seconds``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator(device=dev).manual_seed(0)
    shape = (batch, 3, size, size)
    images = torch.randint(0, 256, shape, generator=generator, device=dev, dtype=torch.uint8)
    simclr, strong = SimCLRAugment(size), StrongAugment(size)

    def simclr_pair() -> None:
        simclr(images, generator)
        simclr(images, generator)

    results: dict[str, float] = {}
    for name, fn in (("simclr_two_views", simclr_pair), ("strong", lambda: strong(images))):
        fn()  # warm-up
        runs, start = 0, time.perf_counter()
        while True:
            fn()
            runs += 1
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        results[name] = batch * runs / elapsed
        print(
            f"{name:>17}: {results[name]:10.0f} images/s  "
            f"({batch}x3x{size}x{size}, {dev}, {torch.get_num_threads()} threads)"
        )
    return results


if __name__ == "__main__":
    benchmark_augment()
