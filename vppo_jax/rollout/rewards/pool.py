"""Grading in worker processes with a time limit per answer.

sympy can hang on adversarial model outputs, and a thread cannot be stopped: each answer
is graded in a worker process, and a worker that runs past `timeout_s` is killed (and
reaped, so no zombie is left) and replaced while the others go on. Its answer gets reward
0 and counts as a timeout; a reward that raises (or kills its worker) gets 0 and counts as
an error.

The time limit covers grading only: a worker first starts (Python, numpy, sympy) and
imports the reward's module, and says when it is ready; only then does it get answers.

Workers are started with 'spawn': the trainer has JAX imported (and its threads running),
and forking such a process is unsafe. Spawned workers import the caller's main module, so
a script that scores rewards must guard its entry point with `if __name__ == "__main__":`.
A pool is used by one thread at a time.
"""

import atexit
import collections
import logging
import multiprocessing
import os
import pickle
import signal
import time
from multiprocessing import connection

import numpy as np

from vppo_jax.rollout.rewards.registry import get_reward

DEFAULT_TIMEOUT_S = 10.0
# Each worker is a Python with sympy (about 70 MB), plus whatever the main module imports.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
# To start a worker or import a reward's module: whatever does not finish by then never will.
PREPARE_TIMEOUT_S = 120.0

# Messages to a worker are (_LOAD, reward_fn) or (_GRADE, response, answer); it answers
# _READY after starting and after a load, and (reward, None) or (None, error text) after a grade.
_LOAD, _GRADE, _READY = "load", "grade", "ready"
_TIMED_OUT = object()  # the outcome of a worker that missed its deadline

logger = logging.getLogger(__name__)


class RewardPool:
    """Worker processes that grade rollout batches; reusable across batches, then `close()`.

    with RewardPool(workers=8) as pool:
        rewards, stats = pool.score_responses(responses, answers, "accuracy", timeout_s=10.0)
    """

    def __init__(self, workers=DEFAULT_WORKERS):
        if workers < 1:
            raise ValueError(f"a RewardPool needs at least one worker, got {workers}")
        self._context = multiprocessing.get_context("spawn")
        self._workers = [_Worker(self._context) for _ in range(workers)]

    def score_responses(self, responses, answers, reward="accuracy", timeout_s=DEFAULT_TIMEOUT_S):
        """Grades response i against answer i with the reward registered as `reward`.

        Returns (rewards (N,) float32, {"timeouts": n, "errors": n}); an answer whose
        grading timed out or failed has reward 0.
        """
        if self._workers is None:
            raise RuntimeError("this RewardPool is closed")
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        reward_fn = get_reward(reward)
        rewards = np.zeros(len(responses), np.float32)
        stats = {"timeouts": 0, "errors": 0}
        first_error = None
        todo = collections.deque(range(len(responses)))
        try:
            while todo or self._busy():
                self._hand_out(todo, reward_fn, responses, answers, timeout_s)
                for index, value, failure in self._collect():
                    if failure is None:
                        rewards[index] = value
                    elif failure is _TIMED_OUT:
                        stats["timeouts"] += 1
                    else:
                        stats["errors"] += 1
                        first_error = first_error or failure
        finally:
            # An interrupted batch must not leak a late result into the next one.
            for worker in self._busy():
                self._replace(worker)
        if stats["timeouts"] or stats["errors"]:
            logger.warning(
                "reward %r on %d responses: %d timed out (limit %.1f s), %d failed%s",
                reward,
                len(responses),
                stats["timeouts"],
                timeout_s,
                stats["errors"],
                f"; first failure: {first_error}" if first_error else "",
            )
        return rewards, stats

    def _busy(self):
        return [worker for worker in self._workers if worker.index is not None]

    def _hand_out(self, todo, reward_fn, responses, answers, timeout_s):
        """Gives each idle worker the next answer, or first the reward if it has another."""
        for worker in self._workers:
            if not (todo and worker.ready and worker.index is None):
                continue
            if worker.reward_fn is not reward_fn:
                sent = worker.load(reward_fn)
            else:
                index = todo.popleft()
                sent = worker.grade(index, responses[index], answers[index], timeout_s)
                if not sent:
                    todo.appendleft(index)
            if not sent:  # it died while idle
                self._replace(worker)

    def _collect(self):
        """Waits until a worker answers or a deadline passes.

        Returns (index, reward, failure) for each answer that finished: failure is None,
        _TIMED_OUT or the error text. Timed-out and dead workers are replaced; workers that
        finished starting or loading become ready.
        """
        waiting = [worker for worker in self._workers if not worker.ready or worker.index is not None]
        next_deadline = min(worker.deadline for worker in waiting)
        answered = connection.wait(
            [worker.conn for worker in waiting], timeout=max(0.0, next_deadline - time.monotonic())
        )
        finished = []
        for worker in waiting:
            if worker.conn in answered:
                try:
                    message = worker.conn.recv()
                except (EOFError, ConnectionResetError):
                    message = None
            elif time.monotonic() >= worker.deadline:
                message = _TIMED_OUT
            else:
                continue
            if not worker.ready:
                if message != _READY:
                    raise RuntimeError(
                        "a reward worker could not start, or import its reward: " + _describe_unready(message)
                    )
                worker.ready = True
            elif message is None or message is _TIMED_OUT:
                failure = _TIMED_OUT if message is _TIMED_OUT else "its worker process exited"
                finished.append((worker.index, None, failure))
                self._replace(worker)
            else:
                finished.append((worker.index, *message))
                worker.index = None
        return finished

    def _replace(self, worker):
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._context)

    def close(self):
        """Stops every worker. Closing a closed pool does nothing."""
        for worker in self._workers or []:
            worker.kill()
        self._workers = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _describe_unready(message):
    if message is None:
        return "the process exited (see its stderr)"
    if message is _TIMED_OUT:
        return f"not ready after {PREPARE_TIMEOUT_S:.0f} s"
    return message[1]


