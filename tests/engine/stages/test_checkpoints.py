"""The run loop's checkpoints: fingerprints chain stage to stage, a checkpoint is reused only
for the same collection and settings, torn files are recomputed; the stage list and names."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from scan_engine import pipeline
from scan_engine.config import make_config
from scan_engine.pipeline import Checkpoints, chain_fingerprint, collection_key, stages_for
from scan_engine.stages import STAGE_NAMES

from .conftest import CLASSES, FAST


def _fingerprints(config, collection) -> dict[str, str]:
    fingerprint = collection_key(collection)
    chain = {}
    for stage in stages_for(config):
        fingerprint = chain_fingerprint(fingerprint, stage.settings(config))
        chain[stage.name] = fingerprint
    return chain


def test_a_change_invalidates_its_stage_and_every_later_one(colour_collection) -> None:
    base = _fingerprints(make_config("tiny", num_clusters=CLASSES), colour_collection)
    scan = _fingerprints(
        make_config("tiny", num_clusters=CLASSES, scan={"epochs": 99}), colour_collection
    )
    assert [scan[s] == base[s] for s in base] == [True, True, False, False, False]
    pretext = _fingerprints(
        make_config("tiny", num_clusters=CLASSES, pretext={"epochs": 99}), colour_collection
    )
    assert all(pretext[s] != base[s] for s in base)
    selflabel = _fingerprints(
        make_config("tiny", num_clusters=CLASSES, selflabel={"epochs": 99}), colour_collection
    )
    assert [selflabel[s] == base[s] for s in base] == [True, True, True, False, False]
    # Run-only settings change nothing a checkpoint holds.
    budget = _fingerprints(
        make_config("tiny", num_clusters=CLASSES, time_budget_s=60, top_members=3),
        colour_collection,
    )
    assert budget == base
    # Other images: nothing is reused.
    fewer = _fingerprints(
        make_config("tiny", num_clusters=CLASSES), colour_collection.subset(list(range(30)))
    )
    assert all(fewer[s] != base[s] for s in base)


def test_checkpoints_load_only_their_fingerprint(tmp_path) -> None:
    checkpoints = Checkpoints(tmp_path)
    config = make_config("tiny")
    checkpoints.save("mine", "abc", {"neighbors": torch.arange(3)}, config)
    assert torch.equal(checkpoints.load("mine", "abc")["neighbors"], torch.arange(3))
    assert checkpoints.load("mine", "other") is None
    assert checkpoints.load("scan", "abc") is None
    (tmp_path / "scan.pt").write_bytes(b"torn")
    assert checkpoints.load("scan", "abc") is None
    assert not list(tmp_path.glob("*.tmp"))


def test_a_rerun_restores_every_stage_and_a_changed_one_recomputes(
    colour_collection, tmp_path
) -> None:
    config = make_config("tiny", num_clusters=CLASSES, **FAST)
    first = pipeline.run(colour_collection, config, tmp_path)
    log = tmp_path / "log.jsonl"
    lines = log.read_text().splitlines()
    again = pipeline.run(colour_collection, config, tmp_path)
    assert log.read_text().splitlines() == lines  # nothing trained again
    for a, b in zip(first.results, again.results, strict=True):
        assert (a.assignments == b.assignments).all()
    changed = config.model_copy(update={"scan": config.scan.model_copy(update={"epochs": 4})})
    pipeline.run(colour_collection, changed, tmp_path)
    stages = {json.loads(line)["stage"] for line in log.read_text().splitlines()[len(lines) :]}
    assert "pretext" not in stages and "scan" in stages


def test_stage_lists_and_names() -> None:
    known = make_config("tiny", num_clusters=3)
    open_k = make_config("tiny", num_clusters_range=[2, 4])
    pretrained = make_config("pretrained", num_clusters_range=[2, 4])
    assert [s.name for s in stages_for(known)] == [
        "pretext",
        "mine",
        "scan",
        "selflabel",
        "finalize",
    ]
    assert [s.name for s in stages_for(open_k)] == [n for n in STAGE_NAMES if n != "features"]
    assert [s.name for s in stages_for(pretrained)] == [n for n in STAGE_NAMES if n != "pretext"]
    # The service reads the names without loading torch.
    code = "import sys, scan_engine.stages; print('torch' in sys.modules)"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.strip() == "False"
