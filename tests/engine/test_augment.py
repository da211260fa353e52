"""Batched augmentations: shapes, determinism, exact geometry, and the colour ops against PIL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from scan_engine.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    STRONG_OPS,
    SimCLRAugment,
    SimCLRParams,
    StrongAugment,
    StrongParams,
    denormalize,
    normalize,
    ops,
)

MEAN = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _images(batch: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields (B, 3, S, S) uint8: structure, not white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noise = 0.05 * torch.rand(batch, 3, size, size, generator=g)
    return ((fine * 0.8 + 0.1 + noise).clamp(0, 1) * 255).round().to(torch.uint8)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalised float -> [0, 1] float (no rounding)."""
    return x * STD.to(x.device) + MEAN.to(x.device)


def _pil_images(seed: int = 0, size: int = 24) -> list[np.ndarray]:
    """Two RGB uint8 images with squeezed, uneven histograms, so the ops change them."""
    rng = np.random.RandomState(seed)
    low_contrast = rng.randint(60, 150, size=(size, size, 3)).astype(np.uint8)
    ramp = np.linspace(0, 1, size)[None, :, None] ** 2 * np.array([200, 120, 90])
    skewed = (ramp + rng.randint(0, 40, size=(size, size, 3))).clip(0, 255).astype(np.uint8)
    return [low_contrast, skewed]


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def _assert_matches_pil(ours: torch.Tensor, theirs: Image.Image, atol_levels: float) -> None:
    expected = _to_tensor(np.array(theirs))
    diff = (ours * 255.0 - expected * 255.0).abs().max().item()
    assert diff <= atol_levels, f"max difference {diff:.2f} levels > {atol_levels}"


# ------------------------------------------------------------------------------------------
# normalise
# ------------------------------------------------------------------------------------------


def test_normalize_matches_formula_and_round_trips() -> None:
    images = _images(4)
    x = normalize(images)
    assert x.dtype == torch.float32 and x.shape == images.shape
    assert torch.allclose(x, (images.float() / 255 - MEAN) / STD, atol=1e-6)
    assert torch.equal(denormalize(x), images)
    custom = normalize(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(custom, images.float() / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize("transform", [normalize, SimCLRAugment(32), StrongAugment(32)])
def test_rejects_non_uint8_input(transform) -> None:
    with pytest.raises(ValueError, match="uint8"):
        transform(torch.rand(2, 3, 32, 32))


# ------------------------------------------------------------------------------------------
# Both views: shape, dtype, device, determinism, per-sample randomness
# ------------------------------------------------------------------------------------------

VIEWS = {
    "simclr": lambda size: SimCLRAugment(size),
    "strong": lambda size: StrongAugment(size),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("size", [32, 20])
def test_output_shape_dtype_device(view: str, size: int, device: str) -> None:
    images = _images(5, size).to(device)
    out = VIEWS[view](size)(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 3, size, size)
    assert out.dtype == torch.float32
    assert out.device == images.device
    assert torch.isfinite(out).all()
    # Values stay inside the normalised image of [0, 1].
    pixels = _unnormalize(out)
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4


def test_simclr_resizes_to_image_size() -> None:
    out = SimCLRAugment(24)(_images(3, 40))
    assert out.shape == (3, 3, 24, 24)


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_same_seed_same_output_other_seed_other_output(view: str) -> None:
    images = _images(16)
    transform = VIEWS[view](32)
    a = transform(images, generator=torch.Generator().manual_seed(7))
    b = transform(images, generator=torch.Generator().manual_seed(7))
    c = transform(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_each_sample_gets_its_own_parameters(view: str) -> None:
    # The same image 16 times: a batch-wide draw would give 16 equal outputs.
    images = _images(1).expand(16, -1, -1, -1).contiguous()
    out = VIEWS[view](32)(images, generator=torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat)
    off_diagonal = distances[~torch.eye(16, dtype=torch.bool)]
    assert (off_diagonal > 1e-3).all()


def test_simclr_views_differ_but_keep_image_statistics() -> None:
    images = _images(8, seed=3)
    transform = SimCLRAugment(32)
    g = torch.Generator().manual_seed(0)
    views = torch.stack([_unnormalize(transform(images, g)) for _ in range(16)])  # (V,B,3,S,S)
    original = images.float() / 255.0
    # Two views of one image are different images ...
    assert (views[0] - views[1]).abs().mean() > 0.03
    # ... but, averaged over views, keep its colour: jitter is centred on the identity and the
    # crops cover at least 20 % of the image.
    view_means = views.mean(dim=(0, 3, 4))  # (B, 3)
    assert (view_means - original.mean(dim=(2, 3))).abs().max() < 0.08
    # Luma of each view stays close to that of its image (brightness jitter is at most 40 %).
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 1, 3)
    view_luma = (views.mean(dim=(3, 4)) * luma).sum(-1)  # (V, B)
    image_luma = (original.mean(dim=(2, 3)) * luma[0]).sum(-1)  # (B,)
    assert ((view_luma - image_luma).abs() < 0.3).float().mean() > 0.9


# ------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------


def test_affine_grid_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, 2, 3, generator=g)
    ours = ops.affine_grid(theta, 13, 21)
    theirs = F.affine_grid(theta, [6, 3, 13, 21], align_corners=False)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_identity_and_flip_matrices_are_exact() -> None:
    x = _images(4).float() / 255
    identity = torch.eye(3).expand(4, 3, 3)
    assert torch.allclose(ops.affine_batch(x, identity), x, atol=1e-5)
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0])).expand(4, 3, 3)
    assert torch.allclose(ops.affine_batch(x, flip), torch.flip(x, dims=[3]), atol=1e-5)
    vflip = torch.diag(torch.tensor([1.0, -1.0, 1.0])).expand(4, 3, 3)
    assert torch.allclose(ops.affine_batch(x, vflip), torch.flip(x, dims=[2]), atol=1e-5)


