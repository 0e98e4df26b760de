"""Collapse never passes in silence: watching how many groups dynamic sampling keeps.

Dynamic sampling keeps only groups whose rewards differ (GRPO advantages are zero
otherwise). A policy that collapses (every response truncated, or every answer right or
wrong on every prompt) leaves no such group, and then no update can bring it back: every
later step would train on nothing. The reference (verl's DAPO recipe) stops with an error
after `max_num_gen_batches` rounds; we pad the batch after `rollout.max_filter_rounds`
rounds, so this guard watches the padding instead:

* a step whose batch holds fewer live groups than `rollout.min_live_share` of
  `rollout.prompts_per_step` is *starved*; it is logged and counted in the metrics;
* a step with no live group at all is *empty*: the trainer takes no optimizer update
  on it (there is no gradient, only Adam's momentum and weight decay to replay);
* after `rollout.max_starved_steps` consecutive starved steps the run stops with an
  error that names the cause and the settings that change it.
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)


class CollapseError(RuntimeError):
    """Dynamic sampling kept too few groups for too many consecutive steps."""

    exit_status = 3  # the programs' exit statuses: vppo_jax/io/cli.py


@dataclasses.dataclass
class CollapseGuard:
    prompts_per_step: int
    min_live_share: float
    max_starved_steps: int  # 0: count and warn, never stop
    starved_streak: int = 0
    empty_steps: int = 0
    symptoms: str = ""  # of the last starved step, for the error

    def observe(self, step: int, live_groups: int, rollout_metrics: dict) -> dict[str, float]:
        """Updates the counters with one step's batch; returns the metrics to log."""
        share = live_groups / self.prompts_per_step
        starved = share < self.min_live_share or live_groups == 0
        self.empty_steps += live_groups == 0
        self.starved_streak = self.starved_streak + 1 if starved else 0
        metrics = {
            "rollout/live_share": share,
            "rollout/empty_steps": self.empty_steps,
            "rollout/starved_streak": self.starved_streak,
        }
        if not starved:
            return metrics
        self.symptoms = _symptoms(rollout_metrics)
        log.warning(
            "Step %d: dynamic sampling kept %d of %d groups (%s)%s.",
            step,
            live_groups,
            self.prompts_per_step,
            self.symptoms,
            "; no update" if live_groups == 0 else "",
        )
        return metrics

    def stop_if_collapsed(self, step: int):
        """Raises CollapseError when the streak of starved steps has reached `max_starved_steps`
        (called once the step's metrics and checkpoint are written)."""
        if self.max_starved_steps and self.starved_streak >= self.max_starved_steps:
            raise CollapseError(
                f"The policy has collapsed: for {self.starved_streak} consecutive steps (up to step {step}) dynamic "
                f"sampling kept fewer than {self.min_live_share:.0%} of rollout.prompts_per_step="
                f"{self.prompts_per_step} groups with mixed rewards ({self.symptoms} at the last step), so there is "
                "no gradient left to learn from. Look at entropy, rollout/response_length and rollout/truncated in "
                "metrics.jsonl. Settings that change this: optim.learning_rate (lower) and optim.warmup_steps, "
                "rollout.max_filter_rounds (more rounds to fill the batch), rollout.max_new_tokens (a budget the "
                "answers fit in), algo.accuracy_bounds; rollout.min_live_share and rollout.max_starved_steps "
                "(0: never stop) set this guard."
            )

    def state(self) -> dict:
        return {"starved_streak": self.starved_streak, "empty_steps": self.empty_steps}

    def restore(self, state: dict):
        """From `state()`; a checkpoint written before the guard existed restores zeros."""
        self.starved_streak, self.empty_steps = state.get("starved_streak", 0), state.get("empty_steps", 0)


def _symptoms(rollout_metrics: dict) -> str:
    return (
        f"sampled accuracy {rollout_metrics['rollout/accuracy']:.2f}, "
        f"{rollout_metrics['rollout/truncated']:.0%} of responses truncated"
    )
