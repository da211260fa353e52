"""Choosing K without labels, and merging clusters: the score on hand-made predictions, the
candidate heads on separable features, the config, and the pipeline on a generated collection."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from scan_engine import metrics
from scan_engine.config import ConfigError, default_cluster_range, make_config
from scan_engine.model_selection import (
    KSelection,
    merge_groups,
    merge_probabilities,
    neighbor_agreement,
    neighbor_coassignment,
    score_candidate,
    select_num_clusters,
    train_candidate_heads,
)
from scan_engine.neighbors import knn

GROUPS, PER_GROUP = 4, 30


def _blobs(dim: int = 16, spread: float = 0.15, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """GROUPS tight blobs on the unit sphere: (features (N, D) unit rows, labels (N,))."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(GROUPS, dim, generator=generator), dim=1)
    labels = np.repeat(np.arange(GROUPS), PER_GROUP)
    noise = spread * torch.randn(len(labels), dim, generator=generator)
    features = torch.nn.functional.normalize(centres[labels] + noise, dim=1)
    return features, labels


def _one_hot(assignments: np.ndarray, num_clusters: int, sharpness: float = 0.97) -> torch.Tensor:
    """(N, C) confident probabilities: `sharpness` on the assigned cluster, the rest spread."""
    rest = (1 - sharpness) / (num_clusters - 1)
    probabilities = torch.full((len(assignments), num_clusters), rest, dtype=torch.float64)
    probabilities[torch.arange(len(assignments)), torch.from_numpy(assignments)] = sharpness
    return probabilities


@pytest.fixture(scope="module")
def blobs() -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    features, labels = _blobs()
    neighbors, _ = knn(features.numpy(), 5)
    return features, labels, torch.from_numpy(neighbors)


def test_agreement_is_one_for_consistent_predictions_and_chance_is_the_mean_square(
    blobs,
) -> None:
    features, labels, neighbors = blobs
    agreement, chance = neighbor_agreement(_one_hot(labels, GROUPS, sharpness=1.0), neighbors)
    assert agreement == pytest.approx(1.0)
    assert chance == pytest.approx(1 / GROUPS)  # four equal groups
    score = score_candidate(_one_hot(labels, GROUPS, sharpness=1.0), neighbors, features)
    assert score.consistency == pytest.approx(1.0)
    assert score.balance == pytest.approx(1.0)
    assert score.small_clusters == 0 and score.used_clusters == GROUPS


