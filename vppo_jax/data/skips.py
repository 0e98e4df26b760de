"""Counting skipped prompts per reason for the metrics, with one warning per reason."""

from __future__ import annotations

import collections
import logging

from vppo_jax.data.prompts import SKIP_REASONS, Prompt

log = logging.getLogger(__name__)


class SkipCounter:
    """skips = SkipCounter()
    prompts = [p for p in prompts if not skips.count(p)]
    metrics.update(skips.metrics())   # {"data/skipped_bad_image": 3, ...}, totals since creation
    """

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()

    def count(self, prompt: Prompt) -> bool:
        """True (and counted) when the prompt was skipped; the first skip of each reason is logged."""
        if not prompt.skipped:
            return False
        if not self.counts[prompt.skip_reason]:
            log.warning(
                "Skipping an example (%s): %s. Later '%s' skips are only counted, in data/skipped_%s.",
                prompt.skip_reason,
                prompt.skip_detail,
                prompt.skip_reason,
                prompt.skip_reason,
            )
        self.counts[prompt.skip_reason] += 1
        return True

    def metrics(self) -> dict[str, int]:
        """Every reason, zeros included, so the metric keys never change during a run."""
        return {f"data/skipped_{reason}": self.counts[reason] for reason in SKIP_REASONS}