def test_integer_translation_shifts_pixels_and_pads_with_zero() -> None:
    x = _images(2, 16).float() / 255
    # Content moves right by 3 px: output(col) = input(col - 3), i.e. x_in = x_out - 3 * 2/16.
    theta = torch.eye(3).expand(2, 3, 3).clone()
    theta[:, 0, 2] = -3 * 2 / 16
    out = ops.affine_batch(x, theta)
    assert torch.allclose(out[..., 3:], x[..., :-3], atol=1e-5)
    assert out[..., :3].abs().max() < 1e-6


def _flip_shift_reference(x: torch.Tensor, params: StrongParams, fill: torch.Tensor):
    """Per-image loop (test only): flip, then move content by (dx, dy), fill the rest."""
    out = torch.empty_like(x)
    size = x.shape[-1]
    for i in range(x.shape[0]):
        image = torch.flip(x[i], dims=[2]) if params.flip[i] else x[i]
        dx, dy = (int(v) for v in params.shift[i])
        canvas = fill.view(3, 1, 1).expand(3, size, size).clone()
        src = image[:, max(0, -dy) : size - max(0, dy), max(0, -dx) : size - max(0, dx)]
        canvas[:, max(0, dy) : size - max(0, -dy), max(0, dx) : size - max(0, -dx)] = src
        out[i] = canvas
    return out


