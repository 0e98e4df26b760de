"""Stopping a run cleanly when it is told to: SIGTERM (a preemptible VM's notice, a scheduler)
or SIGINT (Ctrl-C).

A signal does not stop the step in flight: its handler only takes note. When the step has
finished (metrics written), the trainer asks `stop_after(steps_done)`; on a yes it checkpoints
that step, waits for the writes, stops its reward workers and exits with `Preempted` (exit
status 75). No step that finished is lost, and none is half done in a checkpoint. A second
signal stops the process at once (the last complete checkpoint still resumes it).

Several processes must stop after the same step, or the collectives of the next one would
wait forever for those that left. The answer of `stop_after` is the same on all of them:

* SIGTERM goes to JAX's preemption service, which the processes of a `jax.distributed` run
  share (on a Cloud TPU it also hears the VM's maintenance notices): a notice that reaches
  any process is agreed on at the next step boundary (`reached_preemption_sync_point`, the
  mechanism orbax uses too);
* a signal this module handles itself (SIGINT; SIGTERM when there is no such service) is
  gathered from every process at each step boundary.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
from jax.experimental import multihost_utils

from vppo_jax.parallel import distributed


class Preempted(Exception):
    """The run stopped after a finished step, at a signal; its checkpoint resumes it."""

    exit_status = 75  # EX_TEMPFAIL: try again (the programs' exit statuses: vppo_jax/io/cli.py)
    line_prefix = "preempted"


def _jax_hears_sigterm() -> bool:
    """Whether SIGTERM is JAX's: a multi-process run with the preemption service on (its default).
    Our own handler would replace the one the service installed."""
    return jax.process_count() > 1 and jax.config.jax_enable_preemption_service


class PreemptionWatch:
    """A context manager: inside it SIGTERM and SIGINT are noted, not obeyed; `stop_after` says
    when to stop. The previous handlers are back on exit."""

    def __init__(self):
        self.signal_name: str | None = None  # the first signal this process received
        self._previous = {}

    def __enter__(self):
        signals = [signal.SIGINT] + ([] if _jax_hears_sigterm() else [signal.SIGTERM])
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _note(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # the second one: stop now, as without this watch
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
            os.kill(os.getpid(), signum)
            return
        self.signal_name = name
        print(
            f"{name}: the step in flight finishes, then a checkpoint is written and the run stops "
            f"({name} again stops at once)",
            file=sys.stderr,
            flush=True,
        )

    def stop_after(self, steps_done: int) -> str | None:
        """Called by every process after each step: the reason to stop now (the signal's name),
        the same on every process, or None to go on."""
        if jax.process_count() == 1:
            return self.signal_name
        reasons = [name for name in distributed.allgather(self.signal_name) if name]
        # Called at every step, as the service needs; orbax's saves call it with the same numbers.
        if _jax_hears_sigterm() and multihost_utils.reached_preemption_sync_point(steps_done):
            reasons.append("SIGTERM")
        return reasons[0] if reasons else None