_shared_pool = None


def score_responses(responses, answers, reward="accuracy", timeout_s=DEFAULT_TIMEOUT_S):
    """`RewardPool.score_responses` on a pool of DEFAULT_WORKERS workers shared by the
    process, started on first use and closed at exit."""
    global _shared_pool
    if _shared_pool is None:
        _shared_pool = RewardPool()
        atexit.register(_shared_pool.close)
    return _shared_pool.score_responses(responses, answers, reward, timeout_s)


class _Worker:
    """One worker process and our end of its pipe.

    ready: started, and done loading `reward_fn`. index: the response it grades, None when
    idle. deadline: when it must have answered (grading) or be ready (starting, loading).
    """

    def __init__(self, context):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_conn,), name="reward-worker", daemon=True)
        self.process.start()
        child_conn.close()  # so that its death reads as EOF here
        self.ready = False
        self.reward_fn = None
        self.index = None
        self.deadline = time.monotonic() + PREPARE_TIMEOUT_S

    def load(self, reward_fn):
        """Sends it the reward to import; False if the worker is gone."""
        if not self._send((_LOAD, reward_fn)):
            return False
        self.ready = False
        self.reward_fn = reward_fn
        self.deadline = time.monotonic() + PREPARE_TIMEOUT_S
        return True

    def grade(self, index, response, answer, timeout_s):
        """Sends it an answer to grade; False if the worker is gone."""
        if not self._send((_GRADE, response, answer)):
            return False
        self.index = index
        self.deadline = time.monotonic() + timeout_s
        return True

    def _send(self, message):
        try:
            self.conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def kill(self):
        self.process.kill()
        self.process.join()  # reaps it: no zombie
        self.conn.close()


def _serve(conn):
    """The worker's loop: load a reward, grade with it, until the pool closes the pipe."""
    # Ctrl-C and a preemption's SIGTERM (sent to every process of the VM) are the parent's: it
    # finishes grading the step in flight with us, then closes the pool, which stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reward_fn = None
    reply = _READY
    while True:
        try:
            conn.send(reply)
            message = conn.recv_bytes()
        except (EOFError, BrokenPipeError):  # the pool is closed, or its process is gone
            return
        try:
            kind, *args = pickle.loads(message)  # a load imports the reward's module here
            if kind == _LOAD:
                (reward_fn,) = args
                reply = _READY
            else:
                reply = float(reward_fn(*args)), None
        except Exception as error:  # the reward raised, or its module does not import here
            reply = None, f"{type(error).__name__}: {error}"