def test_strong_flip_and_crop_are_pixel_exact() -> None:
    images = _images(32)
    transform = StrongAugment(32, num_ops=0, cutout=False)
    params = transform.sample_params(32, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert params.shift.abs().max() <= 4 and params.shift.abs().max() > 0
    assert 0 < params.flip.sum() < 32
    out = _unnormalize(transform.apply(images, params))
    expected = _flip_shift_reference(images.float() / 255, params, torch.tensor(CIFAR10_MEAN))
    assert torch.allclose(out, expected, atol=1e-4)


def _forced(transform: StrongAugment, ops: list[str], magnitudes: list[float], batch: int):
    """Strong parameters with no flip, no crop, no cutout and the given op sequence."""
    params = transform.sample_params(batch, torch.device("cpu"), torch.Generator().manual_seed(0))
    params.flip[:] = False
    params.shift[:] = 0
    params.ops = torch.tensor([STRONG_OPS.index(op) for op in ops]).expand(batch, -1)
    params.magnitudes = torch.tensor(magnitudes).expand(batch, -1)
    params.cutout_side[:] = 0
    return params


@pytest.mark.parametrize("op", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y"])
def test_geometric_ops_compose_into_one_map(op: str) -> None:
    # op(+m) then op(-m) is the identity: only true if both fold into one resampling.
    images = _images(4)
    transform = StrongAugment(32, num_ops=2, cutout=False)
    params = _forced(transform, [op, op], [0.7, -0.7], 4)
    assert torch.allclose(transform.apply(images, params), normalize(images), atol=1e-4)


def test_translate_op_moves_by_its_magnitude() -> None:
    images = _images(3)
    transform = StrongAugment(32, num_ops=1, cutout=False)
    pixels = 3
    magnitude = pixels / (ops.MAX_TRANSLATE * 32)
    out = _unnormalize(transform.apply(images, _forced(transform, ["translate_x"], [magnitude], 3)))
    x = images.float() / 255
    assert torch.allclose(out[..., pixels:], x[..., :-pixels], atol=1e-4)
    assert torch.allclose(out[..., :pixels], MEAN.expand(3, 3, 32, pixels), atol=1e-4)


def test_geometry_runs_in_order_flip_then_ops() -> None:
    # Flip, then move right by 3 px (the other order would move the content left).
    images = _images(2)
    transform = StrongAugment(32, num_ops=1, cutout=False)
    params = _forced(transform, ["translate_x"], [3 / (ops.MAX_TRANSLATE * 32)], 2)
    params.flip[:] = True
    out = _unnormalize(transform.apply(images, params))
    flipped = torch.flip(images.float() / 255, dims=[3])
    assert torch.allclose(out[..., 3:], flipped[..., :-3], atol=1e-4)


def test_rotate_op_turns_by_its_angle() -> None:
    # A horizontal bar through the centre, rotated by 30 degrees, lies along the 30 degree line.
    size = 33
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    image[:, :, 16, :] = 255
    transform = StrongAugment(size, num_ops=1, cutout=False)
    out = _unnormalize(transform.apply(image, _forced(transform, ["rotate"], [1.0], 1)))[0, 0]
    bright = (out > 0.5).nonzero().float() - 16  # (n, 2) rows, cols about the centre
    bright = bright[bright[:, 1].abs() > 4]  # away from the centre, where the angle is defined
    angles = torch.rad2deg(torch.atan2(bright[:, 0], bright[:, 1])).remainder(180)
    assert len(angles) > 10
    assert ((angles - 30).abs() < 6).all() or ((angles - 150).abs() < 6).all()


def test_simclr_crops_stay_inside_the_image_with_paper_scale_and_ratio() -> None:
    transform = SimCLRAugment(32, crop_scale_min=0.2)
    params = transform.sample_params(2000, 32, 32, torch.device("cpu"), torch.Generator())
    theta = params.theta
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1]  # fractions of the side
    area = width * height
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 1 + 1e-5
    ratio = width / height
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert (theta[:, 0, 2].abs() + width <= 1 + 1e-5).all()  # window inside horizontally
    assert (theta[:, 1, 2].abs() + height <= 1 + 1e-5).all()
    flipped = (theta[:, 0, 0] < 0).float().mean()
    assert 0.4 < flipped < 0.6
    assert theta[:, 0, 1].abs().max() == 0 and theta[:, 1, 0].abs().max() == 0


def test_simclr_crop_of_a_flat_image_stays_flat() -> None:
    # Upsampling a crop at the image edge must not blend in black (or any padding).
    images = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    transform = SimCLRAugment(32, crop_scale_min=0.2, jitter_p=0.0, grayscale_p=0.0)
    out = _unnormalize(transform(images, torch.Generator().manual_seed(0)))
    assert torch.allclose(out, torch.full_like(out, 200 / 255), atol=1e-5)


# ------------------------------------------------------------------------------------------
# SimCLR colour: one composed affine map == the ops applied one by one
# ------------------------------------------------------------------------------------------


def _jitter_reference(x: torch.Tensor, params: SimCLRParams) -> torch.Tensor:
    """Sequential colour jitter + grayscale, one image at a time, no clamping (test only)."""
    yiq = torch.tensor(ops.RGB_TO_YIQ, dtype=torch.float64).float()
    yiq_inv = torch.linalg.inv(yiq)
    luma = torch.tensor(ops.LUMA)
    out = []
    for i in range(x.shape[0]):
        image = x[i]  # (3, H, W)
        brightness, contrast, saturation, hue = params.jitter[i].tolist()
        for op in params.order[i].tolist():
            gray = torch.einsum("c,chw->hw", luma, image)
            if op == 0:
                image = image * brightness
            elif op == 1:
                image = contrast * image + (1 - contrast) * gray.mean()
            elif op == 2:
                image = saturation * image + (1 - saturation) * gray
            else:
                y, i_, q = torch.einsum("kc,chw->khw", yiq, image)
                angle = 2 * math.pi * hue
                i_, q = (
                    i_ * math.cos(angle) - q * math.sin(angle),
                    i_ * math.sin(angle) + q * math.cos(angle),
                )
                image = torch.einsum("ck,khw->chw", yiq_inv, torch.stack([y, i_, q]))
        if params.grayscale[i]:
            image = torch.einsum("c,chw->hw", luma, image).expand(3, -1, -1)
        out.append(image)
    return torch.stack(out)


def test_simclr_colour_jitter_equals_sequential_reference() -> None:
    images = _images(24, size=12, seed=5)
    transform = SimCLRAugment(12)
    params = transform.sample_params(24, 12, 12, torch.device("cpu"), torch.Generator())
    params.theta = torch.eye(3).expand(24, 3, 3).clone()  # colour only
    # Force jitter everywhere with strong factors, keep the drawn orders and grayscale.
    g = torch.Generator().manual_seed(3)
    params.jitter = torch.stack(
        [
            0.6 + 0.8 * torch.rand(24, generator=g),
            0.6 + 0.8 * torch.rand(24, generator=g),
            0.6 + 0.8 * torch.rand(24, generator=g),
            0.2 * torch.rand(24, generator=g) - 0.1,
        ],
        dim=1,
    )
    assert len({tuple(o) for o in params.order.tolist()}) > 5  # many different orders
    out = _unnormalize(transform.apply(images, params))
    expected = _jitter_reference(images.float() / 255, params).clamp(0, 1)
    assert torch.allclose(out, expected, atol=2e-5)


def test_hue_rotation_keeps_greys_and_luma() -> None:
    transform = SimCLRAugment(32)
    grey = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    params = transform.sample_params(2, 32, 32, torch.device("cpu"), torch.Generator())
    params.theta = torch.eye(3).expand(2, 3, 3).clone()
    params.jitter = torch.tensor([[1.0, 1.0, 1.0, 0.1], [1.0, 1.0, 1.0, -0.07]])
    params.grayscale[:] = False
    out = _unnormalize(transform.apply(grey, params))
    assert torch.allclose(out, grey.float() / 255, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Strong-view colour ops against PIL
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_equalize_matches_pil(seed: int) -> None:
    for image in _pil_images(seed):
        ours = ops.equalize(_to_tensor(image))
        _assert_matches_pil(ours, ImageOps.equalize(Image.fromarray(image)), atol_levels=1e-3)


def test_equalize_leaves_flat_channels_alone() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[..., 0] = 77  # one level: identity in PIL
    image[..., 1] = np.arange(64).reshape(8, 8)
    ours = ops.equalize(_to_tensor(image))
    _assert_matches_pil(ours, ImageOps.equalize(Image.fromarray(image)), atol_levels=1e-3)
    assert torch.allclose(ours[0, 0], torch.full((8, 8), 77 / 255))


@pytest.mark.parametrize("seed", [0, 1])
def test_autocontrast_matches_pil(seed: int) -> None:
    for image in _pil_images(seed):
        ours = ops.autocontrast(_to_tensor(image))
        # PIL truncates its lookup table to int; we keep the exact value.
        _assert_matches_pil(ours, ImageOps.autocontrast(Image.fromarray(image)), atol_levels=1.0)
        assert ours.amin(dim=(2, 3)).max() == 0 and ours.amax(dim=(2, 3)).min() > 1 - 1e-6


@pytest.mark.parametrize("bits", [1, 4, 6, 8])
def test_posterize_matches_pil(bits: int) -> None:
    for image in _pil_images():
        ours = ops.posterize(_to_tensor(image), torch.tensor([bits]))
        _assert_matches_pil(ours, ImageOps.posterize(Image.fromarray(image), bits), 1e-3)


@pytest.mark.parametrize("threshold", [0, 90, 128, 200, 255])
def test_solarize_matches_pil(threshold: int) -> None:
    for image in _pil_images():
        ours = ops.solarize(_to_tensor(image), torch.tensor([threshold / 255]))
        _assert_matches_pil(ours, ImageOps.solarize(Image.fromarray(image), threshold), 1e-3)


ENHANCERS = {
    "brightness": (ops.brightness, ImageEnhance.Brightness),
    "color": (ops.color, ImageEnhance.Color),
    "contrast": (ops.contrast, ImageEnhance.Contrast),
    "sharpness": (ops.sharpness, ImageEnhance.Sharpness),
}


@pytest.mark.parametrize("name", sorted(ENHANCERS))
@pytest.mark.parametrize("factor", [0.1, 0.6, 1.5, 1.9])
def test_enhance_ops_match_pil(name: str, factor: float) -> None:
    ours_fn, pil_class = ENHANCERS[name]
    for image in _pil_images():
        ours = ours_fn(_to_tensor(image), torch.tensor([factor]))
        theirs = pil_class(Image.fromarray(image)).enhance(factor)
        # PIL rounds its intermediate (grey / blurred) image to uint8 levels.
        _assert_matches_pil(ours, theirs, atol_levels=2.0)


@pytest.mark.parametrize("op", ["solarize", "posterize", "equalize", "sharpness", "contrast"])
def test_strong_view_dispatches_each_op_to_the_samples_that_drew_it(op: str) -> None:
    images = _images(6)
    transform = StrongAugment(32, num_ops=2, cutout=False)
    params = _forced(transform, ["identity", op], [0.0, 0.8], 6)
    # Every other sample draws the op in round 2; the rest keep the identity.
    params.ops = params.ops.clone()
    params.ops[1::2, 1] = STRONG_OPS.index("identity")
    out = _unnormalize(transform.apply(images, params))
    x = images.float() / 255
    expected = ops.COLOUR_OPS[STRONG_OPS.index(op)](x[0::2], torch.full((3,), 0.8))
    assert torch.allclose(out[0::2], expected, atol=1e-4)
    assert torch.allclose(out[1::2], x[1::2], atol=1e-4)
    assert not torch.allclose(out[0::2], x[0::2], atol=1e-2)


def test_posterize_bits_cover_eight_to_four() -> None:
    bits = ops.posterize_bits(torch.linspace(-1, 1, 1001))
    assert set(bits.tolist()) == {4, 5, 6, 7, 8}


# ------------------------------------------------------------------------------------------
# Cutout
# ------------------------------------------------------------------------------------------


def test_cutout_zeroes_exactly_one_square() -> None:
    x = torch.rand(3, 3, 16, 16) + 1.0  # no zeros to begin with
    center = torch.tensor([[8, 8], [0, 15], [5, 3]])
    side = torch.tensor([6, 4, 0])
    out = ops.cutout(x, center, side)
    zero = out == 0
    assert zero[0].all(dim=0)[5:11, 5:11].all() and zero[0].sum() == 3 * 36
    assert zero[1].all(dim=0)[0:2, 13:16].all() and zero[1].sum() == 3 * 6  # clipped at border
    assert not zero[2].any()
    assert torch.equal(out[~zero], x[~zero])


def test_strong_view_cutout_holes_are_squares_up_to_half_the_side() -> None:
    images = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)  # white: no op makes it 0
    transform = StrongAugment(32, num_ops=0, cutout=True)
    params = transform.sample_params(64, torch.device("cpu"), torch.Generator().manual_seed(2))
    params.shift[:] = 0
    out = transform.apply(images, params)
    hole = (out == 0).all(dim=1)  # (B, H, W)
    assert params.cutout_side.min() >= 1 and params.cutout_side.max() <= 16
    assert params.cutout_side.float().std() > 2  # sizes vary per sample
    for i in range(64):
        rows = hole[i].any(dim=1).nonzero().flatten()
        cols = hole[i].any(dim=0).nonzero().flatten()
        # The hole is the rectangle rows x cols (a square unless clipped by the border).
        assert hole[i].sum() == len(rows) * len(cols) > 0
        assert len(rows) <= params.cutout_side[i] and len(cols) <= params.cutout_side[i]
