"""Tensor helpers, geometry and colour operations shared by the augmentation views.

Every function works on whole batches: uint8 or float (B, 3, H, W) on any device, per-sample
parameters as tensors. Geometry is one ``F.affine_grid`` + ``F.grid_sample`` call per batch;
colour changes work on floats in [0, 1] and mirror the PIL operation of the same name
(RandAugment was defined on PIL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "STRONG_OPS",
    "normalize",
    "denormalize",
]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

# ITU-R 601 luma, the weights PIL ("L" mode) and torchvision use for grayscale.
LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ (NTSC). Hue jitter is a rotation of the (I, Q) chroma plane: luma and grey stay put.
RGB_TO_YIQ = (
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
OP = {name: code for code, name in enumerate(STRONG_OPS)}
# Magnitude ranges at |magnitude| = 1 (torchvision / FixMatch RandAugment ranges for 32 px).
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3  # x_in = x_out + shear * y_out
MAX_TRANSLATE = 0.3  # fraction of the side
MAX_ENHANCE = 0.9  # colour/contrast/brightness/sharpness factor in [0.1, 1.9]
MIN_POSTERIZE_BITS = 4  # bits kept: 8 (no-op) ... 4


# --------------------------------------------------------------------------------------------
# Small tensor helpers
# --------------------------------------------------------------------------------------------


def check_uint8(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected a uint8 batch (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )


def channel_tensor(values: Sequence[float], like: Tensor) -> Tensor:
    """(C,) floats -> (1, C, 1, 1) on the device of ``like``."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """U[0, 1) on ``device``, drawn where the generator lives so a CPU seed also drives CUDA."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def to_float(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def normalize_float_(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """In place: x <- (x - mean) / std per channel."""
    return x.sub_(channel_tensor(mean, x)).div_(channel_tensor(std, x))


def normalize(
    images: Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Tensor:
    """The weak / eval view: uint8 (B, 3, H, W) -> float32 ``(x / 255 - mean) / std``."""
    check_uint8(images)
    return normalize_float_(to_float(images), mean, std)


def denormalize(
    x: Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Tensor:
    """Inverse of ``normalize`` for viewing: float (B, 3, H, W) -> uint8, rounded and clamped."""
    pixels = (x * channel_tensor(std, x) + channel_tensor(mean, x)) * 255.0
    return pixels.round_().clamp_(0, 255).to(torch.uint8)


def grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> luma (B, 1, H, W)."""
    return (x * channel_tensor(LUMA, x)).sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Geometry: one affine_grid + grid_sample for the whole batch
# --------------------------------------------------------------------------------------------


def affine_batch(
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
    grid = affine_grid(matrices.to(x.dtype), out_h, out_w)  # (B, out_h, out_w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def affine_grid(theta: Tensor, height: int, width: int) -> Tensor:
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


def pixel_to_normalized(matrices: Tensor, height: int, width: int) -> Tensor:
    """(B, 3, 3) maps in centred pixel units -> the normalised frame of ``affine_batch``."""
    scale = matrices.new_tensor([width / 2.0, height / 2.0, 1.0])
    # D^-1 M D with D = diag(W/2, H/2, 1): rescale rows by 1/D and columns by D.
    return matrices * scale.view(1, 1, 3) / scale.view(1, 3, 1)


def identity_matrices(batch: int, device: torch.device) -> Tensor:
    """(B, 3, 3) identity affine maps, one per sample."""
    return torch.eye(3, device=device).expand(batch, 3, 3).clone()


# --------------------------------------------------------------------------------------------
# Colour ops of the strong view. x: float (n, 3, H, W) in [0, 1]; magnitude: (n,) in [-1, 1].
# Each mirrors the PIL operation of the same name (RandAugment was defined on PIL).
# --------------------------------------------------------------------------------------------


def blend(x: Tensor, degenerate: Tensor | float, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor * (x - degenerate), factor (n,), clamped."""
    f = factor.view(-1, 1, 1, 1)
    return torch.lerp(torch.as_tensor(degenerate, dtype=x.dtype, device=x.device), x, f).clamp_(
        0.0, 1.0
    )


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each image to [0, 1]; flat channels stay as they are."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    span = high - low
    flat = span <= 0
    scale = torch.where(flat, torch.ones_like(span), 1.0 / span.clamp_min(1e-12))
    offset = torch.where(flat, torch.zeros_like(low), low)
    return (x - offset).mul_(scale)


def equalize(x: Tensor) -> Tensor:
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


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert pixels at or above ``threshold`` (n,) in [0, 1] (PIL: ``i >= threshold``)."""
    t = threshold.view(-1, 1, 1, 1).to(x.dtype)
    return torch.where(x >= t - 1e-6, 1.0 - x, x)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits`` (n,) int bits of every 8-bit level (PIL ImageOps.posterize)."""
    levels = (x * 255.0).round_().to(torch.uint8)  # x in [0, 1]
    mask = (255 - ((1 << (8 - bits.to(torch.int64))) - 1)).to(torch.uint8).view(-1, 1, 1, 1)
    return torch.bitwise_and(levels, mask).to(x.dtype).div_(255.0)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    return blend(x, 0.0, factor)


def color(x: Tensor, factor: Tensor) -> Tensor:
    return blend(x, grayscale(x), factor)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = grayscale(x).mean(dim=(2, 3), keepdim=True)  # (n, 1, 1, 1)
    return blend(x, mean, factor)


def smooth(x: Tensor) -> Tensor:
    """PIL's ImageFilter.SMOOTH: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, borders unchanged."""
    # Separable 3x3 box sum on the interior (B, C, H-2, W-2); the centre weighs 1 + 4.
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    out = x.clone()
    out[..., 1:-1, 1:-1] = (box + 4.0 * x[..., 1:-1, 1:-1]) / 13.0
    return out


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    return blend(x, smooth(x), factor)


def enhance_factor(magnitude: Tensor) -> Tensor:
    return 1.0 + MAX_ENHANCE * magnitude


COLOUR_OPS: dict[int, Callable[[Tensor, Tensor], Tensor]] = {
    OP["autocontrast"]: lambda x, m: autocontrast(x),
    OP["equalize"]: lambda x, m: equalize(x),
    OP["solarize"]: lambda x, m: solarize(x, 1.0 - m.abs()),
    OP["color"]: lambda x, m: color(x, enhance_factor(m)),
    OP["contrast"]: lambda x, m: contrast(x, enhance_factor(m)),
    OP["brightness"]: lambda x, m: brightness(x, enhance_factor(m)),
    OP["sharpness"]: lambda x, m: sharpness(x, enhance_factor(m)),
    OP["posterize"]: lambda x, m: posterize(x, posterize_bits(m)),
}


def posterize_bits(magnitude: Tensor) -> Tensor:
    """|magnitude| in [0, 1] -> bits kept, uniform over 8 ... MIN_POSTERIZE_BITS."""
    steps = 9 - MIN_POSTERIZE_BITS  # 5 outcomes: 8, 7, 6, 5, 4
    drop = (magnitude.abs() * steps).floor().clamp_(max=steps - 1)
    return (8 - drop).to(torch.int64)


def cutout(x: Tensor, center: Tensor, side: Tensor, value: float = 0.0) -> Tensor:
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
