"""scan-bench: every mode prints one JSON line carrying the figures benchmarks/README.md quotes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scan_engine.cli import bench
from scan_engine.data import load_folder
from scan_engine.sample_data import make_shapes_collection


def _bench(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert bench.main(list(args)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "one JSON line per command"
    line = json.loads(lines[0])
    assert {"machine", "runs", "peak_rss_mb", "config"} <= set(line)
    assert line["machine"]["cores"] >= 1 and line["machine"]["torch"]
    assert isinstance(line["machine"]["native_bf16"], bool) and line["machine"]["cpu_family_model"]
    return line


@pytest.fixture(scope="module")
def shapes_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_shapes_collection(tmp_path_factory.mktemp("shapes"), classes=3, per_class=40)
    collection = load_folder(root, image_size=32, labels_from_folders=True)
    path = tmp_path_factory.mktemp("npz") / "shapes.npz"
    np.savez(
        path,
        images=collection.images.permute(0, 2, 3, 1).numpy(),  # (N, H, W, 3) uint8, as the data
        labels=np.asarray(collection.labels),
        class_names=np.asarray(collection.class_names),
    )
    return path


def test_knn_is_timed_on_each_repeat(capsys) -> None:
    line = _bench(capsys, "--stage", "knn", "--knn-n", "300", "--knn-dim", "16", "--repeat", "3")
    assert len(line["runs"]) == 3
    assert all(run["n"] == 300 and run["k"] == 20 and run["knn_s"] > 0 for run in line["runs"])
    assert line["median_knn_s"] == pytest.approx(
        sorted(r["knn_s"] for r in line["runs"])[1], abs=1e-3
    )


@pytest.mark.parametrize(
    ("stage", "preset"),
    [
        ("pretext", "tiny"),
        ("scan", "tiny"),
        ("selflabel", "tiny"),
        ("scan", "cpu"),
        ("selflabel", "cpu"),
    ],
)
def test_training_stages_report_steady_state_images_per_second(capsys, stage, preset) -> None:
    line = _bench(capsys, "--stage", stage, "--preset", preset, "--steps", "2")
    run = line["runs"][0]
    assert run["steps"] == 3  # the timed steps plus the excluded warm-up step
    assert run["images_per_s"] > 0 and line["median_images_per_s"] == pytest.approx(
        run["images_per_s"], rel=1e-3
    )


def test_memory_reports_the_collection_held_as_uint8(capsys, shapes_npz: Path) -> None:
    line = _bench(capsys, "--stage", "memory", "--data", str(shapes_npz), "--memory-n", "100")
    run = line["runs"][0]
    assert run["n"] == 100 and run["collection_mb"] == pytest.approx(100 * 3 * 32 * 32 / 2**20)
    assert run["peak_rss_mb"] >= run["peak_rss_mb_before"] > 0


def test_a_full_run_reports_every_stage_and_keeps_its_work_dir(
    capsys, shapes_npz: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    line = _bench(
        capsys, "--data", str(shapes_npz), "--preset", "tiny", "--clusters", "3",
        "--work-dir", str(work),
    )  # fmt: skip
    run = line["runs"][0]
    assert run["images"] == 120
    metrics = run["metrics"]
    assert 0 <= metrics["kmeans"]["acc"] <= 1 and 0 <= metrics["scan"]["acc"] <= 1
    if metrics.get("selflabel") is not None:
        assert 0 <= metrics["selflabel"]["acc"] <= 1
    else:  # the SCAN result was kept: the line says why
        assert any("self-labeling" in note for note in run["notes"])
    assert set(run["timings_s"]) >= {"pretext", "mine", "scan", "selflabel", "total"}
    assert run["images_per_s"]["pretext"] > 0 and run["neighbor_purity"]
    assert (work / "pretext.pt").is_file() and (work / "report.json").is_file()