def test_the_score_prefers_the_true_number_of_groups(blobs) -> None:
    features, labels, neighbors = blobs
    split = labels.copy()
    # C = 6: groups 0 and 1 cut in halves by image order, which their neighbours do not follow.
    split[(labels == 0) & (np.arange(len(labels)) % 2 == 1)] = 4
    split[(labels == 1) & (np.arange(len(labels)) % 2 == 1)] = 5
    probabilities = {
        2: _one_hot(labels // 2, 2),  # two pairs of groups merged
        3: _one_hot(np.minimum(labels, 2), 3),  # groups 2 and 3 merged
        GROUPS: _one_hot(labels, GROUPS),
        6: _one_hot(split, 6),
    }
    selection = select_num_clusters(probabilities, neighbors, features)
    assert selection.chosen == GROUPS
    scores = {c.num_clusters: c for c in selection.candidates}
    assert list(scores) == [2, 3, GROUPS, 6]
    # Merging groups costs silhouette; splitting them costs neighbour consistency.
    assert scores[2].silhouette < scores[GROUPS].silhouette
    assert scores[6].consistency < scores[GROUPS].consistency
    assert scores[GROUPS].score == max(c.score for c in selection.candidates)
    saved = selection.to_json()
    assert saved["chosen"] == GROUPS and "silhouette" in saved["rule"]
    assert KSelection.from_json(saved).chosen == GROUPS
    assert [c["num_clusters"] for c in saved["candidates"]] == [2, 3, GROUPS, 6]


def test_empty_and_tiny_clusters_are_penalised(blobs) -> None:
    features, labels, neighbors = blobs
    full = score_candidate(_one_hot(labels, GROUPS), neighbors, features)
    # Five clusters asked, the fifth left empty: same partition, one cluster too many.
    sparse = score_candidate(_one_hot(labels, 5), neighbors, features)
    assert sparse.used_clusters == GROUPS and sparse.small_clusters == pytest.approx(1 / 5)
    assert sparse.balance < 1.0
    assert sparse.score < full.score - 0.2


def test_one_cluster_holding_everything_scores_worst(blobs) -> None:
    features, labels, neighbors = blobs
    collapsed = score_candidate(_one_hot(np.zeros_like(labels), GROUPS), neighbors, features)
    assert collapsed.silhouette == -1.0 and collapsed.used_clusters == 1
    assert collapsed.score < 0


def test_candidate_heads_find_separable_groups(blobs) -> None:
    features, labels, neighbors = blobs
    probabilities = train_candidate_heads(
        features,
        neighbors,
        [2, 3, 4, 5, 6],
        num_heads=2,
        entropy_weight=5.0,
        steps=300,
        batch_size=128,
        lr=1e-2,
        weight_decay=1e-4,
        generator=torch.Generator().manual_seed(0),
    )
    assert {c: p.shape for c, p in probabilities.items()} == {
        c: (len(labels), c) for c in [2, 3, 4, 5, 6]
    }
    assert torch.allclose(probabilities[4].sum(1), torch.ones(len(labels)))
    assert metrics.cluster_accuracy(labels, probabilities[4].argmax(1).numpy()) == 1.0
    assert select_num_clusters(probabilities, neighbors, features).chosen == GROUPS


def test_coassignment_is_symmetric_and_sums_to_one(blobs) -> None:
    _, labels, neighbors = blobs
    matrix = neighbor_coassignment(_one_hot(labels, GROUPS), neighbors)
    assert matrix.shape == (GROUPS, GROUPS)
    np.testing.assert_allclose(matrix, matrix.T)
    assert matrix.sum() == pytest.approx(1.0)
    assert np.all(np.diag(matrix) > 5 * (matrix - np.diag(np.diag(matrix))).max())


def test_merging_joins_the_most_confused_clusters_first() -> None:
    # Clusters 0/3 and 1/2 share many neighbour pairs; the pairs barely touch each other.
    matrix = np.array(
        [
            [0.20, 0.00, 0.01, 0.05],
            [0.00, 0.20, 0.06, 0.00],
            [0.01, 0.06, 0.15, 0.00],
            [0.05, 0.00, 0.00, 0.21],
        ]
    )
    np.testing.assert_array_equal(merge_groups(matrix, 2), [0, 1, 1, 0])
    # The first merge takes the pair with the larger share of the smaller cluster: 1 and 2.
    np.testing.assert_array_equal(merge_groups(matrix, 3), [0, 1, 1, 2])
    np.testing.assert_array_equal(merge_groups(matrix, 4), [0, 1, 2, 3])
    np.testing.assert_array_equal(merge_groups(matrix, 1), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="into 1..4"):
        merge_groups(matrix, 5)


def test_merged_probabilities_add_up_within_groups() -> None:
    probabilities = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    merged = merge_probabilities(probabilities, np.array([0, 1, 1, 0]))
    torch.testing.assert_close(merged, torch.tensor([[0.5, 0.5], [0.8, 0.2]]))


def test_config_takes_a_range_instead_of_k() -> None:
    config = make_config("tiny", num_clusters_range=[3, 6], overcluster=2)
    assert config.num_clusters == 3  # a placeholder until the pipeline chooses
    assert config.candidate_counts() == [3, 4, 5, 6]
    assert config.possible_cluster_counts() == [3, 4, 5, 6, 8, 10, 12]
    assert make_config("tiny").candidate_counts() == [10]
    for bad in ([6, 3], [1, 4]):
        with pytest.raises(ConfigError, match="2 <= low <= high"):
            make_config("tiny", num_clusters_range=bad)
    with pytest.raises(ConfigError, match="inside num_clusters_range"):
        make_config("tiny", num_clusters=9, num_clusters_range=[3, 6])
    assert default_cluster_range(36) == (2, 3)
    assert default_cluster_range(10_000) == (2, 20)
    assert default_cluster_range(5) == (2, 2)


@pytest.mark.slow
def test_the_pipeline_chooses_the_true_number_of_classes(k_selection_run) -> None:
    """4 classes of shapes, candidates 2..6, no labels used: K = 4 is chosen and trained."""
    result = k_selection_run.result
    selection = result.k_selection
    assert selection is not None and selection["chosen"] == 4, selection
    assert [c["num_clusters"] for c in selection["candidates"]] == [2, 3, 4, 5, 6]
    for candidate in selection["candidates"]:
        assert {"score", "consistency", "balance", "silhouette", "small_clusters"} <= set(candidate)
    assert [r.num_clusters for r in result.results] == [4]
    assert result.report["config"]["num_clusters"] == 4
    assert result.report["config"]["num_clusters_range"] == [2, 6]
    assert result.report["k_selection"] == selection == result.metrics["k_selection"]
    assert "select_k" in result.timings
    assert (k_selection_run.work_dir / "select_k.pt").is_file()
    final = result.results[0].metrics.get("selflabel") or result.results[0].metrics["scan"]
    assert final["acc"] >= 0.85, final


@pytest.mark.slow
def test_a_rerun_resumes_with_the_same_choice(k_selection_run, tmp_path) -> None:
    from scan_engine import pipeline

    work = tmp_path / "work"
    shutil.copytree(k_selection_run.work_dir, work)
    again = pipeline.run(k_selection_run.train, k_selection_run.config, work)
    assert again.k_selection == k_selection_run.result.k_selection
    np.testing.assert_array_equal(
        again.results[0].assignments, k_selection_run.result.results[0].assignments
    )


@pytest.mark.slow
def test_command_line_chooses_k_when_none_is_given(k_selection_run, tmp_path, capsys) -> None:
    import json

    from scan_engine.cli.cluster import main

    folder = k_selection_run.shapes_folder
    short = ["--preset", "tiny", "--quiet", "--set", "pretext.epochs=1", "--set", "scan.epochs=1"]
    short += ["--set", "selflabel.epochs=1", "--set", "k_selection.steps=20"]
    out = tmp_path / "out"
    assert main([str(folder), "--clusters-range", "2-3", "--out", str(out), *short]) == 0
    report = json.loads((out / "report.json").read_text())
    chosen = report["k_selection"]["chosen"]
    assert chosen in (2, 3) and report["config"]["num_clusters"] == chosen
    assert (out / "assignments.csv").is_file() and not list(out.glob("assignments_c*.csv"))
    assert json.loads(capsys.readouterr().out)["k_selection"]["chosen"] == chosen
    both = main([str(folder), "--clusters", "3", "--clusters-range", "2-3", *short])
    assert both == 2 and "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(folder), "--clusters-range", "two-three"])
