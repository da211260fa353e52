"""The pretrained route: the features stage with the bundled EfficientNet-Lite0 weights on the
generated shapes (at a small image size), the feature cache reused by a run with another K, and
prediction from a model.pt that references the backbone instead of copying it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scan_engine import pipeline
from scan_engine.config import make_config
from scan_engine.data import from_arrays, load_folder
from scan_engine.predict import MODEL_FORMAT_VERSION, load_model
from scan_engine.sample_data import make_shapes_collection, render_shape_image
from scan_engine.sources import ImageSources

pytestmark = pytest.mark.slow

CLASSES = 4
# Small enough for a shared 2-core CPU; the backbone's own 224 px is the preset's default.
FAST = {"image_size": 64, "scan": {"epochs": 20}, "selflabel": {"epochs": 5}}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_collection(root, classes=CLASSES, per_class=10, image_size=48, seed=1)


@pytest.fixture(scope="module")
def first_run(shapes: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("work")
    config = make_config("pretrained", num_clusters=CLASSES, **FAST)
    sources = ImageSources.from_folder(shapes, labels_from_folders=True)
    return sources, work, config, pipeline.run(sources, config, work)


def test_the_pretrained_preset_clusters_the_shapes(first_run) -> None:
    _, work, config, result = first_run
    assert config.pretrained_backbone == "efficientnet_lite0" and config.fixed_backbone
    assert make_config("pretrained").image_size == 224  # the backbone's input size
    report = result.report
    assert report["route"] == "pretrained"
    backbone = report["backbone"]
    assert backbone["name"] == "efficientnet_lite0" and len(backbone["weights_sha256"]) == 64
    assert backbone["image_size"] == 64 and backbone["from_cache"] is False
    assert backbone["images_per_s"] > 0
    assert "pretext" not in report["timings_s"] and "features" in report["timings_s"]
    main = result.result_for(CLASSES)
    assert main.assignments.shape == (CLASSES * 10,)
    final = main.metrics.get("selflabel") or main.metrics["scan"]
    assert max(main.metrics["scan"]["acc"], final["acc"]) >= 0.7, report["metrics"]
    assert report["metrics"]["kmeans"]["acc"] >= 0.7  # ImageNet features separate the shapes
    assert list((work / "features").glob("*.npz")), "features were cached"
    # Self-labeling is off in the preset, so no augmented view was embedded (one pass per image).
    assert "self-labeling disabled by the config" in report["notes"], report["notes"]
    assert [p.name for p in (work / "features").glob("*.npz")][0].split("-")[-2] == "v0"


def test_another_k_reuses_the_cached_features(first_run) -> None:
    sources, work, config, _ = first_run
    again = pipeline.run(sources, config.model_copy(update={"num_clusters": 3}), work)
    assert again.report["backbone"]["from_cache"] is True
    assert again.metrics["features"]["from_cache"] is True
    assert [r.num_clusters for r in again.results] == [3]


def test_prediction_from_the_referencing_model_file(first_run, shapes: Path, tmp_path) -> None:
    sources, work, config, result = first_run
    # The second test may have replaced model.pt: train K = CLASSES again from checkpoints.
    result = pipeline.run(sources, config, work)
    saved = torch.load(result.model_path, weights_only=True)
    assert saved["format_version"] == MODEL_FORMAT_VERSION == 5
    reference = saved["backbone_reference"]
    assert reference["name"] == "efficientnet_lite0"
    assert reference["weights_sha256"] == result.report["backbone"]["weights_sha256"]
    assert reference["preprocessing"]["input_size"] == 64
    assert not any(key.startswith("backbone.") for key in saved["state_dict"])  # not copied
    predictor = load_model(result.model_path)
    _, logits = predictor.features_and_logits_of_sources(sources)
    predicted = logits[CLASSES].argmax(1).numpy()
    np.testing.assert_array_equal(predicted, result.result_for(CLASSES).assignments)
    # A decoded collection works too (any size: the backbone's preprocessing resizes it).
    decoded = load_folder(shapes, image_size=48)
    assert decoded.ids == sources.ids
    by_pixels = predictor.predict(decoded, num_clusters=CLASSES)
    assert np.mean(by_pixels.assignments == predicted) >= 0.95
    assert by_pixels.outlier is not None and by_pixels.outlier.mean() <= 0.2
    # A shape and colour never seen in training (class 4 of the generator: a magenta ring).
    rings = np.stack(
        [render_shape_image(4, 48, np.random.default_rng([7, 4, i])) for i in range(8)]
    )
    unseen = predictor.predict(from_arrays(rings, image_size=48), num_clusters=CLASSES)
    assert unseen.outlier is not None and unseen.distance is not None
    # Rings lie farther out than nearly every training image. Only some pass the radius: with 40
    # training images its 99th percentile is their largest neighbour distance (3 of 8 here).
    assert np.median(unseen.distance) > np.quantile(by_pixels.distance, 0.9), unseen.distance
    assert unseen.outlier.any(), unseen.distance
