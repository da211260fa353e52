"""The typed config: presets, readable errors, cluster counts, JSON round trip, immutability."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from scan_engine.config import PRESETS, ConfigError, ScanConfig, make_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate(preset: str) -> None:
    config = make_config(preset)
    assert isinstance(config, ScanConfig)
    assert config.preset == preset
    assert config.cluster_counts() == [config.num_clusters]


def test_expected_presets_exist() -> None:
    assert {"paper", "gpu", "cpu", "tiny"} <= set(PRESETS)


def test_paper_defaults() -> None:
    config = make_config("paper")
    assert config.pretext.epochs == 500 and config.pretext.temperature == 0.1
    assert config.scan.entropy_weight == 5.0 and config.scan.num_neighbors == 20
    assert config.selflabel.threshold == 0.99


def test_overrides_merge_into_preset() -> None:
    tiny = make_config("tiny")
    config = make_config("tiny", num_clusters=5, scan={"epochs": 3})
    assert config.num_clusters == 5
    assert config.scan.epochs == 3
    # The rest of the preset's nested section survives a partial override.
    assert config.scan.num_heads == tiny.scan.num_heads
    assert config.scan.batch_size == tiny.scan.batch_size
    assert config.pretext == tiny.pretext


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'fast'") as caught:
        make_config("fast")
    assert "tiny" in str(caught.value)  # lists the choices


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_cluster": 3}, "num_cluster"),
        ({"scan": {"epoch": 3}}, "scan.epoch"),
        ({"pretext": {"temprature": 0.2}}, "pretext.temprature"),
        ({"selflabel": {"treshold": 0.9}}, "selflabel.treshold"),
    ],
)
def test_unknown_key_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config("tiny", **overrides)
    message = str(caught.value)
    assert field in message
    assert "extra" in message.lower() or "not permitted" in message.lower()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_clusters": 1}, "num_clusters"),
        ({"image_size": 4}, "image_size"),
        ({"backbone_width": 0}, "backbone_width"),
        ({"backbone": "vit"}, "backbone"),
        ({"time_budget_s": 0}, "time_budget_s"),
        ({"pretext": {"temperature": 0}}, "pretext.temperature"),
        ({"scan": {"entropy_weight": -1}}, "scan.entropy_weight"),
        ({"scan": {"num_heads": 0}}, "scan.num_heads"),
        ({"selflabel": {"threshold": 1.0}}, "selflabel.threshold"),
        ({"overcluster": 0.5}, "overcluster"),
        ({"overcluster": [1, 20]}, "overcluster"),
        ({"overcluster": []}, "overcluster"),
    ],
)
def test_out_of_range_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config("tiny", **overrides)
    assert field in str(caught.value)


def test_config_error_is_a_value_error() -> None:
    # Callers (CLI, API) may catch ValueError; ConfigError must not escape as ValidationError.
    with pytest.raises(ValueError):
        make_config("tiny", num_clusters=0)


@pytest.mark.parametrize(
    ("num_clusters", "overcluster", "expected"),
    [
        (10, None, [10]),
        (10, 1, [10]),
        (10, 2, [10, 20]),
        (10, 2.0, [10, 20]),
        (10, 1.5, [10, 15]),
        (3, 1.5, [3, 5]),  # 4.5 rounds up
        (4, 1.5, [4, 6]),
        (10, [20, 30], [10, 20, 30]),
        (10, [30, 10, 20, 20], [10, 20, 30]),  # sorted, unique, K always included
        (10, [5], [5, 10]),
    ],
)
def test_cluster_counts(num_clusters: int, overcluster: Any, expected: list[int]) -> None:
    config = make_config("tiny", num_clusters=num_clusters, overcluster=overcluster)
    assert config.cluster_counts() == expected


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"overcluster": 2},
        {"overcluster": 1.5},
        {"overcluster": [20, 30]},
        {"backbone_weights": "/models/moco.pth", "time_budget_s": 120.5, "backbone": "resnet50"},
        {"selflabel": {"enabled": False}, "scan": {"update_backbone": False}},
    ],
)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_json_round_trip(preset: str, overrides: dict[str, Any]) -> None:
    if "backbone_weights" in overrides:  # a ResNet state dict is the other route's
        overrides = {**overrides, "pretrained_backbone": None}
    config = make_config(preset, **overrides)
    data = config.to_json_dict()
    # Really JSON: survives a trip through text.
    restored = ScanConfig.model_validate(json.loads(json.dumps(data)))
    assert restored == config
    assert restored.cluster_counts() == config.cluster_counts()
    assert ScanConfig.model_validate(data) == config


def test_frozen() -> None:
    config = make_config("tiny")
    with pytest.raises(ValidationError):
        config.num_clusters = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.scan.epochs = 1  # type: ignore[misc]
    assert config.num_clusters == 10 and config.scan.epochs == make_config("tiny").scan.epochs


def test_pretrained_preset_runs_the_bundled_backbone_at_its_own_size() -> None:
    config = make_config("pretrained")
    assert config.pretrained_backbone == "efficientnet_lite0" and config.route == "pretrained"
    assert config.image_size == 224
    assert make_config("cpu").route == "scratch" and make_config("cpu").image_size == 32


def test_image_size_follows_the_chosen_backbone() -> None:
    from scan_engine.backbones import get_spec

    config = make_config("pretrained", pretrained_backbone="dino_vits16")
    assert config.image_size == get_spec("dino_vits16").input_size
    # A scratch preset given a backbone becomes the pretrained route at the backbone's size.
    assert make_config("tiny", pretrained_backbone="dino_vits16").image_size == 224
    # A convolutional backbone may run at another size when asked (small photos, a faster run).
    assert make_config("pretrained", image_size=160).image_size == 160


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"pretrained_backbone": "resnet9000"}, "unknown backbone 'resnet9000'; known:"),
        ({"pretrained_backbone": "dinov2_vits14", "image_size": 64}, "runs only at 224 px"),
        ({"pretrained_backbone": "efficientnet_lite0", "backbone_weights": "r18.pt"}, "two routes"),
    ],
)
def test_pretrained_route_refuses_what_cannot_run(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        make_config("pretrained", **overrides)
    if words.startswith("unknown"):
        assert "efficientnet_lite0" in str(caught.value)  # the known names are listed
