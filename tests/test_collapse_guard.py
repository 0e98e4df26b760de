"""The collapse guard's counting, against hand-worked sequences of live-group counts."""

import pytest

from vppo_jax.trainer.collapse_guard import CollapseError, CollapseGuard

ROLLOUT = {"rollout/accuracy": 0.0, "rollout/truncated": 1.0}


def observe_all(guard, live_counts):
    return [guard.observe(step, live, ROLLOUT) for step, live in enumerate(live_counts)]


def test_starved_and_empty_steps_are_counted_and_a_healthy_step_resets_the_streak():
    guard = CollapseGuard(prompts_per_step=8, min_live_share=0.25, max_starved_steps=0)
    metrics = observe_all(guard, [8, 1, 0, 2, 0, 1, 5])
    # 1 of 8 is below a quarter, 2 of 8 is not: starved at steps 1, 2, 4, 5.
    assert [m["rollout/starved_streak"] for m in metrics] == [0, 1, 2, 0, 1, 2, 0]
    assert [m["rollout/empty_steps"] for m in metrics] == [0, 0, 1, 1, 2, 2, 2]
    assert [m["rollout/live_share"] for m in metrics] == [1.0, 0.125, 0.0, 0.25, 0.0, 0.125, 0.625]
    guard.stop_if_collapsed(6)  # max_starved_steps=0: never stops


def test_the_guard_stops_at_the_configured_streak_and_not_before():
    guard = CollapseGuard(prompts_per_step=4, min_live_share=0.0, max_starved_steps=3)
    for step, live in enumerate([0, 0]):
        guard.observe(step, live, ROLLOUT)  # with min_live_share 0 only empty steps starve
        guard.stop_if_collapsed(step)
    guard.observe(2, 0, ROLLOUT)
    with pytest.raises(CollapseError, match=r"3 consecutive steps \(up to step 2\).*100% of responses truncated"):
        guard.stop_if_collapsed(2)


def test_the_counters_resume_from_a_checkpoint():
    guard = CollapseGuard(prompts_per_step=8, min_live_share=0.5, max_starved_steps=3)
    observe_all(guard, [0, 1])
    resumed = CollapseGuard(prompts_per_step=8, min_live_share=0.5, max_starved_steps=3)
    resumed.restore(guard.state())
    resumed.observe(2, 3, ROLLOUT)
    with pytest.raises(CollapseError):
        resumed.stop_if_collapsed(2)
    fresh = CollapseGuard(prompts_per_step=8, min_live_share=0.5, max_starved_steps=3)
    fresh.restore({})  # a checkpoint from before the guard
    assert fresh.state() == {"starved_streak": 0, "empty_steps": 0}
