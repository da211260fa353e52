"""Shared training plumbing: the learning-rate schedule, the time-budget step plan, the reporter."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from scan_engine.results import ProgressEvent, StopRequested
from scan_engine.training import Reporter, StepPlan, cosine_lr, epoch_batches

# ---------------------------------------------------------------- cosine_lr


def test_cosine_lr_warmup_is_linear_up_to_base() -> None:
    values = [cosine_lr(0.4, step, total=100, warmup=4) for step in range(4)]
    assert values == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert cosine_lr(0.4, 4, total=100, warmup=4) == pytest.approx(0.4)  # decay starts at base


def test_cosine_lr_end_value_and_midpoint() -> None:
    base, total = 0.4, 100
    floor = base * 1e-3
    assert cosine_lr(base, 0, total) == pytest.approx(base)
    assert cosine_lr(base, total, total) == pytest.approx(floor)
    assert cosine_lr(base, 10 * total, total) == pytest.approx(floor)  # clamped past the end
    assert cosine_lr(base, total // 2, total) == pytest.approx((base + floor) / 2)
    assert cosine_lr(1.0, total, total, final_ratio=0.1) == pytest.approx(0.1)
    with_warmup = [cosine_lr(base, s, total, warmup=10) for s in range(10, total + 1)]
    assert with_warmup[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(with_warmup, with_warmup[1:], strict=False))


def test_cosine_lr_degenerate_totals() -> None:
    assert math.isfinite(cosine_lr(0.1, 0, total=0))
    assert math.isfinite(cosine_lr(0.1, 0, total=1, warmup=1))


# ---------------------------------------------------------------- StepPlan


def _run_fake_steps(plan: StepPlan, step_s: float, cap: int) -> int:
    step = 0
    while step < plan.total and step < cap:
        time.sleep(step_s)
        plan.after_step(step)
        step += 1
    return step


def test_step_plan_cuts_total_to_fit_budget() -> None:
    plan = StepPlan(epochs=10, steps_per_epoch=10, budget_s=0.3)
    assert plan.total == 100 and plan.epochs == 10
    started = time.monotonic()
    steps = _run_fake_steps(plan, step_s=0.02, cap=100)
    elapsed = time.monotonic() - started
    # 100 steps of 20 ms would take 2 s; the plan keeps about 0.3 s worth (~15 steps).
    assert steps == plan.total
    assert 4 <= plan.total < 40
    assert elapsed < 0.9
    assert plan.epochs == pytest.approx(plan.total / 10)


def test_step_plan_keeps_total_without_budget() -> None:
    plan = StepPlan(epochs=3, steps_per_epoch=7, budget_s=None)
    assert plan.total == 21
    for step in range(10):
        plan.after_step(step)
    assert plan.total == 21


def test_step_plan_keeps_total_with_ample_budget() -> None:
    plan = StepPlan(epochs=2, steps_per_epoch=50, budget_s=60.0)
    _run_fake_steps(plan, step_s=0.02, cap=6)  # calibrates at step 3
    assert plan.total == 100


def test_step_plan_fill_budget_grows_total_to_use_the_budget() -> None:
    plan = StepPlan(epochs=1, steps_per_epoch=5, budget_s=0.6, fill_budget=True)
    assert plan.total == 5
    started = time.monotonic()
    steps = _run_fake_steps(plan, step_s=0.02, cap=200)
    elapsed = time.monotonic() - started
    # 5 planned steps of 20 ms; the budget affords ~30, and the plan takes them.
    assert steps == plan.total
    assert 15 <= plan.total <= 40
    assert 0.3 < elapsed < 1.2


def test_step_plan_without_fill_never_grows() -> None:
    plan = StepPlan(epochs=1, steps_per_epoch=5, budget_s=0.6)
    _run_fake_steps(plan, step_s=0.02, cap=200)
    assert plan.total == 5


def test_step_plan_fill_budget_needs_a_budget() -> None:
    plan = StepPlan(epochs=1, steps_per_epoch=5, budget_s=None, fill_budget=True)
    _run_fake_steps(plan, step_s=0.001, cap=200)
    assert plan.total == 5
    assert StepPlan(epochs=0, steps_per_epoch=5, budget_s=9.0, fill_budget=True).total == 0


def test_step_plan_re_estimates_when_steps_slow_down() -> None:
    plan = StepPlan(epochs=100, steps_per_epoch=5, budget_s=0.5)
    step = 0
    while step < plan.total:
        time.sleep(0.005 if step < 5 else 0.05)  # 10x slower after the first epoch
        plan.after_step(step)
        step += 1
    # Fitted at step 3 to ~100 fast steps; re-fitted at each epoch's end once steps slowed, so
    # the stage ends near its budget instead of running ~100 slow steps (5 s).
    assert step < 40


def test_step_plan_fractional_epochs_and_steady_rate() -> None:
    plan = StepPlan(epochs=0.5, steps_per_epoch=10, budget_s=None)
    assert plan.total == 5
    assert StepPlan(epochs=0, steps_per_epoch=10, budget_s=None).total == 0
    assert plan.steady_rate(items_per_step=8) == 0.0  # nothing timed yet
    _run_fake_steps(plan, step_s=0.02, cap=5)
    rate = plan.steady_rate(items_per_step=8)
    # 8 items per >= 20 ms step: at most 400 items/s, and not absurdly less on a busy box.
    assert 50 < rate <= 8 / 0.02 * 1.01


# ---------------------------------------------------------------- Reporter


def test_reporter_stop_flag_raises() -> None:
    requested = {"stop": False}
    reporter = Reporter({"a": 1.0}, should_stop=lambda: requested["stop"], min_interval_s=0)
    reporter.update("a", 0.1)
    requested["stop"] = True
    with pytest.raises(StopRequested, match="a"):
        reporter.update("a", 0.2)
    # Even a throttled update checks the flag.
    throttled = Reporter({"a": 1.0}, should_stop=lambda: True, min_interval_s=1e9)
    with pytest.raises(StopRequested):
        throttled.update("a", 0.5)


def test_reporter_fractions_monotone_and_bounded() -> None:
    events: list[ProgressEvent] = []
    weights = {"pretext": 6.0, "mine": 1.0, "scan": 2.0, "selflabel": 1.0}
    reporter = Reporter(weights, callback=events.append, min_interval_s=0)
    for stage in weights:
        for stage_fraction in (-0.2, 0.0, 0.25, 0.5, 1.0, 1.3):  # out-of-range ones are clamped
            reporter.update(stage, stage_fraction, f"{stage} {stage_fraction}")
    assert len(events) == 4 * 6
    fractions = [event.fraction for event in events]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert all(0.0 <= e.stage_fraction <= 1.0 for e in events)
    assert all(a <= b + 1e-12 for a, b in zip(fractions, fractions[1:], strict=False))
    assert fractions[0] == 0.0 and fractions[-1] == pytest.approx(1.0)
    # Stage boundaries sit at the normalised cumulative weights.
    end_of_pretext = next(e for e in events if e.stage == "pretext" and e.stage_fraction == 1.0)
    assert end_of_pretext.fraction == pytest.approx(0.6)
    start_of_scan = next(e for e in events if e.stage == "scan")
    assert start_of_scan.fraction == pytest.approx(0.7)
    assert events[0].eta_s is None  # no ETA before any progress
    assert all(e.eta_s is None or e.eta_s >= 0 for e in events)
    assert events[-1].eta_s == pytest.approx(0.0, abs=1e-9)
    assert events[3].message == "pretext 0.5"


def test_reporter_throttles_unless_forced() -> None:
    events: list[ProgressEvent] = []
    reporter = Reporter({"a": 1.0}, callback=events.append, min_interval_s=3600)
    reporter.update("a", 0.0, force=True)
    reporter.update("a", 0.2)  # within the interval: dropped
    reporter.update("a", 0.3)
    reporter.update("a", 1.0, force=True)  # stage ends are always reported
    assert [e.stage_fraction for e in events] == [0.0, 1.0]


def test_reporter_first_update_is_emitted() -> None:
    events: list[ProgressEvent] = []
    Reporter({"a": 1.0}, callback=events.append).update("a", 0.1)
    assert [e.stage_fraction for e in events] == [0.1]


def test_reporter_writes_json_lines(tmp_path: Path) -> None:
    log_path = tmp_path / "log.jsonl"
    reporter = Reporter({"a": 1.0}, log_path=log_path)
    records = [{"stage": "a", "epoch": 0, "loss": 1.5}, {"stage": "a", "epoch": 1, "loss": 0.75}]
    for record in records:
        reporter.log(record)
    lines = log_path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    Reporter({"a": 1.0}).log({"no": "file"})  # without a path: only logged, no error


# ---------------------------------------------------------------- epoch_batches


def test_epoch_batches_drop_short_last_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = epoch_batches(10, 4, generator)
    assert [len(b) for b in batches] == [4, 4]
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == 8
    # Fewer items than a batch: one batch of everything.
    assert [len(b) for b in epoch_batches(3, 8, generator)] == [3]
