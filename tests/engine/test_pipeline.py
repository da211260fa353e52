"""End to end: the whole pipeline on a generated collection of real image files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scan_engine import pipeline
from scan_engine.config import ConfigError, make_config
from scan_engine.data import load_folder
from scan_engine.predict import load_model
from scan_engine.results import StopRequested
from scan_engine.sample_data import make_shapes_collection

pytestmark = pytest.mark.slow

CLASSES = 4


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_collection(root, classes=CLASSES, per_class=50, image_size=48, seed=1)


@pytest.fixture(scope="module")
def collection(shapes_folder: Path):
    return load_folder(shapes_folder, image_size=32, labels_from_folders=True)


@pytest.fixture(scope="module")
def finished_run(collection, tmp_path_factory: pytest.TempPathFactory):
    work_dir = tmp_path_factory.mktemp("work")
    config = make_config("tiny", num_clusters=CLASSES, overcluster=[8])
    events = []
    result = pipeline.run(collection, config, work_dir, progress=events.append)
    return config, work_dir, result, events


def test_recovers_the_classes(finished_run, collection) -> None:
    _, _, result, _ = finished_run
    main = result.result_for(CLASSES)
    assert main.metrics is not None
    final = main.metrics.get("selflabel") or main.metrics["scan"]
    assert final["acc"] >= 0.85, result.report["metrics"]
    assert result.metrics["neighbor_purity"]["1"] >= 0.8
    # The k-means baseline is reported alongside, from the same pretext features: the shapes
    # separate, so it is well above chance (1 / CLASSES).
    assert result.report["metrics"]["kmeans"]["acc"] >= 0.6


def test_every_image_is_assigned_once_per_cluster_count(finished_run, collection) -> None:
    _, _, result, _ = finished_run
    assert [r.num_clusters for r in result.results] == [CLASSES, 8]
    for clustering in result.results:
        assert clustering.assignments.shape == (len(collection),)
        assert clustering.assignments.min() >= 0
        assert clustering.assignments.max() < clustering.num_clusters
        assert np.all((clustering.confidence > 0) & (clustering.confidence <= 1))
        sizes = [c.size for c in clustering.clusters]
        assert sum(sizes) == len(collection)
        for summary in clustering.clusters:
            if summary.size == 0:
                assert summary.prototype is None
                continue
            assert clustering.assignments[summary.prototype] == summary.index
            assert all(clustering.assignments[i] == summary.index for i in summary.top_members)
            confidences = clustering.confidence[summary.top_members]
            assert np.all(np.diff(confidences) <= 1e-6), "top members are most confident first"
    # Overclustering is scored by majority vote.
    assert result.result_for(8).metrics["scan"]["method"] == "majority_vote"
    assert result.embedding_2d is not None and result.embedding_2d.shape == (len(collection), 2)


def test_progress_reports_every_stage_in_order(finished_run) -> None:
    _, _, _, events = finished_run
    stages = [e.stage for e in events]
    assert stages[0] == "pretext" and stages[-1] == "finalize"
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["pretext", "mine", "scan", "selflabel", "finalize"]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any(e.eta_s is not None for e in events)


def test_checkpoints_and_report_are_written(finished_run) -> None:
    _, work_dir, result, _ = finished_run
    for stage in ("pretext", "mine", "scan", "selflabel"):
        assert (work_dir / f"{stage}.pt").is_file()
    assert Path(result.model_path).is_file()
    report = json.loads((work_dir / "report.json").read_text())
    assert set(report["timings_s"]) >= {"pretext", "mine", "scan", "selflabel", "finalize"}
    assert report["config"]["preset"] == "tiny"
    lines = (work_dir / "log.jsonl").read_text().splitlines()
    assert {json.loads(line)["stage"] for line in lines} >= {"pretext", "scan", "selflabel"}


def test_rerun_resumes_from_checkpoints(finished_run, collection, tmp_path: Path) -> None:
    config, work_dir, result, _ = finished_run
    copy = tmp_path / "work"
    shutil.copytree(work_dir, copy)
    log_before = (copy / "log.jsonl").read_text()
    again = pipeline.run(collection, config, copy)
    # Nothing was trained again: no new per-epoch lines, identical assignments.
    assert (copy / "log.jsonl").read_text() == log_before
    for first, second in zip(result.results, again.results, strict=True):
        np.testing.assert_array_equal(first.assignments, second.assignments)


def test_stop_flag_stops_and_the_rerun_resumes(finished_run, collection, tmp_path) -> None:
    config, work_dir, _, _ = finished_run
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(work_dir / "pretext.pt", work / "pretext.pt")  # as if pretext had finished

    def stop_in_scan(event_stage: list[str]) -> bool:
        return bool(event_stage) and event_stage[-1] == "scan"

    seen: list[str] = []
    with pytest.raises(StopRequested):
        pipeline.run(
            collection,
            config,
            work,
            progress=lambda e: seen.append(e.stage),
            should_stop=lambda: stop_in_scan(seen),
        )
    assert (work / "mine.pt").is_file() and not (work / "scan.pt").exists()
    log = work / "log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    assert not any(json.loads(line)["stage"] == "pretext" for line in lines), "pretext resumed"

    # The rerun resumes: pretext and mine come from their checkpoints, scan onwards trains.
    def written(path: Path) -> tuple[int, int]:  # a rewrite (write, then rename) changes both
        return path.stat().st_ino, path.stat().st_mtime_ns

    mined = written(work / "mine.pt")
    result = pipeline.run(collection, config, work)
    assert written(work / "mine.pt") == mined, "mine was recomputed"
    trained = {json.loads(line)["stage"] for line in log.read_text().splitlines()[len(lines) :]}
    assert "pretext" not in trained and "scan" in trained
    assert (work / "scan.pt").is_file() and Path(result.model_path).is_file()
    assert [r.num_clusters for r in result.results] == [CLASSES, 8]


def test_pretrained_backbone_route(finished_run, collection, tmp_path) -> None:
    """A saved backbone (here: the pretext one) is loaded, frozen, and heads train on features."""
    _, work_dir, _, _ = finished_run
    saved = torch.load(work_dir / "pretext.pt", weights_only=False)["payload"]["model"]
    weights = tmp_path / "backbone.pt"
    torch.save(
        {
            f"module.encoder_q.{k[len('backbone.') :]}": v
            for k, v in saved.items()
            if k.startswith("backbone.")
        },
        weights,
    )
    config = make_config(
        "tiny",
        num_clusters=CLASSES,
        backbone_weights=str(weights),
        scan={"epochs": 40},
        selflabel={"epochs": 10},
    )
    result = pipeline.run(collection, config, tmp_path / "work")
    assert "pretext" not in result.throughput
    final = result.result_for(CLASSES).metrics
    assert max(final["scan"]["acc"], (final.get("selflabel") or {"acc": 0})["acc"]) >= 0.8
    # The heads read scaled unit-norm features; the saved model applies the same scale.
    predictor = load_model(result.model_path)
    assert predictor.model.head_input_scale == config.scan.feature_scale != 1.0
    predicted = predictor.predict(collection.images)
    assert np.mean(predicted.assignments == result.result_for(CLASSES).assignments) >= 0.99


def test_other_scan_settings_reuse_the_pretext(finished_run, collection, tmp_path) -> None:
    config, work_dir, _, _ = finished_run
    work = tmp_path / "work"
    shutil.copytree(work_dir, work)
    lines_before = len((work / "log.jsonl").read_text().splitlines())
    changed = config.model_copy(
        update={"scan": config.scan.model_copy(update={"epochs": config.scan.epochs + 2})}
    )
    pipeline.run(collection, changed, work)
    new_lines = (work / "log.jsonl").read_text().splitlines()[lines_before:]
    stages = {json.loads(line)["stage"] for line in new_lines}
    assert "pretext" not in stages
    assert {"scan", "selflabel"} <= stages


def test_impossible_requests_are_config_errors(collection, tmp_path) -> None:
    with pytest.raises(ConfigError, match="clusters"):
        pipeline.run(collection, make_config("tiny", num_clusters=len(collection) + 1), tmp_path)
    with pytest.raises(ConfigError, match="px"):
        pipeline.run(collection, make_config("tiny", image_size=64), tmp_path)


def test_command_line_writes_every_output(shapes_folder: Path, tmp_path: Path) -> None:
    from scan_engine.cli.cluster import main

    source = tmp_path / "input"
    shutil.copytree(shapes_folder, source)
    (source / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = main(
        [
            str(source),
            "--clusters",
            str(CLASSES),
            "--overcluster",
            "2",
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--labels-from-folders",
            "--quiet",
            "--set",
            "pretext.epochs=2",
            "--set",
            "scan.epochs=2",
            "--set",
            "selflabel.epochs=1",
        ]
    )
    assert code == 0
    images = sorted(
        p.relative_to(shapes_folder).as_posix() for p in shapes_folder.rglob("*") if p.is_file()
    )
    for name, count in (("assignments.csv", CLASSES), ("assignments_c8.csv", 8)):
        with (out / name).open() as f:
            rows = list(csv.DictReader(f))
        assert sorted(r["path"] for r in rows) == images
        assert {int(r["cluster"]) for r in rows} <= set(range(count))
    clusters = json.loads((out / "clusters.json").read_text())
    assert [c["num_clusters"] for c in clusters] == [CLASSES, 8]
    for result_set in clusters:
        for cluster in result_set["clusters"]:
            if cluster["size"]:
                with Image.open(out / cluster["prototype_file"]) as prototype:
                    assert min(prototype.size) >= 48  # the original, not the 32 px copy
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["scan"]["acc"] > 0
    assert report["skipped_count"] == 1
    assert [entry["path"] for entry in report["skipped"]] == ["notes.txt"]
    assert report["skipped"][0]["reason"]
    assignments = json.loads((out / "assignments.json").read_text())
    assert len(assignments[0]["assignments"]) == len(images)


def test_command_line_rejects_bad_input(tmp_path: Path, capsys) -> None:
    from scan_engine.cli.cluster import main

    assert main([str(tmp_path / "missing"), "--clusters", "3", "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main([str(tmp_path), "--clusters", "3", "--quiet", "--set", "scan.epoch=3"]) == 2
    assert "epoch" in capsys.readouterr().err
