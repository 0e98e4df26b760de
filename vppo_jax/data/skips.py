"""Counting skipped prompts per reason for the metrics, with one warning per reason; and
stopping a stream in which nothing is usable."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence

from vppo_jax.data.prompts import SKIP_REASONS, Prompt
from vppo_jax.errors import InputError

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


class UnusableSourceGuard:
    """Raises InputError once every row of a source has been skipped since the last usable prompt.

    A training stream repeats forever and the trainer reads until it has enough prompts, so
    files whose rows are all bad would be read forever. Rows are told apart by index: a row
    that is usable is never among the skipped, so the error cannot come while one exists. The
    rows a process reads are its shard's (pipeline.py), so with several processes a process
    sees every row only over several epochs: the error comes later, never wrongly. grain maps
    rows in several threads, hence the lock.
    """

    def __init__(self, num_rows: int, files: Sequence[str]):
        self.num_rows = num_rows
        self.files = list(files)
        self._reasons: dict[int, str] = {}  # row index -> why it was skipped, since the last usable prompt
        self._first_detail = ""
        self._lock = threading.Lock()

    def observe(self, prompt: Prompt):
        with self._lock:
            if not prompt.skipped:
                self._reasons.clear()
                return
            self._first_detail = self._first_detail or prompt.skip_detail
            self._reasons[prompt.index] = prompt.skip_reason
            if len(self._reasons) < self.num_rows:
                return
            counts = dict(collections.Counter(self._reasons.values()).most_common())
        raise InputError(
            f"none of the {self.num_rows} rows of {self.files} can be used (skipped: {counts}; the first: "
            f"{self._first_detail[:300]}). Check the files and the column names (data.problem_key, "
            "data.answer_key, data.images_key)."
        )

    def __getstate__(self):  # a lock does not pickle; a copy in another process guards its own reads
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
